"""The shipping saga's decisions as a pure state machine (no actors, no I/O, no clock).

``decide(state, input, env) -> (state, commands)``, in the style of ``saga.machine``: the
ShippingSaga actor feeds it what happened and carries out the commands it returns. It starts
once ``OrderPaid`` of an order placed with shipping is committed (DESIGN.md section 9) and is
then the only writer of the order stream:

    ship -created-> consume the reservation -consumed-> record OrderShipped (terminal)
      |-refused/timeout-> record ShipmentFailed, compensate, record ... OrderCancelled
      |-carrier failed-> record ShipmentFailed, compensate, record ... OrderFulfillmentFailed

Compensation undoes the steps one at a time and records what it gave back in reverse order:
``PaymentRefunded``, ``InventoryReleased``, then the terminal event. The requests go release
first (it fences the stock: a reservation already consumed by a shipment answers "shipped",
and the order then ends shipped instead), then the carrier's cancel (no shipment may stand),
then the refund (the payment is voided, so a charge that stood is refunded).

The point of no return is the carrier's confirmation: from then on the reservation is
consumed and the order ends ``shipped``; a customer's cancel that comes later is too late.
Before it, a cancel compensates with ``cancelled_by: "Customer"``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from messages.base import OrderStatus, items_of
from messages.commands import (
    InventoryReleasedReply,
    InventoryShippedReply,
    InventoryUnavailableReply,
    PaymentVoidedReply,
    ShipmentCancelledReply,
    ShipmentCreatedReply,
    ShipmentRefusedReply,
)
from messages.events import (
    Event,
    InventoryReleased,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    PaymentRefunded,
    ShipmentFailed,
    ends_order,
    status_of_terminal,
)
from saga.machine import (
    CUSTOMER,
    SYSTEM,
    Abort,
    Appended,
    AppendEvents,
    AppendFailed,
    CancelRequested,
    Env,
    Finish,
    Pending,
    RequestRelease,
    RequestVoid,
    Service,
    ServiceRestarted,
    Start,
    StartTimer,
    StepFailed,
    TimedOut,
)

SHIPMENT_FAILED = "Shipment failed"  # the reason of the OrderCancelled a failed shipment ends in
# ShipmentFailed reasons that start with this end the order `failed` (the carrier broke), the
# others `cancelled` (the carrier said no, or never answered): a rebuilt saga reads it back.
FAILURE_PREFIX = "Carrier failed: "


class Phase(enum.StrEnum):
    """Where the shipping saga is."""

    SHIPPING = "shipping"  # the carrier was asked to create the shipment
    CONSUMING = "consuming"  # shipped: Inventory was asked to consume the reservation
    COMPENSATING = "compensating"
    RECORDING = "recording"  # an append is in flight; `after` says what follows its commit
    DONE = "done"


class Undo(enum.StrEnum):
    """The compensation's steps, in the order they are taken."""

    RELEASE = "release"
    CANCEL_SHIPMENT = "cancel_shipment"
    REFUND = "refund"


UNDO_ORDER = (Undo.RELEASE, Undo.CANCEL_SHIPMENT, Undo.REFUND)

ShippingInput = (
    Start
    | ShipmentCreatedReply
    | ShipmentRefusedReply
    | ShipmentCancelledReply
    | InventoryShippedReply
    | InventoryUnavailableReply
    | InventoryReleasedReply
    | PaymentVoidedReply
    | Appended
    | AppendFailed
    | StepFailed
    | ServiceRestarted
    | TimedOut
    | CancelRequested
)

# --- commands (the saga machine's AppendEvents, RequestRelease, RequestVoid, StartTimer,
# Finish and Abort, and these) ------------------------------------------------------------------


@dataclass(frozen=True)
class RequestShipment:
    """Ask the carrier to create the order's shipment."""


@dataclass(frozen=True)
class RequestShipStock:
    """Ask Inventory to consume the order's reservation (its units leave the warehouse)."""


@dataclass(frozen=True)
class RequestCancelShipment:
    """Ask the carrier to make sure no shipment stands for the order."""

    reason: str


ShippingCommand = (
    AppendEvents
    | RequestShipment
    | RequestShipStock
    | RequestRelease
    | RequestCancelShipment
    | RequestVoid
    | StartTimer
    | Finish
    | Abort
)

# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShippingState:
    """Everything the shipping saga knows about its order; rebuilt from the stream."""

    order: OrderPlaced
    version: int
    recorded: tuple[Event, ...]
    phase: Phase = Phase.SHIPPING
    token: int = 0
    shipment: ShipmentCreatedReply | None = None
    cancel: str | None = None  # the customer's reason, once a cancel came in
    # compensation
    outcome: OrderStatus | None = None
    reason: str = ""
    cancelled_by: str = SYSTEM
    undo: Undo | None = None  # the compensation step in flight
    released: str | None = None
    refunded: tuple[str, Decimal] | None = None
    release_recorded: bool = False
    refund_recorded: bool = False
    pending: Pending | None = None
    final_status: OrderStatus | None = None


def recover(events: Sequence[Event], *, cancel: str | None = None) -> ShippingState:
    """The shipping saga's state from the order stream (which holds ``OrderPaid``).

    Rebuilt after a crash the saga drives the order on from what is recorded: every request
    is idempotent per order id, and its one append before the end (``ShipmentFailed``, or the
    terminal event) goes at the stream's head, so an append its predecessor left in flight
    and its own cannot both land. `cancel` is a customer's cancel that came before the start.
    """
    if not events or not isinstance(events[0], OrderPlaced):
        raise ValueError("an order stream starts with OrderPlaced")
    order = events[0]
    if not any(isinstance(e, OrderPaid) for e in events):
        raise ValueError("the shipping saga starts after OrderPaid")
    state = ShippingState(order=order, version=len(events) - 1, recorded=tuple(events))
    for event in events:
        if ends_order(event, order):
            status = status_of_terminal(event)
            return replace(state, phase=Phase.DONE, final_status=status)
        if isinstance(event, ShipmentFailed):
            failed = event.reason.startswith(FAILURE_PREFIX)
            outcome = OrderStatus.FAILED if failed else OrderStatus.CANCELLED
            state = replace(state, outcome=outcome, reason=_why(event), cancelled_by=SYSTEM)
        elif isinstance(event, InventoryReleased):
            state = replace(state, release_recorded=True)
        elif isinstance(event, PaymentRefunded):
            state = replace(state, refund_recorded=True)
    return replace(state, cancel=cancel)


# --- the machine ------------------------------------------------------------------------------


def decide(
    state: ShippingState, msg: ShippingInput, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    """The shipping saga's next state and what to do, given what just happened."""
    if state.phase == Phase.DONE:
        return state, []
    if isinstance(msg, TimedOut) and msg.token != state.token:
        return state, []  # stale
    if isinstance(msg, Start):
        return _on_start(state)
    if isinstance(msg, CancelRequested):
        return _on_cancel(state, msg.reason)
    if state.phase == Phase.RECORDING:
        return _while_recording(state, msg)
    if state.phase == Phase.SHIPPING:
        return _while_shipping(state, msg, env)
    if state.phase == Phase.CONSUMING:
        return _while_consuming(state, msg, env)
    return _while_compensating(state, msg, env)


def _on_start(state: ShippingState) -> tuple[ShippingState, list[ShippingCommand]]:
    if state.outcome is not None:
        return _begin_compensation(state, state.outcome, state.reason)
    if state.cancel is not None:
        return _cancel_now(state, state.cancel)
    return _ship(state)


def _on_cancel(state: ShippingState, reason: str) -> tuple[ShippingState, list[ShippingCommand]]:
    if state.cancel is not None:
        return state, []
    state = replace(state, cancel=reason)
    if state.phase == Phase.SHIPPING:
        # The carrier has not confirmed: its cancel (a step of the compensation) makes sure
        # no shipment stands, even one it creates later.
        return _cancel_now(state, reason)
    # Consuming (past the point of no return), compensating (ending anyway) or recording (the
    # commit decides, see _while_recording): the order ends as it was going to.
    return state, []


def _cancel_now(state: ShippingState, reason: str) -> tuple[ShippingState, list[ShippingCommand]]:
    state = replace(state, cancelled_by=CUSTOMER)
    return _begin_compensation(state, OrderStatus.CANCELLED, reason)


def _ship(state: ShippingState) -> tuple[ShippingState, list[ShippingCommand]]:
    return _arm(replace(state, phase=Phase.SHIPPING), [RequestShipment()])


def _while_shipping(
    state: ShippingState, msg: ShippingInput, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    if isinstance(msg, ShipmentCreatedReply):
        state = replace(state, phase=Phase.CONSUMING, shipment=msg)
        return _arm(state, [RequestShipStock()])
    if isinstance(msg, ShipmentRefusedReply):
        return _fail_shipment(state, f"Carrier refused: {msg.reason}", OrderStatus.CANCELLED, env)
    if isinstance(msg, TimedOut):
        return _fail_shipment(state, "Shipment timed out", OrderStatus.CANCELLED, env)
    if isinstance(msg, StepFailed | ServiceRestarted) and msg.service == Service.SHIPPING:
        why = msg.reason if isinstance(msg, StepFailed) else "carrier restarted"
        return _fail_shipment(state, f"{FAILURE_PREFIX}{why}", OrderStatus.FAILED, env)
    return state, []


def _while_consuming(
    state: ShippingState, msg: ShippingInput, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    shipment = state.shipment
    if shipment is None:
        raise ValueError("consuming stock without a shipment")
    if isinstance(msg, InventoryShippedReply):
        shipped = OrderShipped(
            order_id=state.order.order_id,
            shipment_id=shipment.shipment_id,
            carrier=shipment.carrier,
            tracking_number=shipment.tracking_number,
            items=items_of(state.order.lines),
            shipped_at=env.now(),
        )
        return _record(state, (shipped,), "finish", env, final=OrderStatus.SHIPPED)
    if isinstance(msg, InventoryUnavailableReply):
        # Nothing is held any more (released by someone else): the goods cannot leave.
        reason = f"Stock not available for the shipment: {msg.reason}"
        return _fail_shipment(state, reason, OrderStatus.CANCELLED, env)
    if isinstance(msg, TimedOut) or (
        isinstance(msg, StepFailed | ServiceRestarted) and msg.service == Service.INVENTORY
    ):
        # Past the point of no return: ask again (idempotent) until Inventory answers.
        return _arm(state, [RequestShipStock()])
    return state, []


def _fail_shipment(
    state: ShippingState, reason: str, outcome: OrderStatus, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    failed = ShipmentFailed(order_id=state.order.order_id, reason=reason, failed_at=env.now())
    state = replace(state, outcome=outcome, reason=_why(failed), cancelled_by=SYSTEM)
    return _record(state, (failed,), "compensate", env)


def _why(failed: ShipmentFailed) -> str:
    """The reason the compensation records: "Shipment failed" for a cancelled order (DESIGN.md
    section 9), with the carrier's failure for a failed one."""
    if failed.reason.startswith(FAILURE_PREFIX):
        return f"{SHIPMENT_FAILED}: {failed.reason}"
    return SHIPMENT_FAILED


def _begin_compensation(
    state: ShippingState, outcome: OrderStatus, reason: str
) -> tuple[ShippingState, list[ShippingCommand]]:
    state = replace(state, phase=Phase.COMPENSATING, outcome=outcome, reason=reason)
    return _undo(state, UNDO_ORDER[0])


def _undo(state: ShippingState, step: Undo) -> tuple[ShippingState, list[ShippingCommand]]:
    state = replace(state, undo=step)
    return _arm(state, [_undo_request(state)])


def _undo_request(state: ShippingState) -> ShippingCommand:
    if state.undo == Undo.RELEASE:
        return RequestRelease(reason=state.reason)
    if state.undo == Undo.CANCEL_SHIPMENT:
        return RequestCancelShipment(reason=state.reason)
    return RequestVoid(reason=state.reason)


def _while_compensating(
    state: ShippingState, msg: ShippingInput, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    step = state.undo
    if step == Undo.RELEASE and isinstance(msg, InventoryReleasedReply):
        return _undo(replace(state, released=msg.reservation_id), Undo.CANCEL_SHIPMENT)
    if step == Undo.RELEASE and isinstance(msg, InventoryShippedReply):
        # A saga before this one had the shipment confirmed and the stock consumed: the order
        # is shipped. The carrier was not asked to cancel yet, so it returns the shipment.
        state = replace(state, outcome=None, reason="", cancelled_by=SYSTEM, undo=None)
        return _ship(state)
    if step == Undo.CANCEL_SHIPMENT and isinstance(msg, ShipmentCancelledReply):
        return _undo(state, Undo.REFUND)
    if step == Undo.REFUND and isinstance(msg, PaymentVoidedReply):
        refunded = (
            (msg.refunded_payment_id, msg.amount or Decimal(0))
            if msg.refunded_payment_id is not None
            else None
        )
        return _record_compensation(replace(state, refunded=refunded, undo=None), env)
    if isinstance(msg, TimedOut | ServiceRestarted | StepFailed):
        # Compensation cannot give up: ask again (every request is idempotent).
        return _arm(state, [_undo_request(state)])
    return state, []


def _record_compensation(
    state: ShippingState, env: Env
) -> tuple[ShippingState, list[ShippingCommand]]:
    """PaymentRefunded, InventoryReleased (what was given back and is not recorded yet), then
    the terminal event: the reverse of the forward steps (DESIGN.md section 9)."""
    order, now = state.order, env.now()
    outcome = state.outcome or OrderStatus.FAILED
    events: list[Event] = []
    if state.refunded is not None and not state.refund_recorded:
        events.append(
            PaymentRefunded(
                order_id=order.order_id,
                payment_id=state.refunded[0],
                amount=state.refunded[1],
                reason=state.reason,
                refunded_at=now,
            )
        )
    if state.released and not state.release_recorded:
        events.append(
            InventoryReleased(
                order_id=order.order_id,
                reservation_id=state.released,
                reason=state.reason,
                released_at=now,
            )
        )
    if outcome == OrderStatus.CANCELLED:
        events.append(
            OrderCancelled(
                order_id=order.order_id,
                cancelled_by=state.cancelled_by,
                reason=state.reason,
                refund_issued=state.refunded is not None or state.refund_recorded,
                cancelled_at=now,
            )
        )
    else:
        events.append(
            OrderFulfillmentFailed(
                order_id=order.order_id, error_message=state.reason, failed_at=now
            )
        )
    return _record(state, tuple(events), "finish", env, final=outcome)


def _while_recording(
    state: ShippingState, msg: ShippingInput
) -> tuple[ShippingState, list[ShippingCommand]]:
    pending = state.pending
    if pending is None:
        raise ValueError("a shipping saga recording without a pending append")
    append = pending.append
    if isinstance(msg, Appended) and msg.version == append.expected_version + len(append.events):
        state = replace(
            state, version=msg.version, pending=None, recorded=state.recorded + append.events
        )
        if pending.after == "compensate":
            return _begin_compensation(state, state.outcome or OrderStatus.FAILED, state.reason)
        status = state.final_status or OrderStatus.FAILED
        return replace(state, phase=Phase.DONE), [Finish(status=status, reason=state.reason)]
    if isinstance(msg, Appended):
        return state, []  # the reply to an earlier send of an earlier append
    if isinstance(msg, AppendFailed):
        return replace(state, phase=Phase.DONE), [Abort(reason=msg.reason)]
    if isinstance(msg, TimedOut) or (
        isinstance(msg, ServiceRestarted | StepFailed) and msg.service == Service.STORE
    ):
        return _arm(state, [append])
    return state, []


def _record(
    state: ShippingState,
    events: tuple[Event, ...],
    after: str,
    env: Env,
    final: OrderStatus | None = None,
) -> tuple[ShippingState, list[ShippingCommand]]:
    append = AppendEvents(
        events=events,
        event_ids=tuple(env.new_id() for _ in events),
        expected_version=state.version,
    )
    state = replace(
        state,
        phase=Phase.RECORDING,
        pending=Pending(append=append, after=after),
        final_status=final or state.final_status,
    )
    return _arm(state, [append])


def _arm(
    state: ShippingState, commands: list[ShippingCommand]
) -> tuple[ShippingState, list[ShippingCommand]]:
    """Every wait gets a deadline: a new token makes all earlier timers stale."""
    token = state.token + 1
    return replace(state, token=token), [*commands, StartTimer(token=token)]
