"""Start-up recovery: every order whose stream has no terminal event is driven on."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from actors.base import log
from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.registry import ends_order, starts_workflow
from messages.events import (
    FINAL_TYPE_NAMES,
    TERMINAL_TYPE_NAMES,
    Event,
    OrderPlaced,
    order_id_of,
    order_stream,
)
from store import EventStore


class Recovery:
    """Unfinished orders, started a few at a time: on the process bases each saga is a new
    process, and hundreds at once after a crash would stall the machine."""

    def __init__(
        self,
        orders: LiveOrders,
        read_order: Callable[[str], list[Event]],
        spawn: Callable[[LiveOrder, Sequence[Event]], None],
        close: Callable[[list[str]], None],
        limit: int,
    ) -> None:
        self._orders = orders
        self._close = close  # marks ended streams closed in the store
        self._read_order = read_order
        self._spawn = spawn
        self._limit = limit  # sagas running at once while the backlog lasts
        self._backlog: deque[str] = deque()

    def find(self, reader: EventStore, owner: str | None = None) -> int:
        """Queue every open order stream (only those ``owner`` owns, for a node on a shared
        store): one without a terminal event, or whose last event is a trigger whose workflow
        never began (OrderPaid of an order placed with shipping); how many there are.

        The store lists only the streams whose last append did not close them, so this reads
        the orders in flight, not the history. A database written before appends closed
        streams lists every order once: the ended ones found are closed (``close``) so the
        next start skips them."""
        ended: list[str] = []
        for head in reader.open_heads(order_stream(""), owner):
            if head.last_type in FINAL_TYPE_NAMES or (
                head.last_type in TERMINAL_TYPE_NAMES
                and not starts_workflow(reader, head.stream, head.last_type)
            ):
                ended.append(head.stream)
                continue
            self._backlog.append(order_id_of(head.stream))
        if ended:
            log.warning("manager: closing %d ended order streams listed as open", len(ended))
            self._close(ended)
        count = len(self._backlog)
        if count:
            log.warning("manager: recovering %d unfinished orders", count)
        self.drain()
        return count

    def take_over(self, order_ids: Sequence[str]) -> None:
        """Drive on orders taken over from a node whose lease expired, as if found on start."""
        self._backlog.extend(order_ids)
        self.drain()

    def drain(self) -> None:
        """Start recovery sagas while fewer than the limit run."""
        while self._backlog and self._orders.running < self._limit:
            order_id = self._backlog.popleft()
            events = self._read_order(order_id)
            placed = events[0] if events else None
            if not isinstance(placed, OrderPlaced):
                log.error(
                    "manager: stream of %s does not start with OrderPlaced",
                    order_id,
                    extra={"order_id": order_id},
                )
                continue
            if ends_order(placed, events):
                continue  # ended meanwhile, or taken over ended: nothing to drive
            live = self._orders.add(LiveOrder(placed=placed, committed=True))
            if live.saga is None:
                self._spawn(live, events)
