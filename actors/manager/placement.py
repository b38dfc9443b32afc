"""Placing orders: idempotent by order id, answered when durable or when terminal.

The stream ``order-{id}`` is created with expected version NO_STREAM, so a second placement of
the same id finds the first (same order: same answer; different order: ``conflict``), also
across restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from actors.base import AppendCallback
from actors.manager.orders import LiveOrder, LiveOrders, Waiter, same_order
from messages.base import order_total, utcnow
from messages.commands import AppendDone, AppendRejected, OrderReply, PlaceOrder, Refused
from messages.errors import ErrorCode
from messages.events import Event, OrderPlaced, final_status, order_stream
from saga.views import order_view
from store import NO_STREAM


class PlacementHost(Protocol):
    """What placing orders needs from the manager actor."""

    def send(self, target: Any, msg: Any) -> None:
        """Send a message (Thespian's send)."""

    def append(
        self,
        stream: str,
        events: Sequence[Event],
        expected_version: int,
        done: AppendCallback,
        *,
        owner: str | None = None,
    ) -> None:
        """Append to the store through the manager's appender (fresh event ids); `owner`
        becomes the stream's owner in the same commit."""

    @property
    def node_id(self) -> str | None:
        """This node's id on a shared store (None: the store serves this node alone)."""

    def owner_of(self, order_id: str) -> str | None:
        """The node that owns the order (None: nobody, or no nodes)."""

    def read_order(self, order_id: str) -> list[Event]:
        """The order's stream, decoded."""

    def spawn(self, live: LiveOrder, events: Sequence[Event], *, compensate: bool) -> None:
        """Start a saga for the order from these events."""

    def accepting(self) -> bool:
        """Whether new orders are accepted now (booted, not draining)."""

    def unknown_products(self, product_ids: Sequence[str]) -> list[str]:
        """Those of `product_ids` that are no product (Inventory's list)."""


def refuse(send: Callable[[Any, Any], None], waiter: Waiter, code: ErrorCode, message: str) -> None:
    """Answer a request with a wire error code."""
    send(waiter[0], Refused(req_id=waiter[1], code=code, message=message))


class Placement:
    """Accepts orders once and answers their waiters."""

    def __init__(self, orders: LiveOrders, host: PlacementHost) -> None:
        self._orders = orders
        self._host = host

    def place(self, msg: PlaceOrder, sender: Any) -> None:
        """Accept an order once; answer when OrderPlaced is durable or when it is terminal."""
        placed = OrderPlaced(
            order_id=msg.order_id,
            customer_id=msg.customer_id,
            lines=msg.lines,
            total_amount=order_total(msg.lines),
            payment_method=msg.payment_method,
            placed_at=utcnow(),
            shipping=msg.shipping,
        )
        waiter = (sender, msg.req_id)
        live = self._orders.get(msg.order_id)
        if live is not None:
            if not same_order(live.placed, placed):
                message = f"order {msg.order_id} exists with different contents"
                refuse(self._host.send, waiter, ErrorCode.CONFLICT, message)
            elif msg.wait:
                live.waiters.append(waiter)
            elif live.committed:
                self._reply_status(waiter, msg.order_id)
            else:
                live.acks.append(waiter)
            return
        if not self._host.accepting():
            refuse(
                self._host.send,
                waiter,
                ErrorCode.UNAVAILABLE,
                "the system is not accepting orders now",
            )
            return
        unknown = self._host.unknown_products([line.product_id for line in msg.lines])
        if unknown:
            # Nothing is recorded: a typo in a product id is bad input, not a cancelled order.
            message = f"unknown products {', '.join(unknown)} (add them with add_product)"
            refuse(self._host.send, waiter, ErrorCode.INVALID, message)
            return
        live = LiveOrder(placed=placed)
        (live.waiters if msg.wait else live.acks).append(waiter)
        self._orders.add(live)
        self._host.append(
            order_stream(msg.order_id),
            [placed],
            NO_STREAM,
            self._placed_callback(live),
            owner=self._host.node_id,
        )

    def _placed_callback(self, live: LiveOrder) -> AppendCallback:
        def placed(reply: AppendDone | AppendRejected) -> None:
            order_id = live.placed.order_id
            if isinstance(reply, AppendDone):
                live.committed = True
                self._host.spawn(live, [live.placed], compensate=False)
                for waiter in live.acks:
                    self._reply_status(waiter, order_id)
                live.acks.clear()
            elif reply.error == "conflict":
                self._existing_order(live)
            else:
                self._orders.remove(live)
                for waiter in live.acks + live.waiters:
                    message = f"order not recorded: {reply.message}"
                    refuse(self._host.send, waiter, ErrorCode.UNAVAILABLE, message)

        return placed

    def _existing_order(self, live: LiveOrder) -> None:
        """The stream already exists (placed before, maybe before a restart)."""
        order_id = live.placed.order_id
        events = self._host.read_order(order_id)
        first = events[0] if events else None
        waiters = live.acks + live.waiters
        if not isinstance(first, OrderPlaced) or not same_order(first, live.placed):
            self._orders.remove(live)
            for waiter in waiters:
                message = f"order {order_id} exists with different contents"
                refuse(self._host.send, waiter, ErrorCode.CONFLICT, message)
            return
        view = order_view(order_id, events)
        if final_status(events) is not None:
            self._orders.remove(live)
            for waiter in waiters:
                self._host.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
            return
        node = self._host.node_id
        if node is not None and self._host.owner_of(order_id) not in (None, node):
            # Another node owns it and drives it (or will, once it takes a dead owner's orders
            # over): answer what it is now; a client that waits follows it with get_order.
            self._orders.remove(live)
            for waiter in waiters:
                self._host.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
            return
        # Unfinished and nobody drives it (its workflow was lost): recover it now.
        live.placed, live.committed = first, True
        for waiter in live.acks:
            self._host.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
        live.acks.clear()
        self._host.spawn(live, events, compensate=False)

    def _reply_status(self, waiter: Waiter, order_id: str) -> None:
        view = order_view(order_id, self._host.read_order(order_id))
        self._host.send(waiter[0], OrderReply(req_id=waiter[1], order=view))
