"""The OrderManager actor: entry point for orders and supervisor of sagas and services.

It assembles the parts of this package and keeps only the boot, the recovery of unfinished
orders and the routing of messages: placement (``placement``), the live orders (``orders``), the
workflow registry and warm pool (``registry``), carrying out the supervision policy
(``supervision``), the services (``services``) and stock requests (``stock``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ChildActorExited, PoisonMessage, WakeupMessage

from actors.base import (
    AppendCallback,
    Appender,
    BaseActor,
    NotConfiguredError,
    log,
    order_extra,
)
from actors.manager.cancels import Cancels
from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.placement import Placement, refuse
from actors.manager.recovery import Recovery
from actors.manager.registry import WarmPool, ending_types, workflow_for
from actors.manager.services import SERVICES, STORE, Ready, Services
from actors.manager.stock import INVENTORY, StockForwarder
from actors.manager.supervision import Supervisor
from messages.base import OrderStatus
from messages.commands import (
    AppendDone,
    AppendRejected,
    Batch,
    CancelOrder,
    CatchUp,
    CaughtUp,
    Configure,
    Configured,
    Drain,
    DrainStatus,
    GetStock,
    IAm,
    Identify,
    Identities,
    InventoryReleasedReply,
    InventoryShippedReply,
    LeaseLost,
    OrderReply,
    PaymentVoidedReply,
    PlaceOrder,
    ProductsKnown,
    Refused,
    SagaAborted,
    SagaFinished,
    ServiceMoved,
    ServiceReady,
    SetStock,
    ShipmentCancelledReply,
    ShipmentCreatedReply,
    StartSaga,
    StockReport,
    TakeOver,
)
from messages.errors import ErrorCode
from messages.events import Event, order_stream, stock_stream
from observability.metrics import SUPERVISION_RESTARTS
from saga.supervision import SupervisionPolicy
from saga.views import decode_stream, order_view
from store import CODEC, EventStore, open_store

MAX_SAGAS_RECOVERING_PROCESS = 16  # recovery sagas started at once on the process bases
WATCHDOG_PERIOD = 0.5  # seconds between liveness checks of service and saga processes
WATCHDOG = "watchdog"


@dataclass(frozen=True)
class Parts:
    """What the manager builds from its Configure."""

    config: Configure
    services: Services
    supervisor: Supervisor
    pool: WarmPool
    recovery: Recovery


class OrderManager(BaseActor):
    """Places orders, starts their sagas, and supervises sagas and services."""

    actor_name = "manager"

    def __init__(self) -> None:
        super().__init__()
        self._parts: Parts | None = None
        self._boot: tuple[Any, int] | None = None
        self._reader: EventStore | None = None
        self._appender = Appender(self, "manager")
        self._orders = LiveOrders()
        self._placement = Placement(self._orders, self)
        self._cancels = Cancels(self._orders, self)
        self._stock = StockForwarder(self._inventory_if_available, self.send)
        self._draining = False
        self._stopping = False
        self._takeovers: dict[str, tuple[Any, TakeOver]] = {}  # CatchUp ref -> request

    # --- boot -------------------------------------------------------------------------------

    def receiveMsg_Batch(self, msg: Batch, sender: Any) -> None:
        """Handle each request of the batch as if it had come alone (and fail alone)."""
        for message in msg.messages:
            try:
                self.receiveMessage(message, sender)
            except Exception:
                log.exception(
                    "manager: %s failed", type(message).__name__, extra=order_extra(message)
                )
                req_id = getattr(message, "req_id", None)
                if req_id is not None:
                    message_text = "the system failed on this request"
                    refuse(self.send, (sender, req_id), ErrorCode.INTERNAL, message_text)

    def receiveMsg_Configure(self, msg: Configure, sender: Any) -> None:
        """Start the store first (it creates the schema), then the services that read it."""
        if self._parts is not None:
            self.send(sender, Configured(req_id=msg.req_id, recovered=len(self._orders)))
            return
        self._boot = (sender, msg.req_id)
        policy = SupervisionPolicy(max_failures=msg.max_saga_failures, retry_every=msg.step_timeout)
        limit = MAX_SAGAS_RECOVERING_PROCESS if msg.crash_exits_process else 10_000
        self._parts = Parts(
            config=msg,
            services=Services(msg, self.createActor, self.send, self.wake_after, self._started),
            supervisor=Supervisor(policy, self._orders, self),
            pool=WarmPool(self.createActor, msg.warm_sagas),
            recovery=Recovery(
                self._orders, self.read_order, self._spawn_new, self._close_streams, limit
            ),
        )
        self._parts.services.start(STORE)

    def _started(self, name: str, address: Any) -> None:
        if name == STORE:
            self._appender.store = address

    def receiveMsg_ServiceReady(self, msg: ServiceReady, sender: Any) -> None:
        """A service is up: continue the boot, or tell the sagas where a restarted one is."""
        services = self._p.services
        ready = services.ready(msg, sender)
        if ready == Ready.STALE:
            return
        self._stock.products_known(ProductsKnown(products=msg.products))
        if ready == Ready.FIRST and msg.name == STORE:
            self._reader = open_store(self._p.config.store_url, readonly=True)
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
            moved = ServiceMoved(service=msg.name, address=sender)
            for live in self._orders:
                if live.saga is not None:
                    self.send(live.saga, moved)
            return
        if services.all_ready() and self._boot is not None:
            if self._p.config.crash_exits_process:
                self.wake_after(WATCHDOG_PERIOD, WATCHDOG)
            recovered = self._p.recovery.find(self._store_reader, self._p.config.node_id)
            gateway, req_id = self._boot
            self._boot = None
            self.send(gateway, Configured(req_id=req_id, recovered=recovered))

    @property
    def _p(self) -> Parts:
        if self._parts is None:
            raise NotConfiguredError("the manager has not been configured")
        return self._parts

    @property
    def _store_reader(self) -> EventStore:
        if self._reader is None:
            raise NotConfiguredError("the store is not open yet")
        return self._reader

    # --- what the parts ask of the actor ----------------------------------------------------

    def accepting(self) -> bool:
        """Whether new orders are accepted now (booted, not draining)."""
        return not self._draining and self._boot is None and self._parts is not None

    def append(  # noqa: PLR0913 - Appender.append's fields, ids and owner optional
        self,
        stream: str,
        events: Sequence[Event],
        expected_version: int,
        done: AppendCallback,
        event_ids: Sequence[str] | None = None,
        *,
        owner: str | None = None,
        closes: bool = False,
    ) -> None:
        """Append events through the manager's appender (fresh ids unless given); `owner`
        becomes the stream's owner in the same commit; `closes`: the order ends with them."""
        ids = [CODEC.new_id() for _ in events] if event_ids is None else event_ids
        self._appender.append(
            stream, events, ids, expected_version, done, owner=owner, closes=closes
        )

    @property
    def node_id(self) -> str | None:
        """This node's id on a shared store (None: the store serves this node alone)."""
        return self._parts.config.node_id if self._parts is not None else None

    def owner_of(self, order_id: str) -> str | None:
        """The node that owns the order (None: nobody, or no nodes)."""
        return self._store_reader.stream_owner(order_stream(order_id))

    def _close_streams(self, streams: list[str]) -> None:
        """Mark ended order streams closed (the manager's reader is read-only)."""
        with open_store(self._p.config.store_url) as writer:
            writer.close_streams(streams)

    def read_order(self, order_id: str) -> list[Event]:
        """The order's stream, decoded."""
        return decode_stream(self._store_reader.read_stream(order_stream(order_id)))

    def order_version(self, order_id: str) -> int:
        """The order stream's head version."""
        return self._store_reader.stream_version(order_stream(order_id))

    def spawn(self, live: LiveOrder, events: Sequence[Event], *, compensate: bool) -> None:
        """Start the workflow due for the order (the one its last trigger event starts, from
        the warm pool) and let it drive the order on from these events."""
        parts = self._p
        trigger, workflow = workflow_for(events)
        if trigger > live.trigger:
            # A new workflow: its supervision starts afresh (the last one's ended with it).
            live.trigger, live.supervision = trigger, None
        saga = parts.pool.take(workflow)
        self._orders.attach(live, saga)
        addresses = parts.services.addresses
        self.send(
            saga,
            StartSaga(
                order_id=live.placed.order_id,
                events=tuple(events),
                compensate=compensate,
                inventory=addresses["inventory"],
                payment=addresses["payment"],
                store=addresses[STORE],
                step_timeout=parts.config.step_timeout,
                report_pid=parts.config.crash_exits_process,
                shipping=addresses.get("shipping"),
                cancel=live.cancel,
                ends_on=ending_types(live.placed),
            ),
        )

    def _spawn_new(self, live: LiveOrder, events: Sequence[Event]) -> None:
        self.spawn(live, events, compensate=False)

    def respawn(self, live: LiveOrder) -> None:
        """A compensating saga for the order, rebuilt from its stream."""
        SUPERVISION_RESTARTS.labels("saga").inc()
        self.spawn(live, self.read_order(live.placed.order_id), compensate=True)

    def send_to_service(self, name: str, msg: Any) -> None:
        """Send to a service actor by name (its current address)."""
        self.send(self._p.services.addresses[name], msg)

    def wake_after(self, seconds: float, payload: Any) -> None:
        """A WakeupMessage with `payload` after `seconds`."""
        self.wakeupAfter(timedelta(seconds=seconds), payload=payload)

    def stopping(self) -> bool:
        """Whether the system is shutting down (nothing is recovered or restarted any more)."""
        return self._stopping

    def end(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """A workflow of the order is over (its saga finished, or the supervisor ended it):
        start the workflow its last event triggers, or, once the order is terminal, answer
        everyone waiting for it (once)."""
        if view.get("status") == OrderStatus.PAID and live.placed.shipping is not None:
            self._next_workflow(live)  # OrderPaid of an order placed with shipping
            return
        if not self._orders.remove(live):
            return  # ended already
        self._p.recovery.drain()
        for gateway, req_id in live.waiters + live.acks:
            self.send(gateway, OrderReply(req_id=req_id, order=view))
        self._cancels.ended(live, view)

    def _next_workflow(self, live: LiveOrder) -> None:
        """Start the workflow the order's newest trigger event starts, exactly once."""
        if self._orders.get(live.placed.order_id) is not live or self._stopping:
            return
        events = self.read_order(live.placed.order_id)
        trigger, _ = workflow_for(events)
        if trigger <= live.trigger:
            # The workflow that just ended was started by this very trigger: starting it again
            # would run it twice. Supervision decides (respawn, back off, the last resort).
            self._orders.detach(live)
            self._p.supervisor.saga_failed(live, "its workflow ended without ending the order")
            return
        for gateway, req_id in live.acks:  # placed without waiting: OrderPlaced is long durable
            self.send(
                gateway, OrderReply(req_id=req_id, order=order_view(live.placed.order_id, events))
            )
        live.acks.clear()
        self.spawn(live, events, compensate=False)

    def _inventory_if_available(self) -> Any:
        if self._parts is None or not self._parts.services.available(INVENTORY):
            return None
        return self._parts.services.addresses[INVENTORY]

    # --- placing orders ---------------------------------------------------------------------

    def receiveMsg_PlaceOrder(self, msg: PlaceOrder, sender: Any) -> None:
        """Accept an order once; answer when OrderPlaced is durable or when it is terminal."""
        self._placement.place(msg, sender)

    def receiveMsg_CancelOrder(self, msg: CancelOrder, sender: Any) -> None:
        """A customer's cancel: into the running saga; answered when the order ends."""
        self._cancels.cancel(msg, sender)

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
        self._p.supervisor.aborted(msg, sender)

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A saga raised on its start: recover and compensate."""
        self._p.supervisor.poisoned(msg, sender)

    def receiveMsg_InventoryReleasedReply(self, msg: InventoryReleasedReply, sender: Any) -> None:
        """Inventory released an order the supervisor is ending."""
        self._p.supervisor.answer(msg)

    def receiveMsg_PaymentVoidedReply(self, msg: PaymentVoidedReply, sender: Any) -> None:
        """Payment voided an order the supervisor is ending."""
        self._p.supervisor.answer(msg)

    def receiveMsg_InventoryShippedReply(self, msg: InventoryShippedReply, sender: Any) -> None:
        """Inventory found the reservation of an order the supervisor is ending consumed by
        its shipment: the order shipped."""
        self._p.supervisor.answer(msg)

    def receiveMsg_ShipmentCreatedReply(self, msg: ShipmentCreatedReply, sender: Any) -> None:
        """The carrier's shipment of an order the supervisor found shipped."""
        self._p.supervisor.answer(msg)

    def receiveMsg_ShipmentCancelledReply(self, msg: ShipmentCancelledReply, sender: Any) -> None:
        """The carrier made sure no shipment stands for an order the supervisor is ending."""
        self._p.supervisor.answer(msg)

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        """A saga or service process ended: recover what it was doing."""
        if self._stopping:
            return
        child = msg.childAddress
        if self._orders.exit_expected(str(child)):
            return  # a saga that reported its order terminal, exiting as it should
        name = self._p.services.name_of(child)
        if name is not None:
            self._p.services.died(name)
        else:
            self._p.supervisor.exited(child)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A back-off passed, a service restart is due, or the watchdog's round."""
        if self._stopping:
            return
        payload = msg.payload
        if payload == WATCHDOG:
            # Thespian's queue base can miss a killed child: on the process bases the manager
            # also checks the processes of its services and sagas itself.
            self._p.services.check()
            self._p.supervisor.check_sagas()
            self.wake_after(WATCHDOG_PERIOD, WATCHDOG)
        elif isinstance(payload, str) and payload in SERVICES:
            self._p.services.restart(payload)
        else:
            self._p.supervisor.wakeup(payload)

    # --- nodes: takeover and a lost lease ----------------------------------------------------

    def receiveMsg_TakeOver(self, msg: TakeOver, sender: Any) -> None:
        """Orders of a dead node are ours now: Inventory first catches up with the stock those
        orders hold (recorded by the other node), then they are driven on like a recovery."""
        if self._stopping or self._parts is None:
            self.send(sender, Configured(req_id=msg.req_id, recovered=0))
            return
        ref = f"takeover:{msg.req_id}"
        self._takeovers[ref] = (sender, msg)
        self.send_to_service(INVENTORY, CatchUp(ref=ref))

    def receiveMsg_CaughtUp(self, msg: CaughtUp, sender: Any) -> None:
        """Inventory caught up: start the taken-over orders."""
        waiting = self._takeovers.pop(msg.ref, None)
        if waiting is None:
            return
        gateway, takeover = waiting
        if not self._stopping:
            log.warning("manager: taking over %d orders", len(takeover.order_ids))
            self._p.recovery.take_over(takeover.order_ids)
        self.send(gateway, Configured(req_id=takeover.req_id, recovered=len(takeover.order_ids)))

    def receiveMsg_LeaseLost(self, msg: LeaseLost, sender: Any) -> None:
        """Stop driving orders at once (another node may own them already) and take no more;
        nothing here is restarted or recovered any more."""
        log.error("manager: %s; stopping every saga", msg.reason)
        self._draining = self._stopping = True
        stopped = 0
        for live in self._orders:
            if live.saga is not None:
                self.send(live.saga, ActorExitRequest())
                stopped += 1
        self.send(sender, DrainStatus(req_id=msg.req_id, in_flight=stopped))

    # --- stock, drain, identity --------------------------------------------------------------

    def receiveMsg_GetStock(self, msg: GetStock, sender: Any) -> None:
        """Ask Inventory; its answer goes back to the gateway."""
        self._stock.forward(msg, sender)

    def receiveMsg_ProductsKnown(self, msg: ProductsKnown, sender: Any) -> None:
        """Inventory says which products exist."""
        self._stock.products_known(msg)

    def unknown_products(self, product_ids: Sequence[str]) -> list[str]:
        """Those of `product_ids` that are no product (PlacementHost). On a shared store a
        product another node added may not have reached this node's Inventory yet: its stock
        stream decides."""
        unknown = self._stock.unknown(product_ids)
        if unknown and self.node_id is not None:
            found = tuple(
                p for p in unknown if self._store_reader.stream_version(stock_stream(p)) >= 0
            )
            self._stock.products_known(ProductsKnown(products=found))
            unknown = [p for p in unknown if p not in found]
        return unknown

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
        services = self._parts.services.pids if self._parts is not None else {}
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
