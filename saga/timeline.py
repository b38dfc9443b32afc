"""An order's timeline: its saga events and the payment provider's records, merged by time.

Each entry says how long the step took since the previous entry, and whether it compensates
(stock given back, a charge voided or refunded), so a person sees where an order spent its time
and what was undone. Times are commit times; entries committed together keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from messages.base import iso_utc
from saga.views import event_view
from store import StoredEvent

COMPENSATIONS = frozenset(
    {"InventoryReleased", "PaymentRefunded", "PaymentVoided", "ChargeRefunded"}
)
"""Event types (order and payment streams) that undo an earlier step."""


def timeline(
    order_id: str, order: Sequence[StoredEvent], payment: Sequence[StoredEvent]
) -> dict[str, Any]:
    """The merged timeline of an order (``order`` must not be empty)."""
    merged = sorted([*order, *payment], key=lambda s: (s.recorded_at, s.position))
    start = merged[0].recorded_at
    previous = start
    entries = []
    for stored in merged:
        view = event_view(stored)
        entries.append(
            {
                "type": stored.type,
                "source": "payment" if stored.stream.startswith("payment-") else "order",
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
