"""Actor-level tests: the real actors in a real Thespian system (simple base and queue base),
talking to a real SQLite file, without the gateway."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import ActorSystem, WakeupMessage

from actors import manager as manager_module
from actors.event_store import EventStoreActor
from actors.inventory import InventoryActor
from actors.manager import OrderManager
from actors.payment import PaymentActor
from actors.saga import OrderSaga
from actors.shipping_saga import ShippingSaga
from messages.base import Item, OrderLine, Shipping, ShippingAddress
from messages.commands import (
    AppendRejected,
    AppendToStream,
    ChargePayment,
    Configure,
    Configured,
    GetStock,
    InventoryReleasedReply,
    InventoryReservedReply,
    InventoryShippedReply,
    InventoryUnavailableReply,
    OrderReply,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
    PlaceOrder,
    ReleaseStock,
    ReserveStock,
    ServiceConfig,
    ServiceReady,
    StartSaga,
    StockReport,
    VoidPayment,
)
from messages.events import OrderFulfillmentFailed, OrderPaid, OrderPlaced
from saga import machine as sm
from saga.audit import audit
from saga.views import decode_stream
from store import SqliteEventStore
from tests.conftest import new_id, wait_until

BASES = [
    pytest.param("simpleSystemBase", id="simple"),
    pytest.param("multiprocQueueBase", id="queue", marks=pytest.mark.process),
]
ASK = timedelta(seconds=20)


@pytest.fixture(params=BASES)
def system(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh actor system of each base, shut down after the test."""
    asys = ActorSystem(request.param, transientUnique=True)
    yield asys
    asys.shutdown()


def ask(asys: Any, actor: Any, msg: Any) -> Any:
    """Ask and fail loudly on silence."""
    reply = asys.ask(actor, msg, ASK)
    assert reply is not None, f"no reply to {type(msg).__name__}"
    return reply


def services(asys: Any, db: Path, step_timeout: float = 0.5) -> dict[str, Any]:
    """A store, an Inventory and a Payment actor on `db`, configured and ready."""
    store = asys.createActor(EventStoreActor)
    config = {
        "store_url": f"sqlite:///{db}",
        "synchronous": "FULL",
        "step_timeout": step_timeout,
        "crash_exits_process": False,
    }
    assert isinstance(
        ask(asys, store, ServiceConfig(name="store", store=None, **config)), ServiceReady
    )
    made = {"store": store}
    for name, cls in (("inventory", InventoryActor), ("payment", PaymentActor)):
        made[name] = asys.createActor(cls)
        assert isinstance(
            ask(asys, made[name], ServiceConfig(name=name, store=store, **config)), ServiceReady
        )
    return made


def stream_types(db: Path, stream: str) -> list[str]:
    """Event types of a stream, read from the file."""
    with SqliteEventStore(db, readonly=True) as reader:
        return [s.type for s in reader.read_stream(stream)]


def test_inventory_reserve_is_idempotent_and_release_fences(system: Any, tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    inventory = services(system, db)["inventory"]
    order = new_id()
    items = (Item(product_id="SKU-001", quantity=3),)
    first = ask(system, inventory, ReserveStock(order_id=order, items=items))
    second = ask(system, inventory, ReserveStock(order_id=order, items=items))
    assert isinstance(first, InventoryReservedReply)
    assert second == first
    stock = ask(system, inventory, GetStock(req_id=1, product_ids=("SKU-001",)))
    assert isinstance(stock, StockReport)
    assert stock.stock["SKU-001"] == {"on_hand": 1000, "reserved": 3, "available": 997}

    released = ask(system, inventory, ReleaseStock(order_id=order, reason="test"))
    again = ask(system, inventory, ReleaseStock(order_id=order, reason="test"))
    given_back = InventoryReleasedReply(order_id=order, reservation_id=first.reservation_id)
    assert released == again == given_back
    late = ask(system, inventory, ReserveStock(order_id=order, items=items))
    # a reserve after the release must not hold stock
    assert isinstance(late, InventoryUnavailableReply)

    fenced = new_id()
    assert ask(
        system, inventory, ReleaseStock(order_id=fenced, reason="gave up")
    ) == InventoryReleasedReply(order_id=fenced, reservation_id=None)
    late = ask(system, inventory, ReserveStock(order_id=fenced, items=items))
    assert isinstance(late, InventoryUnavailableReply)
    stock = ask(system, inventory, GetStock(req_id=2, product_ids=("SKU-001",)))
    assert stock.stock["SKU-001"]["reserved"] == 0
    assert stream_types(db, "stock-SKU-001")[-2:] == ["StockReserved", "StockReleased"]
    assert stream_types(db, "inventory-fences") == ["StockReleased"]  # the fence: no product


def test_inventory_is_all_or_nothing(system: Any, tmp_path: Path) -> None:
    inventory = services(system, tmp_path / "o.db")["inventory"]
    order = new_id()
    items = (Item(product_id="SKU-001", quantity=1), Item(product_id="SKU-002", quantity=1001))
    refused = ask(system, inventory, ReserveStock(order_id=order, items=items))
    assert isinstance(refused, InventoryUnavailableReply)
    assert [(u.product_id, u.requested, u.available) for u in refused.unavailable_items] == [
        ("SKU-002", 1001, 1000)
    ]
    stock = ask(system, inventory, GetStock(req_id=1, product_ids=("SKU-001", "SKU-002")))
    assert {p: s["reserved"] for p, s in stock.stock.items()} == {"SKU-001": 0, "SKU-002": 0}


def test_inventory_state_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    order = new_id()
    items = (Item(product_id="SKU-007", quantity=4),)
    for _ in range(2):
        asys = ActorSystem("simpleSystemBase", transientUnique=True)
        try:
            inventory = services(asys, db)["inventory"]
            held = ask(asys, inventory, ReserveStock(order_id=order, items=items))
            stock = ask(asys, inventory, GetStock(req_id=1, product_ids=("SKU-007",)))
        finally:
            asys.shutdown()
        assert isinstance(held, InventoryReservedReply)
        assert stock.stock["SKU-007"]["reserved"] == 4  # rebuilt, not doubled, on the 2nd run


def test_payment_charges_once_and_void_refunds(system: Any, tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    payment = services(system, db)["payment"]
    order = new_id()
    charge = ChargePayment(order_id=order, amount=Decimal("12.50"), payment_method="tok_visa")
    first = ask(system, payment, charge)
    assert isinstance(first, PaymentProcessedReply)
    assert ask(system, payment, charge) == first
    voided = ask(system, payment, VoidPayment(order_id=order, reason="test"))
    assert voided == PaymentVoidedReply(
        order_id=order, refunded_payment_id=first.payment_id, amount=Decimal("12.50")
    )
    assert ask(system, payment, VoidPayment(order_id=order, reason="again")) == voided
    assert stream_types(db, f"payment-{order}") == [
        "ChargeSucceeded",
        "ChargeRefunded",
        "PaymentVoided",
    ]


def test_payment_decline_and_charge_after_void(system: Any, tmp_path: Path) -> None:
    payment = services(system, tmp_path / "o.db")["payment"]
    declined = ask(
        system,
        payment,
        ChargePayment(order_id=new_id(), amount=Decimal(1), payment_method="tok_chargeDeclined"),
    )
    assert isinstance(declined, PaymentFailedReply)
    order = new_id()
    ask(system, payment, VoidPayment(order_id=order, reason="gave up"))
    after = ask(
        system, payment, ChargePayment(order_id=order, amount=Decimal(1), payment_method="tok_visa")
    )
    assert isinstance(after, PaymentFailedReply)


def test_late_charge_after_void_is_refunded(system: Any, tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    payment = services(system, db, step_timeout=0.2)["payment"]
    order = new_id()
    system.tell(
        payment, ChargePayment(order_id=order, amount=Decimal(3), payment_method="tok_late")
    )
    ask(system, payment, VoidPayment(order_id=order, reason="timed out"))

    def settled() -> list[str] | None:
        system.listen(timedelta(milliseconds=20))  # the simple base runs timers while listening
        types = stream_types(db, f"payment-{order}")
        return types if len(types) == 3 else None

    assert wait_until(settled, timeout=10) == ["PaymentVoided", "ChargeSucceeded", "ChargeRefunded"]


def test_manager_runs_orders_through_sagas(system: Any, tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    manager = system.createActor(OrderManager)
    configured = ask(
        system,
        manager,
        Configure(
            req_id=1,
            store_url=f"sqlite:///{db}",
            synchronous="FULL",
            step_timeout=0.5,
            crash_exits_process=False,
        ),
    )
    assert configured == Configured(req_id=1, recovered=0)
    lines = (OrderLine(product_id="SKU-001", quantity=1, unit_price=Decimal("2.5")),)
    outcomes = {}
    for n, token in enumerate(["tok_visa", "tok_chargeDeclined", "tok_error", "tok_timeout"]):
        order = f"a-{uuid.uuid4().hex[:8]}"
        reply = ask(
            system,
            manager,
            PlaceOrder(
                req_id=10 + n,
                order_id=order,
                customer_id="c",
                lines=lines,
                payment_method=token,
                wait=True,
            ),
        )
        assert isinstance(reply, OrderReply)
        assert reply.req_id == 10 + n
        outcomes[token] = (reply.order["status"], stream_types(db, f"order-{order}")[-1])
    assert outcomes == {
        "tok_visa": ("paid", "OrderPaid"),
        "tok_chargeDeclined": ("cancelled", "OrderCancelled"),
        "tok_error": ("failed", "OrderFulfillmentFailed"),
        "tok_timeout": ("cancelled", "OrderCancelled"),
    }
    with SqliteEventStore(db, readonly=True) as reader:
        events = decode_stream(reader.read_stream("stock-SKU-001"))
    assert sum(type(e).__name__ == "StockReserved" for e in events) == 4
    assert sum(type(e).__name__ == "StockReleased" for e in events) == 3


def test_payment_forgets_old_records_but_not_their_facts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("actors.payment.MAX_CACHED_RECORDS", 2)
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    try:
        payment = services(asys, tmp_path / "o.db")["payment"]
        orders = [new_id() for _ in range(5)]
        first = {
            order: ask(
                asys,
                payment,
                ChargePayment(order_id=order, amount=Decimal(2), payment_method="tok_visa"),
            )
            for order in orders
        }
        # The first orders were evicted from the cache: asked again, the provider reads its
        # stream and gives the same answer, never a second charge.
        for order in orders:
            again = ask(
                asys,
                payment,
                ChargePayment(order_id=order, amount=Decimal(2), payment_method="tok_visa"),
            )
            assert again == first[order]
    finally:
        asys.shutdown()
    for order in orders:
        assert stream_types(tmp_path / "o.db", f"payment-{order}") == ["ChargeSucceeded"]


class PoisonSaga(OrderSaga):
    """A saga with a bug: it raises on the payment's answer (after the charge went through)
    and on every recovery, so no saga of its order can ever finish it."""

    def receiveMsg_PaymentProcessedReply(self, msg: PaymentProcessedReply, sender: Any) -> None:
        raise RuntimeError("poisoned after the charge")

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        if msg.compensate:
            raise RuntimeError("poisoned recovery")
        super().receiveMsg_StartSaga(msg, sender)


@dataclass
class PoisonRun:
    """One order placed through a manager whose workflow is a buggy saga class."""

    db: Path
    order: str
    reply: Any
    stock_before: dict[str, int]
    stock_after: dict[str, int]


def place_with_poison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saga: type, quantity: int
) -> PoisonRun:
    """Place one order of `quantity` SKU-003 with `saga` as the workflow, on the simple base,
    the supervisor giving up after 3 failed sagas; stock is read before and after. A
    ShippingSaga class replaces the workflow OrderPaid starts, and the order is placed with
    shipping."""
    workflows: dict[Any, Any] = manager_module.WORKFLOWS
    ships = issubclass(saga, ShippingSaga)
    monkeypatch.setitem(workflows, OrderPaid if ships else OrderPlaced, saga)
    address = ShippingAddress(name="A", line1="1 St", city="B", postal_code="1", country="DE")
    shipping = Shipping(address=address) if ships else None
    db = tmp_path / "o.db"
    order = f"p-{uuid.uuid4().hex[:8]}"
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    try:
        manager = asys.createActor(OrderManager)
        configure = Configure(
            req_id=1,
            store_url=f"sqlite:///{db}",
            synchronous="FULL",
            step_timeout=0.5,
            crash_exits_process=False,
            max_saga_failures=3,
        )
        assert ask(asys, manager, configure) == Configured(req_id=1, recovered=0)
        before = ask(asys, manager, GetStock(req_id=2, product_ids=("SKU-003",)))
        lines = (OrderLine(product_id="SKU-003", quantity=quantity, unit_price=Decimal("2.5")),)
        place = PlaceOrder(
            req_id=3,
            order_id=order,
            customer_id="c",
            lines=lines,
            payment_method="tok_visa",
            wait=True,
            shipping=shipping,
        )
        reply = ask(asys, manager, place)
        after = ask(asys, manager, GetStock(req_id=4, product_ids=("SKU-003",)))
    finally:
        asys.shutdown()
    assert isinstance(before, StockReport)
    assert isinstance(after, StockReport)
    return PoisonRun(db, order, reply, before.stock["SKU-003"], after.stock["SKU-003"])


def audit_of(db: Path) -> dict[str, Any]:
    with SqliteEventStore(db, readonly=True) as reader:
        return audit(reader)


def test_an_order_whose_sagas_keep_failing_still_ends_compensated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's last resort: after MAX_SAGA_FAILURES it releases, voids and records
    OrderFulfillmentFailed itself; the order is terminal, stock is back, the charge refunded."""
    run = place_with_poison(tmp_path, monkeypatch, PoisonSaga, quantity=4)
    assert isinstance(run.reply, OrderReply)
    assert run.reply.order["status"] == "failed"
    assert "3 sagas failed" in run.reply.order["reason"]
    assert "refunded" in run.reply.order["reason"]
    assert "released" in run.reply.order["reason"]
    assert run.stock_after == run.stock_before  # the 4 units are back
    assert stream_types(run.db, f"order-{run.order}") == [
        "OrderPlaced",
        "InventoryReserved",
        "InventoryReleased",
        "PaymentRefunded",
        "OrderFulfillmentFailed",
    ]
    assert stream_types(run.db, f"payment-{run.order}") == [
        "ChargeSucceeded",
        "ChargeRefunded",
        "PaymentVoided",
    ]
    report = audit_of(run.db)
    assert report["ok"], report["checks"]
    assert report["status_counts"] == {"failed": 1}


class StoreFailingOnce(EventStoreActor):
    """Answers the supervisor's first OrderFulfillmentFailed append with store_error, late
    (after 1.5 step timeouts), as a store waiting on a locked database would."""

    failed = False

    def receiveMsg_AppendToStream(self, msg: AppendToStream, sender: Any) -> None:
        if not StoreFailingOnce.failed and any(
            isinstance(e, OrderFulfillmentFailed) for e in msg.events
        ):
            StoreFailingOnce.failed = True
            self.wakeupAfter(timedelta(seconds=0.75), payload=(msg.ref, sender))
            return
        super().receiveMsg_AppendToStream(msg, sender)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        ref, requester = msg.payload
        self.send(requester, AppendRejected(ref=ref, error="store_error", message="locked"))


def test_the_last_resort_survives_a_store_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's own terminal append fails late: it tries again and the order ends once."""
    monkeypatch.setitem(manager_module.SERVICES, "store", StoreFailingOnce)
    monkeypatch.setattr(StoreFailingOnce, "failed", False)
    run = place_with_poison(tmp_path, monkeypatch, PoisonSaga, quantity=1)
    assert isinstance(run.reply, OrderReply)
    assert run.reply.order["status"] == "failed"
    assert StoreFailingOnce.failed
    assert stream_types(run.db, f"order-{run.order}") == [
        "OrderPlaced",
        "InventoryReserved",
        "InventoryReleased",
        "PaymentRefunded",
        "OrderFulfillmentFailed",
    ]


class FailsAfterPaying(OrderSaga):
    """A saga with a bug after the end: OrderPaid commits, then reporting it raises, in every
    saga of the order."""

    def _carry_out(self, command: sm.Command) -> None:
        if isinstance(command, sm.Finish):
            raise RuntimeError("poisoned after OrderPaid")
        super()._carry_out(command)

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        if msg.compensate:
            raise RuntimeError("poisoned recovery")
        super().receiveMsg_StartSaga(msg, sender)


def test_the_last_resort_never_undoes_a_paid_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the supervisor voided and released before looking at the stream."""
    run = place_with_poison(tmp_path, monkeypatch, FailsAfterPaying, quantity=3)
    assert isinstance(run.reply, OrderReply)
    assert run.reply.order["status"] == "paid"
    assert run.stock_after["reserved"] == run.stock_before["reserved"] + 3
    assert stream_types(run.db, f"payment-{run.order}") == ["ChargeSucceeded"]  # no refund
    assert stream_types(run.db, f"order-{run.order}")[-1] == "OrderPaid"
    report = audit_of(run.db)
    assert report["ok"], report["checks"]


class ShipsThenFails(ShippingSaga):
    """A shipping saga with a bug: it raises once the shipment consumed the stock (before
    recording OrderShipped), and on every recovery."""

    def receiveMsg_InventoryShippedReply(self, msg: InventoryShippedReply, sender: Any) -> None:
        raise RuntimeError("poisoned after the stock left")

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        if msg.compensate:
            raise RuntimeError("poisoned recovery")
        super().receiveMsg_StartSaga(msg, sender)


class NeverShips(ShippingSaga):
    """A shipping saga that raises on every start: the carrier is never asked."""

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        raise RuntimeError("poisoned start")


def test_the_last_resort_finishes_a_shipped_order_as_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stock was consumed by the shipment: the supervisor records OrderShipped with the
    carrier's shipment and refunds nothing (it used to retry such an order for ever)."""
    run = place_with_poison(tmp_path, monkeypatch, ShipsThenFails, quantity=2)
    assert isinstance(run.reply, OrderReply)
    assert run.reply.order["status"] == "shipped"
    assert run.stock_after["on_hand"] == run.stock_before["on_hand"] - 2
    assert run.stock_after["reserved"] == run.stock_before["reserved"]
    assert stream_types(run.db, f"order-{run.order}")[-1] == "OrderShipped"
    assert stream_types(run.db, f"payment-{run.order}") == ["ChargeSucceeded"]  # no refund
    assert stream_types(run.db, f"shipment-{run.order}") == ["ShipmentCreated"]
    report = audit_of(run.db)
    assert report["ok"], report["checks"]


def test_the_last_resort_cancels_at_the_carrier_refunds_and_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = place_with_poison(tmp_path, monkeypatch, NeverShips, quantity=2)
    assert isinstance(run.reply, OrderReply)
    assert run.reply.order["status"] == "failed"
    assert run.stock_after == run.stock_before
    assert stream_types(run.db, f"order-{run.order}")[-4:] == [
        "OrderPaid",
        "PaymentRefunded",
        "InventoryReleased",
        "OrderFulfillmentFailed",
    ]
    assert stream_types(run.db, f"shipment-{run.order}") == ["ShipmentVoided"]
    assert stream_types(run.db, f"payment-{run.order}")[-1] == "PaymentVoided"
    report = audit_of(run.db)
    assert report["ok"], report["checks"]
