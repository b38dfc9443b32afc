"""Messages between actors, and between the gateway and the actor system: one class per intent.

They are pickled between processes on the process bases, so every class lives at module top
level. Requests that come from the gateway carry ``req_id`` so the reply can be matched.
Actor addresses are opaque Thespian objects, typed ``Any``.

Naming: a request says what to do (``ReserveStock``, ``ChargePayment``, ``ReleaseStock``,
``VoidPayment``); a service's answer is ``<Service><Fact>Reply``, where ``<Service><Fact>`` is
the stored event that fact is recorded as. ``InventoryReservedReply`` leads to the order event
``InventoryReserved``, ``InventoryUnavailableReply`` to ``InventoryUnavailable``,
``InventoryReleasedReply`` to ``InventoryReleased``, ``PaymentProcessedReply`` to
``PaymentProcessed``, ``PaymentFailedReply`` to ``PaymentFailed``; ``PaymentVoidedReply`` reports
the payment stream's ``PaymentVoided`` (and a refund, if it made one). The saga machine and the
supervision policy take these replies as their inputs as they are, with no copy in between. The
services' own streams keep their historical names (``StockReserved``, ``StockReleased``,
``ChargeSucceeded``, ...): stored type names never change, so old databases stay readable.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from messages.base import Frozen, Item, OrderLine, Shipping, ShippingAddress, UnavailableItem
from messages.errors import ErrorCode
from messages.events import Event


class ActorMessage(Frozen):
    """Base of actor messages (may hold actor addresses)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


# --- gateway <-> OrderManager ----------------------------------------------------------------


class PlaceOrder(ActorMessage):
    """A client's order; idempotent by order_id."""

    req_id: int
    order_id: str
    customer_id: str
    lines: tuple[OrderLine, ...]
    payment_method: str
    wait: bool
    shipping: Shipping | None = None


class CancelOrder(ActorMessage):
    """A customer's cancellation (DESIGN.md section 9); answered with the order's view once it
    is cancelled, or refused (`conflict`: it ended otherwise; `not_found`)."""

    req_id: int
    order_id: str
    reason: str


class Batch(ActorMessage):
    """Requests that reached the gateway together, handed over in one message.

    On the simple base each external ``tell`` runs the actors until they are idle, so requests
    told one by one would each travel alone through the saga (one commit each); handed over
    together they move through the actors side by side and share group commits.
    """

    messages: tuple[ActorMessage, ...]


class OrderReply(ActorMessage):
    """The order's status (terminal when the request asked to wait)."""

    req_id: int
    order: dict[str, Any]


class Refused(ActorMessage):
    """A request the system will not carry out, with the error code the client gets."""

    req_id: int
    code: ErrorCode
    message: str


class GetStock(ActorMessage):
    """Ask for on_hand / reserved / available of some products (none: all)."""

    req_id: int
    product_ids: tuple[str, ...]


class SetStock(ActorMessage):
    """Set a product's units on hand (an operator's correction or a delivery). With `create`
    the product must be new (``add_product``); without, it must exist (``set_stock``), so a
    typo in a product id never makes a product."""

    req_id: int
    product_id: str
    on_hand: int
    create: bool = False


class ProductsKnown(ActorMessage):
    """Inventory to the manager: the products that exist, when one is added (on start they
    come with ServiceReady), so an order naming an unknown product is refused before anything
    is recorded."""

    products: tuple[str, ...]


class StockReport(ActorMessage):
    """Stock levels per product."""

    req_id: int
    stock: dict[str, dict[str, int]]


class Drain(ActorMessage):
    """Stop accepting orders; reply how many sagas are still running. `final`: the system is
    about to shut down, so stop supervising too (no restarts of actors Thespian is stopping)."""

    req_id: int
    final: bool = False


class DrainStatus(ActorMessage):
    """How many orders are still in flight."""

    req_id: int
    in_flight: int


class Identify(ActorMessage):
    """Ask the system for its actors' names, addresses and OS process ids (tests, operators)."""

    req_id: int


class Identities(ActorMessage):
    """name -> pid of each actor the manager knows (services and live sagas)."""

    req_id: int
    pids: dict[str, int]


# --- configuration ---------------------------------------------------------------------------


class Configure(ActorMessage):
    """Boot the OrderManager: open the database, start the services, recover unfinished orders."""

    req_id: int
    store_url: str  # store.open_store: sqlite:///PATH, postgresql://..., memory:[NAME]
    synchronous: str
    step_timeout: float
    crash_exits_process: bool
    payment_latency: float = 0.0
    payment_provider: str = "simulated"  # providers.open_provider: simulated or http://...
    warm_sagas: int = 0  # saga actors created ahead of need (process bases)
    # Sagas of one order that may fail before the supervisor ends the order itself
    # (saga.supervision.MAX_SAGA_FAILURES; messages cannot import saga).
    max_saga_failures: int = Field(default=8, ge=1)
    # A node on a shared store (DESIGN.md section 10): its id and lease epoch fence its writes;
    # None on a store of one node.
    node_id: str | None = None
    epoch: int = 0


class TakeOver(ActorMessage):
    """This node now owns these unfinished orders of nodes whose leases expired: drive them on
    as start-up recovery does (after Inventory caught up with what those nodes recorded)."""

    req_id: int
    order_ids: tuple[str, ...]


class LeaseLost(ActorMessage):
    """The node's lease is lost or about to expire: stop driving orders now (another node
    may own them already) and take no new ones. Answered with DrainStatus."""

    req_id: int
    reason: str


class CatchUp(ActorMessage):
    """Manager to Inventory: read what other nodes recorded in the stock streams before
    answering CaughtUp (the orders taken over may hold stock this node never saw)."""

    ref: str


class CaughtUp(ActorMessage):
    """Inventory's answer to CatchUp."""

    ref: str


class Configured(ActorMessage):
    """The system is up; `recovered` unfinished orders are being driven on."""

    req_id: int
    recovered: int


class ServiceConfig(ActorMessage):
    """Sent by the manager to a (re)started service actor."""

    name: str
    store_url: str
    synchronous: str
    store: Any
    step_timeout: float
    crash_exits_process: bool
    payment_latency: float = 0.0
    payment_provider: str = "simulated"
    node_id: str | None = None  # see Configure
    epoch: int = 0


class ServiceReady(ActorMessage):
    """A service finished loading its durable state (Inventory: with the products that exist)."""

    name: str
    pid: int
    products: tuple[str, ...] = ()


class IAm(ActorMessage):
    """A saga (process bases) tells the manager its OS process id, for the watchdog."""

    name: str
    pid: int


# --- saga <-> OrderManager --------------------------------------------------------------------


class StartSaga(ActorMessage):
    """Drive one order: from scratch (events = [OrderPlaced]) or recovered from its stream."""

    order_id: str
    events: tuple[Event, ...]
    compensate: bool
    inventory: Any
    payment: Any
    store: Any
    step_timeout: float
    report_pid: bool = False  # process bases: tell the manager our pid for its watchdog
    shipping: Any = None  # the Shipping actor (the ShippingSaga talks to it)
    cancel: str | None = None  # the customer asked to cancel (the reason), before this start
    # the event type names that end the order when appended last (its append closes the stream)
    ends_on: frozenset[str] = frozenset()

    @field_validator("ends_on")
    @classmethod
    def _one_of_each(cls, ends_on: frozenset[str]) -> frozenset[str]:
        # Validation builds a new set per message, and each saga keeps its own for its whole
        # life: with 10,000 orders in flight, 10,000 copies of the same two or three sets.
        return _ENDINGS.setdefault(ends_on, ends_on)


_ENDINGS: dict[frozenset[str], frozenset[str]] = {}  # StartSaga.ends_on values, one of each


class CancelSaga(ActorMessage):
    """The customer wants the order cancelled: the running saga decides what that means in
    the state it is in (DESIGN.md section 9)."""

    order_id: str
    reason: str


class ServiceMoved(ActorMessage):
    """A service was restarted at a new address; requests pending with the old one are lost."""

    service: str
    address: Any


class SagaFinished(ActorMessage):
    """The order is terminal; its terminal event is committed. `order` is its client view."""

    order_id: str
    reason: str
    order: dict[str, Any]
    saga_key: str  # str() of the saga's own address, as its ChildActorExited will carry it


class SagaAborted(ActorMessage):
    """The saga could not go on; the manager recovers the order from its stream."""

    order_id: str
    reason: str


# --- EventStore actor -------------------------------------------------------------------------


class AppendToStream(ActorMessage):
    """Append events at expected_version; ref comes back in the reply."""

    ref: str
    stream: str
    events: tuple[Event, ...]
    event_ids: tuple[str, ...]
    expected_version: int
    owner: str | None = None  # the node that owns the stream from now on (if it has no owner)
    closes: bool = False  # the stream's last append: it leaves the store's open heads


class AppendToStreams(ActorMessage):
    """Append to several streams at once, each at its expected version: all or nothing
    (``EventStore.append_many``); ref comes back in the reply."""

    ref: str
    parts: tuple[AppendToStream, ...]  # each part's own ref is unused


class AppendDone(ActorMessage):
    """The append committed; version is the stream's new last version (for AppendToStreams:
    the last part's, and `versions` has each part's)."""

    ref: str
    version: int
    versions: tuple[int, ...] = ()


class AppendRejected(ActorMessage):
    """The append was refused (concurrency conflict, duplicate ids, store failure)."""

    ref: str
    error: str
    message: str


class FlushAppends(ActorMessage):
    """Sent by the EventStore actor to itself: commit everything buffered so far in one go."""


# --- Inventory ----------------------------------------------------------------------------------


class ReserveStock(ActorMessage):
    """Hold all items for the order, or none."""

    order_id: str
    items: tuple[Item, ...]


class InventoryReservedReply(ActorMessage):
    """Inventory's answer: the order's items are held under reservation_id."""

    order_id: str
    reservation_id: str


class InventoryUnavailableReply(ActorMessage):
    """Inventory's answer: the order's items could not be held (short, unknown product, or the
    order was fenced)."""

    order_id: str
    unavailable_items: tuple[UnavailableItem, ...]
    reason: str


class ReleaseStock(ActorMessage):
    """Give back what is held for the order and refuse to hold anything for it later."""

    order_id: str
    reason: str


class ShipStock(ActorMessage):
    """Consume the order's reservation: its units leave on_hand and reserved (once)."""

    order_id: str


class InventoryShippedReply(ActorMessage):
    """Inventory's answer: the order's reservation was consumed by its shipment (now or
    earlier; also the answer to a release of a shipped order, which gives nothing back).
    Reports the stock streams' ``StockShipped``; the order event is ``OrderShipped``."""

    order_id: str
    reservation_id: str


class InventoryReleasedReply(ActorMessage):
    """Inventory's answer: nothing is held for the order any more; reservation_id is what was
    given back (now or earlier), None if nothing was ever held."""

    order_id: str
    reservation_id: str | None


# --- Payment ----------------------------------------------------------------------------------


class ChargePayment(ActorMessage):
    """Charge the order's amount with a payment token."""

    order_id: str
    amount: Decimal
    payment_method: str


class PaymentProcessedReply(ActorMessage):
    """Payment's answer: the charge stands."""

    order_id: str
    payment_id: str
    amount: Decimal


class PaymentFailedReply(ActorMessage):
    """Payment's answer: the charge was declined (or the payment was voided before it)."""

    order_id: str
    reason: str


class VoidPayment(ActorMessage):
    """Guarantee that no charge stands for the order, now or later."""

    order_id: str
    reason: str


class PaymentVoidedReply(ActorMessage):
    """Payment's answer: no charge stands; refunded_payment_id is a charge that was refunded to
    get there (amount its amount)."""

    order_id: str
    refunded_payment_id: str | None
    amount: Decimal | None


# --- Shipping (the carrier) ---------------------------------------------------------------------


class CreateShipment(ActorMessage):
    """Ask the carrier to ship the order's items to the address; idempotent per order id."""

    order_id: str
    carrier: str
    address: ShippingAddress
    items: tuple[Item, ...]


class ShipmentCreatedReply(ActorMessage):
    """The carrier's answer: the shipment exists (``ShipmentCreated``)."""

    order_id: str
    shipment_id: str
    carrier: str
    tracking_number: str


class ShipmentRefusedReply(ActorMessage):
    """The carrier's answer: it will not ship the order (``ShipmentRefused``), or shipping was
    cancelled before it asked."""

    order_id: str
    reason: str


class CancelShipment(ActorMessage):
    """Guarantee that no shipment stands for the order, now or later."""

    order_id: str
    reason: str


class ShipmentCancelledReply(ActorMessage):
    """The carrier's answer: no shipment stands (``ShipmentVoided``); shipment_id is one that
    was cancelled to get there."""

    order_id: str
    shipment_id: str | None


class LateShipment(ActorMessage):
    """Wakeup payload: a slow (ship_timeout) shipment is created now."""

    request: CreateShipment


class LateCharge(ActorMessage):
    """Wakeup payload: a slow (tok_late / latency) charge completes now."""

    order_id: str
    amount: Decimal
    payment_method: str
    reply_to: Any
