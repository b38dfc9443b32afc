"""Read models built from streams: what a client sees of an order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from messages.base import OrderStatus, iso_utc
from messages.events import (
    Event,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    PaymentFailed,
    PaymentProcessed,
    PaymentRefunded,
    ShipmentFailed,
    status_of_terminal,
)
from store import CODEC, StoredEvent


def decode_stream(stored: Sequence[StoredEvent]) -> list[Event]:
    """The domain events of a stored stream."""
    return [CODEC.decode(record) for record in stored]


def order_view(order_id: str, events: Sequence[Event]) -> dict[str, Any]:
    """The order's status as a client sees it: `pending` until OrderPaid or a terminal event is
    recorded; an order placed with shipping is `paid` until its shipping outcome."""
    view: dict[str, Any] = {
        "order_id": order_id,
        "status": OrderStatus.PENDING,
        "reason": None,
        "version": len(events) - 1,
        "last_event": type(events[-1]).__name__ if events else None,
    }
    for event in events:
        status = status_of_terminal(event)
        if status is not None:
            view["status"] = status
        fields = _VIEW_FIELDS.get(type(event))
        if fields is not None:
            view.update(fields(event))
    return view


def _placed(event: OrderPlaced) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "customer_id": event.customer_id,
        "total_amount": str(event.total_amount),
        "payment_method": event.payment_method,
        "placed_at": iso_utc(event.placed_at),
    }
    if event.shipping is not None:
        fields["shipping"] = event.shipping.model_dump(mode="json")
    return fields


def _shipped(event: OrderShipped) -> dict[str, Any]:
    return {
        "shipment_id": event.shipment_id,
        "carrier": event.carrier,
        "tracking_number": event.tracking_number,
        "shipped_at": iso_utc(event.shipped_at),
    }


def _cancelled(event: OrderCancelled) -> dict[str, Any]:
    return {
        "reason": event.reason,
        "refund_issued": event.refund_issued,
        "cancelled_by": event.cancelled_by,
    }


# What each event adds to the view (after a terminal event's status).
_VIEW_FIELDS: dict[type[Event], Callable[[Any], dict[str, Any]]] = {
    OrderPlaced: _placed,
    InventoryReserved: lambda e: {"reservation_id": e.reservation_id},
    InventoryUnavailable: lambda e: {
        "unavailable_items": [item.model_dump() for item in e.unavailable_items]
    },
    PaymentProcessed: lambda e: {"payment_id": e.payment_id},
    PaymentFailed: lambda e: {"payment_failure": e.reason},
    InventoryReleased: lambda _: {"inventory_released": True},
    PaymentRefunded: lambda e: {"refunded_payment_id": e.payment_id},
    ShipmentFailed: lambda e: {"shipment_failure": e.reason},
    OrderShipped: _shipped,
    OrderCancelled: _cancelled,
    OrderFulfillmentFailed: lambda e: {"reason": e.error_message},
    OrderPaid: lambda e: {"amount": str(e.amount)},
}


def event_view(stored: StoredEvent) -> dict[str, Any]:
    """One stored event as the wire shows it: metadata and the payload's fields."""
    return {
        "type": stored.type,
        "version": stored.version,
        "position": stored.position,
        "event_id": stored.event_id,
        "recorded_at": iso_utc(stored.recorded_at),
        "data": CODEC.decode(stored).model_dump(mode="json"),
    }
