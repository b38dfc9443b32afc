"""StockBook.before / restore: what a change did to the book, taken back exactly (the Inventory
undoes the changes of a refused append this way instead of rebuilding its book)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages.base import Item, utcnow
from messages.events import Event, StockReleased, StockReserved, StockSet, StockShipped
from saga.stock import StockBook

PRODUCTS = ("P1", "P2", "P3")
ORDERS = ("o1", "o2", "o3")


@st.composite
def stock_events(draw: st.DrawFn) -> Event:
    """Any stock event about a few products and orders (whether or not it makes sense)."""
    now = utcnow()
    kind = draw(st.sampled_from(("set", "reserve", "release", "ship")))
    if kind == "set":
        return StockSet(
            product_id=draw(st.sampled_from(PRODUCTS)),
            on_hand=draw(st.integers(0, 50)),
            set_at=now,
        )
    order_id = draw(st.sampled_from(ORDERS))
    products = draw(st.lists(st.sampled_from(PRODUCTS), max_size=3, unique=True))
    items = tuple(Item(product_id=p, quantity=draw(st.integers(1, 5))) for p in products)
    if kind == "reserve":
        return StockReserved(
            order_id=order_id,
            reservation_id=draw(st.sampled_from(("r1", "r2"))),
            items=items,
            reserved_at=now,
        )
    if kind == "release":
        return StockReleased(
            order_id=order_id, reservation_id="r1", items=items, reason="x", released_at=now
        )
    return StockShipped(order_id=order_id, reservation_id="r1", items=items, shipped_at=now)


def state(book: StockBook) -> tuple[object, ...]:
    return (
        dict(book.on_hand),
        dict(book.reserved),
        {
            o: (r.reservation_id, r.units, r.released, r.shipped)
            for o, r in book.reservations.items()
        },
    )


@settings(max_examples=300, deadline=None)
@given(
    history=st.lists(stock_events(), max_size=12),
    changes=st.lists(st.lists(stock_events(), min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_restoring_changes_newest_first_gives_back_the_book(
    history: list[Event], changes: list[list[Event]]
) -> None:
    book = StockBook()
    for product_id in PRODUCTS:
        book.apply(StockSet(product_id=product_id, on_hand=20, set_at=utcnow()))
    for event in history:
        book.apply(event)
    before = state(book)
    undos = []
    for change in changes:
        undos.append(book.before(change))
        for event in change:
            book.apply(event)
    for undo in reversed(undos):
        book.restore(undo)
    assert state(book) == before


# --- checkpoints: the durable book, its snapshot, forgetting ended orders ---------------------


def seeded_book(history: list[Event]) -> StockBook:
    book = StockBook()
    for product_id in PRODUCTS:
        book.apply(StockSet(product_id=product_id, on_hand=20, set_at=utcnow()))
    for event in history:
        book.apply(event)
    return book


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(stock_events(), max_size=12),
    changes=st.lists(st.lists(stock_events(), min_size=1, max_size=3), max_size=4),
)
def test_durable_book_is_the_book_before_the_pending_changes(
    history: list[Event], changes: list[list[Event]]
) -> None:
    book = seeded_book(history)
    before = state(book)
    undos = []
    for change in changes:
        undos.append(book.before(change))
        for event in change:
            book.apply(event)
    after = state(book)
    assert state(book.durable(undos)) == before
    assert state(book) == after  # the live book keeps its pending changes


@settings(max_examples=200, deadline=None)
@given(history=st.lists(stock_events(), max_size=12), more=st.lists(stock_events(), max_size=6))
def test_snapshot_round_trip_then_the_same_events_give_the_same_book(
    history: list[Event], more: list[Event]
) -> None:
    book = seeded_book(history)
    versions = {"stock-P1": len(history), "fences": 3}
    loaded, loaded_versions = StockBook.from_snapshot(book.snapshot(versions))
    assert loaded_versions == versions
    assert state(loaded) == state(book)
    for event in more:
        book.apply(event)
        loaded.apply(event)
    assert state(loaded) == state(book)


def test_a_snapshot_of_something_else_is_refused() -> None:
    with pytest.raises(ValueError, match="snapshot"):
        StockBook.from_snapshot(b"\x93\x01\x02\x03")
    with pytest.raises(ValueError, match="format"):
        StockBook.from_snapshot(msgpack.packb({"format": 99}))


def test_forgetting_ended_orders_keeps_levels_and_the_open_orders() -> None:
    now = utcnow()
    book = seeded_book([])
    for order_id in ORDERS:
        book.apply(
            StockReserved(
                order_id=order_id,
                reservation_id=f"r-{order_id}",
                items=(Item(product_id="P1", quantity=2),),
                reserved_at=now,
            )
        )
    levels = (dict(book.on_hand), dict(book.reserved))
    assert book.forget_ended(lambda order_id: order_id == "o2") == 2
    assert set(book.reservations) == {"o2"}
    assert (dict(book.on_hand), dict(book.reserved)) == levels  # paid units stay reserved
    assert book.available("P1") == 20 - 6
