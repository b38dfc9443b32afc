"""The orders the manager is placing or driving, and which saga actor drives which."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from messages.base import kept
from messages.events import OrderPlaced
from saga.supervision import Supervision

MAX_FINISHED_REMEMBERED = 100_000

Waiter = tuple[Any, int]  # (gateway address, req_id)


@dataclass
class LiveOrder:
    """An order the manager is placing or driving."""

    placed: OrderPlaced
    saga: Any = None
    pid: int | None = None  # the saga's process (process bases)
    committed: bool = False
    waiters: list[Waiter] = field(default_factory=list)  # want the terminal status
    acks: list[Waiter] = field(default_factory=list)  # want to know OrderPlaced is durable
    supervision: Supervision | None = None  # from the first failed saga of its workflow on
    trigger: int = -1  # version of the trigger event whose workflow was started (exactly once)
    cancel: str | None = None  # the customer's cancel (its reason), passed to every saga
    cancels: list[Waiter] = field(default_factory=list)  # want the cancel's outcome

    def __post_init__(self) -> None:
        kept(self.placed)  # held while the order lives: its field-name set is shared


def same_order(a: OrderPlaced, b: OrderPlaced) -> bool:
    """Whether two placements describe the same order (timestamps aside)."""
    return (a.customer_id, a.lines, a.payment_method, a.shipping) == (
        b.customer_id,
        b.lines,
        b.payment_method,
        b.shipping,
    )


class LiveOrders:
    """Live orders by id, how many have a saga actor, and the sagas that reported their order
    terminal (their exit is expected, not a death)."""

    def __init__(self) -> None:
        self._live: dict[str, LiveOrder] = {}
        self.running = 0  # live orders with a saga actor
        self._finished_sagas: dict[str, None] = {}  # insertion-ordered set of saga addresses

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[LiveOrder]:
        """A snapshot: the loop may end orders."""
        return iter(list(self._live.values()))

    def get(self, order_id: str) -> LiveOrder | None:
        """The live order with this id."""
        return self._live.get(order_id)

    def add(self, live: LiveOrder) -> LiveOrder:
        """Track an order; the one already tracked under its id wins."""
        return self._live.setdefault(live.placed.order_id, live)

    def remove(self, live: LiveOrder) -> bool:
        """Stop tracking the order (and its saga); False if it was not this live order."""
        order_id = live.placed.order_id
        if self._live.get(order_id) is not live:
            return False
        del self._live[order_id]
        self.detach(live)
        return True

    def attach(self, live: LiveOrder, saga: Any) -> None:
        """`saga` drives the order from now on (the previous one, if any, is forgotten)."""
        self.detach(live)
        live.saga = saga
        self.running += 1

    def detach(self, live: LiveOrder) -> None:
        """The order's saga actor is gone (finished, aborted or dead)."""
        if live.saga is not None:
            live.saga, live.pid = None, None
            self.running -= 1

    def by_saga(self, address: Any) -> LiveOrder | None:
        """The live order driven by this saga address. Addresses are compared with ==: on the
        queue base the address createActor returns prints differently from (and does not hash
        like) the one its messages carry."""
        for live in self._live.values():
            if live.saga is not None and live.saga == address:
                return live
        return None

    def saga_finished(self, saga_key: str) -> None:
        """A saga reported its order terminal; `saga_key` is str() of its own address, as its
        ChildActorExited will carry it, so that exit is recognised without a scan."""
        self._finished_sagas[saga_key] = None
        while len(self._finished_sagas) > MAX_FINISHED_REMEMBERED:
            del self._finished_sagas[next(iter(self._finished_sagas))]

    def exit_expected(self, saga_key: str) -> bool:
        """Whether this exit is of a saga that finished (each exit is recognised once)."""
        if saga_key in self._finished_sagas:
            del self._finished_sagas[saga_key]
            return True
        return False

    def pids(self) -> dict[str, int]:
        """saga:{order_id} -> pid of the live sagas that told theirs (process bases)."""
        return {f"saga:{o}": live.pid for o, live in self._live.items() if live.pid is not None}
