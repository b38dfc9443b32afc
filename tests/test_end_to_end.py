"""End to end: a real run.py, a real socket, the wire protocol of DESIGN.md section 6.

Every token path runs on the simple base and again on the queue base (one process per actor).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import msgpack
import pytest

from client import Client, ClientError
from saga.audit import audit
from store import open_store
from tests.conftest import ROOT, Server, new_id, wait_until

LINES = [
    {"product_id": "SKU-001", "quantity": 2, "unit_price": "9.99"},
    {"product_id": "SKU-002", "quantity": 1, "unit_price": 5},
]
TOTAL = Decimal("24.98")

# token -> (status, the order stream's event types)
PATHS: dict[str, tuple[str, list[str]]] = {
    "tok_visa": ("paid", ["OrderPlaced", "InventoryReserved", "PaymentProcessed", "OrderPaid"]),
    "tok_chargeDeclined": (
        "cancelled",
        [
            "OrderPlaced",
            "InventoryReserved",
            "PaymentFailed",
            "InventoryReleased",
            "OrderCancelled",
        ],
    ),
    "tok_error": (
        "failed",
        ["OrderPlaced", "InventoryReserved", "InventoryReleased", "OrderFulfillmentFailed"],
    ),
    "tok_timeout": (
        "cancelled",
        [
            "OrderPlaced",
            "InventoryReserved",
            "PaymentFailed",
            "InventoryReleased",
            "OrderCancelled",
        ],
    ),
    "tok_late": (
        "cancelled",
        [
            "OrderPlaced",
            "InventoryReserved",
            "PaymentFailed",
            "InventoryReleased",
            "OrderCancelled",
        ],
    ),
    "tok_crash": (
        "failed",
        ["OrderPlaced", "InventoryReserved", "InventoryReleased", "OrderFulfillmentFailed"],
    ),
}

BASES = [
    pytest.param("simple", id="simple"),
    pytest.param("queue", id="queue", marks=pytest.mark.process),
    pytest.param("tcp", id="tcp", marks=pytest.mark.process),
]


@pytest.fixture(scope="module", params=BASES)
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """One run.py per base for the whole module (starting one costs about a second)."""
    # The tcp base's admin listens on a port of its own (Thespian's default 1900 may be taken).
    extra = ("--admin-port", str(free_port())) if request.param == "tcp" else ()
    srv = Server(
        tmp_path_factory.mktemp(f"e2e-{request.param}"),
        base=request.param,
        step_timeout=0.5 if request.param == "simple" else 1.0,
        extra=extra,
    )
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture
def client(server: Server) -> Client:
    """A fresh connection to the module's server."""
    return server.client()


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def event_types(client: Client, order_id: str) -> list[str]:
    """The types of the order stream's events, in version order."""
    reply = client.read_stream(f"order-{order_id}")
    assert [e["version"] for e in reply["events"]] == list(range(len(reply["events"])))
    return [e["type"] for e in reply["events"]]


def stock_of(client: Client, *products: str) -> dict[str, dict[str, int]]:
    """Stock levels of some products."""
    result: dict[str, dict[str, int]] = client.stock(products)
    return result


@pytest.mark.parametrize("token", list(PATHS))
def test_each_token_ends_as_designed_and_compensation_restores_stock(
    client: Client, token: str
) -> None:
    before = stock_of(client, "SKU-001", "SKU-002")
    order_id = new_id(token)
    result = client.place_order(order_id, "cust-1", LINES, payment_method=token)
    status, types = PATHS[token]
    assert result["status"] == status, result
    assert event_types(client, order_id) == types
    after = stock_of(client, "SKU-001", "SKU-002")
    if status == "paid":
        assert result["amount"] == str(TOTAL)
        assert after["SKU-001"]["reserved"] == before["SKU-001"]["reserved"] + 2
        assert after["SKU-002"]["reserved"] == before["SKU-002"]["reserved"] + 1
    else:
        assert after == before  # every unit given back
    assert client.get_order(order_id)["status"] == status


def test_payment_stream_records_charges_and_refunds(client: Client) -> None:
    paid, late = new_id("paid"), new_id("late")
    client.place_order(paid, "c", LINES)
    client.place_order(late, "c", LINES, payment_method="tok_late")
    charged = client.read_stream(f"payment-{paid}")["events"]
    assert [e["type"] for e in charged] == ["ChargeSucceeded"]
    assert charged[0]["data"]["amount"] == str(TOTAL)

    def late_refunded() -> list[str] | None:
        types = [e["type"] for e in client.read_stream(f"payment-{late}")["events"]]
        return types if "ChargeRefunded" in types else None

    # The late approval lands after the order was cancelled: the provider refunds it itself.
    assert wait_until(late_refunded, timeout=20) == [
        "PaymentVoided",
        "ChargeSucceeded",
        "ChargeRefunded",
    ]
    assert client.get_order(late)["status"] == "cancelled"


def test_declined_order_records_reason_and_no_refund(client: Client) -> None:
    order_id = new_id("declined")
    result = client.place_order(order_id, "c", LINES, payment_method="tok_chargeDeclined")
    assert result["reason"] == "Payment failed: Your card was declined."
    assert result["refund_issued"] is False
    events = client.read_stream(f"order-{order_id}")["events"]
    assert events[2]["data"]["reason"] == "Your card was declined."


def test_inventory_unavailable_holds_nothing(client: Client) -> None:
    before = stock_of(client, "SKU-003")["SKU-003"]
    order_id = new_id("short")
    lines = [
        {"product_id": "SKU-003", "quantity": before["available"] + 1, "unit_price": "1"},
        {"product_id": "SKU-004", "quantity": 1, "unit_price": "1"},
    ]
    result = client.place_order(order_id, "c", lines)
    assert result["status"] == "cancelled"
    assert result["reason"] == "Inventory unavailable"
    assert event_types(client, order_id) == [
        "OrderPlaced",
        "InventoryUnavailable",
        "OrderCancelled",
    ]
    unavailable = client.read_stream(f"order-{order_id}")["events"][1]["data"]
    assert unavailable["unavailable_items"] == [
        {
            "product_id": "SKU-003",
            "requested": before["available"] + 1,
            "available": before["available"],
        }
    ]
    assert stock_of(client, "SKU-003")["SKU-003"] == before


def test_same_order_twice_gives_same_result_and_no_new_events(client: Client) -> None:
    order_id = new_id("twice")
    first = client.place_order(order_id, "c", LINES)
    events = client.read_stream(f"order-{order_id}")["events"]
    stock = stock_of(client, "SKU-001")
    second = client.place_order(order_id, "c", LINES)
    assert second["status"] == first["status"] == "paid"
    assert second["payment_id"] == first["payment_id"]
    assert client.read_stream(f"order-{order_id}")["events"] == events
    assert stock_of(client, "SKU-001") == stock


def test_concurrent_duplicates_place_one_order(client: Client) -> None:
    order_id = new_id("dup")
    futures = [
        client.submit(
            "place_order",
            {
                "order_id": order_id,
                "customer_id": "c",
                "lines": LINES,
                "payment_method": "tok_visa",
                "wait": True,
            },
        )
        for _ in range(5)
    ]
    results = [f.result(30) for f in futures]
    assert {r["status"] for r in results} == {"paid"}
    assert len({r["payment_id"] for r in results}) == 1
    assert event_types(client, order_id).count("OrderPlaced") == 1
    assert len(client.read_stream(f"payment-{order_id}")["events"]) == 1


def test_same_id_different_order_is_a_conflict(client: Client) -> None:
    order_id = new_id("conflict")
    client.place_order(order_id, "c", LINES)
    with pytest.raises(ClientError) as err:
        client.place_order(order_id, "c", LINES[:1])
    assert err.value.code == "conflict"
    assert len(event_types(client, order_id)) == 4


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"lines": []}, "lines"),
        ({"lines": [{"product_id": "SKU-001", "quantity": 0, "unit_price": "1"}]}, "quantity"),
        ({"lines": [{"product_id": "SKU-001", "quantity": "2", "unit_price": "1"}]}, "quantity"),
        ({"lines": [{"product_id": "SKU-001", "quantity": 1, "unit_price": "-1"}]}, "unit_price"),
        ({"lines": [{"product_id": "SKU-001", "quantity": 1, "unit_price": "abc"}]}, "unit_price"),
        ({"lines": [{"product_id": "SKU-001", "quantity": 1, "unit_price": "NaN"}]}, "unit_price"),
        (
            {"lines": [{"product_id": "SKU-001", "quantity": 1, "unit_price": "0.001"}]},
            "unit_price",
        ),
        ({"lines": [{"product_id": "", "quantity": 1, "unit_price": "1"}]}, "product_id"),
        ({"order_id": ""}, "order_id"),
        ({"customer_id": None}, "customer_id"),
        ({"wait": "yes"}, "wait"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_orders_are_refused_naming_the_field(
    client: Client, args: dict[str, Any], field: str
) -> None:
    order = {
        "order_id": new_id("bad"),
        "customer_id": "c",
        "lines": LINES,
        "payment_method": "tok_visa",
        "wait": True,
        **args,
    }
    with pytest.raises(ClientError) as err:
        client.call("place_order", order)
    assert err.value.code == "invalid"
    assert field in err.value.message
    assert client.ping()["pong"] is True  # the connection survives


def test_amounts_come_back_in_cents_and_times_in_one_utc_format(client: Client) -> None:
    order = new_id()
    lines = [{"product_id": "SKU-004", "quantity": 2, "unit_price": 5}]
    reply = client.place_order(order, "c", lines)
    assert reply["status"] == "paid"
    assert (reply["total_amount"], reply["amount"]) == ("10.00", "10.00")
    events = client.read_stream(f"order-{order}")["events"]
    assert events[0]["data"]["lines"][0]["unit_price"] == "5.00"
    stamps = [reply["placed_at"]] + [e["recorded_at"] for e in events]
    stamps += [e["data"]["placed_at"] for e in events[:1]]
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stamp), stamp


def test_read_stream_pages(client: Client) -> None:
    first = client.call("read_stream", {"stream": "stock-SKU-001", "limit": 3})
    assert [e["version"] for e in first["events"]] == [0, 1, 2]
    second = client.call(
        "read_stream",
        {"stream": "stock-SKU-001", "from_version": first["next_version"], "limit": 3},
    )
    assert [e["version"] for e in second["events"]] == [3, 4, 5]


def test_unknown_order_and_stream_are_not_found(client: Client) -> None:
    for op, args in [
        ("get_order", {"order_id": new_id("ghost")}),
        ("read_stream", {"stream": f"order-{new_id('ghost')}"}),
    ]:
        with pytest.raises(ClientError) as err:
            client.call(op, args)
        assert err.value.code == "not_found"


def test_unknown_op_and_unknown_product(client: Client) -> None:
    with pytest.raises(ClientError) as err:
        client.call("drop_tables", {})
    assert err.value.code == "unknown_op"
    with pytest.raises(ClientError) as err:
        client.stock(["SKU-NOPE"])
    assert err.value.code == "not_found"


def test_no_wait_answers_once_placed_and_the_order_finishes(client: Client) -> None:
    order_id = new_id("nowait")
    placed = client.place_order(order_id, "c", LINES, payment_method="tok_timeout", wait=False)
    assert placed["status"] == "pending"
    assert placed["version"] >= 0
    final = wait_until(
        lambda: (o := client.get_order(order_id))["status"] != "pending" and o, timeout=20
    )
    assert final["status"] == "cancelled"


def test_products_are_explicit_and_a_typo_makes_none(client: Client) -> None:
    product = f"SKU-N{new_id('p')[-6:]}"
    for call in (lambda: client.set_stock(product, 5), lambda: client.stock([product])):
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.code == "not_found"
    order_id = new_id("typo")
    lines = [{"product_id": product, "quantity": 1, "unit_price": "1.00"}]
    with pytest.raises(ClientError) as err:
        client.place_order(order_id, "c", lines)
    assert err.value.code == "invalid"
    assert product in err.value.message
    with pytest.raises(ClientError) as err:
        client.get_order(order_id)  # nothing was recorded for it
    assert err.value.code == "not_found"
    assert client.add_product(product, 5)[product] == {"on_hand": 5, "reserved": 0, "available": 5}
    with pytest.raises(ClientError) as err:
        client.add_product(product, 7)
    assert err.value.code == "conflict"
    assert client.place_order(order_id, "c", lines)["status"] == "paid"
    assert client.set_stock(product, 9)[product]["on_hand"] == 9


def test_set_stock_then_orders_cannot_oversell(client: Client) -> None:
    product = f"SKU-T{new_id('p')[-6:]}"
    client.add_product(product, 1)
    assert client.set_stock(product, 3)[product] == {"on_hand": 3, "reserved": 0, "available": 3}
    lines = [{"product_id": product, "quantity": 1, "unit_price": "2.50"}]
    futures = [
        client.submit(
            "place_order",
            {"order_id": new_id("race"), "customer_id": "c", "lines": lines, "wait": True},
        )
        for _ in range(8)
    ]
    statuses = sorted(f.result(30)["status"] for f in futures)
    assert statuses == ["cancelled"] * 5 + ["paid"] * 3
    assert stock_of(client, product)[product] == {"on_hand": 3, "reserved": 3, "available": 0}
    with pytest.raises(ClientError) as err:
        client.set_stock(product, 2)  # below what paid orders hold
    assert err.value.code == "conflict"


def test_pipelined_requests_on_one_connection(client: Client) -> None:
    ids = [new_id("pipe") for _ in range(30)]
    futures = [
        client.submit(
            "place_order", {"order_id": i, "customer_id": "c", "lines": LINES, "wait": True}
        )
        for i in ids
    ]
    assert [f.result(30)["order_id"] for f in futures] == ids


def test_garbage_frames_get_an_error_and_the_connection_survives(server: Server) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:

        def exchange(body: bytes) -> dict[str, Any]:
            sock.sendall(struct.pack(">I", len(body)) + body)
            header = sock.recv(4, socket.MSG_WAITALL)
            (length,) = struct.unpack(">I", header)
            reply: dict[str, Any] = msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL))
            return reply

        assert exchange(b"\xc1\xc1")["error"]["code"] == "invalid"
        assert exchange(msgpack.packb([1, 2]))["error"]["code"] == "invalid"
        assert (
            exchange(msgpack.packb({"id": 7, "op": "ping", "args": []}))["error"]["code"]
            == "invalid"
        )
        # Unknown top-level keys are refused, so a waiting request cannot pin a padded frame.
        padded = exchange(msgpack.packb({"id": 9, "op": "ping", "args": {}, "pad": b"x" * 9000}))
        assert padded["error"]["code"] == "invalid"
        assert exchange(msgpack.packb({"id": 8, "op": "ping", "args": {}})) == {
            "id": 8,
            "ok": True,
            "result": {"pong": True, "base": server.base},
        }
        sock.sendall(struct.pack(">I", 2 << 20))  # a frame over 1 MiB: refused, then closed
        header = sock.recv(4, socket.MSG_WAITALL)
        reply = msgpack.unpackb(sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL))
        assert reply["error"]["code"] == "too_large"
        assert sock.recv(1) == b""


def test_audit_is_clean_after_everything(server: Server, client: Client) -> None:
    # Runs last in this module (pytest keeps file order): everything above is in the store.
    def settled() -> dict[str, Any] | None:
        report: dict[str, Any] = client.audit()
        return report if report["in_flight_count"] == 0 else None

    report = wait_until(settled, timeout=30)
    assert report["ok"], json.dumps(report["checks"], indent=1)
    assert report["status_counts"]["paid"] > 0
    assert report["status_counts"]["cancelled"] > 0
    assert report["status_counts"]["failed"] > 0
    # The node ran it in a child process (gateway/audit_process.py): the same report as an
    # audit of the same file in this one.
    with open_store(f"sqlite:///{server.db}", readonly=True) as reader:
        assert report == json.loads(json.dumps(audit(reader)))


# --- through client.py, the command line --------------------------------------------------------


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `client.py` against the server."""
    return subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--port", str(server.port), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize("token", list(PATHS))
def test_cli_place_each_token(server: Server, token: str) -> None:
    order_id = new_id("cli")
    done = cli(
        server,
        "place",
        "--order-id",
        order_id,
        "--customer",
        "c",
        "--line",
        "SKU-005:1:3.50",
        "--payment-method",
        token,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == PATHS[token][0]
    status = json.loads(cli(server, "status", order_id).stdout)
    assert status["status"] == PATHS[token][0]
    events = json.loads(cli(server, "events", order_id).stdout)
    assert [e["type"] for e in events["events"]][-1] == PATHS[token][1][-1]


def test_cli_exit_codes(server: Server) -> None:
    bad = cli(server, "place", "--order-id", "x", "--customer", "c", "--line", "SKU-001:0:1")
    assert bad.returncode == 2  # refused by client.py before it connects
    assert "QTY" in bad.stderr
    refused = cli(
        server,
        "place",
        "--order-id",
        new_id("bad"),
        "--customer",
        "c",
        "--line",
        "SKU-001:1:1",
        "--payment-method",
        "not a token!",
    )
    assert refused.returncode == 2  # refused by the server
    assert "invalid" in refused.stderr
    assert "payment_method" in refused.stderr
    missing = cli(server, "status", new_id("ghost"))
    assert missing.returncode == 4
    assert "not_found" in missing.stderr
    stock = cli(server, "stock", "SKU-001")
    assert stock.returncode == 0
    assert set(json.loads(stock.stdout)["SKU-001"]) == {
        "on_hand",
        "reserved",
        "available",
    }
    audit = cli(server, "audit")
    assert audit.returncode == 0
    assert json.loads(audit.stdout)["ok"] is True
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    down = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "--port", str(free_port), "ping"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert down.returncode == 3
