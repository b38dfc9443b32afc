"""Stock bookkeeping, pure: levels and reservations per product, replayable from the stock events.

The Inventory actor keeps one ``StockBook`` in memory; the audit replays one from the store to
check invariant 3 (DESIGN.md section 7). No actors and no I/O here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from messages.base import Item, UnavailableItem
from messages.events import (
    FENCES_STREAM,
    Event,
    StockReleased,
    StockReserved,
    StockSet,
    StockShipped,
    stock_stream,
)

Units = tuple[tuple[str, int], ...]  # (product id, quantity) per product
SNAPSHOT_FORMAT = 1


def units_of(items: Sequence[Item]) -> Units:
    """Items as plain pairs, product ids interned: Inventory keeps one Reservation per order
    it ever held, and as pydantic Items with their own strings they took ~870 bytes each."""
    return tuple((sys.intern(item.product_id), item.quantity) for item in items)


@dataclass(slots=True)
class Reservation:
    """What one order holds (or held)."""

    reservation_id: str  # "" for a fence: the order was released before it reserved anything
    units: Units
    released: bool = False
    shipped: bool = False  # consumed by the order's shipment: nothing held, nothing to release

    def items(self) -> tuple[Item, ...]:
        """The held units as Items (for the event that releases them)."""
        return tuple(Item(product_id=p, quantity=q) for p, q in self.units)


@dataclass(slots=True)
class Undo:
    """What some events are about to change in a book, as it was: `StockBook.restore` puts it
    back (the book before a change that was never committed)."""

    on_hand: dict[str, int | None]
    reserved: dict[str, int | None]
    reservations: dict[str, Reservation | None]


@dataclass
class StockBook:
    """Stock levels and reservations; pure bookkeeping, replayable from the inventory stream."""

    on_hand: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        """Apply one inventory event."""
        if isinstance(event, StockSet):
            self.on_hand[event.product_id] = event.on_hand
            self.reserved.setdefault(event.product_id, 0)
        elif isinstance(event, StockReserved):
            # One product's share of a reservation (the stock streams), or all of it (the old
            # single inventory stream): shares of one reservation add up.
            units = units_of(event.items)
            held = self.reservations.get(event.order_id)
            if held is not None and held.reservation_id == event.reservation_id:
                held.units += units
            else:
                self.reservations[event.order_id] = Reservation(event.reservation_id, units)
            for product_id, quantity in units:
                self.reserved[product_id] = self.reserved.get(product_id, 0) + quantity
        elif isinstance(event, StockReleased):
            held = self.reservations.get(event.order_id)
            if held is None:
                self.reservations[event.order_id] = Reservation("", (), released=True)
                return
            held.released = True
            # The event names what it gives back: the whole reservation, or one product's
            # share of it (each share is released in its own product's stream).
            for product_id, quantity in units_of(event.items):
                self.reserved[product_id] -= quantity
        elif isinstance(event, StockShipped):
            # The shipped units leave the warehouse: out of on_hand and out of reserved (each
            # product's share in its own stream, like a release).
            held = self.reservations.get(event.order_id)
            if held is not None:
                held.shipped = True
            for product_id, quantity in units_of(event.items):
                self.reserved[product_id] = self.reserved.get(product_id, 0) - quantity
                self.on_hand[product_id] = self.on_hand.get(product_id, 0) - quantity

    def before(self, events: Sequence[Event]) -> Undo:
        """Take what `events` will touch (levels of their products, their orders'
        reservations) as it is now, before they are applied."""
        products: set[str] = set()
        orders: set[str] = set()
        for event in events:
            if isinstance(event, StockSet):
                products.add(event.product_id)
            elif isinstance(event, StockReserved | StockReleased | StockShipped):
                orders.add(event.order_id)
                products.update(item.product_id for item in event.items)
        return Undo(
            on_hand={p: self.on_hand.get(p) for p in products},
            reserved={p: self.reserved.get(p) for p in products},
            reservations={o: _copy(self.reservations.get(o)) for o in orders},
        )

    def restore(self, undo: Undo) -> None:
        """Put back what `before` took. Undos of several changes are restored newest first."""
        for levels, taken in ((self.on_hand, undo.on_hand), (self.reserved, undo.reserved)):
            for product_id, level in taken.items():
                if level is None:
                    levels.pop(product_id, None)
                else:
                    levels[product_id] = level
        for order_id, held in undo.reservations.items():
            if held is None:
                self.reservations.pop(order_id, None)
            else:
                self.reservations[order_id] = held

    def shortfall(self, items: tuple[Item, ...]) -> tuple[UnavailableItem, ...]:
        """The items that cannot be held now (unknown products have 0 available)."""
        return tuple(
            UnavailableItem(
                product_id=item.product_id,
                requested=item.quantity,
                available=self.available(item.product_id),
            )
            for item in items
            if self.available(item.product_id) < item.quantity
        )

    def available(self, product_id: str) -> int:
        """Units that can still be reserved."""
        return self.on_hand.get(product_id, 0) - self.reserved.get(product_id, 0)

    def report(self, product_ids: tuple[str, ...]) -> dict[str, dict[str, int]]:
        """on_hand / reserved / available per product (all products when none are named)."""
        wanted = product_ids or tuple(sorted(self.on_hand))
        return {
            p: {
                "on_hand": self.on_hand.get(p, 0),
                "reserved": self.reserved.get(p, 0),
                "available": self.available(p),
            }
            for p in wanted
            if p in self.on_hand
        }

    def forget_ended(self, is_open: Callable[[str], bool]) -> int:
        """Drop the reservations of orders that have ended (`is_open` is False for them): no
        request about such an order comes any more, and the units a paid order keeps stay
        counted in `reserved`. Without this the book would hold every order ever placed.
        Returns how many were dropped."""
        ended = [order_id for order_id in self.reservations if not is_open(order_id)]
        for order_id in ended:
            del self.reservations[order_id]
        return len(ended)

    def durable(self, pending: Sequence[Undo]) -> StockBook:
        """The book without the changes not yet committed (their undos, oldest first): a copy
        that shares the unchanged reservations (it is encoded at once, not kept)."""
        book = StockBook(dict(self.on_hand), dict(self.reserved), dict(self.reservations))
        for undo in reversed(pending):
            book.restore(undo)
        return book

    def snapshot(self, versions: Mapping[str, int]) -> bytes:
        """The book and the stream versions it reflects, as msgpack (no pickle: a snapshot is
        read back by every node of a shared store)."""
        return msgpack.packb(
            {
                "format": SNAPSHOT_FORMAT,
                "versions": dict(versions),
                "on_hand": self.on_hand,
                "reserved": self.reserved,
                "reservations": [
                    [o, r.reservation_id, [list(u) for u in r.units], r.released, r.shipped]
                    for o, r in self.reservations.items()
                ],
            },
            use_bin_type=True,
        )

    @classmethod
    def from_snapshot(cls, data: bytes) -> tuple[StockBook, dict[str, int]]:
        """The book and versions `snapshot` wrote; ValueError if it is not one."""
        try:
            raw: Any = msgpack.unpackb(data, raw=False)
            if raw.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"snapshot format {raw.get('format')!r}")
            book = cls(
                on_hand={sys.intern(p): int(n) for p, n in raw["on_hand"].items()},
                reserved={sys.intern(p): int(n) for p, n in raw["reserved"].items()},
            )
            for order_id, reservation_id, units, released, shipped in raw["reservations"]:
                held = tuple((sys.intern(p), int(q)) for p, q in units)
                book.reservations[order_id] = Reservation(
                    reservation_id, held, bool(released), bool(shipped)
                )
            versions = {str(s): int(v) for s, v in raw["versions"].items()}
        except (KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise ValueError(f"not a stock snapshot: {e}") from e
        return book, versions


def _copy(held: Reservation | None) -> Reservation | None:
    if held is None:
        return None
    return Reservation(held.reservation_id, held.units, held.released, held.shipped)


def split_by_stream(event: Event) -> list[tuple[str, Event]]:
    """Where an inventory event goes in the per-product layout: a level into its product's
    stream, a reservation, a release or a shipment as one event per product (with that
    product's items) in each product's stream, a fence (a release holding nothing) into the
    fences stream."""
    if isinstance(event, StockSet):
        return [(stock_stream(event.product_id), event)]
    if isinstance(event, StockReserved | StockReleased | StockShipped):
        if not event.items:
            return [(FENCES_STREAM, event)]
        by_product: dict[str, list[Item]] = {}
        for item in event.items:
            by_product.setdefault(item.product_id, []).append(item)
        return [
            (stock_stream(product_id), event.model_copy(update={"items": tuple(items)}))
            for product_id, items in by_product.items()
        ]
    return []
