"""The Inventory actor: stock per product, all-or-nothing reservations keyed by order id.

Its state is durable: every change is an event in stream ``inventory`` (this actor is its only
writer) and a (re)started Inventory rebuilds itself from that stream. A change is applied in
memory at once (so the next request sees it) and answered only after its event is committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from actors.base import Appender, BaseActor, CommitGate, log
from messages.base import new_id, utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    GetStock,
    Refused,
    ReleaseStock,
    ReserveStock,
    ServiceConfig,
    ServiceReady,
    SetStock,
    StockGivenBack,
    StockHeld,
    StockRefused,
    StockReport,
)
from messages.errors import ErrorCode
from messages.events import INVENTORY_STREAM, Event, StockReleased, StockReserved, StockSet
from saga.stock import StockBook
from store import CODEC, NO_STREAM, open_store

SEED_PRODUCTS = tuple(f"SKU-{n:03d}" for n in range(1, 11))
SEED_ON_HAND = 1000


Reply = tuple[Any, Any]  # (recipient, message)


class InventoryActor(BaseActor):
    """Holds stock for orders; every request is idempotent by order id."""

    actor_name = "inventory"

    def __init__(self) -> None:
        super().__init__()
        self._book = StockBook()
        self._version = NO_STREAM
        self._appender = Appender(self, "inventory")
        self._config: ServiceConfig | None = None
        self._gate = CommitGate()

    # --- life cycle -----------------------------------------------------------------------

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Load the inventory stream (seeding a new database), then report ready."""
        self._config = msg
        self._appender.store = msg.store
        self._reload()
        if self._version == NO_STREAM:
            now = utcnow()
            seed = [StockSet(product_id=p, on_hand=SEED_ON_HAND, set_at=now) for p in SEED_PRODUCTS]
            self._record(seed, on_commit=[])
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid()))

    def _reload(self) -> None:
        assert self._config is not None
        with open_store(self._config.store_url, readonly=True) as reader:
            stored = reader.read_stream(INVENTORY_STREAM)
        self._book = StockBook()
        for record in stored:
            self._book.apply(CODEC.decode(record))
        self._version = stored[-1].version if stored else NO_STREAM
        self._appender.forget_all()
        self._gate.clear()

    # --- requests -------------------------------------------------------------------------

    def receiveMsg_ReserveStock(self, msg: ReserveStock, sender: Any) -> None:
        """Hold every item for the order or none; a repeated request gets the same answer."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ReserveStock(msg, sender))
            return
        if msg.order_id in self._book.reservations:
            self.send(sender, self._reserve_answer(msg))
            return
        short = self._book.shortfall(msg.items)
        if short:
            # Nothing changes, so nothing to record: the saga records InventoryUnavailable.
            self.send(
                sender,
                StockRefused(
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
            [event], on_commit=[lambda: (sender, self._reserve_answer(msg))], order_id=msg.order_id
        )

    def _reserve_answer(self, msg: ReserveStock) -> StockHeld | StockRefused:
        held = self._book.reservations[msg.order_id]
        if held.released:
            return StockRefused(
                order_id=msg.order_id,
                unavailable_items=(),
                reason="order was cancelled before it reserved",
            )
        return StockHeld(order_id=msg.order_id, reservation_id=held.reservation_id)

    def receiveMsg_ReleaseStock(self, msg: ReleaseStock, sender: Any) -> None:
        """Give back what the order holds; release is idempotent and fences later reserves."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ReleaseStock(msg, sender))
            return

        def answer() -> Reply:
            held = self._book.reservations.get(msg.order_id)
            reservation_id = held.reservation_id if held and held.reservation_id else None
            return sender, StockGivenBack(order_id=msg.order_id, reservation_id=reservation_id)

        held = self._book.reservations.get(msg.order_id)
        if held is not None and held.released:
            self.send(*answer())
            return
        event = StockReleased(
            order_id=msg.order_id,
            reservation_id=held.reservation_id if held else "",
            items=held.items() if held else (),
            reason=msg.reason,
            released_at=utcnow(),
        )
        self._record([event], on_commit=[answer], order_id=msg.order_id)

    def receiveMsg_SetStock(self, msg: SetStock, sender: Any) -> None:
        """Set units on hand; refused below the units already reserved (that would oversell)."""
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
        self._record(
            [event],
            on_commit=[
                lambda: (sender, StockReport(req_id=msg.req_id, stock=self._book.report(report)))
            ],
        )

    def receiveMsg_GetStock(self, msg: GetStock, sender: Any) -> None:
        """Report stock levels."""
        self.send(sender, StockReport(req_id=msg.req_id, stock=self._book.report(msg.product_ids)))

    # --- recording ------------------------------------------------------------------------

    def _record(
        self,
        events: Sequence[Event],
        on_commit: list[Callable[[], Reply]],
        order_id: str | None = None,
    ) -> None:
        """Apply now, append at the next version, answer once committed."""
        for event in events:
            self._book.apply(event)
        expected = self._version
        self._version += len(events)
        if order_id is not None:
            self._gate.hold(order_id)

        def committed(reply: AppendDone | AppendRejected) -> None:
            if isinstance(reply, AppendRejected):
                # Our view and the stream disagree (a previous incarnation's append landed, or
                # the store failed): rebuild from what is durable; waiting requesters time out
                # and retry, and retries are idempotent.
                log.error("inventory: append rejected (%s); reloading", reply.message)
                self._reload()
                return
            for make in on_commit:
                self.send(*make())
            if order_id is not None:
                self._gate.committed(order_id)

        self._appender.append(
            INVENTORY_STREAM, events, [CODEC.new_id() for _ in events], expected, committed
        )

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """A recorded change is durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """A recorded change was refused."""
        self._appender.settle(msg)
