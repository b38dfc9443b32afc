"""End to end: shipping and cancel (DESIGN.md section 9) over the wire and through client.py, on
a real run.py on the simple and the queue base."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from client import Client, ClientError
from tests.conftest import ROOT, Server, new_id, wait_until

LINE = {"product_id": "SKU-006", "quantity": 2, "unit_price": "7.50"}
ADDRESS = {
    "name": "Ann Smith",
    "line1": "1 Main St",
    "city": "Berlin",
    "postal_code": "10115",
    "country": "DE",
}
PAID = ["OrderPlaced", "InventoryReserved", "PaymentProcessed", "OrderPaid"]
COMPENSATED = ["PaymentRefunded", "InventoryReleased"]

# carrier -> (status, the order stream after OrderPaid, the shipment stream once settled)
CARRIERS: dict[str, tuple[str, list[str], list[str]]] = {
    "ship_standard": ("shipped", ["OrderShipped"], ["ShipmentCreated"]),
    "ship_refused": (
        "cancelled",
        ["ShipmentFailed", *COMPENSATED, "OrderCancelled"],
        ["ShipmentRefused", "ShipmentVoided"],
    ),
    "ship_timeout": (
        "cancelled",
        ["ShipmentFailed", *COMPENSATED, "OrderCancelled"],
        ["ShipmentVoided", "ShipmentCreated", "ShipmentCancelled"],
    ),
    "ship_error": (
        "failed",
        ["ShipmentFailed", *COMPENSATED, "OrderFulfillmentFailed"],
        ["ShipmentVoided"],
    ),
}


@pytest.fixture(
    scope="module",
    params=["simple", pytest.param("queue", marks=pytest.mark.process)],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One run.py per base for the module."""
    srv = Server(
        tmp_path_factory.mktemp(f"ship-{request.param}"),
        base=request.param,
        step_timeout=0.5 if request.param == "simple" else 1.0,
    )
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture
def client(server: Server) -> Client:
    """A fresh connection to the module's server."""
    return server.client()


def types(client: Client, stream: str) -> list[str]:
    """The event types of a stream (empty if it does not exist)."""
    try:
        return [e["type"] for e in client.read_stream(stream)["events"]]
    except ClientError as e:
        if e.code == "not_found":
            return []
        raise


def place(client: Client, order_id: str, carrier: str, **kwargs: Any) -> Any:
    """Place a one-line order with shipping."""
    shipping = {"address": ADDRESS, "carrier": carrier}
    return client.place_order(order_id, "c", [LINE], shipping=shipping, **kwargs)


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_each_carrier_token_ends_as_designed(client: Client, carrier: str) -> None:
    before = client.stock(["SKU-006"])["SKU-006"]
    order_id = new_id(carrier)
    result = place(client, order_id, carrier)
    status, after_paid, shipment = CARRIERS[carrier]
    assert result["status"] == status, result
    assert types(client, f"order-{order_id}") == PAID + after_paid
    assert wait_until(lambda: types(client, f"shipment-{order_id}") == shipment, timeout=20)
    after = client.stock(["SKU-006"])["SKU-006"]
    if status == "shipped":
        # The reservation was consumed: both fall by the shipped units, reserved is back.
        assert after == {
            "on_hand": before["on_hand"] - 2,
            "reserved": before["reserved"],
            "available": before["available"] - 2,
        }
        assert result["tracking_number"].startswith("TRK")
        assert result["shipping"]["address"] == ADDRESS
    else:
        assert after == before
        assert types(client, f"payment-{order_id}") == [
            "ChargeSucceeded",
            "ChargeRefunded",
            "PaymentVoided",
        ]
    if status == "cancelled":
        assert (result["reason"], result["cancelled_by"], result["refund_issued"]) == (
            "Shipment failed",
            "System",
            True,
        )


def test_cancel_while_pending_stops_the_saga(client: Client) -> None:
    before = client.stock(["SKU-006"])["SKU-006"]
    order_id = new_id("cancel-pending")
    client.place_order(order_id, "c", [LINE], payment_method="tok_timeout", wait=False)
    wait_until(lambda: "InventoryReserved" in types(client, f"order-{order_id}"))
    result = client.cancel_order(order_id, "changed my mind")
    assert (result["status"], result["cancelled_by"], result["reason"]) == (
        "cancelled",
        "Customer",
        "changed my mind",
    )
    assert types(client, f"order-{order_id}") == [
        "OrderPlaced",
        "InventoryReserved",
        "InventoryReleased",
        "OrderCancelled",
    ]
    assert "PaymentVoided" in types(client, f"payment-{order_id}")  # the charge in flight
    assert client.stock(["SKU-006"])["SKU-006"] == before
    # Idempotent: a second cancel answers with the cancelled order.
    assert client.cancel_order(order_id)["status"] == "cancelled"


def test_cancel_while_paid_and_waiting_for_shipment_refunds_and_cancels_the_shipment(
    client: Client,
) -> None:
    before = client.stock(["SKU-006"])["SKU-006"]
    order_id = new_id("cancel-paid")
    place(client, order_id, "ship_timeout", wait=False)
    wait_until(lambda: client.get_order(order_id)["status"] == "paid")
    result = client.cancel_order(order_id, "found it cheaper")
    assert (result["status"], result["cancelled_by"], result["refund_issued"]) == (
        "cancelled",
        "Customer",
        True,
    )
    assert types(client, f"order-{order_id}") == [*PAID, *COMPENSATED, "OrderCancelled"]
    assert types(client, f"shipment-{order_id}")[0] == "ShipmentVoided"
    assert types(client, f"payment-{order_id}") == [
        "ChargeSucceeded",
        "ChargeRefunded",
        "PaymentVoided",
    ]
    assert client.stock(["SKU-006"])["SKU-006"] == before


@pytest.mark.parametrize(
    ("how", "status"),
    [("ship_standard", "shipped"), ("ship_error", "failed"), ("no_shipping", "paid")],
)
def test_cancel_too_late_is_a_conflict(client: Client, how: str, status: str) -> None:
    order_id = new_id("late")
    if how == "no_shipping":
        client.place_order(order_id, "c", [LINE])
    else:
        place(client, order_id, how)
    events = types(client, f"order-{order_id}")
    with pytest.raises(ClientError) as err:
        client.cancel_order(order_id)
    assert err.value.code == "conflict"
    assert status in err.value.message
    assert types(client, f"order-{order_id}") == events  # nothing recorded


def test_cancel_of_an_unknown_order_is_not_found(client: Client) -> None:
    with pytest.raises(ClientError) as err:
        client.cancel_order(new_id("ghost"))
    assert err.value.code == "not_found"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"country": "XX"}, "country"),
        ({"country": "de"}, "country"),
        ({"postal_code": "1" * 17}, "postal_code"),
        ({"name": " "}, "name"),
        ({"city": 5}, "city"),
        ({"line1": None}, "line1"),
    ],
)
def test_invalid_shipping_is_refused_naming_the_field(
    client: Client, change: dict[str, Any], field: str
) -> None:
    shipping = {"address": {**ADDRESS, **change}}
    with pytest.raises(ClientError) as err:
        client.place_order(new_id("bad"), "c", [LINE], shipping=shipping)
    assert err.value.code == "invalid"
    assert field in err.value.message


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """Run client.py against the server."""
    return subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--port", str(server.port), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize("carrier", list(CARRIERS))
def test_cli_place_with_shipping_and_cancel(server: Server, carrier: str) -> None:
    order_id = new_id("cli")
    ship_to = "Ann Smith;1 Main St;Berlin;10115;DE"
    done = cli(
        server,
        *("place", "--order-id", order_id, "--customer", "c", "--line", "SKU-007:1:2.00"),
        *("--ship-to", ship_to, "--carrier", carrier, "--exit-status"),
    )
    status = CARRIERS[carrier][0]
    assert done.returncode == {"shipped": 0, "cancelled": 5, "failed": 6}[status], done.stderr
    assert json.loads(done.stdout)["status"] == status
    events = json.loads(cli(server, "events", order_id).stdout)["events"]
    assert [e["type"] for e in events] == PAID + CARRIERS[carrier][1]
    cancel = cli(server, "cancel", order_id, "--reason", "r")
    assert cancel.returncode == (0 if status == "cancelled" else 4), cancel.stderr


def test_cli_cancel_pending_and_usage(server: Server) -> None:
    order_id = new_id("cli-cancel")
    placed = cli(
        server,
        *("place", "--order-id", order_id, "--customer", "c", "--line", "SKU-007:1:2.00"),
        *("--payment-method", "tok_timeout", "--no-wait"),
    )
    assert placed.returncode == 0, placed.stderr
    cancel = cli(server, "cancel", order_id, "--reason", "oops")
    assert cancel.returncode == 0, cancel.stderr
    result = json.loads(cancel.stdout)
    assert (result["status"], result["cancelled_by"], result["reason"]) == (
        "cancelled",
        "Customer",
        "oops",
    )
    bad = cli(server, "place", "--order-id", "x", "--customer", "c", "--line", "SKU-001:1:1",
              "--ship-to", "only;three;parts")  # fmt: skip
    assert bad.returncode == 2
    assert "NAME;LINE1;CITY;POSTAL;CC" in bad.stderr
    lonely = cli(server, "place", "--order-id", "x", "--customer", "c", "--line", "SKU-001:1:1",
                 "--carrier", "ship_refused")  # fmt: skip
    assert lonely.returncode == 2
    assert cli(server, "cancel", new_id("ghost")).returncode == 4


def test_audit_is_clean_after_shipping_and_cancels(client: Client) -> None:
    report = wait_until(lambda: (r := client.audit())["in_flight_count"] == 0 and r, timeout=30)
    assert report["ok"], json.dumps(report["checks"], indent=1)
    assert report["status_counts"]["shipped"] > 0
    assert report["units_shipped"] > 0
