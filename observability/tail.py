"""The store tail: one thread follows the store's global order (``read_all`` from the last
position) and feeds three things from that single read:

- the **order index** behind ``list_orders`` (newest first, by status and customer),
- the **metrics** derived from events (``observability.metrics``),
- the **live feed** of the web console (server-sent events), fanned out to every subscriber, so
  a console never polls the order list and N consoles cost one store read, not N.

Reading the store instead of hooking the actors keeps the saga's hot path untouched and works on
every base: the process bases' actors write to the same store.

The index holds a small record (about 400 bytes) for each of the newest ``INDEX_WINDOW`` orders
and for every order in flight, however old: ``list_orders`` pages through those, newest first,
and ``get_order`` / ``read_stream`` reach any order in the store. So a node that has taken
millions of orders holds what the window holds, not its history; an index of every order would
be a store-side query (an index on the placement), not memory.

The first pass after a start does not read the whole store either: it reads the last
``START_EVENTS`` events (enough for the window) and the streams of the orders still open (the
store's open heads), so a node's start costs the same on a day-old and on a year-old database.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from messages.base import OrderStatus, iso_utc
from messages.events import FINAL_TYPE_NAMES, TERMINAL_TYPE_NAMES
from observability import metrics
from store import EventStore, StoredEvent

log = logging.getLogger("orders.tail")

PAGE = 1000  # events per read_all call (5,000 left ~4 MiB more RSS after the first pass)
MAX_LIST = 1000  # orders per list page
SCAN_LIMIT = 100_000  # index entries one list request looks at before it returns a cursor
FEED_ORDERS_PER_MESSAGE = 200  # changed orders one live message carries (the newest)
SUBSCRIBER_BACKLOG = 256  # messages queued for a slow subscriber before it must resync
STATS_KEPT = 300  # seconds of throughput/latency history a new console starts with
INDEX_WINDOW = 10_000  # newest orders the index keeps besides those in flight
TRIM_EVERY = 1_000  # orders past the window before the oldest finished ones are dropped
START_EVENTS = INDEX_WINDOW * 10  # events the first pass reads back (an order writes ~5-10)

ORDER_PREFIX = "order-"
# Provider streams of one order (payment-{id}, shipment-{id}): the order's live feed shows them.
RECORD_PREFIXES = ("payment-", "shipment-")
_STATUS_OF_TYPE = {
    "OrderPaid": OrderStatus.PAID,
    "OrderShipped": OrderStatus.SHIPPED,
    "OrderCancelled": OrderStatus.CANCELLED,
    "OrderFulfillmentFailed": OrderStatus.FAILED,
}


@dataclass(slots=True)
class OrderSummary:
    """What the order list shows of one order."""

    order_id: str
    position: int  # of its OrderPlaced: the list's newest-first order and its cursor
    placed_at: float  # commit time of OrderPlaced (unix seconds)
    customer_id: str = ""
    total_amount: str = "0"
    payment_method: str = ""
    status: str = OrderStatus.PENDING
    reason: str | None = None
    shipping: bool = False  # placed with shipping: OrderPaid does not end it
    finished: bool = False  # its terminal event is recorded
    last_type: str = "OrderPlaced"
    version: int = 0
    updated_at: float = 0.0

    def view(self) -> dict[str, Any]:
        """The summary as the API returns it."""
        return {
            "order_id": self.order_id,
            "customer_id": self.customer_id,
            "status": str(self.status),
            "reason": self.reason,
            "total_amount": self.total_amount,
            "payment_method": self.payment_method,
            "last_event": self.last_type,
            "version": self.version,
            "placed_at": iso_utc(self.placed_at),
            "updated_at": iso_utc(self.updated_at),
        }


@dataclass
class _Sequence:
    """Orders in placement order, with their positions for bisecting a cursor."""

    positions: list[int] = field(default_factory=list)
    orders: list[OrderSummary] = field(default_factory=list)

    @classmethod
    def of(cls, orders: list[OrderSummary]) -> _Sequence:
        """A sequence of `orders`, already in position order."""
        return cls([o.position for o in orders], orders)

    def add(self, order: OrderSummary) -> None:
        # Placements arrive in position order, so appending keeps both lists sorted.
        self.positions.append(order.position)
        self.orders.append(order)


@dataclass
class _Second:
    """Throughput and latency of the orders that ended within one wall-clock second."""

    placed: int = 0
    completed: int = 0
    latencies: list[float] = field(default_factory=list)


class _Subscriber:
    """One live-feed client: a bounded queue on the event loop, and what it wants to see."""

    def __init__(self, loop: asyncio.AbstractEventLoop, order_id: str | None) -> None:
        self.loop = loop
        self.order_id = order_id
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(SUBSCRIBER_BACKLOG)

    def offer(self, message: str | None) -> None:
        """Runs on the loop. A subscriber too slow to keep up is told to resync (reload what
        it shows) rather than holding an unbounded backlog."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None if message is None else _sse("resync", {}))


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class StoreTail:
    """Follows the store from position 0; see the module docstring."""

    def __init__(self, open_store: Callable[[], EventStore], interval: float = 0.2) -> None:
        self._open_store = open_store
        self._store: EventStore | None = None
        self._interval = interval
        self._lock = threading.Lock()  # one reader of the store and writer of the index
        self._position = 0
        self._orders: dict[str, OrderSummary] = {}
        self._all = _Sequence()
        self._by_customer: dict[str, _Sequence] = {}
        self._pending = 0
        # Metrics count what happens while this node runs; the history before it started is
        # in the store (Prometheus counters start at zero with their process).
        self._count_from = time.time()
        self._initial_pending: list[str] | None = None
        self._subscribers: set[_Subscriber] = set()
        self._second = _Second()
        self._second_of = int(time.time())
        self.stats: deque[dict[str, Any]] = deque(maxlen=STATS_KEPT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = threading.Event()  # the first pass reached the end of the store
        self._metrics = metrics.DERIVED
        self._order_feeds = 0  # subscribers that follow one order's events

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the store and follow it in a thread of its own."""
        self._store = self._open_store()
        self._thread = threading.Thread(target=self._run, name="store-tail", daemon=True)
        self._thread.start()

    def close_feeds(self) -> None:
        """End every live subscription (the node is stopping)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            with contextlib.suppress(RuntimeError):  # its loop closed already
                subscriber.loop.call_soon_threadsafe(subscriber.offer, None)

    def stop(self) -> None:
        """End the thread and every live subscription."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.close_feeds()
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Read in the background only for the first pass and while a console follows
                # the feed: every row it reads hands the GIL back and forth with the actor
                # thread (sqlite3 releases it per step), which cost ~15% of the simple base's
                # orders/s under load. Requests, list_orders and /metrics catch up themselves.
                if self._subscribers or not self.caught_up.is_set():
                    self.catch_up()
                    self.caught_up.set()
                    self._tick(time.time())
            except Exception:
                # A failed read (the store busy, a disk hiccup) is retried on the next round.
                log.exception("tail: reading the store failed; retrying")
            self._stop.wait(self._interval)

    # --- following the store --------------------------------------------------------------

    def catch_up(self) -> int:
        """Read and apply everything committed since the last call (callers on any thread;
        a request calls it first to see its own writes). Returns the events applied."""
        with self._lock:
            store = self._store
            if store is None:
                return 0
            applied = 0
            if self._initial_pending is None:
                applied += self._start_from_recent(store)
            changed: dict[str, OrderSummary] = {}
            # Per-event entries only when someone follows an order's events.
            events: list[dict[str, Any]] | None = [] if self._order_feeds else None
            while True:
                batch = store.read_all(self._position, PAGE)
                if not batch:
                    break
                with self._metrics.lock:
                    for stored in batch:
                        self._apply(stored, changed, events)
                    self._metrics.in_flight = self._pending
                self._position = batch[-1].position
                applied += len(batch)
                self._trim()
            if self._initial_pending is None:
                self._initial_pending = [
                    o.order_id for o in self._orders.values() if not o.finished
                ]
            if changed:
                self._publish(changed, events or [])
            return applied

    def _start_from_recent(self, store: EventStore) -> int:
        """The first pass begins START_EVENTS before the end of the store; the orders still
        open whose placement is older are read from their own streams first (up to that
        point: the pass reads the rest). Returns the events applied."""
        start = max(0, store.last_position() - START_EVENTS)
        if start == 0:
            return 0
        older: list[StoredEvent] = []
        for head in store.open_heads(ORDER_PREFIX):
            if head.last_type in FINAL_TYPE_NAMES:
                continue  # a database from before streams were closed lists ended orders
            stream = store.read_stream(head.stream)
            if stream and stream[0].position <= start:
                older.extend(e for e in stream if e.position <= start)
        older.sort(key=lambda stored: stored.position)
        unused: dict[str, OrderSummary] = {}  # nobody follows the feed before the first pass
        for stored in older:
            self._apply(stored, unused, None)
        self._position = start
        return len(older)

    def _trim(self) -> None:
        """Drop the oldest finished orders past INDEX_WINDOW (in flight ones stay)."""
        orders = self._all.orders
        excess = len(orders) - INDEX_WINDOW
        if excess < TRIM_EVERY:
            return
        kept = [o for o in orders[:excess] if not o.finished]
        gone = {o.customer_id for o in orders[:excess] if o.finished}
        for order in orders[:excess]:
            if order.finished:
                del self._orders[order.order_id]
        self._all = _Sequence.of([*kept, *orders[excess:]])
        for customer_id in gone:
            left = [o for o in self._by_customer[customer_id].orders if o.order_id in self._orders]
            if left:
                self._by_customer[customer_id] = _Sequence.of(left)
            else:
                del self._by_customer[customer_id]

    def _apply(
        self,
        stored: StoredEvent,
        changed: dict[str, OrderSummary],
        events: list[dict[str, Any]] | None,
    ) -> None:
        stream = stored.stream
        if stream.startswith(ORDER_PREFIX):
            self._apply_order(stream[len(ORDER_PREFIX) :], stored, changed, events)
            return
        prefix = next((p for p in RECORD_PREFIXES if stream.startswith(p)), None)
        if prefix is None:
            return
        kind = stored.type
        if stored.recorded_at >= self._count_from and kind in metrics.COMPENSATION_KIND:
            self._metrics.compensations[metrics.COMPENSATION_KIND[kind]] += 1
        if events is not None:
            events.append(self._event_entry(stream[len(prefix) :], stored))

    def _apply_order(
        self,
        order_id: str,
        stored: StoredEvent,
        changed: dict[str, OrderSummary],
        events: list[dict[str, Any]] | None,
    ) -> None:
        kind, at = stored.type, stored.recorded_at
        if events is not None:
            events.append(self._event_entry(order_id, stored))
        if kind == "OrderPlaced":
            changed[order_id] = self._place(order_id, stored)
            return
        order = self._orders.get(order_id)
        if order is None:
            return  # a stream that does not start with OrderPlaced: the audit reports it
        if at >= self._count_from:
            derived = self._metrics
            step = metrics.STEP_OF_EVENT.get(kind)
            if step is not None:
                derived.steps[step].observe(max(at - order.updated_at, 0.0))
            if kind in metrics.COMPENSATION_KIND:
                derived.compensations[metrics.COMPENSATION_KIND[kind]] += 1
        order.last_type, order.version, order.updated_at = kind, stored.version, at
        if kind in TERMINAL_TYPE_NAMES:
            self._settle(order, stored)
        changed[order_id] = order

    def _place(self, order_id: str, stored: StoredEvent) -> OrderSummary:
        placed = _fields(stored)
        order = OrderSummary(
            order_id=order_id,
            position=stored.position,
            placed_at=stored.recorded_at,
            customer_id=placed["customer_id"],
            total_amount=placed["total_amount"],
            payment_method=placed["payment_method"],
            shipping=placed.get("shipping") is not None,
            updated_at=stored.recorded_at,
        )
        self._orders[order_id] = order
        self._all.add(order)
        self._by_customer.setdefault(order.customer_id, _Sequence()).add(order)
        self._pending += 1
        self._second.placed += 1
        return order

    def _settle(self, order: OrderSummary, stored: StoredEvent) -> None:
        """A terminal event's status. OrderPaid ends only an order placed without shipping;
        one with shipping shows ``paid`` and stays in flight until its shipping outcome."""
        kind, at = stored.type, stored.recorded_at
        if order.finished or (kind == "OrderPaid" and order.status != OrderStatus.PENDING):
            return
        order.status = _STATUS_OF_TYPE[kind]
        if kind == "OrderPaid" and order.shipping:
            return
        if kind not in ("OrderPaid", "OrderShipped"):
            fields = _fields(stored)
            order.reason = fields.get("reason", fields.get("error_message"))
        order.finished = True
        self._pending -= 1
        self._second.completed += 1
        self._second.latencies.append(at - order.placed_at)
        if at >= self._count_from:
            self._metrics.orders[order.status] += 1
            self._metrics.order_seconds.observe(max(at - order.placed_at, 0.0))

    @staticmethod
    def _event_entry(order_id: str, stored: StoredEvent) -> dict[str, Any]:
        return {
            "order_id": order_id,
            "stream": stored.stream,
            "type": stored.type,
            "version": stored.version,
            "recorded_at": iso_utc(stored.recorded_at),
        }

    # --- the live feed --------------------------------------------------------------------

    def subscribe(self, order_id: str | None = None) -> _Subscriber:
        """A live subscription (on the running loop): every order change (the newest
        FEED_ORDERS_PER_MESSAGE per message), or one order's events; throughput stats each
        second for both. Starts with the stats history."""
        subscriber = _Subscriber(asyncio.get_running_loop(), order_id)
        subscriber.offer(_sse("stats", list(self.stats)))
        with self._lock:
            self._subscribers.add(subscriber)
            self._order_feeds += order_id is not None
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        """End a subscription (its client went away)."""
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.discard(subscriber)
                self._order_feeds -= subscriber.order_id is not None

    def _publish(self, changed: dict[str, OrderSummary], events: list[dict[str, Any]]) -> None:
        if not self._subscribers:
            return
        # Serialised once here, not once per subscriber.
        newest = sorted(changed.values(), key=lambda o: o.position)[-FEED_ORDERS_PER_MESSAGE:]
        orders = _sse(
            "orders",
            {
                "orders": [o.view() for o in newest],
                "changed": len(changed),
                "pending": self._pending,
            },
        )
        for subscriber in self._subscribers:
            if subscriber.order_id is None:
                message = orders
            else:
                mine = [e for e in events if e["order_id"] == subscriber.order_id]
                if not mine:
                    continue
                message = _sse("events", mine)
            with contextlib.suppress(RuntimeError):
                subscriber.loop.call_soon_threadsafe(subscriber.offer, message)

    def _tick(self, now: float) -> None:
        """Close the stats of each finished second and send them to every subscriber."""
        second = int(now)
        if second == self._second_of:
            return
        done, self._second = self._second, _Second()
        latencies = sorted(done.latencies)
        entry = {
            "t": iso_utc(self._second_of),
            "placed": done.placed,
            "completed": done.completed,
            "p50_ms": _percentile(latencies, 0.5),
            "p99_ms": _percentile(latencies, 0.99),
            "in_flight": self._pending,
        }
        self._second_of = second
        self.stats.append(entry)
        message = _sse("stats", [entry])
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            with contextlib.suppress(RuntimeError):
                subscriber.loop.call_soon_threadsafe(subscriber.offer, message)

    # --- queries --------------------------------------------------------------------------

    def list_orders(
        self,
        *,
        status: str | None = None,
        customer_id: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of orders, newest first: ``{"orders": [...], "next_cursor"?}``. A page
        stops after SCAN_LIMIT index entries even if short, with a cursor to go on, so a rare
        status costs each request a bounded scan."""
        limit = max(1, min(limit, MAX_LIST))
        before = _parse_cursor(cursor)
        self.catch_up()
        with self._lock:
            sequence = self._all if customer_id is None else self._by_customer.get(customer_id)
            if sequence is None:
                return {"orders": []}
            end = bisect.bisect_left(sequence.positions, before)
            found: list[OrderSummary] = []
            index = end - 1
            stop = max(-1, end - 1 - SCAN_LIMIT)
            while index > stop and len(found) < limit:
                order = sequence.orders[index]
                if status is None or order.status == status:
                    found.append(order)
                index -= 1
            page: dict[str, Any] = {"orders": [o.view() for o in found]}
            if index > -1:
                page["next_cursor"] = str(sequence.orders[index + 1].position)
            return page

    def counts(self) -> tuple[int, int]:
        """The orders in the store (counted there: the index holds a window of them) and how
        many of them are in flight (read up to now)."""
        self.catch_up()
        with self._lock:
            store = self._store
            total = 0 if store is None else store.count_streams(ORDER_PREFIX)
            return total, self._pending

    def recovering(self) -> int:
        """Orders that were in flight when the tail first read the store and still are (the
        ones this node's recovery drives on); -1 until that first read."""
        with self._lock:
            if self._initial_pending is None:
                return -1
            left = [
                o
                for o in self._initial_pending
                if o in self._orders and not self._orders[o].finished
            ]
            self._initial_pending = left
            return len(left)


def _fields(stored: StoredEvent) -> dict[str, Any]:
    """A stored event's fields without building its model: the payload is the event's JSON-mode
    dump (store/codec.py), and validating it (pydantic) cost more than the rest of the tail."""
    fields: dict[str, Any] = msgpack.unpackb(stored.payload, raw=False)
    return fields


def _parse_cursor(cursor: str | None) -> int:
    if cursor is None or cursor == "":
        return 1 << 62
    if not cursor.isdigit() or len(cursor) > 19:
        raise ValueError("cursor must be a next_cursor this API returned")
    return int(cursor)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)
