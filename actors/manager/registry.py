"""The workflow registry (which workflow an event starts) and the warm pool.

``register_workflow(TriggerEvent, Workflow)``: every committed event of that type starts one
``Workflow`` actor for its order (DESIGN.md section 9), if the workflow ``wants`` that order.
The workflow that drives an order is the one started by the last trigger in its stream, so a
start-up recovery, a takeover or a respawn after a failure finds it from the stream alone, also
when the process died between the trigger's commit and the workflow's start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from actors.saga import OrderSaga, WorkflowActor
from actors.shipping_saga import ShippingSaga
from messages.events import (
    EVENT_TYPES,
    FINAL_TYPE_NAMES,
    TERMINAL_TYPE_NAMES,
    Event,
    OrderPaid,
    OrderPlaced,
)
from store import CODEC, EventStore

WORKFLOWS: dict[type[Event], type[WorkflowActor]] = {}


def register_workflow(event_type: type[Event], workflow: type[WorkflowActor]) -> None:
    """Run one `workflow` actor per committed event of `event_type` (the seed's AddWorkflow)."""
    WORKFLOWS[event_type] = workflow


register_workflow(OrderPlaced, OrderSaga)
register_workflow(OrderPaid, ShippingSaga)


def workflow_for(events: Sequence[Event]) -> tuple[int, type[WorkflowActor]]:
    """The version of the last trigger in the order stream `events` and the workflow it
    starts: the workflow that drives the order now."""
    if not events or not isinstance(events[0], OrderPlaced):
        raise LookupError("an order stream starts with OrderPlaced")
    placed = events[0]
    found: tuple[int, type[WorkflowActor]] | None = None
    for version, event in enumerate(events):
        workflow = WORKFLOWS.get(type(event))
        if workflow is not None and workflow.wants(placed):
            found = (version, workflow)
    if found is None:
        raise LookupError(f"no workflow registered for {type(events[0]).__name__}")
    return found


def starts_workflow(reader: EventStore, stream: str, last_type: str) -> bool:
    """Whether an order stream whose last event is of type `last_type` (a trigger that can
    also end an order, like OrderPaid) still has its workflow to run: the trigger was
    committed and nothing after it. Reads only the stream's first event."""
    if workflow_of(last_type) is None:
        return False
    first = reader.read_stream(stream, 0, 1)
    placed = CODEC.decode(first[0]) if first else None
    return isinstance(placed, OrderPlaced) and workflow_due(placed, last_type)


def workflow_of(event_type: str) -> type[WorkflowActor] | None:
    """The workflow registered for events of this type name, if any."""
    return WORKFLOWS.get(EVENT_TYPES[event_type]) if event_type in EVENT_TYPES else None


def workflow_due(placed: OrderPlaced, last_type: str) -> bool:
    """Whether an order (its OrderPlaced) whose last event is of `last_type` has a workflow
    to run for that event."""
    workflow = workflow_of(last_type)
    return workflow is not None and workflow.wants(placed)


def ending_types(placed: OrderPlaced) -> frozenset[str]:
    """The event type names that end this order for good when appended last: the final ones,
    and a terminal one (OrderPaid) whose workflow does not run for it. The append of such an
    event closes the order stream, so start-up recovery never reads the order again."""
    return FINAL_TYPE_NAMES | {t for t in TERMINAL_TYPE_NAMES if not workflow_due(placed, t)}


def ends_order(placed: OrderPlaced, events: Sequence[Event]) -> bool:
    """Whether appending `events` to the order's stream ends the order (see ending_types)."""
    return bool(events) and type(events[-1]).__name__ in ending_types(placed)


class WarmPool:
    """Workflow actors created ahead of need, `size` per workflow class.

    On the process bases creating an actor forks a process (10-30 ms); created ahead of need,
    that happens off the order's critical path. Each actor still serves one order.
    """

    def __init__(self, create: Callable[[type[WorkflowActor]], Any], size: int) -> None:
        self._create = create
        self._size = size
        self._spares: dict[type[WorkflowActor], deque[Any]] = {}

    def take(self, workflow: type[WorkflowActor]) -> Any:
        """A fresh workflow actor: from the pool when there is one, then top the pool up."""
        spares = self._spares.setdefault(workflow, deque())
        actor = spares.popleft() if spares else self._create(workflow)
        while len(spares) < self._size:
            spares.append(self._create(workflow))
        return actor
