"""Start-up recovery: every order whose stream has no terminal event is driven on."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from actors.base import log
from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.registry import starts_workflow, workflow_due
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
        limit: int,
    ) -> None:
        self._orders = orders
        self._read_order = read_order
        self._spawn = spawn
        self._limit = limit  # sagas running at once while the backlog lasts
        self._backlog: deque[str] = deque()

    def find(self, reader: EventStore, owner: str | None = None) -> int:
        """Queue every order stream without a terminal event, and every one whose last event
        is a trigger whose workflow never began (OrderPaid of an order placed with shipping);
        only those ``owner`` owns, for a node on a shared store; how many there are."""
        prefix = order_stream("")
        heads = reader.stream_heads(prefix) if owner is None else reader.owned_heads(owner, prefix)
        for head in heads:
            if head.last_type in FINAL_TYPE_NAMES:
                continue
            if head.last_type in TERMINAL_TYPE_NAMES and not starts_workflow(
                reader, head.stream, head.last_type
            ):
                continue
            self._backlog.append(order_id_of(head.stream))
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
            last = type(events[-1]).__name__
            if last in FINAL_TYPE_NAMES or (
                last in TERMINAL_TYPE_NAMES and not workflow_due(placed, last)
            ):
                continue  # ended meanwhile, or taken over ended: nothing to drive
            live = self._orders.add(LiveOrder(placed=placed, committed=True))
            if live.saga is None:
                self._spawn(live, events)
