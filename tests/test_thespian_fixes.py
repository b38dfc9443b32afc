"""The simple base as ``runtime.thespian_fixes`` leaves it: the same behaviour Thespian documents
(FIFO delivery, timers, three attempts then ``PoisonMessage``, init arguments), without the leak
of one registry entry per actor that ever lived."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import (
    Actor,
    ActorExitRequest,
    ActorSystem,
    ChildActorExited,
    DeadEnvelope,
    PoisonMessage,
    WakeupMessage,
)

from actors.manager import OrderManager
from messages.base import OrderLine
from messages.commands import Configure, OrderReply, PlaceOrder
from runtime import thespian_fixes
from tests.conftest import new_id

ASK = timedelta(seconds=10)


@pytest.fixture
def simple() -> Iterator[Any]:
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    yield asys
    asys.shutdown()


class Flaky(Actor):
    """Raises on the first `n` deliveries of a message `("fail", n)`, then answers "ok"."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, tuple) and msg[0] == "fail":
            if self.failures < msg[1]:
                self.failures += 1
                raise RuntimeError(f"failure {self.failures}")
            self.send(sender, ("ok", self.failures))


class Echo(Actor):
    """Answers in order; arms a timer on request; reports its children's exits."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if isinstance(msg, WakeupMessage):
            self.send(msg.payload, ("woke", msg.payload is not None))
        elif isinstance(msg, tuple) and msg[0] == "timer":
            self.wakeupAfter(timedelta(seconds=msg[1]), payload=sender)
        elif isinstance(msg, tuple) and msg[0] == "child":
            self.requester = sender
            child = self.createActor(Echo)
            self.send(child, ActorExitRequest())
        elif isinstance(msg, ChildActorExited):
            self.send(self.requester, "child exited")
        elif isinstance(msg, int):
            self.send(sender, msg)


class WithCapabilities(Actor):
    """Thespian passes `capabilities` to an __init__ that asks for it."""

    def __init__(self, capabilities: dict[str, Any]) -> None:
        super().__init__()
        self.name = capabilities.get("Thespian ActorSystem Name")

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        self.send(sender, self.name)


def test_a_handler_that_raises_is_retried_then_poisoned(simple: Any) -> None:
    flaky = simple.createActor(Flaky)
    assert simple.ask(flaky, ("fail", 2), ASK) == ("ok", 2)  # two failures, third attempt ok
    other = simple.createActor(Flaky)
    reply = simple.ask(other, ("fail", 10), ASK)
    assert isinstance(reply, PoisonMessage)
    assert reply.poisonMessage == ("fail", 10)
    assert "failure 3" in reply.details  # three attempts, as Thespian documents


def test_messages_arrive_in_order_and_timers_fire(simple: Any) -> None:
    echo = simple.createActor(Echo)
    for n in range(50):
        simple.tell(echo, n)
    assert [simple.listen(ASK) for _ in range(50)] == list(range(50))
    assert simple.ask(echo, ("timer", 0.05), ASK) == ("woke", True)


def test_children_exit_and_init_arguments(simple: Any) -> None:
    echo = simple.createActor(Echo)
    assert simple.ask(echo, ("child",), ASK) == "child exited"
    assert simple.ask(simple.createActor(WithCapabilities), "name?", ASK) == "simpleSystem"


class DeadLetters(Actor):
    """Registers for dead letters and reports each one to whoever asked last."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if msg == "register":
            self.handleDeadLetters()
            self.requester = sender
            self.send(sender, "registered")
        elif isinstance(msg, DeadEnvelope):
            self.send(self.requester, ("dead letter", type(msg.deadMessage).__name__))


class ArmsAndExits(Actor):
    """Arms a timer, then exits before it fires."""

    def receiveMessage(self, msg: Any, sender: Any) -> None:
        if msg == "arm":
            self.wakeupAfter(timedelta(seconds=0.05), payload="late")
            self.send(sender, "armed")


def test_a_timer_outliving_its_actor_is_a_dead_letter_only_if_someone_listens(
    simple: Any,
) -> None:
    quiet = simple.createActor(ArmsAndExits)
    assert simple.ask(quiet, "arm", ASK) == "armed"
    simple.tell(quiet, ActorExitRequest())
    assert simple.listen(timedelta(seconds=0.3)) is None  # dropped: nobody handles dead letters

    dead_letters = simple.createActor(DeadLetters)
    assert simple.ask(dead_letters, "register", ASK) == "registered"
    loud = simple.createActor(ArmsAndExits)
    assert simple.ask(loud, "arm", ASK) == "armed"
    simple.tell(loud, ActorExitRequest())
    assert simple.listen(timedelta(seconds=2)) == ("dead letter", "WakeupMessage")


def test_finished_sagas_leave_nothing_behind(simple: Any, tmp_path: Path) -> None:
    """Thespian kept a ``None`` per actor that ever lived: one per order, forever."""
    manager = simple.createActor(OrderManager)
    simple.ask(
        manager,
        Configure(
            req_id=1,
            store_url=f"sqlite:///{tmp_path / 'o.db'}",
            synchronous="NORMAL",
            step_timeout=5.0,
            crash_exits_process=False,
        ),
        ASK,
    )
    registry = simple._systemBase.actorRegistry
    lines = (OrderLine(product_id="SKU-001", quantity=1, unit_price=Decimal("1")),)

    def place(count: int) -> None:
        for n in range(count):
            reply = simple.ask(
                manager,
                PlaceOrder(
                    req_id=n,
                    order_id=new_id(),
                    customer_id="c",
                    lines=lines,
                    payment_method="tok_visa",
                    wait=True,
                ),
                ASK,
            )
            assert isinstance(reply, OrderReply)
            assert reply.order["status"] == "paid"

    place(5)
    before = len(registry)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector would free, to look at it
    try:
        place(40)
        gc.collect()
        cyclic = Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(registry) == before
    # A finished saga is freed by reference counting: no cycle left for the collector, whose
    # pauses were the latency tail (docs/performance.md).
    assert cyclic["OrderSaga"] == 0, cyclic.most_common(8)


def test_the_fixes_refuse_a_thespian_they_were_not_written_for() -> None:
    with pytest.raises(thespian_fixes.UnsupportedThespianError, match=r"thespian 4\.0\.2"):
        thespian_fixes.apply(version="4.0.2")
    thespian_fixes.apply()  # the pinned version: applies (again: idempotent)
