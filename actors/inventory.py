"""The Inventory actor: stock per product, all-or-nothing reservations keyed by order id.

Its state is durable: every change is an event in the stream of the product it is about,
``stock-{product_id}`` (a reservation across products is one atomic multi-stream append, with
each product's share in its stream and the expected version of each), and a (re)started
Inventory rebuilds itself from those streams. A change is applied in memory at once (so the
next request sees it) and answered only after its events are committed.

Appends carry expected versions, so another writer of the same streams (an Inventory of another
node on a shared PostgreSQL store, or a previous incarnation of this one) makes them conflict
rather than oversell. At most one append is in flight at a time: the changes made meanwhile go
out together as the next one, each stream at the version the previous append left it, so an
append is never built on one that may still be refused. On a refusal the Inventory takes back
what the lost changes did to its book (each change keeps what it touched as it was before:
``StockBook.before``), reads the streams they were about from the versions it knew (what the
other writer did there since), then handles again every request whose change was lost, all in
the next append, at most ``MAX_ATTEMPTS`` times each; a reservation that keeps conflicting is
then refused with that reason. (It used to rebuild its whole book from every stock stream's
whole history on each refusal: with several nodes on one store, most of their time.)

On a store shared by several nodes, other nodes' Inventories write the same stock streams. This
one catches up with them (reads every stock stream past the version it knows and applies what
it finds) when it is idle: before refusing a reservation for want of stock (the stock may have
been set or released elsewhere), on ``CatchUp`` (the manager takes over orders whose stock
another node reserved), and every ``CATCH_UP_PERIOD`` seconds.

The book is checkpointed: after every ``SNAPSHOT_EVERY`` stock events committed it saves a
snapshot of what is durable (levels, the reservations, the version of each stream it reflects)
under ``SNAPSHOT``, and a start loads the snapshot and reads only the events after it, so a start
does not read the whole history. At the same moments the book forgets the reservations of orders
that have ended (their streams are closed in the store): they are never asked about again, and
the units of a paid order stay counted in ``reserved``. So the book holds the orders in flight,
not every order ever placed.

A database made before the stock streams has the Inventory's whole history in one stream,
``inventory``: the first start copies it, split by product, into the stock streams and ends it
with ``InventoryMigrated``, all in one commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import Appender, BaseActor, CommitGate, NotConfiguredError, log
from messages.base import new_id, utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    CatchUp,
    CaughtUp,
    GetStock,
    InventoryReleasedReply,
    InventoryReservedReply,
    InventoryShippedReply,
    InventoryUnavailableReply,
    ProductsKnown,
    Refused,
    ReleaseStock,
    ReserveStock,
    ServiceConfig,
    ServiceReady,
    SetStock,
    ShipStock,
    StockReport,
)
from messages.errors import ErrorCode
from messages.events import (
    FENCES_STREAM,
    INVENTORY_STREAM,
    STOCK_PREFIX,
    Event,
    InventoryMigrated,
    StockReleased,
    StockReserved,
    StockSet,
    StockShipped,
    order_stream,
    stock_stream,
)
from saga.stock import StockBook, Undo, split_by_stream
from store import CODEC, NO_STREAM, EventStore, StoreError, open_store

SEED_PRODUCTS = tuple(f"SKU-{n:03d}" for n in range(1, 11))
SEED_ON_HAND = 1000
MAX_ATTEMPTS = 20  # conflicts one request may meet before it is refused (each is cheap: the
# streams it touches, read from the versions known; and each means another writer committed)
CATCH_UP_PERIOD = 1.0  # seconds between catch-ups with other nodes (shared store only)
CATCH_UP_TIMER = "catch-up"
SNAPSHOT = "inventory"  # the store's name of the book's snapshot
# Stock events committed between two snapshots: the book then holds the reservations of at most
# this many ended orders besides those in flight, and a start reads at most this many events.
SNAPSHOT_EVERY = 2_000


Reply = tuple[Any, Any]  # (recipient, message)


@dataclass
class Change:
    """One request's events (by stream), its answers, and how to handle it again."""

    parts: list[tuple[str, Event]]
    on_commit: list[Callable[[], Reply]]
    order_id: str | None
    retry: Callable[[int], None] | None  # re-handle the request as attempt n
    attempt: int
    ids: list[str] = field(default_factory=list)
    undo: Undo | None = None  # the book before this change (None: rebuild it on a refusal)


class InventoryActor(BaseActor):
    """Holds stock for orders; every request is idempotent by order id."""

    actor_name = "inventory"

    def __init__(self) -> None:
        super().__init__()
        self._book = StockBook()
        self._versions: dict[str, int] = {}  # stream -> version committed (as far as we know)
        self._in_flight: list[Change] = []
        self._queued: list[Change] = []
        self._appender = Appender(self, "inventory")
        self._config: ServiceConfig | None = None
        self._manager: Any = None  # told which products exist
        self._gate = CommitGate()
        self._reader: EventStore | None = None  # shared store: to catch up with other nodes
        self._when_idle: list[Callable[[], None]] = []  # run after the next catch-up
        self._retrying = False  # handling lost requests again: send them as one append after
        self._snapshots: EventStore | None = None  # writes the snapshots, finds ended orders
        self._since_snapshot = 0  # stock events committed since the last snapshot

    # --- life cycle -----------------------------------------------------------------------

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Load the stock streams (migrating or seeding the database first), report ready."""
        self._config = msg
        self._appender.store = msg.store
        self._manager = sender
        self._reload(migrate=True)
        if msg.node_id is not None and self._reader is None:
            self._reader = open_store(msg.store_url, readonly=True)
            self.wakeupAfter(timedelta(seconds=CATCH_UP_PERIOD), payload=CATCH_UP_TIMER)
        products = tuple(sorted(self._book.on_hand))
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid(), products=products))

    def _tell_products(self) -> None:
        self.send(self._manager, ProductsKnown(products=tuple(sorted(self._book.on_hand))))

    # --- other nodes' changes (shared store) ----------------------------------------------

    def receiveMsg_CatchUp(self, msg: CatchUp, sender: Any) -> None:
        """Answer once what other nodes recorded in the stock streams is in the book."""
        self._after_catch_up(lambda: self.send(sender, CaughtUp(ref=msg.ref)))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """The periodic catch-up with other nodes."""
        if msg.payload != CATCH_UP_TIMER:
            return
        self._after_catch_up(lambda: None)
        self.wakeupAfter(timedelta(seconds=CATCH_UP_PERIOD), payload=CATCH_UP_TIMER)

    def _after_catch_up(self, then: Callable[[], None]) -> None:
        """Run `then` after catching up: now if no change of ours is on its way to the store,
        else once the appends in flight are answered (the book is then what is durable plus
        nothing pending, so what lies past our versions was written by someone else)."""
        self._when_idle.append(then)
        self._catch_up_if_idle()

    def _catch_up_if_idle(self) -> None:
        if self._in_flight or self._queued or not self._when_idle:
            return
        self._catch_up()
        waiting, self._when_idle = self._when_idle, []
        for then in waiting:
            then()

    def _catch_up(self) -> bool:
        """Apply every stock event past the versions we know; whether there were any."""
        if self._reader is None:
            return False
        heads = self._reader.stream_heads(STOCK_PREFIX)
        fences = self._reader.stream_version(FENCES_STREAM)
        behind = [
            stream
            for stream, version in [(h.stream, h.version) for h in heads]
            + [(FENCES_STREAM, fences)]
            if version > self._versions.get(stream, NO_STREAM)
        ]
        return self._read_past(self._reader, behind)

    def _read_past(self, reader: EventStore, streams: Iterable[str]) -> bool:
        """Apply what `streams` hold past the versions we know (what other writers recorded
        there since); whether there was anything."""
        found = False
        products = len(self._book.on_hand)
        for stream in streams:
            for record in reader.read_stream(stream, self._versions.get(stream, NO_STREAM) + 1):
                self._book.apply(CODEC.decode(record))
                self._versions[stream] = record.version
                found = True
        if len(self._book.on_hand) != products and self._manager is not None:
            self._tell_products()  # added on another node
        return found

    def _reload(self, migrate: bool = False) -> None:
        """Rebuild the book from the stock streams; forget every change not yet committed."""
        if self._config is None:
            raise NotConfiguredError("inventory: no ServiceConfig yet")
        with open_store(self._config.store_url, readonly=True) as reader:
            self._book, self._versions = _load_snapshot(reader)
            streams = [h.stream for h in reader.stream_heads(STOCK_PREFIX)]
            for stream in (*streams, FENCES_STREAM):
                for record in reader.read_stream(stream, self._versions.get(stream, NO_STREAM) + 1):
                    self._book.apply(CODEC.decode(record))
                    self._versions[stream] = record.version
            self._forget_ended(reader)
            legacy = reader.read_stream(INVENTORY_STREAM) if migrate and not streams else []
        self._in_flight, self._queued = [], []
        self._appender.forget_all()
        self._gate.clear()
        if not migrate or streams:
            return
        if legacy and legacy[-1].type != InventoryMigrated.__name__:
            self._migrate(reader_events=legacy)
        elif not legacy and not self._versions:
            self._seed()

    def _seed(self, attempt: int = 1) -> None:
        """Stock a new database: the seed products whose streams do not exist yet."""
        now = utcnow()
        seed = [
            StockSet(product_id=p, on_hand=SEED_ON_HAND, set_at=now)
            for p in SEED_PRODUCTS
            if stock_stream(p) not in self._versions
        ]
        if seed and attempt <= MAX_ATTEMPTS:
            self._record(seed, on_commit=[], retry=self._seed, attempt=attempt)

    def _migrate(self, reader_events: Sequence[Any]) -> None:
        """Copy the old ``inventory`` stream into the stock streams, split by product, and
        close it with ``InventoryMigrated``: one commit, at the old stream's head (an old
        Inventory still writing to it conflicts, and so does a second migration)."""
        parts: list[tuple[str, Event]] = []
        ids: list[str] = []
        for record in reader_events:
            event = CODEC.decode(record)
            for stream, share in split_by_stream(event):
                parts.append((stream, share))
                ids.append(f"{record.event_id}/{stream}")  # a re-run is an idempotent replay
        marker = InventoryMigrated(
            events=len(reader_events), streams=len({s for s, _ in parts}), migrated_at=utcnow()
        )
        log.warning(
            "inventory: migrating %d events of the old %r stream into %d stock streams",
            len(reader_events),
            INVENTORY_STREAM,
            marker.streams,
        )
        for _, share in parts:
            self._book.apply(share)
        change = Change(
            parts=parts,
            on_commit=[],
            order_id=None,
            retry=lambda _attempt: self._reload(migrate=True),
            attempt=1,
            ids=ids,
        )
        self._queued.append(change)
        self._versions[INVENTORY_STREAM] = reader_events[-1].version
        change.parts.insert(0, (INVENTORY_STREAM, marker))
        change.ids.insert(0, f"{reader_events[-1].event_id}/migrated")
        self._send_next()

    # --- requests -------------------------------------------------------------------------

    def receiveMsg_ReserveStock(self, msg: ReserveStock, sender: Any, attempt: int = 1) -> None:
        """Hold every item for the order or none; a repeated request gets the same answer."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ReserveStock(msg, sender))
            return
        if attempt > MAX_ATTEMPTS:
            self.send(
                sender,
                InventoryUnavailableReply(
                    order_id=msg.order_id,
                    unavailable_items=(),
                    reason=f"the stock of these products kept changing under the reservation "
                    f"(another writer of the same stock streams): {MAX_ATTEMPTS} attempts "
                    "conflicted",
                ),
            )
            return
        if msg.order_id in self._book.reservations:
            self.send(sender, self._reserve_answer(msg))
            return
        short = self._book.shortfall(msg.items)
        if short and self._reader is not None and attempt == 1:
            # Another node may have set or released this stock: refuse only on a fresh book.
            self._after_catch_up(lambda: self.receiveMsg_ReserveStock(msg, sender, 2))
            return
        if short:
            # Nothing changes, so nothing to record: the saga records InventoryUnavailable.
            self.send(
                sender,
                InventoryUnavailableReply(
                    order_id=msg.order_id, unavailable_items=short, reason="insufficient stock"
                ),
            )
            return
        event = StockReserved(
            order_id=msg.order_id,
            reservation_id=f"res-{new_id()}",
            items=msg.items,
            reserved_at=utcnow(),
        )
        self._record(
            [event],
            on_commit=[lambda: (sender, self._reserve_answer(msg))],
            order_id=msg.order_id,
            retry=lambda n: self.receiveMsg_ReserveStock(msg, sender, n),
            attempt=attempt,
        )

    def _reserve_answer(
        self, msg: ReserveStock
    ) -> InventoryReservedReply | InventoryUnavailableReply:
        held = self._book.reservations[msg.order_id]
        if held.released:
            return InventoryUnavailableReply(
                order_id=msg.order_id,
                unavailable_items=(),
                reason="order was cancelled before it reserved",
            )
        return InventoryReservedReply(order_id=msg.order_id, reservation_id=held.reservation_id)

    def receiveMsg_ReleaseStock(self, msg: ReleaseStock, sender: Any, attempt: int = 1) -> None:
        """Give back what the order holds; release is idempotent and fences later reserves."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ReleaseStock(msg, sender))
            return
        if attempt > MAX_ATTEMPTS:
            # Compensation is retried by whoever asked (it waits for the answer); refusing it
            # would leave the stock held.
            log.error(
                "inventory: release of %s conflicted %d times",
                msg.order_id,
                attempt - 1,
                extra={"order_id": msg.order_id},
            )
            return

        def answer() -> Reply:
            held = self._book.reservations.get(msg.order_id)
            reservation_id = held.reservation_id if held and held.reservation_id else None
            return sender, InventoryReleasedReply(
                order_id=msg.order_id, reservation_id=reservation_id
            )

        held = self._book.reservations.get(msg.order_id)
        if held is not None and held.released:
            self.send(*answer())
            return
        if held is not None and held.shipped:
            # The units left with the shipment: nothing to give back, and whoever asked must
            # learn that the order shipped (a compensation that comes too late).
            reply = InventoryShippedReply(order_id=msg.order_id, reservation_id=held.reservation_id)
            self.send(sender, reply)
            return
        event = StockReleased(
            order_id=msg.order_id,
            reservation_id=held.reservation_id if held else "",
            items=held.items() if held else (),
            reason=msg.reason,
            released_at=utcnow(),
        )
        self._record(
            [event],
            on_commit=[answer],
            order_id=msg.order_id,
            retry=lambda n: self.receiveMsg_ReleaseStock(msg, sender, n),
            attempt=attempt,
        )

    def receiveMsg_ShipStock(self, msg: ShipStock, sender: Any, attempt: int = 1) -> None:
        """Consume the order's reservation (its units leave on_hand and reserved), once: a
        repeated request gets the same answer; a released or unknown one is refused."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ShipStock(msg, sender))
            return
        if attempt > MAX_ATTEMPTS:
            log.error(
                "inventory: shipment of %s conflicted %d times",
                msg.order_id,
                attempt - 1,
                extra={"order_id": msg.order_id},
            )
            return  # the shipping saga re-sends on its step timeout
        held = self._book.reservations.get(msg.order_id)
        if held is None or held.released or not held.reservation_id:
            reason = "nothing is held for the order (released, or never reserved)"
            refusal = InventoryUnavailableReply(
                order_id=msg.order_id, unavailable_items=(), reason=reason
            )
            self.send(sender, refusal)
            return
        reply = InventoryShippedReply(order_id=msg.order_id, reservation_id=held.reservation_id)
        if held.shipped:
            self.send(sender, reply)
            return
        event = StockShipped(
            order_id=msg.order_id,
            reservation_id=held.reservation_id,
            items=held.items(),
            shipped_at=utcnow(),
        )
        self._record(
            [event],
            on_commit=[lambda: (sender, reply)],
            order_id=msg.order_id,
            retry=lambda n: self.receiveMsg_ShipStock(msg, sender, n),
            attempt=attempt,
        )

    def receiveMsg_SetStock(self, msg: SetStock, sender: Any, attempt: int = 1) -> None:
        """Set units on hand; refused below the units already reserved (that would oversell)."""
        if attempt > MAX_ATTEMPTS:
            self.send(
                sender,
                Refused(
                    req_id=msg.req_id,
                    code=ErrorCode.CONFLICT,
                    message=f"{msg.product_id}: its stock kept changing under this request "
                    f"({MAX_ATTEMPTS} attempts conflicted); try again",
                ),
            )
            return
        exists = msg.product_id in self._book.on_hand
        if exists == msg.create:
            code, why = (
                (ErrorCode.CONFLICT, "exists already; set its stock with set_stock")
                if exists
                else (ErrorCode.NOT_FOUND, "is no product; add it with add_product")
            )
            refused = Refused(req_id=msg.req_id, code=code, message=f"{msg.product_id} {why}")
            self.send(sender, refused)
            return
        reserved = self._book.reserved.get(msg.product_id, 0)
        if msg.on_hand < reserved:
            self.send(
                sender,
                Refused(
                    req_id=msg.req_id,
                    code=ErrorCode.CONFLICT,
                    message=f"{msg.product_id}: on_hand {msg.on_hand} is below the {reserved} "
                    "units reserved by orders",
                ),
            )
            return
        event = StockSet(product_id=msg.product_id, on_hand=msg.on_hand, set_at=utcnow())
        report = (msg.product_id,)

        def answer() -> Reply:
            if msg.create:
                self._tell_products()  # before the answer: an order may follow at once
            return sender, StockReport(req_id=msg.req_id, stock=self._book.report(report))

        self._record(
            [event],
            on_commit=[answer],
            retry=lambda n: self.receiveMsg_SetStock(msg, sender, n),
            attempt=attempt,
        )

    def receiveMsg_GetStock(self, msg: GetStock, sender: Any) -> None:
        """Report stock levels (on a shared store, after catching up with the other nodes)."""

        def report() -> None:
            stock = self._book.report(msg.product_ids)
            self.send(sender, StockReport(req_id=msg.req_id, stock=stock))

        if self._reader is None:
            report()
        else:
            self._after_catch_up(report)

    # --- recording ------------------------------------------------------------------------

    def _record(
        self,
        events: Sequence[Event],
        on_commit: list[Callable[[], Reply]],
        order_id: str | None = None,
        retry: Callable[[int], None] | None = None,
        attempt: int = 1,
    ) -> None:
        """Apply now, append (to each product's stream) with the next batch, answer once
        committed."""
        undo = self._book.before(events)
        for event in events:
            self._book.apply(event)
        parts = [share for event in events for share in split_by_stream(event)]
        change = Change(parts, on_commit, order_id, retry, attempt, undo=undo)
        change.ids = [CODEC.new_id() for _ in parts]
        if order_id is not None:
            self._gate.hold(order_id)
        self._queued.append(change)
        self._send_next()

    def _send_next(self) -> None:
        """Send every queued change as one multi-stream append, unless one is in flight."""
        if self._in_flight or not self._queued or self._retrying:
            return
        batch, self._queued = self._queued, []
        self._in_flight = batch
        by_stream: dict[str, tuple[list[Event], list[str]]] = {}
        for change in batch:
            for (stream, event), event_id in zip(change.parts, change.ids, strict=True):
                events, ids = by_stream.setdefault(stream, ([], []))
                events.append(event)
                ids.append(event_id)
        parts = [
            (stream, events, ids, self._versions.get(stream, NO_STREAM))
            for stream, (events, ids) in by_stream.items()
        ]
        self._appender.append_many(parts, self._committed)

    def _committed(self, reply: AppendDone | AppendRejected) -> None:
        batch, self._in_flight = self._in_flight, []
        if isinstance(reply, AppendRejected):
            # Another writer got to some of these streams first (or the store failed): catch
            # up on those streams, then handle the lost requests again.
            log_refusal = log.info if reply.error == "conflict" else log.warning
            log_refusal(
                "inventory: append of %d changes refused (%s); catching up and retrying",
                len(batch),
                reply.message,
            )
            self._retry(batch + self._queued)
            return
        streams = list(dict.fromkeys(stream for change in batch for stream, _ in change.parts))
        for stream, version in zip(streams, reply.versions, strict=True):
            self._versions[stream] = version
        for change in batch:
            for make in change.on_commit:
                self.send(*make())
            if change.order_id is not None:
                self._gate.committed(change.order_id)
        self._since_snapshot += sum(len(change.parts) for change in batch)
        if self._since_snapshot >= SNAPSHOT_EVERY:
            self._checkpoint()
        self._send_next()
        self._catch_up_if_idle()

    def _retry(self, lost: list[Change]) -> None:
        """Take back what the `lost` changes (the refused append's and those queued behind
        it) did to the book, newest first; read what their streams got meanwhile from the
        versions we know; handle each request again, and send whatever that records as one
        append."""
        self._queued = []
        if any(change.undo is None for change in lost):
            self._reload()  # a migration: start again from the store
        else:
            for change in reversed(lost):
                assert change.undo is not None
                self._book.restore(change.undo)
                if change.order_id is not None:
                    self._gate.forget(change.order_id)
            streams = dict.fromkeys(stream for change in lost for stream, _ in change.parts)
            if self._reader is not None:
                self._read_past(self._reader, streams)
            else:
                assert self._config is not None
                with open_store(self._config.store_url, readonly=True) as reader:
                    self._read_past(reader, streams)
        self._retrying = True
        try:
            for change in lost:
                if change.retry is not None:
                    change.retry(change.attempt + 1)
        finally:
            self._retrying = False
        for change in lost:  # requests that waited behind a lost change and still wait
            if change.order_id is not None:
                self._gate.resume(change.order_id)
        self._send_next()
        self._catch_up_if_idle()

    # --- checkpoints ----------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Forget the reservations of ended orders, then save what is durable (the book less
        the changes queued behind the append just committed) with the versions it reflects."""
        if any(change.undo is None for change in self._queued):
            return  # a migration is queued: try again after the next commit
        if self._config is None:
            raise NotConfiguredError("inventory: no ServiceConfig yet")
        if self._snapshots is None:
            self._snapshots = open_store(self._config.store_url)
        self._since_snapshot = 0
        try:
            self._forget_ended(self._snapshots)
            durable = self._book.durable([c.undo for c in self._queued if c.undo is not None])
            self._snapshots.save_snapshot(SNAPSHOT, durable.snapshot(self._versions))
        except StoreError:
            # A snapshot only shortens the next start; the events stay the truth.
            log.warning("inventory: could not save a snapshot", exc_info=True)

    def _forget_ended(self, reader: EventStore) -> None:
        """Drop the reservations of the orders whose streams the store has closed (one query
        for all of them; a reservation without an order stream, or whose order is still
        asked about here, is kept)."""
        held = {order_id: order_stream(order_id) for order_id in self._book.reservations}
        closed = reader.closed_among(list(held.values()))

        def needed(order_id: str) -> bool:
            return held[order_id] not in closed or self._gate.busy(order_id)

        dropped = self._book.forget_ended(needed)
        log.debug("inventory: forgot the reservations of %d ended orders", dropped)

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """A recorded change is durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """A recorded change was refused."""
        self._appender.settle(msg)


def _load_snapshot(reader: EventStore) -> tuple[StockBook, dict[str, int]]:
    """The book and versions of the last snapshot, or an empty book if there is none (or it
    cannot be read: then the whole history is replayed, which is slower but as right)."""
    data = reader.load_snapshot(SNAPSHOT)
    if data is not None:
        try:
            return StockBook.from_snapshot(data)
        except ValueError:
            log.warning("inventory: ignoring an unreadable snapshot", exc_info=True)
    return StockBook(), {}
