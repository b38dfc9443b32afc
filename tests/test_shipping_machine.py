"""Unit and property tests of the shipping saga's pure state machine (``saga/shipping.py``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messages.base import Item, OrderLine, Shipping, ShippingAddress, order_total
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
    InventoryReserved,
    OrderCancelled,
    OrderFulfillmentFailed,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    PaymentProcessed,
    PaymentRefunded,
    ShipmentFailed,
    ends_order,
    status_of_terminal,
)
from saga import shipping as ship
from saga.machine import (
    Abort,
    Appended,
    AppendEvents,
    AppendFailed,
    CancelRequested,
    Env,
    Finish,
    RequestRelease,
    RequestVoid,
    Service,
    ServiceRestarted,
    Start,
    StartTimer,
    StepFailed,
    TimedOut,
)

FIXED = datetime(2024, 3, 1, 12, 30, tzinfo=UTC)
ORDER_ID = "ord-7"
RES_ID = "res-1"
PAY_ID = "pay-1"
LINES = (OrderLine(product_id="SKU-001", quantity=2, unit_price=Decimal("5.00")),)
TOTAL = order_total(LINES)
ADDRESS = ShippingAddress(
    name="Ann", line1="1 Main St", city="Berlin", postal_code="1", country="DE"
)
CREATED = ShipmentCreatedReply(
    order_id=ORDER_ID, shipment_id="shp-1", carrier="ship_standard", tracking_number="TRK1"
)
SHIPPED = InventoryShippedReply(order_id=ORDER_ID, reservation_id=RES_ID)
RELEASED = InventoryReleasedReply(order_id=ORDER_ID, reservation_id=RES_ID)
REFUNDED = PaymentVoidedReply(order_id=ORDER_ID, refunded_payment_id=PAY_ID, amount=TOTAL)
CANCELLED_AT_CARRIER = ShipmentCancelledReply(order_id=ORDER_ID, shipment_id=None)


def paid_stream() -> list[Event]:
    """An order placed with shipping, reserved, charged and paid."""
    placed = OrderPlaced(
        order_id=ORDER_ID,
        customer_id="c",
        lines=LINES,
        total_amount=TOTAL,
        payment_method="tok_visa",
        placed_at=FIXED,
        shipping=Shipping(address=ADDRESS, carrier="ship_standard"),
    )
    items = (Item(product_id="SKU-001", quantity=2),)
    return [
        placed,
        InventoryReserved(order_id=ORDER_ID, reservation_id=RES_ID, items=items, reserved_at=FIXED),
        PaymentProcessed(payment_id=PAY_ID, order_id=ORDER_ID, amount=TOTAL, processed_at=FIXED),
        OrderPaid(
            order_id=ORDER_ID,
            payment_id=PAY_ID,
            payment_method="tok_visa",
            amount=TOTAL,
            paid_at=FIXED,
        ),
    ]


def env() -> Env:
    """A fixed clock and counting event ids."""
    counter = itertools.count(1)
    return Env(now=lambda: FIXED, new_id=lambda: f"evt-{next(counter)}")


class Run:
    """Feeds a shipping saga and commits its appends to its stream."""

    def __init__(self, cancel: str | None = None) -> None:
        self.stream = paid_stream()
        self.env = env()
        self.state = ship.recover(self.stream, cancel=cancel)
        self.commands: list[ship.ShippingCommand] = []

    def feed(self, *inputs: ship.ShippingInput) -> list[ship.ShippingCommand]:
        issued: list[ship.ShippingCommand] = []
        for msg in inputs:
            self.state, commands = ship.decide(self.state, msg, self.env)
            issued.extend(c for c in commands if not isinstance(c, StartTimer))
        self.commands.extend(issued)
        return issued

    def commit(self) -> list[ship.ShippingCommand]:
        append = next(c for c in reversed(self.commands) if isinstance(c, AppendEvents))
        assert append.expected_version == len(self.stream) - 1
        self.stream.extend(append.events)
        return self.feed(Appended(version=len(self.stream) - 1))

    def types(self) -> list[str]:
        return [type(e).__name__ for e in self.stream[4:]]


def compensate(run: Run, *, then: str) -> None:
    """Answer the compensation's three steps in order and commit its events."""
    assert run.feed(RELEASED) == [ship.RequestCancelShipment(reason=run.state.reason)]
    assert run.feed(CANCELLED_AT_CARRIER) == [RequestVoid(reason=run.state.reason)]
    appended = run.feed(REFUNDED)
    assert isinstance(appended[0], AppendEvents)
    finish = run.commit()
    assert isinstance(finish[0], Finish)
    assert finish[0].status == then


def test_ships_consumes_the_reservation_then_records_order_shipped() -> None:
    run = Run()
    assert run.feed(Start()) == [ship.RequestShipment()]
    assert run.feed(CREATED) == [ship.RequestShipStock()]
    appended = run.feed(SHIPPED)
    assert isinstance(appended[0], AppendEvents)
    shipped = appended[0].events[0]
    assert isinstance(shipped, OrderShipped)
    assert (shipped.shipment_id, shipped.tracking_number) == ("shp-1", "TRK1")
    assert run.commit() == [Finish(status="shipped", reason="")]


@pytest.mark.parametrize(
    ("failure", "status", "terminal"),
    [
        (ShipmentRefusedReply(order_id=ORDER_ID, reason="no"), "cancelled", "OrderCancelled"),
        ("timeout", "cancelled", "OrderCancelled"),
        (StepFailed(service=Service.SHIPPING, reason="boom"), "failed", "OrderFulfillmentFailed"),
    ],
)
def test_failed_shipment_records_it_then_compensates_in_reverse_order(
    failure: object, status: str, terminal: str
) -> None:
    run = Run()
    run.feed(Start())
    msg = TimedOut(token=run.state.token) if failure == "timeout" else failure
    appended = run.feed(msg)  # type: ignore[arg-type]
    assert isinstance(appended[0], AppendEvents)
    assert isinstance(appended[0].events[0], ShipmentFailed)
    assert run.commit() == [RequestRelease(reason=run.state.reason)]
    compensate(run, then=status)
    assert run.types() == ["ShipmentFailed", "PaymentRefunded", "InventoryReleased", terminal]
    end = run.stream[-1]
    if isinstance(end, OrderCancelled):
        assert (end.cancelled_by, end.reason, end.refund_issued) == (
            "System",
            "Shipment failed",
            True,
        )


def test_cancel_before_the_carrier_confirms_compensates_as_the_customer() -> None:
    run = Run()
    run.feed(Start())
    assert run.feed(CancelRequested(reason="r")) == [RequestRelease(reason="r")]
    assert run.feed(CREATED) == []  # the carrier's late answer changes nothing
    compensate(run, then="cancelled")
    assert run.types() == ["PaymentRefunded", "InventoryReleased", "OrderCancelled"]
    end = run.stream[-1]
    assert isinstance(end, OrderCancelled)
    assert end.cancelled_by == "Customer"


def test_cancel_after_the_carrier_confirmed_is_too_late() -> None:
    run = Run()
    run.feed(Start(), CREATED)
    assert run.feed(CancelRequested(reason="r")) == []
    run.feed(SHIPPED)
    assert run.commit() == [Finish(status="shipped", reason="")]


def test_a_reservation_consumed_by_an_earlier_saga_ends_the_order_shipped() -> None:
    run = Run(cancel="r")  # the cancel reached a saga rebuilt after a crash mid-shipping
    assert run.feed(Start()) == [RequestRelease(reason="r")]
    assert run.feed(SHIPPED) == [ship.RequestShipment()]  # release answers: it shipped
    run.feed(CREATED, SHIPPED)
    assert run.commit()[0] == Finish(status="shipped", reason="")


def test_consuming_never_gives_up() -> None:
    run = Run()
    run.feed(Start(), CREATED)
    assert run.feed(TimedOut(token=run.state.token)) == [ship.RequestShipStock()]
    restarted = ServiceRestarted(service=Service.INVENTORY)
    assert run.feed(restarted) == [ship.RequestShipStock()]


def test_recover_after_shipment_failed_finishes_the_compensation() -> None:
    stream = paid_stream()
    stream.append(ShipmentFailed(order_id=ORDER_ID, reason="Shipment timed out", failed_at=FIXED))
    state = ship.recover(stream)
    assert (state.outcome, state.reason) == ("cancelled", "Shipment failed")
    failed = [
        *stream[:-1],
        ShipmentFailed(order_id=ORDER_ID, reason=f"{ship.FAILURE_PREFIX}x", failed_at=FIXED),
    ]
    assert ship.recover(failed).outcome == "failed"


# --- property: random interleavings of replies, timeouts, crashes and cancels -----------------


@dataclass
class World:
    """Consistent fakes of the carrier, Inventory, Payment and the store around a shipping
    saga that may crash (be rebuilt from the committed stream) at any point."""

    carrier_says: str  # "created" | "refused" | "silent": how the carrier answers a create
    stream: list[Event] = field(default_factory=paid_stream)
    env: Env = field(default_factory=env)
    state: ship.ShippingState | None = None
    timer: int = 0
    in_flight: list[str] = field(default_factory=list)
    sends: list[AppendEvents] = field(default_factory=list)
    committed: set[tuple[str, ...]] = field(default_factory=set)
    shipment: str | None = None  # "standing" | "cancelled"
    carrier_voided: bool = False
    stock: str = "held"  # "held" | "shipped" | "released"
    refunded: bool = False
    cancel: str | None = None
    ended: str | None = None

    def __post_init__(self) -> None:
        self.state = ship.recover(self.stream)

    def feed(self, msg: ship.ShippingInput) -> None:
        assert self.state is not None
        self.state, commands = ship.decide(self.state, msg, self.env)
        for command in commands:
            self.observe(command)

    def observe(self, command: ship.ShippingCommand) -> None:
        assert self.ended is None, f"{command} after Finish"
        if isinstance(command, StartTimer):
            self.timer = command.token
        elif isinstance(command, AppendEvents):
            assert not any(ends_order(e, self.placed) for e in self.stream), "append after end"
            self.sends.append(command)
        elif isinstance(command, Finish):
            assert ends_order(self.stream[-1], self.placed)
            self.ended = command.status
        elif isinstance(command, Abort):
            self.crash()
        else:
            self.in_flight.append(type(command).__name__)

    @property
    def placed(self) -> OrderPlaced:
        first = self.stream[0]
        assert isinstance(first, OrderPlaced)
        return first

    def crash(self) -> None:
        """The saga dies; a new one is rebuilt from what is committed (requests in flight
        still reach the services, their replies reach the new saga)."""
        self.sends.clear()
        self.state = ship.recover(self.stream, cancel=self.cancel)
        if self.state.phase != ship.Phase.DONE:
            self.feed(Start())
        else:
            self.ended = status_of_terminal(self.stream[-1])

    def reply_to(self, request: str) -> ship.ShippingInput | None:
        if request == "RequestShipment":
            if self.carrier_voided:
                return ShipmentRefusedReply(order_id=ORDER_ID, reason="voided")
            if self.shipment is None and self.carrier_says == "created":
                self.shipment = "standing"
            if self.shipment is not None:
                return CREATED
            if self.carrier_says == "refused":
                return ShipmentRefusedReply(order_id=ORDER_ID, reason="no")
            return None
        if request == "RequestShipStock":
            if self.stock == "released":
                return InventoryUnavailableReply(
                    order_id=ORDER_ID, unavailable_items=(), reason="released"
                )
            self.stock = "shipped"
            return SHIPPED
        if request == "RequestRelease":
            if self.stock == "shipped":
                return SHIPPED
            self.stock = "released"
            return RELEASED
        if request == "RequestCancelShipment":
            self.carrier_voided = True
            if self.shipment == "standing":
                self.shipment = "cancelled"
            return CANCELLED_AT_CARRIER
        assert request == "RequestVoid"
        self.refunded = True
        return REFUNDED

    def act(self, kind: str, n: int) -> None:
        if self.ended is not None:
            return
        if kind == "reply" and self.in_flight:
            msg = self.reply_to(self.in_flight.pop(n % len(self.in_flight)))
            if msg is not None:
                self.feed(msg)
        elif kind == "lose" and self.in_flight:
            self.in_flight.pop(n % len(self.in_flight))
        elif kind == "commit" and self.sends:
            append = self.sends.pop(0)
            if append.event_ids not in self.committed:
                if append.expected_version != len(self.stream) - 1:
                    self.feed(AppendFailed(reason="conflict"))
                    return
                self.stream.extend(append.events)
                self.committed.add(append.event_ids)
            self.feed(Appended(version=len(self.stream) - 1))
        elif kind == "timeout":
            self.feed(TimedOut(token=self.timer))
        elif kind == "failed":
            service = (Service.SHIPPING, Service.INVENTORY, Service.PAYMENT, Service.STORE)[n % 4]
            self.feed(StepFailed(service=service, reason="boom"))
        elif kind == "cancel":
            self.cancel = self.cancel or "changed my mind"
            self.feed(CancelRequested(reason=self.cancel))
        elif kind == "crash":
            self.crash()

    def drain(self) -> None:
        for _ in range(200):
            if self.ended is not None:
                return
            if self.sends:
                self.act("commit", 0)
            elif self.in_flight:
                self.act("reply", 0)
            else:
                self.act("timeout", 0)
        raise AssertionError(f"never finished: {self.state}")


KINDS = ("reply",) * 6 + ("commit",) * 4 + ("lose", "timeout", "failed", "cancel", "crash")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    actions=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(min_value=0, max_value=9)), max_size=40
    ),
    carrier_says=st.sampled_from(["created", "refused", "silent"]),
)
def test_random_interleavings_never_ship_and_refund(
    actions: list[tuple[str, int]], carrier_says: str
) -> None:
    world = World(carrier_says=carrier_says)
    world.feed(Start())
    for kind, n in actions:
        world.act(kind, n)
    world.drain()
    terminals = [e for e in world.stream if ends_order(e, world.placed)]
    assert len(terminals) == 1
    assert terminals[0] is world.stream[-1]
    types = [type(e) for e in world.stream]
    if world.ended == "shipped":
        assert world.stock == "shipped"
        assert world.shipment == "standing"
        assert not world.refunded
        assert PaymentRefunded not in types
    else:
        assert world.ended in ("cancelled", "failed")
        assert world.stock == "released"
        assert InventoryReleased in types
        assert world.refunded
        assert PaymentRefunded in types
        assert world.shipment != "standing"
        assert world.carrier_voided
        end = world.stream[-1]
        if isinstance(end, OrderCancelled) and end.cancelled_by == "Customer":
            assert world.cancel is not None
        if isinstance(end, OrderFulfillmentFailed):
            assert ShipmentFailed in types
