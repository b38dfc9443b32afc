"""The audit: DESIGN.md section 7's invariants, computed from the store alone.

An order placed with shipping is not over at OrderPaid: it ends shipped (its reservation
consumed exactly once, the units gone from on_hand), cancelled or failed (refunded).

Orders still in flight are not violations (the audit can run on a live system); they are listed
under ``in_flight`` and the load test fails if any remain once it has stopped placing orders.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from messages.base import OrderStatus
from messages.events import (
    FENCES_STREAM,
    INVENTORY_STREAM,
    ORDER_STREAM_PREFIX,
    PAYMENT_STREAM_PREFIX,
    STOCK_PREFIX,
    ChargeRefunded,
    ChargeSucceeded,
    Event,
    InventoryMigrated,
    InventoryReleased,
    OrderPaid,
    OrderPlaced,
    StockReleased,
    StockReserved,
    StockSet,
    StockShipped,
    order_id_of,
    status_of_terminal,
)
from saga.stock import StockBook
from store import CODEC, EventStore, StoredEvent

MAX_LISTED = 50  # violations listed per check; the count is always complete


@dataclass
class _Order:
    placed: bool = False
    statuses: list[str] = field(default_factory=list)
    terminal_not_last: bool = False
    versions: list[int] = field(default_factory=list)
    after_terminal: int = 0
    releases_recorded: int = 0
    paid_amount: Decimal | None = None
    paid_payment_id: str | None = None
    with_shipping: bool = False  # placed with shipping: OrderPaid does not end it

    @property
    def status(self) -> str:
        if self.statuses:
            return self.statuses[0]
        # In flight; an order placed with shipping is `paid` while it waits for its shipment.
        return OrderStatus.PAID if self.paid_amount is not None else OrderStatus.PENDING

    @property
    def kept_money(self) -> bool:
        """Whether the order keeps its charge: paid (and not over, or over as paid) or
        shipped."""
        return self.paid_amount is not None and self.status in (
            OrderStatus.PAID,
            OrderStatus.SHIPPED,
        )


@dataclass
class _Payments:
    charges: list[tuple[str, Decimal]] = field(default_factory=list)
    refunds: list[tuple[str, Decimal]] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if isinstance(event, ChargeSucceeded):
            self.charges.append((event.payment_id, event.amount))
        elif isinstance(event, ChargeRefunded):
            self.refunds.append((event.payment_id, event.amount))

    @property
    def standing(self) -> set[str]:
        """The payment ids charged and not refunded."""
        return {pid for pid, _ in self.charges} - {pid for pid, _ in self.refunds}


def _scan(store: EventStore, page: int = 5000) -> Iterator[StoredEvent]:
    position = 0
    while True:
        batch = store.read_all(position, page)
        if not batch:
            return
        yield from batch
        position = batch[-1].position


@dataclass
class _Records:
    """What the scan gathered, per kind of stream."""

    orders: defaultdict[str, _Order] = field(default_factory=lambda: defaultdict(_Order))
    payments: defaultdict[str, _Payments] = field(default_factory=lambda: defaultdict(_Payments))
    stock_events: list[Event] = field(default_factory=list)  # stock streams and fences
    legacy: list[Event] = field(default_factory=list)  # the old single inventory stream
    migrated: bool = False  # the old stream's events were copied into the stock streams

    @classmethod
    def read(cls, store: EventStore) -> _Records:
        records = cls()
        for stored in _scan(store):
            records.add(stored)
        return records

    def add(self, stored: StoredEvent) -> None:
        stream = stored.stream
        if stream.startswith(ORDER_STREAM_PREFIX):
            _order_event(self.orders[order_id_of(stream)], stored, CODEC.decode(stored))
        elif stream.startswith(PAYMENT_STREAM_PREFIX):
            payments = self.payments[stream.removeprefix(PAYMENT_STREAM_PREFIX)]
            payments.add(CODEC.decode(stored))
        elif stream.startswith(STOCK_PREFIX) or stream == FENCES_STREAM:
            self.stock_events.append(CODEC.decode(stored))
        elif stream == INVENTORY_STREAM:
            event = CODEC.decode(stored)
            if isinstance(event, InventoryMigrated):
                self.migrated = True
            else:
                self.legacy.append(event)

    @property
    def inventory_events(self) -> list[Event]:
        """The inventory's events in commit order: the stock streams, after the old stream's
        events unless those were migrated into them."""
        return self.stock_events if self.migrated else [*self.legacy, *self.stock_events]


@dataclass(frozen=True)
class _Settlement:
    """How one reservation ended, from the stock events. A reservation across products is
    one event per product in the stock streams (one event in the old stream): the counts are
    per product."""

    reservation_id: str
    order_id: str
    units: Counter[str]  # product -> units held
    release_counts: set[int]  # times each product's share was released
    ship_counts: set[int]  # times each product's share was shipped

    @property
    def released(self) -> int:
        return max(self.release_counts, default=0)

    @property
    def consumed(self) -> bool:
        """Consumed by its order's shipment."""
        return self.ship_counts != {0}

    @property
    def held(self) -> bool:
        return not self.consumed and not self.released

    def violations(self, status: str | None, in_flight: set[str]) -> Iterator[str]:
        label = f"{self.reservation_id} ({self.order_id})"
        if len(self.release_counts) > 1:
            yield f"{label}: released for some of its products only"
        if self.released > 1:
            yield f"{label}: released {self.released} times"
        if self.consumed:
            if self.ship_counts != {1}:
                yield (
                    f"{label}: consumed {sorted(self.ship_counts)} times across "
                    "its products (exactly once each)"
                )
            if self.released:
                yield f"{label}: shipped and released"
            if status != OrderStatus.SHIPPED and self.order_id not in in_flight:
                yield f"{self.reservation_id}: consumed for order {self.order_id} which is {status}"
        elif not self.released:
            if status not in _HOLDING:
                yield f"{self.reservation_id}: held for order {self.order_id} which is {status}"
        elif status == OrderStatus.PAID:
            yield f"{self.reservation_id}: released although {self.order_id} is paid"


_HOLDING = (OrderStatus.PAID, OrderStatus.PENDING)  # the statuses that keep a reservation


@dataclass
class _StockLedger:
    """The inventory's events replayed: the stock book, and what happened to each
    reservation."""

    book: StockBook = field(default_factory=StockBook)
    reservations: dict[str, tuple[str, Counter[str]]] = field(default_factory=dict)
    releases: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rid, product)
    shipments: Counter[tuple[str, str]] = field(default_factory=Counter)  # (rid, product)
    set_to: dict[str, int] = field(default_factory=dict)  # product -> on hand as last set
    shipped_since: Counter[str] = field(default_factory=Counter)  # product -> since last set
    units_shipped: int = 0
    fences: int = 0

    @classmethod
    def replay(cls, events: list[Event]) -> _StockLedger:
        ledger = cls()
        for event in events:
            ledger.book.apply(event)
            ledger.apply(event)
        return ledger

    def apply(self, event: Event) -> None:
        if isinstance(event, StockSet):
            self.set_to[event.product_id] = event.on_hand
            self.shipped_since[event.product_id] = 0
        elif isinstance(event, StockShipped):
            for item in event.items:
                self.shipments[event.reservation_id, item.product_id] += 1
                self.shipped_since[item.product_id] += item.quantity
                self.units_shipped += item.quantity
        elif isinstance(event, StockReserved):
            _, units = self.reservations.setdefault(
                event.reservation_id, (event.order_id, Counter())
            )
            for item in event.items:
                units[item.product_id] += item.quantity
        elif isinstance(event, StockReleased):
            if event.reservation_id:
                for product in {item.product_id for item in event.items}:
                    self.releases[event.reservation_id, product] += 1
            else:
                self.fences += 1

    def settlements(self) -> list[_Settlement]:
        return [
            _Settlement(
                reservation_id=rid,
                order_id=order_id,
                units=units,
                release_counts={self.releases[rid, product] for product in units},
                ship_counts={self.shipments[rid, product] for product in units},
            )
            for rid, (order_id, units) in self.reservations.items()
        ]


def _result(violations: Iterable[str]) -> dict[str, Any]:
    """A check's result: every violation counted, the first ``MAX_LISTED`` listed."""
    listed: list[str] = []
    count = 0
    for text in violations:
        count += 1
        if len(listed) < MAX_LISTED:
            listed.append(text)
    return {"ok": count == 0, "violation_count": count, "violations": listed}


def _status(orders: dict[str, _Order], order_id: str, unknown: str | None) -> str | None:
    return orders[order_id].status if order_id in orders else unknown


@dataclass(frozen=True)
class _Totals:
    charged: Decimal
    refunded: Decimal
    paid_total: Decimal  # of the orders that keep their money

    @classmethod
    def of(cls, orders: dict[str, _Order], payments: dict[str, _Payments]) -> _Totals:
        # Orders that end paid or shipped keep their money (and those paid and waiting for
        # their shipment, on a live system); every other charge was refunded.
        return cls(
            charged=sum((_sum(p.charges) for p in payments.values()), Decimal(0)),
            refunded=sum((_sum(p.refunds) for p in payments.values()), Decimal(0)),
            paid_total=sum(
                (rec.paid_amount for rec in orders.values() if rec.kept_money and rec.paid_amount),
                Decimal(0),
            ),
        )


def _sum(amounts: list[tuple[str, Decimal]]) -> Decimal:
    return sum((amount for _, amount in amounts), Decimal(0))


# --- the five checks, each a stream of violations ---------------------------------------------


def _one_terminal_event(orders: dict[str, _Order]) -> Iterator[str]:
    """1. At most one terminal event per order, and the stream starts with OrderPlaced."""
    for order_id, rec in orders.items():
        if not rec.placed:
            yield f"{order_id}: stream does not start with OrderPlaced"
        if len(rec.statuses) > 1:
            yield f"{order_id}: {len(rec.statuses)} terminal events {rec.statuses}"


def _gapless_versions(orders: dict[str, _Order]) -> Iterator[str]:
    """2. Versions 0..n without gaps, nothing after the terminal event."""
    for order_id, rec in orders.items():
        if rec.terminal_not_last or rec.after_terminal:
            yield f"{order_id}: {rec.after_terminal} events after the terminal event"
        if rec.versions != list(range(len(rec.versions))):
            yield f"{order_id}: versions are not 0..n without gaps"


def _stock_consistent(ledger: _StockLedger, held_by_orders: Counter[str]) -> Iterator[str]:
    """3. Nothing oversold, nothing leaked; shipped units left on_hand exactly once."""
    book, set_to, shipped_since = ledger.book, ledger.set_to, ledger.shipped_since
    for product in sorted(set(book.on_hand) | set(book.reserved)):
        on_hand, reserved_units = book.on_hand.get(product, 0), book.reserved.get(product, 0)
        if not 0 <= reserved_units <= on_hand:
            yield f"{product}: reserved {reserved_units} outside 0..on_hand {on_hand}"
        if reserved_units != held_by_orders[product]:
            yield (
                f"{product}: reserved {reserved_units} but paid and in-flight orders "
                f"hold {held_by_orders[product]}"
            )
        if product in set_to and on_hand != set_to[product] - shipped_since[product]:
            yield (
                f"{product}: on_hand {on_hand} but set to {set_to[product]} with "
                f"{shipped_since[product]} units shipped since"
            )


def _reservations_settled(
    orders: dict[str, _Order], settlements: list[_Settlement], in_flight: set[str]
) -> Iterator[str]:
    """4. Every reservation kept, consumed once or released once, as its order's status says."""
    for order_id, rec in orders.items():
        if rec.releases_recorded > 1:
            yield f"{order_id}: InventoryReleased recorded {rec.releases_recorded} times"
    for settlement in settlements:
        status = _status(orders, settlement.order_id, None)
        yield from settlement.violations(status, in_flight)
    held = {s.order_id for s in settlements if s.held}
    shipped = {s.order_id for s in settlements if s.consumed}
    for order_id, rec in orders.items():
        if rec.status == OrderStatus.PAID and order_id not in held:
            yield f"{order_id}: paid without a held reservation"
        if rec.status == OrderStatus.SHIPPED and order_id not in shipped:
            yield f"{order_id}: shipped but its reservation was not consumed"


def _money_balanced(
    orders: dict[str, _Order], payments: dict[str, _Payments], totals: _Totals
) -> Iterator[str]:
    """5. At most one charge per order, refunded unless the order keeps it; the books add up."""
    for order_id, record in payments.items():
        if len(record.charges) > 1:
            yield f"{order_id}: charged {len(record.charges)} times"
        standing = record.standing
        status = _status(orders, order_id, "unknown")
        if status in (OrderStatus.CANCELLED, OrderStatus.FAILED, "unknown") and standing:
            yield f"{order_id}: {status} but charge {sorted(standing)} is not refunded"
        order = orders.get(order_id)
        if order is not None and order.kept_money and order.paid_payment_id not in standing:
            yield f"{order_id}: {status} but its charge does not stand"
    if totals.charged - totals.refunded != totals.paid_total:
        yield (
            f"charged {totals.charged} - refunded {totals.refunded} = "
            f"{totals.charged - totals.refunded} != paid and shipped orders {totals.paid_total}"
        )


def audit(store: EventStore) -> dict[str, Any]:
    """Check every invariant; ``{"ok", "checks": {name: {"ok", "violations"}}, ...}``."""
    records = _Records.read(store)
    orders, payments = dict(records.orders), dict(records.payments)
    ledger = _StockLedger.replay(records.inventory_events)
    settlements = ledger.settlements()
    in_flight = sorted(o for o, rec in orders.items() if rec.placed and not rec.statuses)
    held_by_orders: Counter[str] = Counter()
    for settlement in settlements:
        if settlement.held and _status(orders, settlement.order_id, None) in _HOLDING:
            held_by_orders.update(settlement.units)
    totals = _Totals.of(orders, payments)
    checks = {
        "one_terminal_event": _result(_one_terminal_event(orders)),
        "gapless_versions": _result(_gapless_versions(orders)),
        "stock_consistent": _result(_stock_consistent(ledger, held_by_orders)),
        "reservations_settled": _result(_reservations_settled(orders, settlements, set(in_flight))),
        "money_balanced": _result(_money_balanced(orders, payments, totals)),
    }
    return {
        "ok": all(check["ok"] for check in checks.values()),
        "checks": checks,
        "orders": len(orders),
        "status_counts": dict(Counter(rec.status for rec in orders.values())),
        "in_flight": in_flight[:MAX_LISTED],
        "in_flight_count": len(in_flight),
        "charged": str(totals.charged),
        "refunded": str(totals.refunded),
        "paid_total": str(totals.paid_total),
        "units_shipped": ledger.units_shipped,
        "fences": ledger.fences,
    }


def _order_event(rec: _Order, stored: StoredEvent, event: Event) -> None:
    rec.versions.append(stored.version)
    if stored.version == 0:
        rec.placed = isinstance(event, OrderPlaced)
        rec.with_shipping = isinstance(event, OrderPlaced) and event.shipping is not None
    if rec.statuses:
        rec.after_terminal += 1
    if isinstance(event, InventoryReleased):
        rec.releases_recorded += 1
    if isinstance(event, OrderPaid):
        rec.paid_amount = event.amount
        rec.paid_payment_id = event.payment_id
        if rec.with_shipping:
            return  # not the end of an order placed with shipping (ends_order)
    status = status_of_terminal(event)
    if status is not None:
        rec.statuses.append(status)
