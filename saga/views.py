"""Read models built from streams: what a client sees of an order."""

from __future__ import annotations

from collections.abc import Sequence
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
        if isinstance(event, OrderPlaced):
            view.update(
                customer_id=event.customer_id,
                total_amount=str(event.total_amount),
                payment_method=event.payment_method,
                placed_at=iso_utc(event.placed_at),
            )
            if event.shipping is not None:
                view["shipping"] = event.shipping.model_dump(mode="json")
        elif isinstance(event, InventoryReserved):
            view["reservation_id"] = event.reservation_id
        elif isinstance(event, InventoryUnavailable):
            view["unavailable_items"] = [item.model_dump() for item in event.unavailable_items]
        elif isinstance(event, PaymentProcessed):
            view["payment_id"] = event.payment_id
        elif isinstance(event, PaymentFailed):
            view["payment_failure"] = event.reason
        elif isinstance(event, InventoryReleased):
            view["inventory_released"] = True
        elif isinstance(event, PaymentRefunded):
            view["refunded_payment_id"] = event.payment_id
        elif isinstance(event, ShipmentFailed):
            view["shipment_failure"] = event.reason
        elif isinstance(event, OrderShipped):
            view.update(
                shipment_id=event.shipment_id,
                carrier=event.carrier,
                tracking_number=event.tracking_number,
                shipped_at=iso_utc(event.shipped_at),
            )
        status = status_of_terminal(event)
        if status is not None:
            view["status"] = status
            if isinstance(event, OrderCancelled):
                view["reason"] = event.reason
                view["refund_issued"] = event.refund_issued
                view["cancelled_by"] = event.cancelled_by
            elif isinstance(event, OrderFulfillmentFailed):
                view["reason"] = event.error_message
            elif isinstance(event, OrderPaid):
                view["amount"] = str(event.amount)
    return view


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
