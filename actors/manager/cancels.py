"""A customer's cancel (DESIGN.md section 9): handed to the order's running saga, answered when
the order ends.

The saga's machine decides what a cancel means in the state it is in; the manager only
remembers it (every later saga of the order starts with it) and answers the customer once the
order is terminal: with the order if it ended ``cancelled``, else ``conflict`` (the cancel
came too late: the order shipped, or was paid without shipping, or failed). A cancel of an
order that is not running is answered from its stream at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.placement import refuse
from messages.base import OrderStatus
from messages.commands import CancelOrder, CancelSaga, OrderReply
from messages.errors import ErrorCode
from messages.events import Event, final_status
from saga.views import order_view


class CancelHost(Protocol):
    """What cancelling needs from the manager actor."""

    def send(self, target: Any, msg: Any) -> None:
        """Send a message (Thespian's send)."""

    def read_order(self, order_id: str) -> list[Event]:
        """The order's stream, decoded."""


class Cancels:
    """Takes customers' cancels and answers them."""

    def __init__(self, orders: LiveOrders, host: CancelHost) -> None:
        self._orders = orders
        self._host = host

    def cancel(self, msg: CancelOrder, sender: Any) -> None:
        """Hand the cancel to the order's saga (or the next one), or answer from the stream."""
        waiter = (sender, msg.req_id)
        live = self._orders.get(msg.order_id)
        if live is not None:
            live.cancels.append(waiter)
            if live.cancel is None:
                live.cancel = msg.reason
                if live.saga is not None:
                    self._host.send(live.saga, CancelSaga(order_id=msg.order_id, reason=msg.reason))
            return
        events = self._host.read_order(msg.order_id)
        if not events:
            refuse(self._host.send, waiter, ErrorCode.NOT_FOUND, f"no order {msg.order_id}")
            return
        view = order_view(msg.order_id, events)
        status = final_status(events)
        if status == OrderStatus.CANCELLED:
            self._host.send(sender, OrderReply(req_id=msg.req_id, order=view))
        elif status is None:
            # Not over, and no saga here drives it (being recovered, or another node's).
            message = f"order {msg.order_id} is not running here yet; try again"
            refuse(self._host.send, waiter, ErrorCode.UNAVAILABLE, message)
        else:
            refuse(self._host.send, waiter, ErrorCode.CONFLICT, _too_late(msg.order_id, status))

    def ended(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """The order is terminal: answer its cancels."""
        for gateway, req_id in live.cancels:
            status = view.get("status")
            if status == OrderStatus.CANCELLED:
                self._host.send(gateway, OrderReply(req_id=req_id, order=view))
            else:
                message = _too_late(live.placed.order_id, str(status))
                refuse(self._host.send, (gateway, req_id), ErrorCode.CONFLICT, message)
        live.cancels.clear()


def _too_late(order_id: str, status: str) -> str:
    return f"order {order_id} is {status}: too late to cancel"
