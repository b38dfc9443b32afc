"""The order saga's decisions as a pure state machine (no actors, no I/O, no clock).

``decide(state, input) -> (state, commands)``: the OrderSaga actor feeds it what happened (a reply,
a timeout, a committed append) and carries out the commands it returns (append events, send a
request, start a timer, finish). Because it is pure it is unit-tested and replayed on its own.

The flow (DESIGN.md sections 3 and 4), each outcome recorded before the next step:

    reserve -ok-> record InventoryReserved -> charge -ok-> record PaymentProcessed + OrderPaid
      |-unavailable-> record InventoryUnavailable + OrderCancelled
      |-timeout/failure-> compensate               |-declined/timeout-> record PaymentFailed,
                                                   |                    then compensate
                                                   |-failure-> compensate

Compensation releases the reservation and voids the payment (both idempotent, keyed by the order
id, both retried until acknowledged), then records InventoryReleased / PaymentRefunded for what it
actually gave back, and the terminal event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any

from messages.base import Item, OrderStatus, items_of, new_id
from messages.commands import (
    InventoryReleasedReply,
    InventoryReservedReply,
    InventoryUnavailableReply,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
)
from messages.events import (
    Event,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    PaymentFailed,
    PaymentProcessed,
    PaymentRefunded,
    status_of_terminal,
)


class Phase(enum.StrEnum):
    """Where the saga is."""

    RESERVING = "reserving"
    CHARGING = "charging"
    COMPENSATING = "compensating"
    RECORDING = "recording"  # an append is in flight; `after` says what follows its commit
    DONE = "done"


class Service(enum.StrEnum):
    """The actors a saga talks to."""

    INVENTORY = "inventory"
    PAYMENT = "payment"
    STORE = "store"
    SHIPPING = "shipping"


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin (or, after recovery, resume) driving the order."""


@dataclass(frozen=True)
class Appended:
    """The pending append committed; version is the stream's new last version."""

    version: int


@dataclass(frozen=True)
class AppendFailed:
    """The store refused the pending append (the stream moved under the saga)."""

    reason: str


@dataclass(frozen=True)
class StepFailed:
    """A service failed while handling the saga's request (PoisonMessage, dead process)."""

    service: Service
    reason: str


@dataclass(frozen=True)
class ServiceRestarted:
    """A service was restarted; requests pending with it were lost."""

    service: Service


@dataclass(frozen=True)
class TimedOut:
    """A step timer fired; stale tokens are ignored."""

    token: int


@dataclass(frozen=True)
class CancelRequested:
    """The customer asked to cancel the order (DESIGN.md section 9): every state decides what
    that means there. Once the order is past the point where it can be cancelled, it ends as
    it would have, and the manager tells the customer it was too late."""

    reason: str


CUSTOMER = "Customer"
SYSTEM = "System"


# The services' replies are inputs as they are (messages/commands.py names them).
SagaInput = (
    Start
    | InventoryReservedReply
    | InventoryUnavailableReply
    | PaymentProcessedReply
    | PaymentFailedReply
    | InventoryReleasedReply
    | PaymentVoidedReply
    | Appended
    | AppendFailed
    | StepFailed
    | ServiceRestarted
    | TimedOut
    | CancelRequested
)

# --- commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendEvents:
    """Append events (with their ids, so a re-send is idempotent) at expected_version."""

    events: tuple[Event, ...]
    event_ids: tuple[str, ...]
    expected_version: int


@dataclass(frozen=True)
class RequestReserve:
    """Ask Inventory to hold these items for the order."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class RequestCharge:
    """Ask Payment to charge the order's total."""

    amount: Decimal
    payment_method: str


@dataclass(frozen=True)
class RequestRelease:
    """Ask Inventory to give back whatever it holds for the order (and refuse it later)."""

    reason: str


@dataclass(frozen=True)
class RequestVoid:
    """Ask Payment to make sure no charge stands for the order."""

    reason: str


@dataclass(frozen=True)
class StartTimer:
    """Arm the step timer; a TimedOut with this token comes back if nothing else does."""

    token: int


@dataclass(frozen=True)
class Finish:
    """The order is terminal (its terminal event is committed)."""

    status: str
    reason: str


@dataclass(frozen=True)
class Abort:
    """The saga cannot go on (its stream changed under it); the supervisor takes over."""

    reason: str


Command = (
    AppendEvents
    | RequestReserve
    | RequestCharge
    | RequestRelease
    | RequestVoid
    | StartTimer
    | Finish
    | Abort
)

# --- state -----------------------------------------------------------------------------------

Clock = Callable[[], datetime]
IdFactory = Callable[[], str]


@dataclass(frozen=True)
class Pending:
    """An append in flight and what the saga does once it is committed."""

    append: AppendEvents
    after: str  # "charge" | "compensate" | "finish"


@dataclass(frozen=True)
class SagaState:
    """Everything the saga knows about its order; rebuilt from the stream on recovery."""

    order: OrderPlaced
    version: int
    phase: Phase = Phase.RESERVING
    token: int = 0
    reservation_id: str | None = None
    payment_id: str | None = None
    # compensation
    outcome: OrderStatus | None = None
    reason: str = ""
    release_done: bool = False
    void_done: bool = False
    need_void: bool = False
    released_reservation: str | None = None
    refunded: tuple[str, Decimal] | None = None
    release_recorded: bool = False
    refund_recorded: bool = False
    pending: Pending | None = None
    final_status: OrderStatus | None = None
    recorded: tuple[Event, ...] = ()  # the order stream as far as it is committed
    # Recovered mid-charge from a dead saga: record PaymentFailed before compensating, so an
    # append the dead saga left in flight (PaymentProcessed + OrderPaid) and ours cannot both
    # land: whichever commits second conflicts, and a paid order is never refunded.
    fence_first: bool = False
    cancel: str | None = None  # the customer's reason, once a cancel came in
    cancelled_by: str = SYSTEM  # who an OrderCancelled of this saga names


_STATE_FIELDS = frozenset(f.name for f in fields(SagaState))


def _evolve(state: SagaState, **changes: Any) -> SagaState:
    """``dataclasses.replace`` for SagaState without running ``__init__`` again: a saga makes
    about 14 of these per order and ``replace`` was ~10 % of the actor thread (profile in
    docs/performance.md). Unknown field names are refused, as ``replace`` refuses them."""
    unknown = changes.keys() - _STATE_FIELDS
    if unknown:
        raise TypeError(f"SagaState has no field(s) {sorted(unknown)}")
    new = object.__new__(SagaState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class Env:
    """What the pure machine needs from outside: a clock and an id source (injectable)."""

    now: Clock
    new_id: IdFactory = new_id


def recover(events: Sequence[Event], *, compensate: bool, cancel: str | None = None) -> SagaState:
    """A saga's state from its stream: ``[OrderPlaced]`` for a new order, or everything
    recorded so far when a saga is rebuilt (one way in for both).

    With ``compensate`` (the saga crashed or raised: the supervisor's choice) the rebuilt saga
    compensates on Start; without it (start-up recovery) it re-drives the next idempotent step.
    `cancel` is a customer's cancel (its reason) that came before this start.
    """
    if not events or not isinstance(events[0], OrderPlaced):
        raise ValueError("an order stream starts with OrderPlaced")
    order = events[0]
    state = SagaState(order=order, version=len(events) - 1, recorded=tuple(events))
    for event in events[1:]:
        if status_of_terminal(event) is not None:
            return _evolve(state, phase=Phase.DONE, final_status=status_of_terminal(event))
        if isinstance(event, InventoryReserved):
            state = _evolve(state, reservation_id=event.reservation_id, phase=Phase.CHARGING)
        elif isinstance(event, InventoryUnavailable):
            state = _evolve(state, outcome=OrderStatus.CANCELLED, reason="Inventory unavailable")
        elif isinstance(event, PaymentProcessed):
            state = _evolve(state, payment_id=event.payment_id)
        elif isinstance(event, PaymentFailed):
            state = _evolve(
                state,
                outcome=OrderStatus.CANCELLED,
                reason=f"Payment failed: {event.reason}",
                need_void=True,
            )
        elif isinstance(event, InventoryReleased):
            state = _evolve(state, release_recorded=True)
        elif isinstance(event, PaymentRefunded):
            state = _evolve(state, refund_recorded=True)
    if compensate and state.outcome is None:
        state = _evolve(
            state,
            outcome=OrderStatus.FAILED,
            reason="saga crashed; recovered",
            fence_first=state.phase == Phase.CHARGING,
        )
    # A charge may have been sent before the crash with its outcome unrecorded: compensation
    # voids it, so a charge that went through (or completes later) is refunded.
    need_void = state.need_void or state.phase == Phase.CHARGING
    return _evolve(state, need_void=need_void, cancel=cancel)


# --- the machine ------------------------------------------------------------------------------


def decide(state: SagaState, msg: SagaInput, env: Env) -> tuple[SagaState, list[Command]]:
    """The saga's next state and what to do, given what just happened."""
    if state.phase == Phase.DONE:
        return state, []  # late or duplicate input for a finished order: nothing to do
    if isinstance(msg, TimedOut) and msg.token != state.token:
        return state, []  # a stale wakeup: wakeupAfter cannot be cancelled
    if isinstance(msg, Start):
        return _on_start(state, env)
    if isinstance(msg, CancelRequested):
        return _on_cancel(state, msg.reason)
    if state.phase == Phase.RECORDING:
        return _while_recording(state, msg)
    if state.phase == Phase.RESERVING:
        return _while_reserving(state, msg, env)
    if state.phase == Phase.CHARGING:
        return _while_charging(state, msg, env)
    return _while_compensating(state, msg, env)


def _on_start(state: SagaState, env: Env) -> tuple[SagaState, list[Command]]:
    order = state.order
    if state.payment_id is not None:
        # Charged and recorded, but OrderPaid missing: finish the order as paid.
        paid = order_paid(order, state.payment_id, env.now())
        return _record(state, (paid,), "finish", env, final=OrderStatus.PAID)
    if state.fence_first:
        failed = PaymentFailed(
            order_id=order.order_id,
            reason="saga crashed; payment outcome unknown",
            failed_at=env.now(),
        )
        return _record(_evolve(state, fence_first=False), (failed,), "compensate", env)
    if state.outcome is not None:
        return _begin_compensation(state, state.outcome, state.reason)
    if state.cancel is not None:
        return _cancel_now(state, state.cancel)
    if state.phase == Phase.CHARGING:
        return _send_charge(state)
    return _arm(
        _evolve(state, phase=Phase.RESERVING), [RequestReserve(items=items_of(order.lines))]
    )


def _on_cancel(state: SagaState, reason: str) -> tuple[SagaState, list[Command]]:
    """A cancel stops the saga at its next safe point: at once while it waits for a reply (the
    release and the void fence whatever is still in flight), after the commit while it records
    (``_while_recording``). A saga already compensating ends as it was going to end."""
    if state.cancel is not None:
        return state, []  # a repeated cancel
    state = _evolve(state, cancel=reason)
    if state.phase in (Phase.RESERVING, Phase.CHARGING):
        return _cancel_now(state, reason)
    return state, []


def _cancel_now(state: SagaState, reason: str) -> tuple[SagaState, list[Command]]:
    # While charging, need_void is already set: a charge that completes anyway is refunded.
    state = _evolve(state, cancelled_by=CUSTOMER)
    return _begin_compensation(state, OrderStatus.CANCELLED, reason)


def _while_reserving(state: SagaState, msg: SagaInput, env: Env) -> tuple[SagaState, list[Command]]:
    order = state.order
    if isinstance(msg, InventoryReservedReply):
        reserved = InventoryReserved(
            order_id=order.order_id,
            reservation_id=msg.reservation_id,
            items=items_of(order.lines),
            reserved_at=env.now(),
        )
        return _record(
            _evolve(state, reservation_id=msg.reservation_id), (reserved,), "charge", env
        )
    if isinstance(msg, InventoryUnavailableReply):
        unavailable = InventoryUnavailable(
            order_id=order.order_id, unavailable_items=msg.unavailable_items, notified_at=env.now()
        )
        cancelled = OrderCancelled(
            order_id=order.order_id,
            cancelled_by="System",
            reason="Inventory unavailable",
            refund_issued=False,
            cancelled_at=env.now(),
        )
        return _record(state, (unavailable, cancelled), "finish", env, final=OrderStatus.CANCELLED)
    if isinstance(msg, TimedOut):
        return _begin_compensation(state, OrderStatus.FAILED, "inventory reservation timed out")
    if isinstance(msg, StepFailed | ServiceRestarted) and msg.service == Service.INVENTORY:
        return _begin_compensation(state, OrderStatus.FAILED, f"inventory failed: {_why(msg)}")
    return state, []


def _while_charging(state: SagaState, msg: SagaInput, env: Env) -> tuple[SagaState, list[Command]]:
    order = state.order
    if isinstance(msg, PaymentProcessedReply):
        processed = PaymentProcessed(
            payment_id=msg.payment_id,
            order_id=order.order_id,
            amount=order.total_amount,
            processed_at=env.now(),
        )
        paid = order_paid(order, msg.payment_id, env.now())
        return _record(
            _evolve(state, payment_id=msg.payment_id),
            (processed, paid),
            "finish",
            env,
            final=OrderStatus.PAID,
        )
    if isinstance(msg, PaymentFailedReply):
        return _fail_payment(state, msg.reason, need_void=False, env=env)
    if isinstance(msg, TimedOut):
        return _fail_payment(state, "payment timed out", need_void=True, env=env)
    if isinstance(msg, StepFailed | ServiceRestarted) and msg.service == Service.PAYMENT:
        return _begin_compensation(
            _evolve(state, need_void=True), OrderStatus.FAILED, f"payment failed: {_why(msg)}"
        )
    return state, []


def _fail_payment(
    state: SagaState, reason: str, *, need_void: bool, env: Env
) -> tuple[SagaState, list[Command]]:
    failed = PaymentFailed(order_id=state.order.order_id, reason=reason, failed_at=env.now())
    state = _evolve(
        state,
        outcome=OrderStatus.CANCELLED,
        reason=f"Payment failed: {reason}",
        need_void=need_void,
    )
    return _record(state, (failed,), "compensate", env)


def _begin_compensation(
    state: SagaState, outcome: OrderStatus, reason: str
) -> tuple[SagaState, list[Command]]:
    # Void whenever a charge was asked for and its outcome is unknown: a charge that completes
    # after we gave up must be refunded by the provider, never left standing.
    need_void = state.need_void
    state = _evolve(
        state,
        phase=Phase.COMPENSATING,
        outcome=outcome,
        reason=reason,
        need_void=need_void,
        release_done=False,
        void_done=not need_void,
    )
    return _arm(state, _compensation_requests(state))


def _compensation_requests(state: SagaState) -> list[Command]:
    commands: list[Command] = []
    if not state.release_done:
        commands.append(RequestRelease(reason=state.reason))
    if not state.void_done:
        commands.append(RequestVoid(reason=state.reason))
    return commands


def _while_compensating(
    state: SagaState, msg: SagaInput, env: Env
) -> tuple[SagaState, list[Command]]:
    if isinstance(msg, InventoryReleasedReply) and not state.release_done:
        state = _evolve(state, release_done=True, released_reservation=msg.reservation_id)
    elif isinstance(msg, PaymentVoidedReply) and not state.void_done:
        refunded = (
            (msg.refunded_payment_id, msg.amount or Decimal(0))
            if msg.refunded_payment_id is not None
            else None
        )
        state = _evolve(state, void_done=True, refunded=refunded)
    elif isinstance(msg, TimedOut | ServiceRestarted | StepFailed):
        # Compensation cannot give up: re-send what is unacknowledged (both are idempotent).
        return _arm(state, _compensation_requests(state))
    else:
        return state, []
    if not (state.release_done and state.void_done):
        return state, []
    return _record_compensation(state, env)


def _record_compensation(state: SagaState, env: Env) -> tuple[SagaState, list[Command]]:
    events = compensation_events(
        state.order,
        outcome=state.outcome or OrderStatus.FAILED,
        reason=state.reason,
        released_reservation=state.released_reservation,
        refunded=state.refunded,
        release_recorded=state.release_recorded,
        refund_recorded=state.refund_recorded,
        now=env.now(),
        cancelled_by=state.cancelled_by,
    )
    return _record(state, events, "finish", env, final=state.outcome or OrderStatus.FAILED)


def compensation_events(  # noqa: PLR0913 - keywords name each fact; saga/supervision.py calls it too
    order: OrderPlaced,
    *,
    outcome: OrderStatus,
    reason: str,
    released_reservation: str | None,
    refunded: tuple[str, Decimal] | None,
    release_recorded: bool,
    refund_recorded: bool,
    now: datetime,
    terminal_reason: str | None = None,
    cancelled_by: str = SYSTEM,
) -> tuple[Event, ...]:
    """What ends a compensated order: InventoryReleased / PaymentRefunded for what was given back
    and is not recorded yet, then the terminal event (OrderCancelled for a cancelled outcome,
    else OrderFulfillmentFailed). `reason` goes on every event, `terminal_reason` (default:
    `reason`) on the terminal one, `cancelled_by` on an OrderCancelled. The saga machine and
    the supervision policy both end orders with it."""
    events: list[Event] = []
    if released_reservation and not release_recorded:
        events.append(
            InventoryReleased(
                order_id=order.order_id,
                reservation_id=released_reservation,
                reason=reason,
                released_at=now,
            )
        )
    if refunded is not None and not refund_recorded:
        events.append(
            PaymentRefunded(
                order_id=order.order_id,
                payment_id=refunded[0],
                amount=refunded[1],
                reason=reason,
                refunded_at=now,
            )
        )
    final_reason = reason if terminal_reason is None else terminal_reason
    if outcome == OrderStatus.CANCELLED:
        events.append(
            OrderCancelled(
                order_id=order.order_id,
                cancelled_by=cancelled_by,
                reason=final_reason,
                refund_issued=refunded is not None or refund_recorded,
                cancelled_at=now,
            )
        )
    else:
        events.append(
            OrderFulfillmentFailed(
                order_id=order.order_id, error_message=final_reason, failed_at=now
            )
        )
    return tuple(events)


def order_paid(order: OrderPlaced, payment_id: str, now: datetime) -> OrderPaid:
    """The terminal event of an order whose charge `payment_id` stands."""
    return OrderPaid(
        order_id=order.order_id,
        payment_id=payment_id,
        payment_method=order.payment_method,
        amount=order.total_amount,
        paid_at=now,
    )


def _while_recording(state: SagaState, msg: SagaInput) -> tuple[SagaState, list[Command]]:
    pending = state.pending
    if pending is None:
        raise ValueError("a saga recording without a pending append")
    if isinstance(msg, Appended) and msg.version == pending.append.expected_version + len(
        pending.append.events
    ):
        state = _evolve(
            state,
            version=msg.version,
            pending=None,
            recorded=state.recorded + pending.append.events,
        )
        if pending.after == "charge":
            if state.cancel is not None:
                return _cancel_now(state, state.cancel)  # the safe point a cancel waited for
            return _send_charge(state)
        if pending.after == "compensate":
            return _begin_compensation(state, state.outcome or OrderStatus.FAILED, state.reason)
        status = state.final_status or OrderStatus.FAILED
        return _evolve(state, phase=Phase.DONE), [Finish(status=status, reason=state.reason)]
    if isinstance(msg, Appended):
        # The reply to an earlier send of an earlier append (re-sent after a timeout): the store
        # answers a replay with the version that append reached, never the pending one's.
        return state, []
    if isinstance(msg, AppendFailed):
        return _evolve(state, phase=Phase.DONE), [Abort(reason=msg.reason)]
    if isinstance(msg, TimedOut) or (
        isinstance(msg, ServiceRestarted | StepFailed) and msg.service == Service.STORE
    ):
        # The same event ids again: the store treats a committed re-send as a no-op.
        return _arm(state, [pending.append])
    return state, []  # replies from other services are stale once we are recording


def _send_charge(state: SagaState) -> tuple[SagaState, list[Command]]:
    order = state.order
    state = _evolve(state, phase=Phase.CHARGING, need_void=True)
    return _arm(
        state, [RequestCharge(amount=order.total_amount, payment_method=order.payment_method)]
    )


def _record(
    state: SagaState,
    events: tuple[Event, ...],
    after: str,
    env: Env,
    final: OrderStatus | None = None,
) -> tuple[SagaState, list[Command]]:
    append = AppendEvents(
        events=events,
        event_ids=tuple(env.new_id() for _ in events),
        expected_version=state.version,
    )
    state = _evolve(
        state,
        phase=Phase.RECORDING,
        pending=Pending(append=append, after=after),
        final_status=final or state.final_status,
    )
    return _arm(state, [append])


def _arm(state: SagaState, commands: list[Command]) -> tuple[SagaState, list[Command]]:
    """Every wait gets a deadline: a new token makes all earlier timers stale."""
    token = state.token + 1
    return _evolve(state, token=token), [*commands, StartTimer(token=token)]


def _why(msg: StepFailed | ServiceRestarted) -> str:
    return msg.reason if isinstance(msg, StepFailed) else "service restarted"
