"""Domain events: what happened, immutable, one class per fact (DESIGN.md section 4).

Order events live in stream ``order-{order_id}``; the Inventory actor's facts in one stream
per product, ``stock-{product_id}`` (a reservation across products is one atomic append to
each product's stream, with that product's items), plus ``inventory-fences`` for orders
released before they reserved anything; the payment provider's in ``payment-{order_id}``; the
carrier's in ``shipment-{order_id}``.
Databases made before that kept the Inventory's facts in one stream, ``inventory``: the first
start copies it into the new streams and ends it with ``InventoryMigrated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from messages.base import Frozen, Item, Money, OrderLine, OrderStatus, Shipping, UnavailableItem

# --- order stream ----------------------------------------------------------------------------


class Event(Frozen):
    """Base of every domain event."""


class OrderPlaced(Event):
    """A client's order was accepted; the first event of every order stream."""

    order_id: str
    customer_id: str
    lines: tuple[OrderLine, ...]
    total_amount: Money
    payment_method: str
    placed_at: datetime
    # Added with shipping (DESIGN.md section 9): events stored before it read as no shipping.
    shipping: Shipping | None = None


class InventoryReserved(Event):
    """All lines of the order are held for it."""

    order_id: str
    reservation_id: str
    items: tuple[Item, ...]
    reserved_at: datetime


class InventoryUnavailable(Event):
    """At least one line could not be reserved; nothing is held."""

    order_id: str
    unavailable_items: tuple[UnavailableItem, ...]
    notified_at: datetime


class PaymentProcessed(Event):
    """The provider charged the order's total."""

    payment_id: str
    order_id: str
    amount: Money
    processed_at: datetime


class OrderPaid(Event):
    """Terminal: the order is paid and its reservation stays held for shipping."""

    order_id: str
    payment_id: str
    payment_method: str
    amount: Money
    paid_at: datetime


class PaymentFailed(Event):
    """The charge was declined, timed out or refused; compensation follows."""

    order_id: str
    reason: str
    failed_at: datetime


class InventoryReleased(Event):
    """Compensation: the order's reservation was given back."""

    order_id: str
    reservation_id: str
    reason: str
    released_at: datetime


class PaymentRefunded(Event):
    """Compensation: a charge that stood for the order was refunded."""

    order_id: str
    payment_id: str
    amount: Money
    reason: str
    refunded_at: datetime


class OrderCancelled(Event):
    """Terminal: the order will not be fulfilled; nothing is held or charged."""

    order_id: str
    cancelled_by: str
    reason: str
    refund_issued: bool
    cancelled_at: datetime


class OrderFulfillmentFailed(Event):
    """Terminal: a step failed unexpectedly; compensation ran before this was recorded."""

    order_id: str
    error_message: str
    failed_at: datetime


class OrderShipped(Event):
    """Terminal for an order placed with shipping: the carrier has it, and the reservation was
    consumed (on_hand and reserved both fell by the shipped units)."""

    order_id: str
    shipment_id: str
    carrier: str
    tracking_number: str
    items: tuple[Item, ...]
    shipped_at: datetime


class ShipmentFailed(Event):
    """The shipment could not be made (refused, timed out, failed); compensation follows."""

    order_id: str
    reason: str
    failed_at: datetime


TERMINAL_EVENTS: dict[type[Event], OrderStatus] = {
    OrderPaid: OrderStatus.PAID,
    OrderShipped: OrderStatus.SHIPPED,
    OrderCancelled: OrderStatus.CANCELLED,
    OrderFulfillmentFailed: OrderStatus.FAILED,
}
TERMINAL_TYPE_NAMES: frozenset[str] = frozenset(t.__name__ for t in TERMINAL_EVENTS)
# OrderPaid ends only an order placed without shipping; these end every order.
FINAL_TYPE_NAMES: frozenset[str] = TERMINAL_TYPE_NAMES - {OrderPaid.__name__}


def status_of_terminal(event: Event) -> OrderStatus | None:
    """The status a terminal event stands for, or None for a non-terminal event. OrderPaid
    stands for ``paid`` also in an order placed with shipping, where it ends the OrderSaga's
    part but not the order (``ends_order``)."""
    return TERMINAL_EVENTS.get(type(event))


def ends_order(event: Event, placed: OrderPlaced) -> bool:
    """Whether `event` is the terminal event of the order `placed` (DESIGN.md section 4):
    OrderShipped, OrderCancelled, OrderFulfillmentFailed, and OrderPaid without shipping."""
    kind = type(event)
    if kind is OrderPaid:
        return placed.shipping is None
    return kind in TERMINAL_EVENTS


def final_status(events: Sequence[Event]) -> OrderStatus | None:
    """The status the order stream `events` ended in, or None while the order is not over."""
    if not events or not isinstance(events[0], OrderPlaced):
        return None
    placed = events[0]
    for event in events:
        if ends_order(event, placed):
            return TERMINAL_EVENTS[type(event)]
    return None


# --- inventory stream ------------------------------------------------------------------------


class StockSet(Event):
    """An operator set a product's units on hand."""

    product_id: str
    on_hand: int
    set_at: datetime


class StockReserved(Event):
    """The Inventory actor held units for an order (all lines or none). In a product's
    stream, ``items`` are that product's share of the reservation."""

    order_id: str
    reservation_id: str
    items: tuple[Item, ...]
    reserved_at: datetime


class StockReleased(Event):
    """A reservation was given back, or (reservation_id empty) an order was fenced off before
    it reserved anything, so a reservation request arriving later is refused."""

    order_id: str
    reservation_id: str
    items: tuple[Item, ...]
    reason: str
    released_at: datetime


class InventoryMigrated(Event):
    """The last event of the old single ``inventory`` stream: its events were copied, split
    by product, into the ``stock-`` streams (and ``inventory-fences``) in the same commit."""

    events: int
    streams: int
    migrated_at: datetime


# --- payment stream --------------------------------------------------------------------------


class ChargeSucceeded(Event):
    """The provider charged an order."""

    order_id: str
    payment_id: str
    amount: Money
    payment_method: str
    charged_at: datetime


class ChargeDeclined(Event):
    """The provider declined an order's charge."""

    order_id: str
    amount: Money
    payment_method: str
    reason: str
    declined_at: datetime


class ChargeRefunded(Event):
    """The provider refunded an order's charge."""

    order_id: str
    payment_id: str
    amount: Money
    reason: str
    refunded_at: datetime


class PaymentVoided(Event):
    """The saga gave up on the payment: no charge may stand for this order from now on."""

    order_id: str
    reason: str
    voided_at: datetime


# --- shipment stream (the carrier's facts about one order) -----------------------------------


class ShipmentCreated(Event):
    """The carrier created the order's shipment."""

    order_id: str
    shipment_id: str
    carrier: str
    tracking_number: str
    created_at: datetime


class ShipmentRefused(Event):
    """The carrier refused to ship the order."""

    order_id: str
    carrier: str
    reason: str
    refused_at: datetime


class ShipmentCancelled(Event):
    """A shipment the carrier had created was cancelled."""

    order_id: str
    shipment_id: str
    reason: str
    cancelled_at: datetime


class ShipmentVoided(Event):
    """The order's shipping was given up: no shipment may stand for it from now on (one the
    carrier creates later is cancelled in the same commit)."""

    order_id: str
    reason: str
    voided_at: datetime


# --- stock streams, shipping ----------------------------------------------------------------


class StockShipped(Event):
    """An order's reservation was consumed by its shipment: on_hand and reserved both fall by
    these units (in a product's stream: that product's share)."""

    order_id: str
    reservation_id: str
    items: tuple[Item, ...]
    shipped_at: datetime


ALL_EVENT_TYPES: tuple[type[Event], ...] = (
    OrderPlaced,
    InventoryReserved,
    InventoryUnavailable,
    PaymentProcessed,
    OrderPaid,
    PaymentFailed,
    InventoryReleased,
    PaymentRefunded,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderShipped,
    ShipmentFailed,
    StockSet,
    StockReserved,
    StockReleased,
    InventoryMigrated,
    ChargeSucceeded,
    ChargeDeclined,
    ChargeRefunded,
    PaymentVoided,
    ShipmentCreated,
    ShipmentRefused,
    ShipmentCancelled,
    ShipmentVoided,
    StockShipped,
)
EVENT_TYPES: dict[str, type[Event]] = {t.__name__: t for t in ALL_EVENT_TYPES}


ORDER_STREAM_PREFIX = "order-"


def order_stream(order_id: str) -> str:
    """The stream holding an order's saga events."""
    return f"{ORDER_STREAM_PREFIX}{order_id}"


def order_id_of(stream: str) -> str:
    """The order id of an order stream's name (the inverse of ``order_stream``)."""
    if not stream.startswith(ORDER_STREAM_PREFIX):
        raise ValueError(f"{stream!r} is not an order stream")
    return stream[len(ORDER_STREAM_PREFIX) :]


PAYMENT_STREAM_PREFIX = "payment-"


def payment_stream(order_id: str) -> str:
    """The stream holding the payment provider's facts about one order."""
    return f"{PAYMENT_STREAM_PREFIX}{order_id}"


SHIPMENT_STREAM_PREFIX = "shipment-"


def shipment_stream(order_id: str) -> str:
    """The stream holding the carrier's facts about one order's shipment."""
    return f"{SHIPMENT_STREAM_PREFIX}{order_id}"


INVENTORY_STREAM = "inventory"
"""The Inventory's single stream of databases made before per-product stock streams."""
STOCK_PREFIX = "stock-"
FENCES_STREAM = "inventory-fences"


def stock_stream(product_id: str) -> str:
    """The stream of one product's stock: levels set, its share of reservations, releases."""
    return f"{STOCK_PREFIX}{product_id}"
