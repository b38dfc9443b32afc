"""The HTTP payment provider against a real HTTP server on loopback (tests/fake_payment_provider):
the adapter alone, the Payment actor with it, and a real run.py placing orders through it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import ActorSystem, PoisonMessage

from actors.event_store import EventStoreActor
from actors.payment import PaymentActor
from messages.commands import (
    ChargePayment,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
    ServiceConfig,
    ServiceReady,
    VoidPayment,
)
from providers import (
    ChargeRequest,
    PaymentDeclinedError,
    ProviderError,
    ProviderTimeoutError,
    RefundRequest,
    VoidRequest,
    open_provider,
)
from providers.http_payment import HttpPaymentProvider, timeout_for, to_minor_units
from providers.simulated import SimulatedProvider
from store import SqliteEventStore
from tests.conftest import Server, new_id, wait_until
from tests.fake_payment_provider import FakePaymentProvider

AMOUNT = Decimal("24.98")


@pytest.fixture
def fake() -> Iterator[FakePaymentProvider]:
    """A fake provider whose tok_timeout answers after 1 s."""
    with FakePaymentProvider(hang=1.0) as server:
        yield server


@pytest.fixture
def provider(fake: FakePaymentProvider) -> Iterator[HttpPaymentProvider]:
    """The adapter, waiting 0.3 s at most."""
    adapter = HttpPaymentProvider(fake.url, timeout=0.3)
    yield adapter
    adapter.close()


def charge(order_id: str, token: str = "tok_visa") -> ChargeRequest:
    """A charge request of AMOUNT."""
    return ChargeRequest(order_id, AMOUNT, token)


# --- the adapter ---------------------------------------------------------------------------------


def test_charge_sends_minor_units_and_the_order_key(
    fake: FakePaymentProvider, provider: HttpPaymentProvider
) -> None:
    order = new_id()
    result = provider.charge(charge(order))
    assert result.payment_id.startswith("ch_")
    assert result.amount == AMOUNT
    [stored] = fake.ledger.charges_of(order)
    assert (stored["amount"], stored["currency"], stored["source"]) == (2498, "usd", "tok_visa")
    assert fake.ledger.requests[-1] == ("POST", "/v1/charges", f"{order}:charge")


def test_declines_and_unknown_tokens_are_final(provider: HttpPaymentProvider) -> None:
    with pytest.raises(PaymentDeclinedError) as declined:
        provider.charge(charge(new_id(), "tok_chargeDeclined"))
    assert (declined.value.reason, declined.value.code) == (
        "Your card was declined.",
        "card_declined",
    )
    with pytest.raises(PaymentDeclinedError, match="No such token"):
        provider.charge(charge(new_id(), "tok_nope"))


def test_a_500_is_a_provider_error_and_a_retry_with_the_key_charges_once(
    fake: FakePaymentProvider, provider: HttpPaymentProvider
) -> None:
    order = new_id()
    with pytest.raises(ProviderError, match="HTTP 500 api_error"):
        provider.charge(charge(order, "tok_error"))
    fake.fail_next = 1
    with pytest.raises(ProviderError, match="HTTP 500"):
        provider.charge(charge(order))
    assert fake.ledger.charges_of(order) == []
    first = provider.charge(charge(order))
    again = provider.charge(charge(order))
    assert again == first
    assert len(fake.ledger.charges_of(order)) == 1


def test_a_key_answered_twice_charges_once(
    fake: FakePaymentProvider, provider: HttpPaymentProvider
) -> None:
    """A charge whose answer was lost (timeout), asked again with the same key once the
    provider is done: the second answer is the first one, replayed; no second charge."""
    order = new_id()
    started = time.monotonic()
    with pytest.raises(ProviderTimeoutError):
        provider.charge(charge(order, "tok_timeout"))
    assert time.monotonic() - started < 0.9  # gave up at its own deadline, not the server's
    assert len(fake.ledger.charges_of(order)) == 1  # the money moved, the answer did not
    with pytest.raises(ProviderError, match="409"):  # the first request is still in progress
        provider.charge(charge(order, "tok_timeout"))

    def replayed() -> Any:
        try:
            return provider.charge(charge(order, "tok_timeout"))
        except ProviderError:
            return None

    result = wait_until(replayed, timeout=5, interval=0.1)
    [stored] = fake.ledger.charges_of(order)
    assert result.payment_id == stored["id"]
    posts = [r for r in fake.ledger.requests if r[2] == f"{order}:charge"]
    assert len(posts) >= 3


def test_void_finds_a_charge_whose_answer_was_lost_and_refunds_it_once(
    fake: FakePaymentProvider, provider: HttpPaymentProvider
) -> None:
    order = new_id()
    with pytest.raises(ProviderTimeoutError):
        provider.charge(charge(order, "tok_timeout"))
    voided = provider.void(VoidRequest(order, "timed out"))
    [stored] = fake.ledger.charges_of(order)
    assert voided.charge is not None
    assert voided.refund is not None
    assert (voided.charge.payment_id, voided.charge.amount) == (stored["id"], AMOUNT)
    assert voided.refund.payment_id == stored["id"]
    assert stored["refunded"] is True
    again = provider.void(VoidRequest(order, "again"))
    assert again.refund is not None
    assert again.refund.payment_id == stored["id"]
    assert len(fake.ledger.refunds) == 1
    # Refunding it directly, with the order's refund key, replays the refund made.
    refund = provider.refund(RefundRequest(order, stored["id"], AMOUNT, "again"))
    assert refund.refund_id == voided.refund.refund_id
    assert provider.void(VoidRequest(new_id(), "nothing")).charge is None


def test_no_provider_listening_is_a_provider_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    adapter = HttpPaymentProvider(f"http://127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(ProviderError):
        adapter.charge(charge(new_id()))
    adapter.close()


def test_timeouts_stay_below_the_step_timeout_and_amounts_are_exact() -> None:
    assert timeout_for(5.0) == 3.0
    assert timeout_for(60.0) == 10.0
    assert to_minor_units(Decimal("0.10")) == 10
    with pytest.raises(ValueError, match="fraction"):
        to_minor_units(Decimal("0.105"))
    assert isinstance(open_provider("simulated", step_timeout=1.0), SimulatedProvider)
    remote = open_provider("http://127.0.0.1:9", step_timeout=1.0)
    assert isinstance(remote, HttpPaymentProvider)
    assert remote.timeout == pytest.approx(0.6)
    remote.close()
    with pytest.raises(ValueError, match="unknown payment provider"):
        open_provider("paypal", step_timeout=1.0)


# --- the Payment actor with the HTTP provider -------------------------------------------------


@pytest.fixture
def payment(fake: FakePaymentProvider, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A Payment actor on the simple base using the fake provider (HTTP timeout 0.6 s)."""
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    config = {
        "store_url": f"sqlite:///{tmp_path / 'o.db'}",
        "synchronous": "FULL",
        "step_timeout": 1.0,
        "crash_exits_process": False,
    }
    try:
        store = asys.createActor(EventStoreActor)
        ready = asys.ask(store, ServiceConfig(name="store", store=None, **config), 20)
        assert isinstance(ready, ServiceReady)
        actor = asys.createActor(PaymentActor)
        msg = ServiceConfig(name="payment", store=store, payment_provider=fake.url, **config)
        assert isinstance(asys.ask(actor, msg, 20), ServiceReady)
        yield asys, actor
    finally:
        asys.shutdown()


def types_of(db: Path, order: str) -> list[str]:
    """The payment stream's event types."""
    with SqliteEventStore(db, readonly=True) as reader:
        return [s.type for s in reader.read_stream(f"payment-{order}")]


def test_actor_charges_declines_and_fails_through_http(
    payment: tuple[Any, Any], fake: FakePaymentProvider, tmp_path: Path
) -> None:
    asys, actor = payment
    paid, declined, broken = new_id("paid"), new_id("declined"), new_id("broken")
    first = asys.ask(
        actor, ChargePayment(order_id=paid, amount=AMOUNT, payment_method="tok_visa"), 10
    )
    assert isinstance(first, PaymentProcessedReply)
    assert first.payment_id == fake.ledger.charges_of(paid)[0]["id"]
    again = asys.ask(
        actor, ChargePayment(order_id=paid, amount=AMOUNT, payment_method="tok_visa"), 10
    )
    assert again == first
    assert len(fake.ledger.charges_of(paid)) == 1
    no = asys.ask(
        actor,
        ChargePayment(order_id=declined, amount=AMOUNT, payment_method="tok_chargeDeclined"),
        10,
    )
    assert no == PaymentFailedReply(order_id=declined, reason="Your card was declined.")
    # A 500: the requester hears what it would if the service had raised on its request.
    failed = asys.ask(
        actor, ChargePayment(order_id=broken, amount=AMOUNT, payment_method="tok_error"), 10
    )
    assert isinstance(failed, PoisonMessage)
    assert "HTTP 500" in failed.details
    voided = asys.ask(actor, VoidPayment(order_id=paid, reason="test"), 10)
    assert voided == PaymentVoidedReply(
        order_id=paid, refunded_payment_id=first.payment_id, amount=AMOUNT
    )
    assert fake.ledger.charges_of(paid)[0]["refunded"] is True
    db = tmp_path / "o.db"
    assert types_of(db, paid) == ["ChargeSucceeded", "ChargeRefunded", "PaymentVoided"]
    assert types_of(db, declined) == ["ChargeDeclined"]
    assert types_of(db, broken) == []


def test_actor_thread_is_not_blocked_and_a_lost_answer_is_refunded_by_the_void(
    payment: tuple[Any, Any], fake: FakePaymentProvider, tmp_path: Path
) -> None:
    asys, actor = payment
    slow, quick = new_id("slow"), new_id("quick")
    asys.tell(actor, ChargePayment(order_id=slow, amount=AMOUNT, payment_method="tok_timeout"))
    started = time.monotonic()
    reply = asys.ask(
        actor, ChargePayment(order_id=quick, amount=AMOUNT, payment_method="tok_visa"), 10
    )
    # Answered while the slow call is out (it takes 0.6 s to time out, the server 1 s).
    assert isinstance(reply, PaymentProcessedReply)
    assert time.monotonic() - started < 0.4
    # The timed-out charge is never answered (the saga's own timer decides: it asks for a
    # void); the void waits until the call ended, and finds the charge that did land. (Had
    # the charge been answered, that answer would be the reply this ask gets.)
    voided = asys.ask(actor, VoidPayment(order_id=slow, reason="payment timed out"), 10)
    [stored] = fake.ledger.charges_of(slow)
    assert voided == PaymentVoidedReply(
        order_id=slow, refunded_payment_id=stored["id"], amount=AMOUNT
    )
    assert stored["refunded"] is True
    assert types_of(tmp_path / "o.db", slow) == [
        "ChargeSucceeded",
        "ChargeRefunded",
        "PaymentVoided",
    ]


# --- end to end: a real run.py with --payment-provider http://... ----------------------------


def test_run_py_with_the_http_provider_places_paid_declined_and_timed_out_orders(
    tmp_path: Path,
) -> None:
    lines = [{"product_id": "SKU-001", "quantity": 2, "unit_price": "9.99"}]
    # tok_timeout answers after 2 s; run.py waits 0.6 s (60 % of its 1 s step timeout).
    with FakePaymentProvider(hang=2.0) as fake:
        server = Server(tmp_path, step_timeout=1.0, extra=("--payment-provider", fake.url))
        try:
            client = server.client()
            orders = {
                token: new_id(token)
                for token in ("tok_visa", "tok_chargeDeclined", "tok_timeout", "tok_error")
            }
            futures = {
                token: client.submit(
                    "place_order",
                    {
                        "order_id": order,
                        "customer_id": "c",
                        "lines": lines,
                        "payment_method": token,
                        "wait": True,
                    },
                )
                for token, order in orders.items()
            }
            results = {token: f.result(60) for token, f in futures.items()}
            assert {t: r["status"] for t, r in results.items()} == {
                "tok_visa": "paid",
                "tok_chargeDeclined": "cancelled",
                "tok_timeout": "cancelled",
                "tok_error": "failed",
            }
            paid = fake.ledger.charges_of(orders["tok_visa"])
            assert [(c["id"], c["refunded"]) for c in paid] == [
                (results["tok_visa"]["payment_id"], False)
            ]
            [lost] = fake.ledger.charges_of(orders["tok_timeout"])
            assert lost["refunded"] is True  # charged at the provider, answer lost, refunded
            timed_out = [
                e["type"] for e in client.read_stream(f"order-{orders['tok_timeout']}")["events"]
            ]
            assert timed_out == [
                "OrderPlaced",
                "InventoryReserved",
                "PaymentFailed",
                "InventoryReleased",
                "PaymentRefunded",
                "OrderCancelled",
            ]
            report = wait_until(
                lambda: (r := client.audit())["in_flight_count"] == 0 and r, timeout=30
            )
            assert report["ok"], json.dumps(report["checks"], indent=1)
        finally:
            assert server.stop() == 0, server.log()[-3000:]
