"""StockBook.before / restore: what a change did to the book, taken back exactly (the Inventory
undoes the changes of a refused append this way instead of rebuilding its book)."""

from __future__ import annotations

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
