"""Unit and property tests of the supervision policy (``saga/supervision.py``), no actor system.

A fixed clock and counter-based event ids make every event the policy records known exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages.base import Item, OrderLine, OrderStatus, Shipping, ShippingAddress, order_total
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
    InventoryReserved,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    PaymentFailed,
    PaymentProcessed,
    PaymentRefunded,
    ShipmentFailed,
    final_status,
    status_of_terminal,
)
from saga.machine import AppendEvents, Env, RequestRelease, RequestVoid, compensation_events
from saga.shipping import RequestCancelShipment, RequestShipment
from saga.supervision import (
    GIVE_UP_REASON,
    MAX_SAGA_FAILURES,
    CustomerCancelled,
    End,
    ReadStream,
    RecheckAfter,
    RecheckDue,
    Respawn,
    RetryAfter,
    RetryDue,
    SagaFailed,
    Stage,
    StreamRead,
    Supervision,
    SupervisionCommand,
    SupervisionInput,
    SupervisionPolicy,
    backoff,
    restart_delay,
    supervise,
)

FIXED = datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
ORDER_ID = "ord-7"
RES_ID = "res-1"
PAY_ID = "pay-1"
LINES = (OrderLine(product_id="SKU-001", quantity=2, unit_price=Decimal("2.50")),)
TOTAL = order_total(LINES)
PLACED = OrderPlaced(
    order_id=ORDER_ID,
    customer_id="c",
    lines=LINES,
    total_amount=TOTAL,
    payment_method="tok_visa",
    placed_at=FIXED,
)
RESERVED = InventoryReserved(
    order_id=ORDER_ID,
    reservation_id=RES_ID,
    items=(Item(product_id="SKU-001", quantity=2),),
    reserved_at=FIXED,
)
PROCESSED = PaymentProcessed(payment_id=PAY_ID, order_id=ORDER_ID, amount=TOTAL, processed_at=FIXED)
RETRY_EVERY = 0.5


def fixed_env() -> Env:
    """A clock that always says FIXED and ids evt-1, evt-2, ..."""
    counter = itertools.count(1)
    return Env(now=lambda: FIXED, new_id=lambda: f"evt-{next(counter)}")


class Supervisor:
    """Feeds inputs to the policy and keeps its state and every command."""

    def __init__(self, max_failures: int = 3, placed: OrderPlaced = PLACED) -> None:
        self.policy = SupervisionPolicy(max_failures=max_failures, retry_every=RETRY_EVERY)
        self.state: Supervision = supervise(placed)
        self.env = fixed_env()

    def feed(self, *inputs: SupervisionInput) -> list[SupervisionCommand]:
        issued: list[SupervisionCommand] = []
        for msg in inputs:
            self.state, commands = self.policy.decide(self.state, msg, self.env)
            issued.extend(commands)
        return issued

    def give_up(self) -> list[SupervisionCommand]:
        """Fail sagas up to the limit; the commands of the last failure."""
        commands: list[SupervisionCommand] = []
        while self.state.stage != Stage.GIVING_UP:
            commands = self.feed(SagaFailed(reason="boom"))
        return commands


def released(reservation: str | None = RES_ID) -> InventoryReleasedReply:
    return InventoryReleasedReply(order_id=ORDER_ID, reservation_id=reservation)


def voided(refunded: bool) -> PaymentVoidedReply:
    return PaymentVoidedReply(
        order_id=ORDER_ID,
        refunded_payment_id=PAY_ID if refunded else None,
        amount=TOTAL if refunded else None,
    )


# --- back-off --------------------------------------------------------------------------------


def test_backoff_starts_at_once_then_doubles_up_to_five_seconds() -> None:
    assert [backoff(n) for n in range(1, 9)] == [0.0, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_service_restarts_back_off_within_the_window_only() -> None:
    recent, delay = restart_delay((), now=100.0)
    assert (recent, delay) == ((100.0,), 0.0)
    recent, delay = restart_delay(recent, now=101.0)
    assert (recent, delay) == ((100.0, 101.0), 0.2)
    recent, delay = restart_delay(recent, now=102.0)
    assert delay == 0.4
    # 30 s later the old restarts no longer count.
    assert restart_delay(recent, now=132.0) == ((132.0,), 0.0)


def test_the_failure_limit_must_allow_one_saga() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SupervisionPolicy(max_failures=0)


def test_default_limit_is_eight() -> None:
    assert SupervisionPolicy().max_failures == MAX_SAGA_FAILURES == 8


# --- respawn and retry -----------------------------------------------------------------------


def test_first_failure_respawns_at_once_later_ones_back_off() -> None:
    sup = Supervisor(max_failures=4)
    assert sup.feed(SagaFailed(reason="x")) == [Respawn()]
    assert sup.state.stage == Stage.RUNNING
    assert sup.feed(SagaFailed(reason="x")) == [RetryAfter(delay=0.2, failures=2)]
    assert sup.state.stage == Stage.BACKING_OFF
    assert sup.feed(RetryDue()) == [Respawn()]
    assert sup.feed(RetryDue()) == []  # a saga runs already
    assert sup.feed(SagaFailed(reason="x")) == [RetryAfter(delay=0.4, failures=3)]
    assert sup.feed(SagaFailed(reason="last")) == [ReadStream(), RecheckAfter(RETRY_EVERY)]
    assert sup.state.stage == Stage.GIVING_UP
    assert sup.state.giving_up == "4 sagas failed (last: last)"
    assert sup.feed(SagaFailed(reason="late"), RetryDue()) == []


def test_inputs_of_the_last_resort_are_ignored_before_it() -> None:
    sup = Supervisor()
    before = sup.state
    assert sup.feed(released(), voided(True), RecheckDue(), StreamRead((PLACED,), 0)) == []
    assert sup.state == before


# --- the last resort -------------------------------------------------------------------------


def test_a_terminal_stream_stands() -> None:
    sup = Supervisor()
    sup.give_up()
    failed = OrderFulfillmentFailed(order_id=ORDER_ID, error_message="saga", failed_at=FIXED)
    commands = sup.feed(StreamRead((PLACED, RESERVED, failed), 2))
    assert len(commands) == 1
    end = commands[0]
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.FAILED
    assert end.view["reason"] == "saga"
    assert sup.state.stage == Stage.DONE
    assert sup.feed(RecheckDue(), released(), SagaFailed(reason="x")) == []


def test_a_recorded_charge_is_finished_as_paid_without_giving_anything_back() -> None:
    sup = Supervisor()
    sup.give_up()
    commands = sup.feed(StreamRead((PLACED, RESERVED, PROCESSED), 2))
    assert commands == [
        AppendEvents(
            events=(
                OrderPaid(
                    order_id=ORDER_ID,
                    payment_id=PAY_ID,
                    payment_method="tok_visa",
                    amount=TOTAL,
                    paid_at=FIXED,
                ),
            ),
            event_ids=("evt-1",),
            expected_version=2,
        )
    ]
    # The timer while the append is out only re-arms itself.
    assert sup.feed(RecheckDue()) == [RecheckAfter(RETRY_EVERY)]
    (end,) = sup.feed(AppendDone(ref="r", version=3))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.PAID
    assert end.view["version"] == 3


def test_otherwise_it_releases_voids_then_records_what_was_given_back() -> None:
    sup = Supervisor()
    sup.give_up()
    asks = sup.feed(StreamRead((PLACED, RESERVED), 1))
    assert asks == [RequestRelease(reason=GIVE_UP_REASON), RequestVoid(reason=GIVE_UP_REASON)]
    assert sup.feed(voided(True)) == []  # still waiting for the release
    assert sup.feed(voided(False)) == []  # a duplicate: the first answer counts
    assert sup.feed(released()) == [ReadStream()]
    (append,) = sup.feed(StreamRead((PLACED, RESERVED), 1))
    why = "3 sagas failed (last: boom); ended by the supervisor"
    assert append == AppendEvents(
        events=(
            InventoryReleased(
                order_id=ORDER_ID, reservation_id=RES_ID, reason=why, released_at=FIXED
            ),
            PaymentRefunded(
                order_id=ORDER_ID, payment_id=PAY_ID, amount=TOTAL, reason=why, refunded_at=FIXED
            ),
            OrderFulfillmentFailed(
                order_id=ORDER_ID,
                error_message=f"{why}: reservation {RES_ID} released; "
                f"charge {PAY_ID} ({TOTAL}) refunded",
                failed_at=FIXED,
            ),
        ),
        event_ids=("evt-1", "evt-2", "evt-3"),
        expected_version=1,
    )
    (end,) = sup.feed(AppendDone(ref="r", version=4))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.FAILED
    assert end.view["refunded_payment_id"] == PAY_ID
    assert end.view["version"] == 4


def test_nothing_held_or_charged_and_recorded_releases_are_not_repeated() -> None:
    sup = Supervisor()
    sup.give_up()
    given_back = InventoryReleased(
        order_id=ORDER_ID, reservation_id=RES_ID, reason="earlier", released_at=FIXED
    )
    sup.feed(StreamRead((PLACED, RESERVED, given_back), 2), released(), voided(False))
    (append,) = sup.feed(StreamRead((PLACED, RESERVED, given_back), 2))
    assert isinstance(append, AppendEvents)
    assert [type(e) for e in append.events] == [OrderFulfillmentFailed]
    sup2 = Supervisor()
    sup2.give_up()
    sup2.feed(StreamRead((PLACED,), 0), released(None), voided(False))
    (append,) = sup2.feed(StreamRead((PLACED,), 0))
    assert isinstance(append, AppendEvents)
    (failed,) = append.events
    assert isinstance(failed, OrderFulfillmentFailed)
    assert failed.error_message.endswith(": nothing held or charged")


def test_requests_are_asked_again_until_answered() -> None:
    sup = Supervisor()
    sup.give_up()
    sup.feed(StreamRead((PLACED, RESERVED), 1))
    assert sup.feed(RecheckDue()) == [
        RequestRelease(reason=GIVE_UP_REASON),
        RequestVoid(reason=GIVE_UP_REASON),
        RecheckAfter(RETRY_EVERY),
    ]
    sup.feed(released())
    assert sup.feed(RecheckDue()) == [RequestVoid(reason=GIVE_UP_REASON), RecheckAfter(RETRY_EVERY)]


def test_a_conflict_reads_again_and_a_store_failure_waits_for_the_timer() -> None:
    sup = Supervisor()
    sup.give_up()
    sup.feed(StreamRead((PLACED, RESERVED), 1), released(), voided(False))
    sup.feed(StreamRead((PLACED, RESERVED), 1))
    assert sup.feed(AppendRejected(ref="r", error="conflict", message="moved")) == [ReadStream()]
    # The stream moved because a saga's last append landed: that end stands.
    cancelled = OrderCancelled(
        order_id=ORDER_ID,
        cancelled_by="System",
        reason="r",
        refund_issued=False,
        cancelled_at=FIXED,
    )
    (end,) = sup.feed(StreamRead((PLACED, RESERVED, cancelled), 2))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.CANCELLED

    sup = Supervisor()
    sup.give_up()
    sup.feed(StreamRead((PLACED, RESERVED), 1), released(), voided(False))
    sup.feed(StreamRead((PLACED, RESERVED), 1))
    assert sup.feed(AppendRejected(ref="r", error="store_error", message="locked")) == []
    assert sup.feed(RecheckDue()) == [ReadStream(), RecheckAfter(RETRY_EVERY)]


def test_an_unreadable_stream_is_compensated_at_its_head() -> None:
    sup = Supervisor()
    sup.give_up()
    assert sup.feed(StreamRead(None, None)) == [
        RequestRelease(reason=GIVE_UP_REASON),
        RequestVoid(reason=GIVE_UP_REASON),
    ]
    assert sup.feed(released(), voided(False)) == [ReadStream()]
    assert sup.feed(StreamRead(None, None)) == []  # head unknown: the timer looks again
    (append,) = sup.feed(StreamRead(None, 1))
    assert isinstance(append, AppendEvents)
    assert append.expected_version == 1
    (end,) = sup.feed(AppendDone(ref="r", version=3))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.FAILED


def test_a_charge_recorded_after_the_void_was_asked_is_not_finished_as_paid() -> None:
    """Once Payment was asked to void, the charge may be refunded: never record OrderPaid."""
    sup = Supervisor()
    sup.give_up()
    sup.feed(StreamRead((PLACED, RESERVED), 1), released(), voided(True))
    (append,) = sup.feed(StreamRead((PLACED, RESERVED, PROCESSED), 2))
    assert isinstance(append, AppendEvents)
    assert not any(isinstance(e, OrderPaid) for e in append.events)
    assert any(isinstance(e, PaymentRefunded) for e in append.events)


# --- the shared compensation events ----------------------------------------------------------


def test_compensation_events_cancelled_and_failed() -> None:
    def events(outcome: OrderStatus, terminal_reason: str | None) -> tuple[Event, ...]:
        return compensation_events(
            PLACED,
            outcome=outcome,
            reason="r",
            released_reservation=RES_ID,
            refunded=(PAY_ID, TOTAL),
            release_recorded=False,
            refund_recorded=True,
            now=FIXED,
            terminal_reason=terminal_reason,
        )

    cancelled = events(OrderStatus.CANCELLED, None)
    assert [type(e) for e in cancelled] == [InventoryReleased, OrderCancelled]
    assert isinstance(cancelled[-1], OrderCancelled)
    assert cancelled[-1].refund_issued
    assert cancelled[-1].reason == "r"
    failed = events(OrderStatus.FAILED, "r: more")
    assert isinstance(failed[-1], OrderFulfillmentFailed)
    assert failed[-1].error_message == "r: more"
    assert isinstance(failed[0], InventoryReleased)
    assert failed[0].reason == "r"


# --- property: random histories --------------------------------------------------------------

START_STREAMS: tuple[tuple[Event, ...], ...] = (
    (PLACED,),
    (PLACED, RESERVED),
    (PLACED, RESERVED, PROCESSED),
    (PLACED, RESERVED, PaymentFailed(order_id=ORDER_ID, reason="crash", failed_at=FIXED)),
)
ACTIONS = (
    *("fail",) * 4,
    "retry",
    "recheck",
    *("release",) * 2,
    *("void",) * 2,
    "duplicate",
    "lose",
    *("commit",) * 2,
    "conflict_fence",
    "conflict_end",
    "store_error",
    "read_fails",
)


@dataclass
class World:
    """The manager, the store, Inventory and Payment around the policy, consistent fakes."""

    max_failures: int
    stream: list[Event]
    charged: bool
    sup: Supervisor = field(init=False)
    ends: list[End] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # release / void asked, unanswered
    replies: list[SupervisionInput] = field(default_factory=list)  # answers given so far
    append: AppendEvents | None = None
    retry_armed: bool = False
    rechecks: int = 0
    saga_running: bool = True
    read_fails: bool = False
    fails_before_giving_up: int = 0
    asked_void: bool = False
    supervisor_events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sup = Supervisor(self.max_failures)

    def feed(self, msg: SupervisionInput) -> None:
        for command in self.sup.feed(msg):
            self.carry_out(command)

    def carry_out(self, command: SupervisionCommand) -> None:
        if isinstance(command, Respawn):
            self.saga_running = True
        elif isinstance(command, RetryAfter):
            self.delays.append(command.delay)
            self.retry_armed = True
        elif isinstance(command, RecheckAfter):
            self.rechecks += 1
        elif isinstance(command, ReadStream):
            # A stream that does not read back is taken as unfinished: the policy cannot tell
            # a terminal one it cannot read (nor could the manager before it).
            if self.read_fails and not self.terminal():
                self.read_fails = False
                self.feed(StreamRead(None, len(self.stream) - 1))
            else:
                self.feed(StreamRead(tuple(self.stream), len(self.stream) - 1))
        elif isinstance(command, RequestRelease):
            self.requests.append("release")
        elif isinstance(command, RequestVoid):
            self.asked_void = True
            self.requests.append("void")
        elif isinstance(command, AppendEvents):
            assert self.append is None, "a second append while one is out"
            self.append = command
        else:
            # The carrier is asked only about orders placed with shipping.
            assert isinstance(command, End), command
            self.ends.append(command)

    def terminal(self) -> bool:
        return any(status_of_terminal(e) is not None for e in self.stream)

    def act(self, kind: str) -> None:
        """Deliver one thing to the supervisor, if it makes sense now."""
        handlers: dict[str, Callable[[str], None]] = {
            "fail": self.saga_fails,
            "retry": self.retry_due,
            "recheck": self.recheck_due,
            "release": self.service_answers,
            "void": self.service_answers,
            "duplicate": self.duplicate_reply,
            "lose": self.request_lost,
            "commit": self.store_commits,
            "conflict_fence": self.saga_append_lands,
            "conflict_end": self.saga_append_lands,
            "store_error": self.store_fails,
            "read_fails": self.next_read_fails,
        }
        handler = handlers.get(kind)
        if handler is not None:
            handler(kind)

    def saga_fails(self, kind: str) -> None:
        if self.saga_running:
            self.saga_running = False
            if self.sup.state.stage != Stage.GIVING_UP:
                self.fails_before_giving_up += 1
            self.feed(SagaFailed(reason="boom"))

    def retry_due(self, kind: str) -> None:
        if self.retry_armed:
            self.retry_armed = False
            self.feed(RetryDue())

    def recheck_due(self, kind: str) -> None:
        if self.rechecks:
            self.rechecks -= 1
            self.feed(RecheckDue())

    def service_answers(self, kind: str) -> None:
        """Inventory answers a release, or Payment a void, that is in flight."""
        if kind not in self.requests:
            return
        self.requests.remove(kind)
        reply: SupervisionInput
        if kind == "release":
            held = any(isinstance(e, InventoryReserved) for e in self.stream)
            reply = released(RES_ID if held else None)
        else:
            reply = voided(self.charged)
        self.replies.append(reply)
        self.feed(reply)

    def duplicate_reply(self, kind: str) -> None:
        if self.replies:
            self.feed(self.replies[-1])

    def request_lost(self, kind: str) -> None:
        if self.requests:
            self.requests.pop(0)

    def store_commits(self, kind: str) -> None:
        if self.append is not None:
            self.commit()

    def saga_append_lands(self, kind: str) -> None:
        """A dead saga's append lands first: the supervisor's then conflicts."""
        if self.terminal():
            return
        if kind == "conflict_fence":
            self.stream.append(PaymentFailed(order_id=ORDER_ID, reason="x", failed_at=FIXED))
        else:
            self.stream.append(
                OrderFulfillmentFailed(order_id=ORDER_ID, error_message="x", failed_at=FIXED)
            )

    def store_fails(self, kind: str) -> None:
        if self.append is not None:
            self.append = None
            self.feed(AppendRejected(ref="r", error="store_error", message="locked"))

    def next_read_fails(self, kind: str) -> None:
        self.read_fails = True

    def commit(self) -> None:
        append, self.append = self.append, None
        assert append is not None
        if append.expected_version != len(self.stream) - 1:
            self.feed(AppendRejected(ref="r", error="conflict", message="moved"))
            return
        assert not self.terminal(), "appended after a terminal event"
        self.stream.extend(append.events)
        self.supervisor_events.extend(append.events)
        self.feed(AppendDone(ref="r", version=len(self.stream) - 1))

    def settle(self) -> None:
        """Deliver everything, sagas still failing, until the order ends."""
        for _ in range(500):
            if self.ends:
                return
            if self.append is not None:
                self.commit()
            elif self.requests:
                self.act(self.requests[0])
            elif self.retry_armed:
                self.act("retry")
            elif self.saga_running:
                self.act("fail")
            elif self.rechecks:
                self.act("recheck")
            else:
                return


@settings(max_examples=400, deadline=None)
@given(
    max_failures=st.integers(min_value=1, max_value=6),
    start=st.sampled_from(START_STREAMS),
    charged=st.booleans(),
    actions=st.lists(st.sampled_from(ACTIONS), max_size=60),
)
def test_every_history_ends_the_order_once_and_never_paid_and_refunded(
    max_failures: int, start: tuple[Event, ...], charged: bool, actions: list[str]
) -> None:
    world = World(max_failures, list(start), charged or PROCESSED in start)
    for kind in actions:
        world.act(kind)
        assert len(world.ends) <= 1
    world.settle()
    # The order ends exactly once, with the status its stream says.
    assert len(world.ends) == 1
    assert sum(status_of_terminal(e) is not None for e in world.stream) == 1
    assert world.ends[0].view["status"] == status_of_terminal(world.stream[-1])
    # Never paid and refunded: OrderPaid only when nothing was asked back, and never both.
    recorded = {type(e) for e in world.supervisor_events}
    assert not (OrderPaid in recorded and PaymentRefunded in recorded)
    if OrderPaid in recorded:
        assert not world.asked_void
    # Back-off never shorter than the one before; the last resort exactly at the limit.
    assert world.delays == sorted(world.delays)
    assert world.fails_before_giving_up == max_failures
    assert world.sup.state.failures == max_failures
    # Nothing changes after the end.
    before = world.sup.state
    for msg in (SagaFailed(reason="x"), RetryDue(), RecheckDue(), released(), voided(True)):
        assert world.sup.feed(msg) == []
    assert world.sup.state == before


# --- the last resort of an order placed with shipping (after OrderPaid) ----------------------

PLACED_SHIP = PLACED.model_copy(
    update={
        "shipping": Shipping(
            address=ShippingAddress(
                name="Ann", line1="1 Main St", city="Berlin", postal_code="1", country="DE"
            ),
            carrier="ship_standard",
        )
    }
)
PAID = OrderPaid(
    order_id=ORDER_ID, payment_id=PAY_ID, payment_method="tok_visa", amount=TOTAL, paid_at=FIXED
)
PAID_STREAM: tuple[Event, ...] = (PLACED_SHIP, RESERVED, PROCESSED, PAID)
CONSUMED = InventoryShippedReply(order_id=ORDER_ID, reservation_id=RES_ID)
CREATED = ShipmentCreatedReply(
    order_id=ORDER_ID, shipment_id="shp-1", carrier="ship_standard", tracking_number="TRK1"
)
REFUSED = ShipmentFailed(order_id=ORDER_ID, reason="Carrier refused: no", failed_at=FIXED)
CARRIER_BROKE = ShipmentFailed(order_id=ORDER_ID, reason="Carrier failed: boom", failed_at=FIXED)
ASK_RELEASE = RequestRelease(reason=GIVE_UP_REASON)
ASK_CANCEL = RequestCancelShipment(reason=GIVE_UP_REASON)
ASK_VOID = RequestVoid(reason=GIVE_UP_REASON)


def carrier_cancelled(shipment_id: str | None = None) -> ShipmentCancelledReply:
    return ShipmentCancelledReply(order_id=ORDER_ID, shipment_id=shipment_id)


def shipping_supervisor(stream: tuple[Event, ...] = PAID_STREAM) -> Supervisor:
    """A supervisor of a paid order placed with shipping, at its last resort, that has read
    `stream` and asked for the release alone."""
    sup = Supervisor(placed=PLACED_SHIP)
    sup.give_up()
    assert sup.feed(StreamRead(stream, len(stream) - 1)) == [ASK_RELEASE]
    return sup


def test_a_consumed_reservation_means_the_order_shipped_never_refunded() -> None:
    """The known gap: Inventory answering "shipped" to the release went unheard and the order
    was retried for ever (and voided besides). Now it ends shipped, as its ShippingSaga would."""
    sup = shipping_supervisor()
    # Not refunded, not cancelled at the carrier: the carrier is asked for the shipment.
    assert sup.feed(CONSUMED) == [RequestShipment()]
    assert sup.feed(RecheckDue()) == [RequestShipment(), RecheckAfter(RETRY_EVERY)]
    assert sup.feed(released(), voided(True), carrier_cancelled()) == []  # none was asked
    assert sup.feed(CREATED) == [ReadStream()]
    (append,) = sup.feed(StreamRead(PAID_STREAM, 3))
    assert append == AppendEvents(
        events=(
            OrderShipped(
                order_id=ORDER_ID,
                shipment_id="shp-1",
                carrier="ship_standard",
                tracking_number="TRK1",
                items=(Item(product_id="SKU-001", quantity=2),),
                shipped_at=FIXED,
            ),
        ),
        event_ids=("evt-1",),
        expected_version=3,
    )
    (end,) = sup.feed(AppendDone(ref="r", version=4))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.SHIPPED


def test_released_it_cancels_at_the_carrier_and_refunds_then_records_in_reverse() -> None:
    sup = shipping_supervisor()
    assert sup.feed(RecheckDue()) == [ASK_RELEASE, RecheckAfter(RETRY_EVERY)]  # release alone
    assert sup.feed(released()) == [ASK_CANCEL, ASK_VOID]
    assert sup.feed(CONSUMED, CREATED) == []  # the release answered first: it counts
    assert sup.feed(voided(True)) == []  # the carrier has not answered
    assert sup.feed(RecheckDue()) == [ASK_CANCEL, RecheckAfter(RETRY_EVERY)]
    assert sup.feed(carrier_cancelled("shp-9")) == [ReadStream()]
    (append,) = sup.feed(StreamRead(PAID_STREAM, 3))
    why = "3 sagas failed (last: boom); ended by the supervisor"
    assert isinstance(append, AppendEvents)
    assert append.expected_version == 3
    assert append.events == (
        PaymentRefunded(
            order_id=ORDER_ID, payment_id=PAY_ID, amount=TOTAL, reason=why, refunded_at=FIXED
        ),
        InventoryReleased(order_id=ORDER_ID, reservation_id=RES_ID, reason=why, released_at=FIXED),
        OrderFulfillmentFailed(
            order_id=ORDER_ID,
            error_message=f"{why}: reservation {RES_ID} released; shipment shp-9 cancelled at "
            f"the carrier; charge {PAY_ID} ({TOTAL}) refunded",
            failed_at=FIXED,
        ),
    )
    (end,) = sup.feed(AppendDone(ref="r", version=6))
    assert isinstance(end, End)
    assert end.view["status"] == OrderStatus.FAILED


def ending_of(sup: Supervisor, stream: tuple[Event, ...]) -> tuple[Event, ...]:
    """Answer release, carrier cancel and void; the events the supervisor then records."""
    sup.feed(released(), carrier_cancelled(), voided(True))
    (append,) = sup.feed(StreamRead(stream, len(stream) - 1))
    assert isinstance(append, AppendEvents)
    return append.events


@pytest.mark.parametrize(
    ("failed", "cancel", "status", "cancelled_by", "reason"),
    [
        pytest.param(
            REFUSED, None, OrderStatus.CANCELLED, "System", "Shipment failed", id="refused"
        ),
        pytest.param(REFUSED, "mind changed", OrderStatus.CANCELLED, "System", "Shipment failed"),
        pytest.param(None, "mind changed", OrderStatus.CANCELLED, "Customer", "mind changed"),
        pytest.param(CARRIER_BROKE, "mind changed", OrderStatus.FAILED, None, None, id="broke"),
        pytest.param(None, None, OrderStatus.FAILED, None, None, id="nothing-decided"),
    ],
)
def test_the_terminal_event_follows_design_section_9(
    failed: ShipmentFailed | None,
    cancel: str | None,
    status: OrderStatus,
    cancelled_by: str | None,
    reason: str | None,
) -> None:
    """A recorded ShipmentFailed decided the outcome already (refused or timed out: cancelled,
    "Shipment failed"; the carrier broke: failed); else a customer's cancel ends it cancelled
    by the customer; else it failed."""
    stream = PAID_STREAM if failed is None else (*PAID_STREAM, failed)
    sup = Supervisor(placed=PLACED_SHIP)
    if cancel is not None:
        sup.feed(CustomerCancelled(reason=cancel))
    sup.give_up()
    sup.feed(StreamRead(stream, len(stream) - 1))
    events = ending_of(sup, stream)
    assert [type(e) for e in events[:-1]] == [PaymentRefunded, InventoryReleased]
    terminal = events[-1]
    assert status_of_terminal(terminal) == status
    if isinstance(terminal, OrderCancelled):
        assert (terminal.cancelled_by, terminal.reason) == (cancelled_by, reason)
        assert terminal.refund_issued


def test_a_customer_cancel_of_an_order_without_shipping_ends_it_cancelled() -> None:
    sup = Supervisor()
    sup.give_up()
    sup.feed(CustomerCancelled(reason="too slow"), CustomerCancelled(reason="again"))
    sup.feed(StreamRead((PLACED, RESERVED), 1), released(), voided(False))
    (append,) = sup.feed(StreamRead((PLACED, RESERVED), 1))
    assert isinstance(append, AppendEvents)
    terminal = append.events[-1]
    assert isinstance(terminal, OrderCancelled)
    assert (terminal.cancelled_by, terminal.reason, terminal.refund_issued) == (
        "Customer",
        "too slow",
        False,
    )


# --- property: random histories of an order placed with shipping ----------------------------

SHIP_STARTS: tuple[tuple[Event, ...], ...] = (
    PAID_STREAM,
    (*PAID_STREAM, REFUSED),
    (*PAID_STREAM, CARRIER_BROKE),
)
SHIP_ACTIONS = (
    "fail",
    "fail",
    "retry",
    "recheck",
    "answer",
    "answer",
    "answer",
    "duplicate",
    "lose",
    "commit",
    "commit",
    "zombie_consumes",
    "zombie_ships",
    "zombie_fails_shipment",
    "store_error",
    "cancel",
)


@dataclass
class ShipWorld:
    """The manager, the store, Inventory, the carrier and Payment around the policy for a paid
    order placed with shipping, with a dead ShippingSaga whose requests and appends may still
    land (it consumes the stock, records OrderShipped or ShipmentFailed)."""

    stream: list[Event]
    sup: Supervisor = field(init=False)
    ends: list[End] = field(default_factory=list)
    requests: list[SupervisionCommand] = field(default_factory=list)  # asked, unanswered
    replies: list[SupervisionInput] = field(default_factory=list)
    append: AppendEvents | None = None
    retry_armed: bool = False
    rechecks: int = 0
    saga_running: bool = True
    consumed: bool = False  # Inventory: the shipment consumed the reservation
    released: bool = False  # Inventory: given back (fences any later consumption)
    shipment: bool = False  # the carrier made the shipment
    carrier_voided: bool = False  # the carrier made sure none stands
    refunded: bool = False  # Payment refunded the charge
    cancelled: str | None = None

    def __post_init__(self) -> None:
        self.sup = Supervisor(max_failures=3, placed=PLACED_SHIP)
        self.shipment = any(isinstance(e, OrderShipped) for e in self.stream)

    def feed(self, msg: SupervisionInput) -> None:
        for command in self.sup.feed(msg):
            self.carry_out(command)

    def carry_out(self, command: SupervisionCommand) -> None:
        if isinstance(command, Respawn):
            self.saga_running = True
        elif isinstance(command, RetryAfter):
            self.retry_armed = True
        elif isinstance(command, RecheckAfter):
            self.rechecks += 1
        elif isinstance(command, ReadStream):
            self.feed(StreamRead(tuple(self.stream), len(self.stream) - 1))
        elif isinstance(command, AppendEvents):
            assert self.append is None, "a second append while one is out"
            self.append = command
        elif isinstance(command, End):
            self.ends.append(command)
        else:
            self.requests.append(command)

    def answer(self, command: SupervisionCommand) -> SupervisionInput:
        """What the service does with the request and answers."""
        if isinstance(command, RequestRelease):
            if self.consumed:
                return CONSUMED
            self.released = True
            return released()
        if isinstance(command, RequestShipment):
            assert not self.carrier_voided, "asked for a shipment after cancelling it"
            self.shipment = True
            return CREATED
        if isinstance(command, RequestCancelShipment):
            self.carrier_voided = True
            return carrier_cancelled("shp-1" if self.shipment else None)
        assert isinstance(command, RequestVoid)
        self.refunded = True
        return voided(True)

    def terminal(self) -> bool:
        return final_status(self.stream) is not None

    def act(self, kind: str) -> None:
        if kind.startswith("zombie_"):
            self.zombie(kind)
        elif kind == "fail" and self.saga_running:
            self.saga_running = False
            self.feed(SagaFailed(reason="boom"))
        elif kind == "retry" and self.retry_armed:
            self.retry_armed = False
            self.feed(RetryDue())
        elif kind == "recheck" and self.rechecks:
            self.rechecks -= 1
            self.feed(RecheckDue())
        elif kind == "answer" and self.requests:
            reply = self.answer(self.requests.pop(0))
            self.replies.append(reply)
            self.feed(reply)
        elif kind == "duplicate" and self.replies:
            self.feed(self.replies[-1])
        elif kind == "lose" and self.requests:
            self.requests.pop(0)
        elif kind == "commit" and self.append is not None:
            self.commit()
        elif kind == "store_error" and self.append is not None:
            self.append = None
            self.feed(AppendRejected(ref="r", error="store_error", message="locked"))
        elif kind == "cancel" and self.cancelled is None:
            self.cancelled = "changed my mind"
            self.feed(CustomerCancelled(reason=self.cancelled))

    def zombie(self, kind: str) -> None:
        """What the dead ShippingSaga's requests and appends still in flight do."""
        if kind == "zombie_consumes" and not self.released:
            self.consumed = self.shipment = True  # its ShipStock landed before our release
        elif kind == "zombie_ships" and self.consumed and not self.terminal():
            self.stream.append(OrderShipped(**CREATED.model_dump(), items=(), shipped_at=FIXED))
        elif kind == "zombie_fails_shipment" and not self.terminal() and not self.consumed:
            self.stream.append(REFUSED)

    def commit(self) -> None:
        append, self.append = self.append, None
        assert append is not None
        if append.expected_version != len(self.stream) - 1:
            self.feed(AppendRejected(ref="r", error="conflict", message="moved"))
            return
        assert not self.terminal(), "appended after a terminal event"
        self.stream.extend(append.events)
        self.feed(AppendDone(ref="r", version=len(self.stream) - 1))

    def settle(self) -> None:
        """Deliver everything, sagas still failing, until the order ends."""
        for _ in range(500):
            if self.ends:
                return
            if self.append is not None:
                self.commit()
            elif self.requests:
                self.act("answer")
            elif self.retry_armed:
                self.act("retry")
            elif self.saga_running:
                self.act("fail")
            elif self.rechecks:
                self.act("recheck")
            else:
                return


@settings(max_examples=400, deadline=None)
@given(
    start=st.sampled_from(SHIP_STARTS),
    actions=st.lists(st.sampled_from(SHIP_ACTIONS), max_size=60),
)
def test_an_order_with_shipping_ends_once_and_is_never_both_shipped_and_refunded(
    start: tuple[Event, ...], actions: list[str]
) -> None:
    world = ShipWorld(list(start))
    for kind in actions:
        world.act(kind)
        assert len(world.ends) <= 1
    world.settle()
    # Ends exactly once, with the status its stream says.
    assert len(world.ends) == 1
    assert sum(e is not PAID and status_of_terminal(e) is not None for e in world.stream) == 1
    status = final_status(world.stream)
    assert world.ends[0].view["status"] == status
    # Never both shipped and refunded, in the services as in the stream.
    recorded = {type(e) for e in world.stream}
    assert not (OrderShipped in recorded and PaymentRefunded in recorded)
    assert not (world.consumed and world.refunded)
    if world.consumed:
        assert status == OrderStatus.SHIPPED
        assert not world.carrier_voided
        assert not world.released
    else:
        # Given back everywhere: the stock, the charge (recorded), no shipment standing.
        assert status in (OrderStatus.CANCELLED, OrderStatus.FAILED)
        assert world.released
        assert world.carrier_voided
        assert world.refunded
        assert PaymentRefunded in recorded
        assert InventoryReleased in recorded
    # Nothing changes after the end.
    before = world.sup.state
    for msg in (SagaFailed(reason="x"), RecheckDue(), released(), CONSUMED, CREATED):
        assert world.sup.feed(msg) == []
    assert world.sup.state == before
