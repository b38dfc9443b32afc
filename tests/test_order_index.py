"""The order index behind list_orders (observability.tail): it keeps the newest orders and every
order in flight, not every order ever placed, and a start reads the recent history and the open
orders, not the whole store."""

from __future__ import annotations

from decimal import Decimal

import pytest

from messages.base import OrderLine, order_total, utcnow
from messages.events import OrderPaid, OrderPlaced, order_stream
from observability import tail as tail_module
from observability.tail import StoreTail
from store import CODEC, NO_STREAM, AppendRequest, EventStore, StoredEvent
from store.memory import InMemoryEventStore

LINES = (OrderLine(product_id="SKU-001", quantity=1, unit_price=Decimal("3.00")),)


def place(store: EventStore, order_id: str, customer_id: str = "c") -> None:
    placed = OrderPlaced(
        order_id=order_id,
        customer_id=customer_id,
        lines=LINES,
        total_amount=order_total(LINES),
        payment_method="tok_visa",
        placed_at=utcnow(),
    )
    store.append(order_stream(order_id), [CODEC.encode(placed)], NO_STREAM)


def pay(store: EventStore, order_id: str) -> None:
    paid = OrderPaid(
        order_id=order_id,
        payment_id=f"pay-{order_id}",
        payment_method="tok_visa",
        amount=order_total(LINES),
        paid_at=utcnow(),
    )
    request = AppendRequest(order_stream(order_id), (CODEC.encode(paid),), 0, closes=True)
    assert store.append_batch([request]) == [1]


def listed(tail: StoreTail, **query: str) -> list[tuple[str, str]]:
    """Every order the index lists (following the cursors), newest first, with its status."""
    found: list[tuple[str, str]] = []
    cursor: str | None = None
    while True:
        page = tail.list_orders(limit=7, cursor=cursor, **query)
        found += [(o["order_id"], o["status"]) for o in page["orders"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            return found


@pytest.fixture(autouse=True)
def small_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tail_module, "INDEX_WINDOW", 20)
    monkeypatch.setattr(tail_module, "TRIM_EVERY", 5)
    monkeypatch.setattr(tail_module, "START_EVENTS", 40)


def test_the_index_keeps_the_newest_orders_and_those_in_flight() -> None:
    store = InMemoryEventStore()
    tail = StoreTail(lambda: store)
    tail.start()
    try:
        ids = [f"o-{n:03d}" for n in range(100)]
        for n, order_id in enumerate(ids):
            place(store, order_id, customer_id="even" if n % 2 == 0 else "odd")
            if order_id not in ("o-003", "o-010"):
                pay(store, order_id)
            if n % 10 == 0:
                tail.catch_up()
        orders = listed(tail)
        newest = [(order_id, "paid") for order_id in reversed(ids)][: len(orders) - 2]
        assert orders[: len(newest)] == newest
        assert orders[-2:] == [("o-010", "pending"), ("o-003", "pending")]
        assert 20 + 2 <= len(orders) <= 20 + 5 + 2  # the window, what waits for the next trim
        assert listed(tail, status="pending") == [("o-010", "pending"), ("o-003", "pending")]
        assert [o for o, _ in listed(tail, customer_id="even")] == [
            o for o, _ in orders if int(o[2:]) % 2 == 0
        ]
        assert tail.counts() == (100, 2)  # the store counts the orders; in flight is exact
        pay(store, "o-003")
        assert listed(tail, status="pending") == [("o-010", "pending")]
        assert tail.counts() == (100, 1)
    finally:
        tail.stop()


class WatchedStore(InMemoryEventStore):
    """Records where each read_all starts."""

    def __init__(self) -> None:
        super().__init__()
        self.reads_from: list[int] = []

    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        self.reads_from.append(from_position)
        return super().read_all(from_position, limit)


def test_a_start_reads_the_recent_events_and_the_open_orders() -> None:
    store = WatchedStore()
    for n in range(100):
        place(store, f"o-{n:03d}")
        if n not in (2, 50):
            pay(store, f"o-{n:03d}")
    tail = StoreTail(lambda: store)
    tail.start()
    try:
        assert tail.caught_up.wait(10)
        # 198 events: the last 40 and the one event of each order still open, not all of them.
        assert store.reads_from[0] == 198 - 40
        orders = listed(tail)
        assert ("o-099", "paid") in orders
        assert ("o-000", "paid") not in orders
        assert orders[-2:] == [("o-050", "pending"), ("o-002", "pending")]
        assert tail.recovering() == 2
        assert tail.counts() == (100, 2)
        pay(store, "o-002")
        assert ("o-002", "paid") in listed(tail)
        assert tail.recovering() == 1
        assert tail.counts() == (100, 1)
    finally:
        tail.stop()
