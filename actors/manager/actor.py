"""The OrderManager actor: entry point for orders and supervisor of sagas and services.

It assembles the parts of this package and keeps only the boot, the recovery of unfinished
orders and the routing of messages: placement (``placement``), the live orders (``orders``), the
workflow registry and warm pool (``registry``), carrying out the supervision policy
(``supervision``), the services (``services``) and stock requests (``stock``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ChildActorExited, PoisonMessage, WakeupMessage

from actors.base import AppendCallback, Appender, BaseActor, log
from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.placement import Placement, refuse
from actors.manager.registry import WarmPool, workflow_for
from actors.manager.services import SERVICES, STORE, Ready, Services, process_alive
from actors.manager.stock import INVENTORY, StockForwarder
from actors.manager.supervision import RetryGiveUp, RetryOrder, Supervisor
from messages.commands import (
    AppendDone,
    AppendRejected,
    Batch,
    Configure,
    Configured,
    Drain,
    DrainStatus,
    GetStock,
    IAm,
    Identify,
    Identities,
    InventoryReleasedReply,
    OrderReply,
    PaymentVoidedReply,
    PlaceOrder,
    Refused,
    SagaAborted,
    SagaFinished,
    ServiceMoved,
    ServiceReady,
    SetStock,
    StartSaga,
    StockReport,
)
from messages.errors import ErrorCode
from messages.events import TERMINAL_TYPE_NAMES, Event, OrderPlaced, order_id_of, order_stream
from saga.supervision import RecheckDue, RetryDue, SupervisionPolicy
from saga.views import decode_stream
from store import CODEC, SqliteEventStore

MAX_SAGAS_RECOVERING_PROCESS = 16  # recovery sagas started at once on the process bases
WATCHDOG_PERIOD = 0.5  # seconds between liveness checks of service and saga processes
WATCHDOG = "watchdog"


class NotConfiguredError(RuntimeError):
    """The manager was asked to do something that needs Configure first."""


class OrderManager(BaseActor):
    """Places orders, starts their sagas, and supervises sagas and services."""

    actor_name = "manager"

    def __init__(self) -> None:
        super().__init__()
        self._config: Configure | None = None
        self._boot: tuple[Any, int] | None = None
        self._reader: SqliteEventStore | None = None
        self._appender = Appender(self, "manager")
        self._orders = LiveOrders()
        self._placement = Placement(self._orders, self)
        self._services: Services | None = None
        self._supervisor: Supervisor | None = None
        self._pool: WarmPool | None = None
        self._stock = StockForwarder(self._inventory_if_available, self.send)
        # Orders to recover, started a few at a time: on the process bases each saga is a new
        # process, and hundreds at once after a crash would stall the machine.
        self._backlog: deque[str] = deque()
        self._draining = False
        self._stopping = False

    # --- boot -------------------------------------------------------------------------------

    def receiveMsg_Batch(self, msg: Batch, sender: Any) -> None:
        """Handle each request of the batch as if it had come alone (and fail alone)."""
        for message in msg.messages:
            try:
                self.receiveMessage(message, sender)
            except Exception:
                log.exception("manager: %s failed", type(message).__name__)
                req_id = getattr(message, "req_id", None)
                if req_id is not None:
                    message_text = "the system failed on this request"
                    refuse(self.send, (sender, req_id), ErrorCode.INTERNAL, message_text)

    def receiveMsg_Configure(self, msg: Configure, sender: Any) -> None:
        """Start the store first (it creates the schema), then the services that read it."""
        if self._config is not None:
            self.send(sender, Configured(req_id=msg.req_id, recovered=len(self._orders)))
            return
        self._config = msg
        self._boot = (sender, msg.req_id)
        policy = SupervisionPolicy(max_failures=msg.max_saga_failures, retry_every=msg.step_timeout)
        self._supervisor = Supervisor(policy, self)
        self._pool = WarmPool(self.createActor, msg.warm_sagas)
        self._services = Services(msg, self.createActor, self.send, self.wake_after, self._started)
        self._services.start(STORE)

    def _started(self, name: str, address: Any) -> None:
        if name == STORE:
            self._appender.store = address

    def receiveMsg_ServiceReady(self, msg: ServiceReady, sender: Any) -> None:
        """A service is up: continue the boot, or tell the sagas where a restarted one is."""
        services = self._svc
        ready = services.ready(msg, sender)
        if ready == Ready.STALE:
            return
        if ready == Ready.FIRST and msg.name == STORE:
            self._reader = SqliteEventStore(self._cfg.db_path, readonly=True)
            services.start("inventory")
            services.start("payment")
            return
        if ready == Ready.RESTARTED:
            log.warning(
                "manager: %s restarted (pid %d); telling %d sagas",
                msg.name,
                msg.pid,
                self._orders.running,
            )
            if msg.name == STORE:
                self._appender.resend()  # placements not yet acknowledged
                for other in ("inventory", "payment"):  # they append through the store too
                    services.restart(other)
            moved = ServiceMoved(service=msg.name, address=sender)
            for live in self._orders:
                if live.saga is not None:
                    self.send(live.saga, moved)
            return
        if services.all_ready() and self._boot is not None:
            if self._cfg.crash_exits_process:
                self.wake_after(WATCHDOG_PERIOD, WATCHDOG)
            recovered = self._recover_unfinished()
            gateway, req_id = self._boot
            self._boot = None
            self.send(gateway, Configured(req_id=req_id, recovered=recovered))

    @property
    def _cfg(self) -> Configure:
        if self._config is None:
            raise NotConfiguredError("the manager has not been configured")
        return self._config

    @property
    def _svc(self) -> Services:
        if self._services is None:
            raise NotConfiguredError("the manager has not been configured")
        return self._services

    @property
    def _store_reader(self) -> SqliteEventStore:
        if self._reader is None:
            raise NotConfiguredError("the store is not open yet")
        return self._reader

    def _recover_unfinished(self) -> int:
        """Drive on every order whose stream has no terminal event (start-up recovery)."""
        for head in self._store_reader.stream_heads(order_stream("")):
            if head.last_type not in TERMINAL_TYPE_NAMES:
                self._backlog.append(order_id_of(head.stream))
        count = len(self._backlog)
        if count:
            log.warning("manager: recovering %d unfinished orders", count)
        self._drain_backlog()
        return count

    def _drain_backlog(self) -> None:
        """Start recovery sagas while fewer than the limit run."""
        limit = MAX_SAGAS_RECOVERING_PROCESS if self._cfg.crash_exits_process else 10_000
        while self._backlog and self._orders.running < limit:
            order_id = self._backlog.popleft()
            events = self.read_order(order_id)
            placed = events[0] if events else None
            if not isinstance(placed, OrderPlaced):
                log.error("manager: stream of %s does not start with OrderPlaced", order_id)
                continue
            live = self._orders.add(LiveOrder(placed=placed, committed=True))
            if live.saga is None:
                self.spawn(live, events, compensate=False)

    # --- what the parts ask of the actor ----------------------------------------------------

    def accepting(self) -> bool:
        """Whether new orders are accepted now (booted, not draining)."""
        return not self._draining and self._boot is None and self._config is not None

    def append_events(
        self, stream: str, events: Sequence[Event], expected_version: int, done: AppendCallback
    ) -> None:
        """Append events with fresh ids through the manager's appender."""
        ids = [CODEC.new_id() for _ in events]
        self._appender.append(stream, events, ids, expected_version, done)

    def append_with_ids(
        self,
        stream: str,
        events: Sequence[Event],
        event_ids: Sequence[str],
        expected_version: int,
        done: AppendCallback,
    ) -> None:
        """Append events with the given ids through the manager's appender."""
        self._appender.append(stream, events, event_ids, expected_version, done)

    def read_order(self, order_id: str) -> list[Event]:
        """The order's stream, decoded."""
        return decode_stream(self._store_reader.read_stream(order_stream(order_id)))

    def order_version(self, order_id: str) -> int:
        """The order stream's head version."""
        return self._store_reader.stream_version(order_stream(order_id))

    def spawn(self, live: LiveOrder, events: Sequence[Event], *, compensate: bool) -> None:
        """Start a saga (from the warm pool) that drives the order on from these events."""
        if self._pool is None:
            raise NotConfiguredError("the manager has not been configured")
        saga = self._pool.take(workflow_for(events[0]))
        self._orders.attach(live, saga)
        addresses = self._svc.addresses
        self.send(
            saga,
            StartSaga(
                order_id=live.placed.order_id,
                events=tuple(events),
                compensate=compensate,
                inventory=addresses["inventory"],
                payment=addresses["payment"],
                store=addresses[STORE],
                step_timeout=self._cfg.step_timeout,
                report_pid=self._cfg.crash_exits_process,
            ),
        )

    def respawn(self, live: LiveOrder) -> None:
        """A compensating saga for the order, rebuilt from its stream."""
        self.spawn(live, self.read_order(live.placed.order_id), compensate=True)

    def send_to_service(self, name: str, msg: Any) -> None:
        """Send to a service actor by name (its current address)."""
        self.send(self._svc.addresses[name], msg)

    def wake_after(self, seconds: float, payload: Any) -> None:
        """A WakeupMessage with `payload` after `seconds`."""
        self.wakeupAfter(timedelta(seconds=seconds), payload=payload)

    def end(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """The order is terminal: answer everyone waiting for it (once)."""
        if not self._orders.remove(live):
            return  # ended already
        self._drain_backlog()
        for gateway, req_id in live.waiters + live.acks:
            self.send(gateway, OrderReply(req_id=req_id, order=view))

    def _inventory_if_available(self) -> Any:
        services = self._services
        if services is None or not services.available(INVENTORY):
            return None
        return services.addresses[INVENTORY]

    # --- placing orders ---------------------------------------------------------------------

    def receiveMsg_PlaceOrder(self, msg: PlaceOrder, sender: Any) -> None:
        """Accept an order once; answer when OrderPlaced is durable or when it is terminal."""
        self._placement.place(msg, sender)

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """An append of ours is durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """An append of ours was refused."""
        self._appender.settle(msg)

    # --- saga supervision -------------------------------------------------------------------

    def receiveMsg_SagaFinished(self, msg: SagaFinished, sender: Any) -> None:
        """The order is terminal: answer everyone waiting for it."""
        # Its exit comes next as ChildActorExited and must not look like a death.
        self._orders.saga_finished(msg.saga_key)
        live = self._orders.get(msg.order_id)
        if live is not None:
            self.end(live, msg.order)

    def receiveMsg_SagaAborted(self, msg: SagaAborted, sender: Any) -> None:
        """The saga gave up (it raised, or its stream moved): recover and compensate."""
        log.error("manager: saga for %s aborted: %s", msg.order_id, msg.reason)
        live = self._orders.get(msg.order_id)
        # A late abort of a saga already replaced (its exit overtook it) changes nothing.
        if live is not None and live.saga is not None and live.saga == sender:
            self._recover_saga(live, msg.reason)

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A saga raised on its start: recover and compensate."""
        log.error("manager: %s poisoned by %s", sender, type(msg.poisonMessage).__name__)
        live = self._orders.by_saga(sender)
        if live is not None:
            self._recover_saga(live, f"raised on {type(msg.poisonMessage).__name__}")

    def _recover_saga(self, live: LiveOrder, reason: str) -> None:
        """The order's saga is gone; the supervision policy says what comes next."""
        if self._stopping or self._supervisor is None:
            return
        if live.saga is not None:
            self.send(live.saga, ActorExitRequest())
            self._orders.detach(live)
        self._supervisor.saga_failed(live, reason)

    def receiveMsg_InventoryReleasedReply(self, msg: InventoryReleasedReply, sender: Any) -> None:
        """Inventory released an order the supervisor is ending."""
        live = self._orders.get(msg.order_id)
        if live is not None and self._supervisor is not None:
            self._supervisor.answer(live, msg)

    def receiveMsg_PaymentVoidedReply(self, msg: PaymentVoidedReply, sender: Any) -> None:
        """Payment voided an order the supervisor is ending."""
        live = self._orders.get(msg.order_id)
        if live is not None and self._supervisor is not None:
            self._supervisor.answer(live, msg)

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        """A saga or service process ended: recover what it was doing."""
        if self._stopping:
            return
        child = msg.childAddress
        if self._orders.exit_expected(str(child)):
            return  # a saga that reported its order terminal, exiting as it should
        name = self._services.name_of(child) if self._services is not None else None
        if name is not None:
            self._svc.died(name)
            return
        live = self._orders.by_saga(child)
        if live is not None:
            log.error("manager: saga for %s died; compensating", live.placed.order_id)
            self._recover_saga(live, "its process died")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A back-off passed, a service restart is due, or the watchdog's round."""
        if self._stopping or self._supervisor is None:
            return
        payload = msg.payload
        if payload == WATCHDOG:
            self._watchdog()
        elif isinstance(payload, RetryOrder):
            live = self._orders.get(payload.order_id)
            if live is not None and live.saga is None:
                self._supervisor.feed(live, RetryDue())
        elif isinstance(payload, RetryGiveUp):
            live = self._orders.get(payload.order_id)
            if live is not None:
                self._supervisor.feed(live, RecheckDue())
        elif isinstance(payload, str) and payload in SERVICES:
            self._svc.restart(payload)

    def _watchdog(self) -> None:
        """Thespian's queue base can miss a killed child, so on the process bases the manager
        also checks the processes of its services and sagas itself."""
        self._svc.check()
        for live in self._orders:
            if live.pid is not None and not process_alive(live.pid):
                log.error(
                    "manager: watchdog found the saga of %s (pid %d) dead",
                    live.placed.order_id,
                    live.pid,
                )
                self._recover_saga(live, "its process died")
        self.wake_after(WATCHDOG_PERIOD, WATCHDOG)

    # --- stock, drain, identity --------------------------------------------------------------

    def receiveMsg_GetStock(self, msg: GetStock, sender: Any) -> None:
        """Ask Inventory; its answer goes back to the gateway."""
        self._stock.forward(msg, sender)

    def receiveMsg_SetStock(self, msg: SetStock, sender: Any) -> None:
        """Ask Inventory; its answer goes back to the gateway."""
        self._stock.forward(msg, sender)

    def receiveMsg_StockReport(self, msg: StockReport, sender: Any) -> None:
        """Inventory's answer to a forwarded request."""
        self._stock.answer(msg)

    def receiveMsg_Refused(self, msg: Refused, sender: Any) -> None:
        """Inventory refused a forwarded request."""
        self._stock.answer(msg)

    def receiveMsg_Drain(self, msg: Drain, sender: Any) -> None:
        """Stop taking new orders; report how many are still running."""
        self._draining = True
        self._stopping = self._stopping or msg.final
        self.send(sender, DrainStatus(req_id=msg.req_id, in_flight=len(self._orders)))

    def receiveMsg_Identify(self, msg: Identify, sender: Any) -> None:
        """The OS pids of the manager, the services and (on the process bases) live sagas."""
        services = self._services.pids if self._services is not None else {}
        pids = {"manager": os.getpid(), **services, **self._orders.pids()}
        self.send(sender, Identities(req_id=msg.req_id, pids=pids))

    def receiveMsg_IAm(self, msg: IAm, sender: Any) -> None:
        """A saga on a process base tells its pid, so the watchdog can see it die."""
        live = self._orders.get(msg.name.removeprefix("saga:"))
        if live is not None and live.saga == sender:
            live.pid = msg.pid

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        """Orderly shutdown: children die with us; do not restart or recover them."""
        self._stopping = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
