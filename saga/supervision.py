"""The supervisor's decisions about an order whose sagas fail, as a pure state machine.

``SupervisionPolicy.decide(state, input, env) -> (state, commands)``, in the style of
``saga.machine.decide``: the OrderManager feeds it what happened (a saga of the order failed, a
timer fired, the order stream was read, Inventory released, Payment voided, the supervisor's
own append committed or was refused) and carries out the commands it returns. No actors, no
I/O; the clock and the id source come in through ``Env``.

The rules:

- The first failed saga is replaced at once by one rebuilt from the stream, compensating.
- Each later failure waits a back-off first (``backoff``: 0.1 s doubling, at most 5 s, never
  shorter than the one before), so an order whose sagas keep failing cannot spin the system.
- At ``max_failures`` the order is ended without any saga code (the last resort). The stream is
  read: a terminal stream stands; a recorded charge is finished as ``OrderPaid``; otherwise
  Inventory is asked to release and Payment to void (both idempotent, keyed by the order id,
  fencing any later reserve or charge), then what was given back and the terminal event are
  recorded (``saga.machine.compensation_events``) at the head that was read, so a saga append
  still in flight conflicts; on a conflict the stream is read again. Requests that go
  unanswered and appends that fail are retried every ``retry_every`` seconds until the order
  ends, exactly once.
- An order placed with shipping goes as its ShippingSaga would (DESIGN.md section 9): the
  release is asked alone first, because it decides. Inventory answering that the reservation
  was consumed means the order shipped: the carrier is asked for the shipment (idempotent: it
  answers with the one it made) and ``OrderShipped`` is recorded, nothing given back. Released,
  the order can no longer ship (the release fences the stock), so the carrier is asked to make
  sure no shipment stands and Payment to void; then ``PaymentRefunded``, ``InventoryReleased``
  and the terminal event are recorded. An order is never both shipped and refunded.
- The terminal event: ``OrderCancelled {cancelled_by: "System", reason: "Shipment failed"}``
  when a recorded ``ShipmentFailed`` had the carrier refuse or time out; else
  ``OrderCancelled {cancelled_by: "Customer"}`` when the customer cancelled; else
  ``OrderFulfillmentFailed`` with what failed and what was given back.

``restart_delay`` is the same back-off for a service that keeps dying.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from messages.base import OrderStatus, items_of
from messages.commands import (
    AppendDone,
    AppendRejected,
    InventoryReleasedReply,
    InventoryShippedReply,
    PaymentVoidedReply,
    ShipmentCancelledReply,
    ShipmentCreatedReply,
)
from messages.events import (
    Event,
    InventoryReleased,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    PaymentProcessed,
    PaymentRefunded,
    ShipmentFailed,
    final_status,
)
from saga.machine import (
    CUSTOMER,
    SYSTEM,
    AppendEvents,
    Env,
    RequestRelease,
    RequestVoid,
    compensation_events,
    order_paid,
)
from saga.shipping import FAILURE_PREFIX, SHIPMENT_FAILED, RequestCancelShipment, RequestShipment
from saga.views import order_view

MAX_SAGA_FAILURES = 8  # about 16 s of retrying with the back-off below
BASE_DELAY = 0.1
MAX_DELAY = 5.0
RESTART_WINDOW = 30.0  # seconds over which restarts of one service count towards back-off
GIVE_UP_REASON = "the supervisor ended the order: its sagas kept failing"


def backoff(attempt: int, *, base: float = BASE_DELAY, most: float = MAX_DELAY) -> float:
    """Seconds to wait before attempt number `attempt` (1-based): none for the first, then
    `base` doubling per attempt up to `most`. Never shorter than the attempt before."""
    if attempt <= 1:
        return 0.0
    return min(most, base * 2 ** (attempt - 1))


def restart_delay(
    restarts: Sequence[float], now: float, *, window: float = RESTART_WINDOW
) -> tuple[tuple[float, ...], float]:
    """A service died at `now` (monotonic seconds); `restarts` are its earlier restart times.
    Returns the restart times that still count (within `window`, this one included) and how
    long to wait before restarting it: at once the first time, backing off when it keeps dying."""
    recent = (*(t for t in restarts if now - t < window), now)
    return recent, backoff(len(recent))


class Stage(enum.StrEnum):
    """Where the supervision of an order is."""

    RUNNING = "running"  # a saga drives the order
    BACKING_OFF = "backing_off"  # the next saga starts when RetryDue comes
    GIVING_UP = "giving_up"  # the last resort: no saga any more
    DONE = "done"  # End was issued; nothing more happens


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SagaFailed:
    """A saga of the order raised, aborted or died."""

    reason: str


@dataclass(frozen=True)
class RetryDue:
    """The back-off of a RetryAfter passed."""


@dataclass(frozen=True)
class RecheckDue:
    """The period of a RecheckAfter passed: ask again what is unanswered, or record again."""


@dataclass(frozen=True)
class StreamRead:
    """The answer to ReadStream: the order stream (None: it does not read back) and its head
    version (None: unknown)."""

    events: tuple[Event, ...] | None
    version: int | None


@dataclass(frozen=True)
class CustomerCancelled:
    """The customer cancelled the order (its reason): an order the supervisor ends without a
    charge standing ends cancelled by the customer."""

    reason: str


# The answers to the last resort's requests.
ServiceAnswer = (
    InventoryReleasedReply
    | InventoryShippedReply
    | PaymentVoidedReply
    | ShipmentCancelledReply
    | ShipmentCreatedReply
)

SupervisionInput = (
    SagaFailed
    | RetryDue
    | RecheckDue
    | StreamRead
    | CustomerCancelled
    | ServiceAnswer
    | AppendDone
    | AppendRejected
)

# --- commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Respawn:
    """Start a new saga for the order, rebuilt from its stream, compensating."""


@dataclass(frozen=True)
class RetryAfter:
    """Feed RetryDue after `delay` seconds (the order's `failures`-th saga failed)."""

    delay: float
    failures: int


@dataclass(frozen=True)
class RecheckAfter:
    """Feed RecheckDue after `delay` seconds."""

    delay: float


@dataclass(frozen=True)
class ReadStream:
    """Read the order stream now and feed StreamRead."""


@dataclass(frozen=True)
class End:
    """The order is terminal: answer everyone waiting for it with `view`."""

    view: dict[str, Any]


# RequestRelease / RequestVoid / AppendEvents are the saga machine's commands, RequestShipment /
# RequestCancelShipment the shipping saga's, reused.
SupervisionCommand = (
    Respawn
    | RetryAfter
    | RecheckAfter
    | ReadStream
    | RequestRelease
    | RequestVoid
    | RequestShipment
    | RequestCancelShipment
    | AppendEvents
    | End
)

# --- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Supervision:
    """What the supervisor knows of one order whose sagas failed."""

    order: OrderPlaced
    stage: Stage = Stage.RUNNING
    failures: int = 0
    giving_up: str | None = None  # why the last resort started
    asked: bool = False  # release and void were asked for: too late to finish as paid
    paid_with: str | None = None  # a recorded charge: the order ends as paid
    released: InventoryReleasedReply | None = None
    voided: PaymentVoidedReply | None = None
    # An order placed with shipping: the reservation was found consumed (the order shipped) and
    # the carrier's shipment; or the carrier's word that no shipment stands.
    shipped: InventoryShippedReply | None = None
    shipment: ShipmentCreatedReply | None = None
    carrier_cancelled: ShipmentCancelledReply | None = None
    cancel: str | None = None  # the customer's cancel (its reason)
    basis: tuple[Event, ...] | None = None  # the stream the pending append was decided on
    recording: tuple[Event, ...] | None = None  # the supervisor's terminal append in flight


def supervise(order: OrderPlaced) -> Supervision:
    """The supervision state of an order none of whose sagas has failed yet."""
    return Supervision(order=order)


@dataclass(frozen=True)
class SupervisionPolicy:
    """The rules, with their limits: how many sagas may fail and how often to retry the last
    resort's requests and appends (the step timeout)."""

    max_failures: int = MAX_SAGA_FAILURES
    retry_every: float = 5.0

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, not {self.max_failures}")

    def decide(
        self, state: Supervision, msg: SupervisionInput, env: Env
    ) -> tuple[Supervision, list[SupervisionCommand]]:
        """The order's next supervision state and what to do, given what just happened."""
        if state.stage == Stage.DONE:
            return state, []  # ended: late timers and replies change nothing
        if isinstance(msg, CustomerCancelled):
            return (state if state.cancel is not None else replace(state, cancel=msg.reason)), []
        if isinstance(msg, SagaFailed):
            return self._saga_failed(state, msg.reason)
        if isinstance(msg, RetryDue):
            if state.stage != Stage.BACKING_OFF:
                return state, []
            return replace(state, stage=Stage.RUNNING), [Respawn()]
        if state.stage != Stage.GIVING_UP:
            return state, []  # replies and reads belong to the last resort only
        if isinstance(msg, RecheckDue):
            return self._recheck(state)
        if isinstance(msg, StreamRead):
            return self._look(state, msg, env)
        if isinstance(msg, AppendDone | AppendRejected):
            return _appended(state, msg)
        return _answered(state, msg)

    def _saga_failed(
        self, state: Supervision, reason: str
    ) -> tuple[Supervision, list[SupervisionCommand]]:
        if state.stage == Stage.GIVING_UP:
            return state, []  # no saga runs any more; a late report of an old one
        failures = state.failures + 1
        if failures >= self.max_failures:
            why = f"{failures} sagas failed (last: {reason})"
            state = replace(state, stage=Stage.GIVING_UP, failures=failures, giving_up=why)
            return state, [ReadStream(), RecheckAfter(self.retry_every)]
        delay = backoff(failures)
        if delay == 0:
            return replace(state, stage=Stage.RUNNING, failures=failures), [Respawn()]
        state = replace(state, stage=Stage.BACKING_OFF, failures=failures)
        return state, [RetryAfter(delay=delay, failures=failures)]

    def _recheck(self, state: Supervision) -> tuple[Supervision, list[SupervisionCommand]]:
        again: list[SupervisionCommand] = [RecheckAfter(self.retry_every)]
        if not _ready(state):
            # Services restart and requests get lost: ask again until both have answered.
            state, asks = _ask(state)
            return state, [*asks, *again]
        if state.recording is not None:
            return state, again  # our append is still out
        return state, [ReadStream(), *again]

    def _look(
        self, state: Supervision, msg: StreamRead, env: Env
    ) -> tuple[Supervision, list[SupervisionCommand]]:
        if state.recording is not None:
            return state, []
        version = msg.version
        if msg.events is not None:
            status = _terminal_status(msg.events)
            if status is not None:
                # Terminal already: a saga's last append landed, or ours committed although the
                # store reported a failure. One terminal event per order.
                view = order_view(state.order.order_id, msg.events)
                return replace(state, stage=Stage.DONE), [End(view=view)]
            processed = next((e for e in msg.events if isinstance(e, PaymentProcessed)), None)
            paid = any(isinstance(e, OrderPaid) for e in msg.events)
            # OrderPaid recorded and the order not over: it was placed with shipping and its
            # shipping failed, so it is compensated like any other (never paid twice).
            if processed is not None and not paid and not state.asked and state.paid_with is None:
                # Charged and recorded before anything was given back: nothing to give back.
                state = replace(state, paid_with=processed.payment_id)
            version = len(msg.events) - 1  # the head this decision is made at
        if not _ready(state):
            return _ask(state)
        if version is None:
            return state, []  # the head is unknown: RecheckDue looks again
        ending = _ending(state, msg.events or (), env)
        append = AppendEvents(
            events=ending,
            event_ids=tuple(env.new_id() for _ in ending),
            expected_version=version,
        )
        return replace(state, basis=msg.events, recording=ending), [append]


def _appended(
    state: Supervision, msg: AppendDone | AppendRejected
) -> tuple[Supervision, list[SupervisionCommand]]:
    if state.recording is None:
        return state, []  # the answer to an append we no longer wait for
    if isinstance(msg, AppendDone):
        events = (*(state.basis or (state.order,)), *state.recording)
        view = {**order_view(state.order.order_id, events), "version": msg.version}
        return replace(state, stage=Stage.DONE, recording=None), [End(view=view)]
    state = replace(state, recording=None)
    if msg.error == "conflict":
        return state, [ReadStream()]  # the stream moved: look again, then at its head
    return state, []  # a store failure: RecheckDue records again


def _answered(
    state: Supervision, msg: ServiceAnswer
) -> tuple[Supervision, list[SupervisionCommand]]:
    """A service answered one of the last resort's requests; a duplicate or an answer to no
    request of ours changes nothing (the first answer counts)."""
    if isinstance(msg, InventoryReleasedReply | InventoryShippedReply):
        if state.released is not None or state.shipped is not None:
            return state, []
        if isinstance(msg, InventoryShippedReply):
            # Consumed by the shipment: the order shipped. Ask the carrier for its shipment.
            return replace(state, shipped=msg), [RequestShipment()]
        state = replace(state, released=msg)
        if _ships(state):
            return _ask(state)  # released: now the carrier's cancel and the refund
        return _record_when_ready(state)
    if isinstance(msg, PaymentVoidedReply) and state.voided is None:
        return _record_when_ready(replace(state, voided=msg))
    if (
        isinstance(msg, ShipmentCancelledReply)
        and state.released is not None
        and state.carrier_cancelled is None
    ):
        return _record_when_ready(replace(state, carrier_cancelled=msg))
    if isinstance(msg, ShipmentCreatedReply) and state.shipped is not None and not state.shipment:
        return _record_when_ready(replace(state, shipment=msg))
    return state, []


def _ships(state: Supervision) -> bool:
    """Whether the order was placed with shipping (its last resort goes the ShippingSaga's way)."""
    return state.order.shipping is not None


def _ready(state: Supervision) -> bool:
    """Whether the supervisor knows enough to record the order's end."""
    if state.paid_with is not None:
        return True
    if state.shipped is not None:
        return state.shipment is not None
    given_back = state.released is not None and state.voided is not None
    return given_back and (not _ships(state) or state.carrier_cancelled is not None)


def _ask(state: Supervision) -> tuple[Supervision, list[SupervisionCommand]]:
    """Ask for what is not answered yet. With shipping the release goes alone first: only
    once it gave the stock back (so the order cannot ship any more) is the carrier asked to
    cancel and Payment to void; if it found the stock consumed, the carrier for the shipment."""
    commands: list[SupervisionCommand] = []
    state = replace(state, asked=True)
    if state.shipped is not None:
        return state, [] if state.shipment is not None else [RequestShipment()]
    if state.released is None:
        commands.append(RequestRelease(reason=GIVE_UP_REASON))
        if _ships(state):
            return state, commands
    if _ships(state) and state.carrier_cancelled is None:
        commands.append(RequestCancelShipment(reason=GIVE_UP_REASON))
    if state.voided is None:
        commands.append(RequestVoid(reason=GIVE_UP_REASON))
    return state, commands


def _record_when_ready(state: Supervision) -> tuple[Supervision, list[SupervisionCommand]]:
    if not _ready(state) or state.recording is not None:
        return state, []
    return state, [ReadStream()]


def _terminal_status(events: Sequence[Event]) -> OrderStatus | None:
    return final_status(events)


def _ending(state: Supervision, events: Sequence[Event], env: Env) -> tuple[Event, ...]:
    """What the supervisor records to end the order (`events`: the stream so far)."""
    now = env.now()
    if state.paid_with is not None:
        return (order_paid(state.order, state.paid_with, now),)
    if state.shipped is not None:
        return (_order_shipped(state, now),)
    released, voided = state.released, state.voided
    if released is None or voided is None:
        raise ValueError("the order's end is recorded only once release and void answered")
    why = f"{state.giving_up}; ended by the supervisor"
    given_back = []
    reservation = released.reservation_id
    if reservation:
        given_back.append(f"reservation {reservation} released")
    cancelled = state.carrier_cancelled.shipment_id if state.carrier_cancelled else None
    if cancelled:
        given_back.append(f"shipment {cancelled} cancelled at the carrier")
    refunded: tuple[str, Decimal] | None = None
    if voided.refunded_payment_id and voided.amount is not None:
        refunded = (voided.refunded_payment_id, voided.amount)
        given_back.append(f"charge {refunded[0]} ({refunded[1]}) refunded")
    failed_reason = f"{why}: " + ("; ".join(given_back) or "nothing held or charged")
    outcome, terminal_reason, cancelled_by = _outcome(state, events, failed_reason)
    ending = compensation_events(
        state.order,
        outcome=outcome,
        reason=why,
        released_reservation=reservation,
        refunded=refunded,
        release_recorded=any(isinstance(e, InventoryReleased) for e in events),
        refund_recorded=any(isinstance(e, PaymentRefunded) for e in events),
        now=now,
        terminal_reason=terminal_reason,
        cancelled_by=cancelled_by,
    )
    if _ships(state):
        # After OrderPaid the steps are undone in reverse: the refund is recorded first.
        *given, terminal = ending
        given.sort(key=lambda e: not isinstance(e, PaymentRefunded))
        ending = (*given, terminal)
    return ending


def _outcome(
    state: Supervision, events: Sequence[Event], failed_reason: str
) -> tuple[OrderStatus, str, str]:
    """How a compensated order ends: (status, the terminal event's reason, cancelled_by).

    A recorded ShipmentFailed decided it already (the carrier refused or timed out: cancelled
    with "Shipment failed"; the carrier broke: failed), as it does for a rebuilt ShippingSaga;
    else a customer's cancel makes it cancelled by the customer; else it failed."""
    shipment_failed = next((e for e in reversed(events) if isinstance(e, ShipmentFailed)), None)
    if shipment_failed is not None and not shipment_failed.reason.startswith(FAILURE_PREFIX):
        return OrderStatus.CANCELLED, SHIPMENT_FAILED, SYSTEM
    if shipment_failed is None and state.cancel is not None:
        return OrderStatus.CANCELLED, state.cancel, CUSTOMER
    return OrderStatus.FAILED, failed_reason, SYSTEM


def _order_shipped(state: Supervision, now: datetime) -> OrderShipped:
    """The terminal event of an order whose reservation its shipment consumed."""
    shipment = state.shipment
    if shipment is None:
        raise ValueError("an order is recorded shipped only with the carrier's shipment")
    return OrderShipped(
        order_id=state.order.order_id,
        shipment_id=shipment.shipment_id,
        carrier=shipment.carrier,
        tracking_number=shipment.tracking_number,
        items=items_of(state.order.lines),
        shipped_at=now,
    )
