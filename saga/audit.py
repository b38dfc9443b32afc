"""The audit: DESIGN.md section 7's invariants, computed from the store alone.

An order placed with shipping is not over at OrderPaid: it ends shipped (its reservation
consumed exactly once, the units gone from on_hand), cancelled or failed (refunded).

Orders still in flight are not violations (the audit can run on a live system); they are listed
under ``in_flight`` and the load test fails if any remain once it has stopped placing orders.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
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


def _scan(store: EventStore, page: int = 5000) -> Iterator[StoredEvent]:
    position = 0
    while True:
        batch = store.read_all(position, page)
        if not batch:
            return
        yield from batch
        position = batch[-1].position


class _Check:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.count = 0

    def fail(self, text: str) -> None:
        self.count += 1
        if len(self.violations) < MAX_LISTED:
            self.violations.append(text)

    def result(self) -> dict[str, Any]:
        return {"ok": self.count == 0, "violation_count": self.count, "violations": self.violations}


def audit(store: EventStore) -> dict[str, Any]:
    """Check every invariant; ``{"ok", "checks": {name: {"ok", "violations"}}, ...}``."""
    orders: dict[str, _Order] = defaultdict(_Order)
    payments: dict[str, _Payments] = defaultdict(_Payments)
    stock_events: list[Event] = []  # the stock streams (and fences), in commit order
    legacy: list[Event] = []  # the old single inventory stream, if not migrated
    migrated = False
    for stored in _scan(store):
        stream = stored.stream
        if stream.startswith(ORDER_STREAM_PREFIX):
            _order_event(orders[order_id_of(stream)], stored, CODEC.decode(stored))
        elif stream.startswith(PAYMENT_STREAM_PREFIX):
            event = CODEC.decode(stored)
            record = payments[stream.removeprefix(PAYMENT_STREAM_PREFIX)]
            if isinstance(event, ChargeSucceeded):
                record.charges.append((event.payment_id, event.amount))
            elif isinstance(event, ChargeRefunded):
                record.refunds.append((event.payment_id, event.amount))
        elif stream.startswith(STOCK_PREFIX) or stream == FENCES_STREAM:
            stock_events.append(CODEC.decode(stored))
        elif stream == INVENTORY_STREAM:
            event = CODEC.decode(stored)
            if isinstance(event, InventoryMigrated):
                migrated = True  # its events were copied into the stock streams
            else:
                legacy.append(event)

    # A reservation across products is one event per product in the stock streams (one
    # event in the old stream): count its shares, and each share's releases.
    book = StockBook()
    reservations: dict[str, tuple[str, Counter[str]]] = {}  # id -> (order id, units held)
    releases: Counter[tuple[str, str]] = Counter()  # (reservation id, product) -> times
    shipments: Counter[tuple[str, str]] = Counter()  # (reservation id, product) -> times
    set_to: dict[str, int] = {}  # product -> units on hand as last set
    shipped_since: Counter[str] = Counter()  # product -> units shipped since it was last set
    units_shipped = 0
    fences = 0
    for event in stock_events if migrated else [*legacy, *stock_events]:
        book.apply(event)
        if isinstance(event, StockSet):
            set_to[event.product_id] = event.on_hand
            shipped_since[event.product_id] = 0
        elif isinstance(event, StockShipped):
            for item in event.items:
                shipments[event.reservation_id, item.product_id] += 1
                shipped_since[item.product_id] += item.quantity
                units_shipped += item.quantity
        if isinstance(event, StockReserved):
            _, units = reservations.setdefault(event.reservation_id, (event.order_id, Counter()))
            for item in event.items:
                units[item.product_id] += item.quantity
        elif isinstance(event, StockReleased):
            if event.reservation_id:
                for product in {item.product_id for item in event.items}:
                    releases[event.reservation_id, product] += 1
            else:
                fences += 1

    terminal, versions, stock, reservation_check, money = (_Check() for _ in range(5))
    in_flight = sorted(o for o, rec in orders.items() if rec.placed and not rec.statuses)
    in_flight_set = set(in_flight)
    for order_id, rec in orders.items():
        if not rec.placed:
            terminal.fail(f"{order_id}: stream does not start with OrderPlaced")
        if len(rec.statuses) > 1:
            terminal.fail(f"{order_id}: {len(rec.statuses)} terminal events {rec.statuses}")
        if rec.terminal_not_last or rec.after_terminal:
            versions.fail(f"{order_id}: {rec.after_terminal} events after the terminal event")
        if rec.versions != list(range(len(rec.versions))):
            versions.fail(f"{order_id}: versions are not 0..n without gaps")
        if rec.releases_recorded > 1:
            reservation_check.fail(
                f"{order_id}: InventoryReleased recorded {rec.releases_recorded} times"
            )

    # 3. stock: nothing oversold, nothing leaked
    held_by_orders: Counter[str] = Counter()
    released: dict[str, int] = {}
    consumed: set[str] = set()  # reservations consumed by their order's shipment
    for reservation_id, (order_id, units) in reservations.items():
        status = orders[order_id].status if order_id in orders else None
        counts = {releases[reservation_id, product] for product in units}
        count = released[reservation_id] = max(counts, default=0)
        shipped = {shipments[reservation_id, product] for product in units}
        if len(counts) > 1:
            reservation_check.fail(
                f"{reservation_id} ({order_id}): released for some of its products only"
            )
        if count > 1:
            reservation_check.fail(f"{reservation_id} ({order_id}): released {count} times")
        if shipped != {0}:
            consumed.add(reservation_id)
            if shipped != {1}:
                reservation_check.fail(
                    f"{reservation_id} ({order_id}): consumed {sorted(shipped)} times across "
                    "its products (exactly once each)"
                )
            if count:
                reservation_check.fail(f"{reservation_id} ({order_id}): shipped and released")
            if status != OrderStatus.SHIPPED and order_id not in in_flight_set:
                reservation_check.fail(
                    f"{reservation_id}: consumed for order {order_id} which is {status}"
                )
        elif count == 0:
            if status in (OrderStatus.PAID, OrderStatus.PENDING):
                held_by_orders.update(units)
            else:
                reservation_check.fail(
                    f"{reservation_id}: held for order {order_id} which is {status}"
                )
        elif status == OrderStatus.PAID:
            reservation_check.fail(f"{reservation_id}: released although {order_id} is paid")
    held_reservations = {
        o for rid, (o, _) in reservations.items() if not released[rid] and rid not in consumed
    }
    shipped_orders = {o for rid, (o, _) in reservations.items() if rid in consumed}
    for order_id, rec in orders.items():
        if rec.status == OrderStatus.PAID and order_id not in held_reservations:
            reservation_check.fail(f"{order_id}: paid without a held reservation")
        if rec.status == OrderStatus.SHIPPED and order_id not in shipped_orders:
            reservation_check.fail(f"{order_id}: shipped but its reservation was not consumed")
    for product in sorted(set(book.on_hand) | set(book.reserved)):
        on_hand, reserved_units = book.on_hand.get(product, 0), book.reserved.get(product, 0)
        if not 0 <= reserved_units <= on_hand:
            stock.fail(f"{product}: reserved {reserved_units} outside 0..on_hand {on_hand}")
        if reserved_units != held_by_orders[product]:
            stock.fail(
                f"{product}: reserved {reserved_units} but paid and in-flight orders "
                f"hold {held_by_orders[product]}"
            )
        if product in set_to and on_hand != set_to[product] - shipped_since[product]:
            stock.fail(
                f"{product}: on_hand {on_hand} but set to {set_to[product]} with "
                f"{shipped_since[product]} units shipped since"
            )

    # 5. money
    charged = refunded = Decimal(0)
    for order_id, record in payments.items():
        charged += sum((amount for _, amount in record.charges), Decimal(0))
        refunded += sum((amount for _, amount in record.refunds), Decimal(0))
        if len(record.charges) > 1:
            money.fail(f"{order_id}: charged {len(record.charges)} times")
        standing = {pid for pid, _ in record.charges} - {pid for pid, _ in record.refunds}
        status = orders[order_id].status if order_id in orders else "unknown"
        if status in (OrderStatus.CANCELLED, OrderStatus.FAILED, "unknown") and standing:
            money.fail(f"{order_id}: {status} but charge {sorted(standing)} is not refunded")
        order = orders.get(order_id)
        if order is not None and order.kept_money and order.paid_payment_id not in standing:
            money.fail(f"{order_id}: {status} but its charge does not stand")
    # Orders that end paid or shipped keep their money (and those paid and waiting for their
    # shipment, on a live system); every other charge was refunded.
    paid_total = sum(
        (rec.paid_amount for rec in orders.values() if rec.kept_money and rec.paid_amount),
        Decimal(0),
    )
    if charged - refunded != paid_total:
        money.fail(
            f"charged {charged} - refunded {refunded} = {charged - refunded} "
            f"!= paid and shipped orders {paid_total}"
        )

    checks = {
        "one_terminal_event": terminal.result(),
        "gapless_versions": versions.result(),
        "stock_consistent": stock.result(),
        "reservations_settled": reservation_check.result(),
        "money_balanced": money.result(),
    }
    return {
        "ok": all(check["ok"] for check in checks.values()),
        "checks": checks,
        "orders": len(orders),
        "status_counts": dict(Counter(rec.status for rec in orders.values())),
        "in_flight": in_flight[:MAX_LISTED],
        "in_flight_count": len(in_flight),
        "charged": str(charged),
        "refunded": str(refunded),
        "paid_total": str(paid_total),
        "units_shipped": units_shipped,
        "fences": fences,
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
