"""The OrderManager: entry point for orders, workflow registry, and supervisor.

- ``PlaceOrder`` is idempotent by order id: the stream ``order-{id}`` is created with
  expected version NO_STREAM, so a second placement of the same id finds the first (same order:
  same answer; different order: ``conflict``), also across restarts.
- After ``OrderPlaced`` commits, the workflow registered for it (``OrderSaga``) is created for
  the order, like the seed's ``AddWorkflow<OrderPlacedEvent, OrderFulfillmentSaga>()``.
- Supervision: a saga that aborts, is poisoned or whose process dies is recovered from its stream
  and compensated. A dead service is restarted (with back-off) from its durable state and the
  sagas are told its new address. On start every order without a terminal event is driven on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from thespian.actors import (
    Actor,
    ActorExitRequest,
    ChildActorExited,
    PoisonMessage,
    WakeupMessage,
)

from actors.base import Appender, BaseActor, log
from actors.event_store import EventStoreActor
from actors.inventory import InventoryActor
from actors.payment import PaymentActor
from actors.saga import OrderSaga
from messages.base import OrderStatus, order_total, utcnow
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
    OrderReply,
    PaymentVoidedReply,
    PlaceOrder,
    Refused,
    ReleaseStock,
    SagaAborted,
    SagaFinished,
    ServiceConfig,
    ServiceMoved,
    ServiceReady,
    SetStock,
    StartSaga,
    StockGivenBack,
    StockReport,
    VoidPayment,
)
from messages.errors import ErrorCode
from messages.events import (
    TERMINAL_TYPE_NAMES,
    Event,
    InventoryReleased,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    PaymentProcessed,
    PaymentRefunded,
    order_stream,
)
from saga.views import decode_stream, order_view
from store import CODEC, NO_STREAM, EventStore, open_store

# --- the workflow registry --------------------------------------------------------------------

WORKFLOWS: dict[type[Event], type[Actor]] = {}


def register_workflow(event_type: type[Event], workflow: type[Actor]) -> None:
    """Run one `workflow` actor per event of `event_type` (the seed's AddWorkflow)."""
    WORKFLOWS[event_type] = workflow


register_workflow(OrderPlaced, OrderSaga)

SERVICES: dict[str, type[Actor]] = {
    "store": EventStoreActor,
    "inventory": InventoryActor,
    "payment": PaymentActor,
}
MAX_SAGAS_RECOVERING_PROCESS = 16  # recovery sagas started at once on the process bases
MAX_FINISHED_REMEMBERED = 100_000
WATCHDOG_PERIOD = 0.5  # seconds between liveness checks of service processes
RESTART_WINDOW = 30.0  # seconds over which restarts of one service count towards back-off
MAX_BACKOFF = 5.0
# Sagas of one order that may fail (raise, abort, die) before the supervisor ends the order
# itself; with the back-off above that is about 16 s of retrying.
MAX_SAGA_FAILURES = 8

WATCHDOG = "watchdog"


@dataclass(frozen=True)
class RetryOrder:
    """Wakeup payload: try the order's saga again after a back-off."""

    order_id: str


@dataclass(frozen=True)
class RetryGiveUp:
    """Wakeup payload: the last resort for an order is not done yet; ask again."""

    order_id: str


Waiter = tuple[Any, int]  # (gateway address, req_id)


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie of ours (reaping it if it is)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child, or already reaped by Thespian
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LiveOrder:
    """An order the manager is placing or driving."""

    placed: OrderPlaced
    saga: Any = None
    pid: int | None = None  # the saga's process (process bases)
    failures: int = 0  # sagas of this order that aborted or died
    committed: bool = False
    waiters: list[Waiter] = field(default_factory=list)  # want the terminal status
    acks: list[Waiter] = field(default_factory=list)  # want to know OrderPlaced is durable
    # The supervisor's last resort (its sagas kept failing): why, and what the services said.
    giving_up: str | None = None
    released: StockGivenBack | None = None
    voided: PaymentVoidedReply | None = None
    finish_paid: bool = False  # the charge is recorded: the supervisor records OrderPaid
    recording: bool = False  # the supervisor's terminal append is out


def same_order(a: OrderPlaced, b: OrderPlaced) -> bool:
    """Whether two placements describe the same order (timestamps aside)."""
    return (a.customer_id, a.lines, a.payment_method) == (b.customer_id, b.lines, b.payment_method)


class OrderManager(BaseActor):
    """Places orders, starts their sagas, and supervises sagas and services."""

    actor_name = "manager"

    def __init__(self) -> None:
        super().__init__()
        self._config: Configure | None = None
        self._boot: Waiter | None = None
        self._reader: EventStore | None = None
        self._appender = Appender(self, "manager")
        self._services: dict[str, Any] = {}
        self._service_pids: dict[str, int] = {}
        self._restarting: set[str] = set()  # services between death and the new one's ready
        self._ready: set[str] = set()
        self._restarts: dict[str, list[float]] = {}
        self._live: dict[str, LiveOrder] = {}
        self._running = 0  # live orders with a saga actor
        self._finished_sagas: dict[str, None] = {}  # insertion-ordered set of saga addresses
        self._forwarded: dict[int, Any] = {}  # req_id -> gateway, for stock requests
        # Orders to recover, started a few at a time: on the process bases each saga is a new
        # process, and hundreds at once after a crash would stall the machine.
        self._backlog: deque[str] = deque()
        self._spares: dict[type[Actor], deque[Any]] = {}  # warm, not yet started workflow actors
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
                    self._refuse(
                        (sender, req_id), ErrorCode.INTERNAL, "the system failed on this request"
                    )

    def receiveMsg_Configure(self, msg: Configure, sender: Any) -> None:
        """Start the store first (it creates the schema), then the services that read it."""
        if self._config is not None:
            self.send(sender, Configured(req_id=msg.req_id, recovered=len(self._live)))
            return
        self._config = msg
        self._boot = (sender, msg.req_id)
        self._start_service("store")

    def _start_service(self, name: str) -> None:
        assert self._config is not None
        address = self.createActor(SERVICES[name])
        self._services[name] = address
        if name == "store":
            self._appender.store = address
        self.send(
            address,
            ServiceConfig(
                name=name,
                store_url=self._config.store_url,
                synchronous=self._config.synchronous,
                store=self._services.get("store"),
                step_timeout=self._config.step_timeout,
                crash_exits_process=self._config.crash_exits_process,
                payment_latency=self._config.payment_latency,
            ),
        )

    def receiveMsg_ServiceReady(self, msg: ServiceReady, sender: Any) -> None:
        """A service is up: continue the boot, or tell the sagas where a restarted one is."""
        if sender != self._services.get(msg.name):
            # An instance that was replaced before it got ready (a second restart overtook it).
            log.warning("manager: ignoring ready from a replaced %s (pid %d)", msg.name, msg.pid)
            self.send(sender, ActorExitRequest())
            return
        self._restarting.discard(msg.name)
        self._service_pids[msg.name] = msg.pid
        first_time = msg.name not in self._ready
        self._ready.add(msg.name)
        if msg.name == "store" and first_time:
            self._reader = open_store(self._cfg.store_url, readonly=True)
            self._start_service("inventory")
            self._start_service("payment")
            return
        if not first_time:
            log.warning(
                "manager: %s restarted (pid %d); telling %d sagas",
                msg.name,
                msg.pid,
                self._running,
            )
            if msg.name == "store":
                self._appender.resend()  # placements not yet acknowledged
                for other in ("inventory", "payment"):  # they append through the store too
                    self._restart(other)
            moved = ServiceMoved(service=msg.name, address=sender)
            for live in self._live.values():
                if live.saga is not None:
                    self.send(live.saga, moved)
            return
        if self._ready >= set(SERVICES) and self._boot is not None:
            if self._cfg.crash_exits_process:
                self.wakeupAfter(timedelta(seconds=WATCHDOG_PERIOD), payload=WATCHDOG)
            recovered = self._recover_unfinished()
            gateway, req_id = self._boot
            self._boot = None
            self.send(gateway, Configured(req_id=req_id, recovered=recovered))

    @property
    def _cfg(self) -> Configure:
        assert self._config is not None
        return self._config

    def _read(self, order_id: str) -> list[Event]:
        assert self._reader is not None
        return decode_stream(self._reader.read_stream(order_stream(order_id)))

    def _recover_unfinished(self) -> int:
        """Drive on every order whose stream has no terminal event (start-up recovery)."""
        assert self._reader is not None
        for head in self._reader.stream_heads("order-"):
            if head.last_type not in TERMINAL_TYPE_NAMES:
                self._backlog.append(head.stream.removeprefix("order-"))
        count = len(self._backlog)
        if count:
            log.warning("manager: recovering %d unfinished orders", count)
        self._drain_backlog()
        return count

    def _drain_backlog(self) -> None:
        """Start recovery sagas while fewer than the limit run."""
        limit = MAX_SAGAS_RECOVERING_PROCESS if self._cfg.crash_exits_process else 10_000
        while self._backlog and self._running < limit:
            order_id = self._backlog.popleft()
            events = self._read(order_id)
            placed = events[0] if events else None
            if not isinstance(placed, OrderPlaced):
                log.error("manager: stream of %s does not start with OrderPlaced", order_id)
                continue
            live = self._live.setdefault(order_id, LiveOrder(placed=placed, committed=True))
            if live.saga is None:
                self._spawn(live, events, compensate=False)

    def _forget_saga(self, live: LiveOrder) -> None:
        """The order's saga actor is gone (finished, aborted or dead)."""
        if live.saga is not None:
            live.saga, live.pid = None, None
            self._running -= 1

    def _order_of_saga(self, address: Any) -> LiveOrder | None:
        """The live order driven by this saga address. Addresses are compared with ==: on the
        queue base the address createActor returns prints differently from (and does not hash
        like) the one its messages carry."""
        for live in self._live.values():
            if live.saga is not None and live.saga == address:
                return live
        return None

    # --- placing orders ---------------------------------------------------------------------

    def receiveMsg_PlaceOrder(self, msg: PlaceOrder, sender: Any) -> None:
        """Accept an order once; answer when OrderPlaced is durable or when it is terminal."""
        placed = OrderPlaced(
            order_id=msg.order_id,
            customer_id=msg.customer_id,
            lines=msg.lines,
            total_amount=order_total(msg.lines),
            payment_method=msg.payment_method,
            placed_at=utcnow(),
        )
        waiter = (sender, msg.req_id)
        live = self._live.get(msg.order_id)
        if live is not None:
            if not same_order(live.placed, placed):
                self._refuse(
                    waiter,
                    ErrorCode.CONFLICT,
                    f"order {msg.order_id} exists with different contents",
                )
            elif msg.wait:
                live.waiters.append(waiter)
            elif live.committed:
                self._reply_status(waiter, msg.order_id)
            else:
                live.acks.append(waiter)
            return
        if self._draining or self._boot is not None or self._config is None:
            self._refuse(waiter, ErrorCode.UNAVAILABLE, "the system is not accepting orders now")
            return
        live = LiveOrder(placed=placed)
        (live.waiters if msg.wait else live.acks).append(waiter)
        self._live[msg.order_id] = live
        self._appender.append(
            order_stream(msg.order_id),
            [placed],
            [CODEC.new_id()],
            NO_STREAM,
            self._placed_callback(live),
        )

    def _placed_callback(self, live: LiveOrder) -> Callable[[AppendDone | AppendRejected], None]:
        def placed(reply: AppendDone | AppendRejected) -> None:
            order_id = live.placed.order_id
            if isinstance(reply, AppendDone):
                live.committed = True
                self._spawn(live, [live.placed], compensate=False)
                for waiter in live.acks:
                    self._reply_status(waiter, order_id)
                live.acks.clear()
            elif reply.error == "conflict":
                self._existing_order(live)
            else:
                del self._live[order_id]
                for waiter in live.acks + live.waiters:
                    self._refuse(
                        waiter, ErrorCode.UNAVAILABLE, f"order not recorded: {reply.message}"
                    )

        return placed

    def _existing_order(self, live: LiveOrder) -> None:
        """The stream already exists (placed before, maybe before a restart)."""
        order_id = live.placed.order_id
        events = self._read(order_id)
        first = events[0] if events else None
        waiters = live.acks + live.waiters
        if not isinstance(first, OrderPlaced) or not same_order(first, live.placed):
            del self._live[order_id]
            for waiter in waiters:
                self._refuse(
                    waiter, ErrorCode.CONFLICT, f"order {order_id} exists with different contents"
                )
            return
        view = order_view(order_id, events)
        if view["status"] != OrderStatus.PENDING:
            del self._live[order_id]
            for waiter in waiters:
                self.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
            return
        # Unfinished and nobody drives it (its saga was lost): recover it now.
        live.placed, live.committed = first, True
        for waiter in live.acks:
            self.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
        live.acks.clear()
        self._spawn(live, events, compensate=False)

    def _spawn(self, live: LiveOrder, events: list[Event], *, compensate: bool) -> None:
        saga = self._new_workflow(WORKFLOWS[type(events[0])])
        self._forget_saga(live)
        live.saga = saga
        self._running += 1
        self.send(
            saga,
            StartSaga(
                order_id=live.placed.order_id,
                events=tuple(events),
                compensate=compensate,
                inventory=self._services["inventory"],
                payment=self._services["payment"],
                store=self._services["store"],
                step_timeout=self._cfg.step_timeout,
                report_pid=self._cfg.crash_exits_process,
            ),
        )

    def _new_workflow(self, workflow: type[Actor]) -> Any:
        """A fresh workflow actor: from the warm pool when there is one, then top the pool up.

        On the process bases creating an actor forks a process (10-30 ms); created ahead of
        need, that happens off the order's critical path. Each actor still serves one order.
        """
        spares = self._spares.setdefault(workflow, deque())
        actor = spares.popleft() if spares else self.createActor(workflow)
        while len(spares) < self._cfg.warm_sagas:
            spares.append(self.createActor(workflow))
        return actor

    def _reply_status(self, waiter: Waiter, order_id: str) -> None:
        self.send(
            waiter[0],
            OrderReply(req_id=waiter[1], order=order_view(order_id, self._read(order_id))),
        )

    def _refuse(self, waiter: Waiter, code: ErrorCode, message: str) -> None:
        self.send(waiter[0], Refused(req_id=waiter[1], code=code, message=message))

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """OrderPlaced is durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """OrderPlaced was refused."""
        self._appender.settle(msg)

    # --- saga supervision -------------------------------------------------------------------

    def receiveMsg_SagaFinished(self, msg: SagaFinished, sender: Any) -> None:
        """The order is terminal: answer everyone waiting for it."""
        # Its exit comes next as ChildActorExited; remember it by the address string the saga
        # itself reported, so that exit is recognised without scanning every live order.
        self._finished_sagas[msg.saga_key] = None
        while len(self._finished_sagas) > MAX_FINISHED_REMEMBERED:
            del self._finished_sagas[next(iter(self._finished_sagas))]
        live = self._live.get(msg.order_id)
        if live is not None:
            self._end(live, msg.order)

    def receiveMsg_SagaAborted(self, msg: SagaAborted, sender: Any) -> None:
        """The saga gave up (it raised, or its stream moved): recover and compensate."""
        log.error("manager: saga for %s aborted: %s", msg.order_id, msg.reason)
        live = self._live.get(msg.order_id)
        # A late abort of a saga already replaced (its exit overtook it) changes nothing.
        if live is not None and live.saga is not None and live.saga == sender:
            self._recover_saga(live, msg.reason)

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A saga raised on its start: recover and compensate."""
        log.error("manager: %s poisoned by %s", sender, type(msg.poisonMessage).__name__)
        live = self._order_of_saga(sender)
        if live is not None:
            self._recover_saga(live, f"raised on {type(msg.poisonMessage).__name__}")

    def _recover_saga(self, live: LiveOrder, reason: str) -> None:
        """Replace the order's saga by one rebuilt from the stream, in compensation mode;
        backing off when its sagas keep failing, so a poisonous order cannot spin the system,
        and ending the order without a saga when they fail MAX_SAGA_FAILURES times."""
        if self._stopping:
            return
        if live.saga is not None:
            self.send(live.saga, ActorExitRequest())
            self._forget_saga(live)
        if live.giving_up is not None:
            return
        live.failures += 1
        if live.failures >= MAX_SAGA_FAILURES:
            self._give_up(live, reason)
            return
        if live.failures == 1:
            self._respawn(live)
            return
        delay = min(MAX_BACKOFF, 0.1 * 2 ** (live.failures - 1))
        log.error(
            "manager: order %s failed %d times; next attempt in %.1fs",
            live.placed.order_id,
            live.failures,
            delay,
        )
        self.wakeupAfter(timedelta(seconds=delay), payload=RetryOrder(live.placed.order_id))

    def _respawn(self, live: LiveOrder) -> None:
        self._spawn(live, self._read(live.placed.order_id), compensate=True)

    # --- the last resort ----------------------------------------------------------------------

    def _give_up(self, live: LiveOrder, reason: str) -> None:
        """End an order whose sagas keep failing without running any saga code.

        If its stream is terminal already, that stands. If the charge is recorded, the order is
        paid: record OrderPaid (as a saga resuming it would). Otherwise release its stock and
        void its payment (both idempotent, keyed by the order id, fencing any later reserve or
        charge), then record what was given back and OrderFulfillmentFailed at the head the
        stream was read at (a saga append still in flight then conflicts). Every accepted order
        still ends, exactly once, and compensated; the reason is in the terminal event."""
        order_id = live.placed.order_id
        live.giving_up = f"{live.failures} sagas failed (last: {reason})"
        log.error("manager: order %s: %s; ending it without a saga", order_id, live.giving_up)
        events = self._read_back(order_id)
        if events is not None:
            view = order_view(order_id, events)
            if view["status"] != OrderStatus.PENDING:
                self._end(live, view)
                return
            if any(isinstance(e, PaymentProcessed) for e in events):
                live.finish_paid = True  # charged and recorded: nothing to give back
                self._record_give_up(live)
                self._retry_give_up_later(live)
                return
        self._ask_give_up(live)

    def _read_back(self, order_id: str) -> list[Event] | None:
        """The order's stream, or None if it does not read back (maybe what failed the sagas)."""
        try:
            return self._read(order_id)
        except Exception:
            log.exception("manager: cannot read the stream of %s back", order_id)
            return None

    def _ask_give_up(self, live: LiveOrder) -> None:
        order_id = live.placed.order_id
        why = "the supervisor ended the order: its sagas kept failing"
        if live.released is None:
            self.send(self._services["inventory"], ReleaseStock(order_id=order_id, reason=why))
        if live.voided is None:
            self.send(self._services["payment"], VoidPayment(order_id=order_id, reason=why))
        # Services restart and requests get lost: ask again until both have answered.
        self._retry_give_up_later(live)

    def _retry_give_up_later(self, live: LiveOrder) -> None:
        self.wakeupAfter(
            timedelta(seconds=self._cfg.step_timeout), payload=RetryGiveUp(live.placed.order_id)
        )

    def receiveMsg_StockGivenBack(self, msg: StockGivenBack, sender: Any) -> None:
        """Inventory released an order the supervisor is ending."""
        live = self._live.get(msg.order_id)
        if live is not None and live.giving_up is not None and live.released is None:
            live.released = msg
            self._record_give_up(live)

    def receiveMsg_PaymentVoidedReply(self, msg: PaymentVoidedReply, sender: Any) -> None:
        """Payment voided an order the supervisor is ending."""
        live = self._live.get(msg.order_id)
        if live is not None and live.giving_up is not None and live.voided is None:
            live.voided = msg
            self._record_give_up(live)

    def _record_give_up(self, live: LiveOrder) -> None:
        if live.recording:
            return
        if not live.finish_paid and (live.released is None or live.voided is None):
            return
        assert self._reader is not None
        order_id = live.placed.order_id
        events = self._read_back(order_id)
        if events is None:
            version = self._reader.stream_version(order_stream(order_id))
            events = []
        else:
            view = order_view(order_id, events)
            if view["status"] != OrderStatus.PENDING:
                # Terminal already: a saga's last append landed, or ours committed although
                # the store reported a failure. One terminal event per order.
                self._end(live, view)
                return
            version = len(events) - 1  # the head this decision was made at
        ending = self._give_up_events(live, events)
        live.recording = True
        self._appender.append(
            order_stream(order_id),
            ending,
            [CODEC.new_id() for _ in ending],
            version,
            self._gave_up_callback(live, ending),
        )

    def _give_up_events(self, live: LiveOrder, events: list[Event]) -> list[Event]:
        """What the supervisor records to end the order (`events`: the stream so far)."""
        order_id, now = live.placed.order_id, utcnow()
        processed = next((e for e in events if isinstance(e, PaymentProcessed)), None)
        if live.finish_paid and processed is not None:
            return [
                OrderPaid(
                    order_id=order_id,
                    payment_id=processed.payment_id,
                    payment_method=live.placed.payment_method,
                    amount=live.placed.total_amount,
                    paid_at=now,
                )
            ]
        assert live.released is not None
        assert live.voided is not None
        why = f"{live.giving_up}; ended by the supervisor"
        ending: list[Event] = []
        given_back = []
        reservation = live.released.reservation_id
        if reservation:
            given_back.append(f"reservation {reservation} released")
            if not any(isinstance(e, InventoryReleased) for e in events):
                ending.append(
                    InventoryReleased(
                        order_id=order_id, reservation_id=reservation, reason=why, released_at=now
                    )
                )
        refunded, amount = live.voided.refunded_payment_id, live.voided.amount
        if refunded and amount is not None:
            given_back.append(f"charge {refunded} ({amount}) refunded")
            if not any(isinstance(e, PaymentRefunded) for e in events):
                ending.append(
                    PaymentRefunded(
                        order_id=order_id,
                        payment_id=refunded,
                        amount=amount,
                        reason=why,
                        refunded_at=now,
                    )
                )
        ending.append(
            OrderFulfillmentFailed(
                order_id=order_id,
                error_message=f"{why}: " + ("; ".join(given_back) or "nothing held or charged"),
                failed_at=now,
            )
        )
        return ending

    def _gave_up_callback(
        self, live: LiveOrder, ending: list[Event]
    ) -> Callable[[AppendDone | AppendRejected], None]:
        def recorded(reply: AppendDone | AppendRejected) -> None:
            live.recording = False
            order_id = live.placed.order_id
            if isinstance(reply, AppendDone):
                events = self._read_back(order_id)
                view = order_view(order_id, events or [live.placed, *ending])
                self._end(live, {**view, "version": reply.version})
                return
            if reply.error == "conflict":
                self._record_give_up(live)  # the stream moved: look again, then at its head
            # else: a store failure; the RetryGiveUp timer tries again

        return recorded

    def _end(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """The order is terminal: answer everyone waiting for it (once)."""
        order_id = live.placed.order_id
        if self._live.get(order_id) is not live:
            return  # ended already
        del self._live[order_id]
        self._forget_saga(live)
        self._drain_backlog()
        for gateway, req_id in live.waiters + live.acks:
            self.send(gateway, OrderReply(req_id=req_id, order=view))

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        """A saga or service process ended: recover what it was doing."""
        if self._stopping:
            return
        child = msg.childAddress
        key = str(child)
        if key in self._finished_sagas:
            del self._finished_sagas[key]
            return  # a saga that reported its order terminal, exiting as it should
        for name, address in list(self._services.items()):
            if address == child:
                self._schedule_restart(name)
                return
        live = self._order_of_saga(child)
        if live is not None:
            log.error("manager: saga for %s died; compensating", live.placed.order_id)
            self._recover_saga(live, "its process died")

    def _schedule_restart(self, name: str) -> None:
        """Restart a dead service, backing off when it keeps dying. Its old address stays in
        place meanwhile (sagas learn the new one from ServiceMoved when it is ready)."""
        if name in self._restarting:
            return  # the watchdog and ChildActorExited both saw the same death
        self._restarting.add(name)
        self._service_pids.pop(name, None)
        now = time.monotonic()
        recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW]
        recent.append(now)
        self._restarts[name] = recent
        delay = 0.0 if len(recent) == 1 else min(MAX_BACKOFF, 0.1 * 2 ** (len(recent) - 1))
        log.error("manager: service %s died; restart #%d in %.1fs", name, len(recent), delay)
        if delay == 0:
            self._restart(name)
        else:
            self.wakeupAfter(timedelta(seconds=delay), payload=name)

    def _restart(self, name: str) -> None:
        """Replace a service instance (dead or not) by a new one that loads its durable state."""
        old = self._services.get(name)
        if old is not None:
            self.send(old, ActorExitRequest())
        self._service_pids.pop(name, None)
        self._restarting.add(name)
        self._start_service(name)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A backed-off restart is due, or the watchdog's round."""
        if self._stopping:
            return
        if msg.payload == WATCHDOG:
            self._watchdog()
        elif isinstance(msg.payload, RetryOrder):
            live = self._live.get(msg.payload.order_id)
            if live is not None and live.saga is None and live.giving_up is None:
                self._respawn(live)
        elif isinstance(msg.payload, RetryGiveUp):
            live = self._live.get(msg.payload.order_id)
            if live is None or live.giving_up is None:
                return  # ended
            if not live.finish_paid and (live.released is None or live.voided is None):
                self._ask_give_up(live)  # asks again and re-arms this timer
                return
            self._record_give_up(live)  # unless an append of it is still out
            self.wakeupAfter(timedelta(seconds=self._cfg.step_timeout), payload=msg.payload)
        elif isinstance(msg.payload, str) and msg.payload in SERVICES:
            self._restart(msg.payload)

    def _watchdog(self) -> None:
        """Thespian's queue base can miss a killed child (it reaps it without reporting
        ChildActorExited when a send to it fails first), so on the process bases the manager
        also checks its services' processes itself."""
        for name in SERVICES:
            pid = self._service_pids.get(name)
            if pid is not None and not process_alive(pid):
                log.error("manager: watchdog found %s (pid %d) dead", name, pid)
                self._schedule_restart(name)
        for live in list(self._live.values()):
            if live.pid is not None and not process_alive(live.pid):
                log.error(
                    "manager: watchdog found the saga of %s (pid %d) dead",
                    live.placed.order_id,
                    live.pid,
                )
                self._recover_saga(live, "its process died")
        self.wakeupAfter(timedelta(seconds=WATCHDOG_PERIOD), payload=WATCHDOG)

    # --- stock, drain, identity --------------------------------------------------------------

    def receiveMsg_GetStock(self, msg: GetStock, sender: Any) -> None:
        """Ask Inventory; its answer goes back to the gateway."""
        self._forward(msg, sender)

    def receiveMsg_SetStock(self, msg: SetStock, sender: Any) -> None:
        """Ask Inventory; its answer goes back to the gateway."""
        self._forward(msg, sender)

    def _forward(self, msg: GetStock | SetStock, sender: Any) -> None:
        inventory = self._services.get("inventory")
        if inventory is None or "inventory" not in self._ready or "inventory" in self._restarting:
            self._refuse((sender, msg.req_id), ErrorCode.UNAVAILABLE, "inventory is restarting")
            return
        self._forwarded[msg.req_id] = sender
        self.send(inventory, msg)

    def receiveMsg_StockReport(self, msg: StockReport, sender: Any) -> None:
        """Inventory's answer to a forwarded request."""
        gateway = self._forwarded.pop(msg.req_id, None)
        if gateway is not None:
            self.send(gateway, msg)

    def receiveMsg_Refused(self, msg: Refused, sender: Any) -> None:
        """Inventory refused a forwarded request."""
        gateway = self._forwarded.pop(msg.req_id, None)
        if gateway is not None:
            self.send(gateway, msg)

    def receiveMsg_Drain(self, msg: Drain, sender: Any) -> None:
        """Stop taking new orders; report how many are still running."""
        self._draining = True
        self._stopping = self._stopping or msg.final
        self.send(sender, DrainStatus(req_id=msg.req_id, in_flight=len(self._live)))

    def receiveMsg_Identify(self, msg: Identify, sender: Any) -> None:
        """The OS pids of the manager, the services and (on the process bases) live sagas."""
        pids = {"manager": os.getpid(), **self._service_pids}
        for order_id, live in self._live.items():
            if live.pid is not None:
                pids[f"saga:{order_id}"] = live.pid
        self.send(sender, Identities(req_id=msg.req_id, pids=pids))

    def receiveMsg_IAm(self, msg: IAm, sender: Any) -> None:
        """A saga on a process base tells its pid, so the watchdog can see it die."""
        live = self._live.get(msg.name.removeprefix("saga:"))
        if live is not None and live.saga == sender:
            live.pid = msg.pid

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        """Orderly shutdown: children die with us; do not restart or recover them."""
        self._stopping = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
