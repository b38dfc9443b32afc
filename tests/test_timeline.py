"""saga/timeline.py: the order stream, payment and shipment records merged by commit time, each
in its column, compensations marked."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from messages.base import Item
from messages.events import (
    ChargeSucceeded,
    Event,
    OrderPaid,
    OrderShipped,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
    order_stream,
    payment_stream,
    shipment_stream,
)
from saga.timeline import source_of, timeline
from store import CODEC, StoredEvent

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
ORDER = "o-tl"


def _stored(stream: str, version: int, position: int, at: float, event: Event) -> StoredEvent:
    record = CODEC.encode(event)
    return StoredEvent(stream, version, position, record.event_id, record.type, record.payload, at)


def test_shipment_records_sit_in_their_own_column_beside_the_order_stream() -> None:
    order = [
        _stored(
            order_stream(ORDER),
            0,
            2,
            10.0,
            OrderPaid(
                order_id=ORDER,
                payment_id="p",
                payment_method="tok_visa",
                amount=Decimal("5"),
                paid_at=NOW,
            ),
        ),
        _stored(
            order_stream(ORDER),
            1,
            5,
            10.5,
            OrderShipped(
                order_id=ORDER,
                shipment_id="s",
                carrier="ship_standard",
                tracking_number="T1",
                items=(Item(product_id="SKU-001", quantity=1),),
                shipped_at=NOW,
            ),
        ),
    ]
    payment = [
        _stored(
            payment_stream(ORDER),
            0,
            1,
            10.0,
            ChargeSucceeded(
                order_id=ORDER,
                payment_id="p",
                amount=Decimal("5"),
                payment_method="tok_visa",
                charged_at=NOW,
            ),
        ),
    ]
    shipment = [
        _stored(
            shipment_stream(ORDER),
            0,
            4,
            10.25,
            ShipmentCreated(
                order_id=ORDER,
                shipment_id="s",
                carrier="ship_standard",
                tracking_number="T1",
                created_at=NOW,
            ),
        ),
    ]
    found = timeline(ORDER, order, payment, shipment)
    entries = found["entries"]
    assert [(e["type"], e["source"]) for e in entries] == [
        ("ChargeSucceeded", "payment"),
        ("OrderPaid", "order"),
        ("ShipmentCreated", "shipment"),
        ("OrderShipped", "order"),
    ]
    assert [e["duration_ms"] for e in entries] == [0.0, 0.0, 250.0, 250.0]
    assert found["total_ms"] == 500.0
    assert entries[2]["data"]["tracking_number"] == "T1"
    assert not any(e["compensation"] for e in entries)


def test_a_cancelled_shipment_is_a_compensation_and_shipment_failed_a_step() -> None:
    order = [
        _stored(
            order_stream(ORDER),
            0,
            1,
            1.0,
            ShipmentFailed(order_id=ORDER, reason="carrier refused", failed_at=NOW),
        ),
    ]
    shipment = [
        _stored(
            shipment_stream(ORDER),
            0,
            2,
            2.0,
            ShipmentCancelled(order_id=ORDER, shipment_id="s", reason="late", cancelled_at=NOW),
        ),
    ]
    entries = timeline(ORDER, order, [], shipment)["entries"]
    assert [(e["type"], e["compensation"]) for e in entries] == [
        ("ShipmentFailed", False),
        ("ShipmentCancelled", True),
    ]
    assert entries[1]["source"] == "shipment"


def test_without_shipment_records_the_timeline_is_order_and_payment() -> None:
    assert source_of(order_stream(ORDER)) == "order"
    assert source_of(payment_stream(ORDER)) == "payment"
    assert source_of(shipment_stream(ORDER)) == "shipment"
    order = [
        _stored(
            order_stream(ORDER),
            0,
            1,
            1.0,
            ShipmentFailed(order_id=ORDER, reason="x", failed_at=NOW),
        ),
    ]
    assert [e["source"] for e in timeline(ORDER, order, [])["entries"]] == ["order"]
