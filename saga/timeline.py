"""An order's timeline: its saga events and the outside services' records (the payment
provider's ``payment-{id}``, the carrier's ``shipment-{id}``), merged by time.

Each entry says how long the step took since the previous entry, and whether it compensates
(stock given back, a charge voided or refunded, a shipment cancelled), so a person sees where an
order spent its time and what was undone. Times are commit times; entries committed together
keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from messages.base import iso_utc
from saga.views import event_view
from store import StoredEvent

COMPENSATIONS = frozenset(
    {
        "InventoryReleased",
        "PaymentRefunded",
        "PaymentVoided",
        "ChargeRefunded",
        "ShipmentCancelled",
        "ShipmentVoided",
    }
)
"""Event types (order, payment and shipment streams) that undo an earlier step."""

SOURCES = (("payment-", "payment"), ("shipment-", "shipment"))
"""Stream prefix → the column an entry goes in; anything else is the order stream."""


def source_of(stream: str) -> str:
    """Which column of the timeline a stream's records go in: order, payment or shipment."""
    return next((name for prefix, name in SOURCES if stream.startswith(prefix)), "order")


def timeline(
    order_id: str,
    order: Sequence[StoredEvent],
    payment: Sequence[StoredEvent],
    shipment: Sequence[StoredEvent] = (),
) -> dict[str, Any]:
    """The merged timeline of an order (``order`` must not be empty)."""
    merged = sorted([*order, *payment, *shipment], key=lambda s: (s.recorded_at, s.position))
    start = merged[0].recorded_at
    previous = start
    entries = []
    for stored in merged:
        view = event_view(stored)
        entries.append(
            {
                "type": stored.type,
                "source": source_of(stored.stream),
                "stream": stored.stream,
                "version": stored.version,
                "time": iso_utc(stored.recorded_at),
                "since_start_ms": round((stored.recorded_at - start) * 1000, 3),
                "duration_ms": round((stored.recorded_at - previous) * 1000, 3),
                "compensation": stored.type in COMPENSATIONS,
                "data": view["data"],
            }
        )
        previous = stored.recorded_at
    return {
        "order_id": order_id,
        "started_at": iso_utc(start),
        "total_ms": round((merged[-1].recorded_at - start) * 1000, 3),
        "entries": entries,
    }
