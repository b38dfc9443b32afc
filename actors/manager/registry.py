"""The workflow registry (which actor drives which kind of event) and the warm pool."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from thespian.actors import Actor

from actors.saga import OrderSaga
from messages.events import Event, OrderPlaced

WORKFLOWS: dict[type[Event], type[Actor]] = {}


def register_workflow(event_type: type[Event], workflow: type[Actor]) -> None:
    """Run one `workflow` actor per event of `event_type` (the seed's AddWorkflow)."""
    WORKFLOWS[event_type] = workflow


register_workflow(OrderPlaced, OrderSaga)


def workflow_for(event: Event) -> type[Actor]:
    """The workflow actor class registered for the event's type."""
    try:
        return WORKFLOWS[type(event)]
    except KeyError:
        raise LookupError(f"no workflow registered for {type(event).__name__}") from None


class WarmPool:
    """Workflow actors created ahead of need, `size` per workflow class.

    On the process bases creating an actor forks a process (10-30 ms); created ahead of need,
    that happens off the order's critical path. Each actor still serves one order.
    """

    def __init__(self, create: Callable[[type[Actor]], Any], size: int) -> None:
        self._create = create
        self._size = size
        self._spares: dict[type[Actor], deque[Any]] = {}

    def take(self, workflow: type[Actor]) -> Any:
        """A fresh workflow actor: from the pool when there is one, then top the pool up."""
        spares = self._spares.setdefault(workflow, deque())
        actor = spares.popleft() if spares else self._create(workflow)
        while len(spares) < self._size:
            spares.append(self._create(workflow))
        return actor
