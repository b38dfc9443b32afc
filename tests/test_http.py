"""The HTTP API against a real run.py, through a real HTTP client (httpx): orders of every
payment outcome, lists, events, timelines, metrics, errors as problem+json, the admin token and
the Host/Origin guard."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx

from run import parse_args
from tests.conftest import Server, new_id, wait_until

LINES = [{"product_id": "SKU-001", "quantity": 2, "unit_price": "9.99"}]
OUTCOMES = {
    "tok_visa": "paid",
    "tok_chargeDeclined": "cancelled",
    "tok_late": "cancelled",
    "tok_timeout": "cancelled",
    "tok_error": "failed",
}
PROBLEM = "application/problem+json"


def _http(server: Server) -> httpx.Client:
    assert server.http_url is not None, server.ready_line
    return httpx.Client(base_url=server.http_url, timeout=30.0)


def _place(http: httpx.Client, order_id: str, token: str, **extra: Any) -> httpx.Response:
    body = {"order_id": order_id, "customer_id": extra.pop("customer", "alice"), "lines": LINES}
    return http.post("/orders", json={**body, "payment_method": token, **extra})


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from the Prometheus text (0 when absent)."""
    label = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = (
        "^" + re.escape(name) + (r"\{" + re.escape(label) + r"\}" if label else "") + r" (\S+)$"
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_orders_of_every_outcome_through_http(start_server: Callable[..., Server]) -> None:
    server = start_server()
    with _http(server) as http:
        ids = {token: new_id(token.replace("_", "-")) for token in OUTCOMES}
        for token, order_id in ids.items():
            reply = _place(http, order_id, token, wait=True, customer=f"c-{token}")
            assert reply.status_code == 201, reply.text
            assert reply.json()["status"] == OUTCOMES[token]
        # wait defaults to false: the answer comes once OrderPlaced is durable
        quick = new_id("quick")
        assert _place(http, quick, "tok_visa").json()["version"] >= 0
        wait_until(lambda: http.get(f"/orders/{quick}").json()["status"] == "paid")

        for token, order_id in ids.items():
            view = http.get(f"/orders/{order_id}").json()
            assert (view["order_id"], view["status"]) == (order_id, OUTCOMES[token])

        _check_order_list(http, ids, quick)

        events = http.get(f"/orders/{ids['tok_chargeDeclined']}/events").json()["events"]
        assert [e["type"] for e in events] == [
            "OrderPlaced",
            "InventoryReserved",
            "PaymentFailed",
            "InventoryReleased",
            "OrderCancelled",
        ]

        _check_late_refund_timeline(http, ids["tok_late"])

        # the same list over the msgpack gateway
        page = server.client().call("list_orders", {"status": "failed"})
        assert [o["order_id"] for o in page["orders"]] == [ids["tok_error"]]

        _check_metrics_after_the_mix(http.get("/metrics").text)

        assert http.get("/audit").json()["ok"] is True
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        spec = http.get("/openapi.json").json()
        assert {"/orders", "/orders/{order_id}/timeline", "/stock/{product_id}"} <= set(
            spec["paths"]
        )
        assert "PlaceOrderBody" in spec["components"]["schemas"]


def _check_order_list(http: httpx.Client, ids: dict[str, str], quick: str) -> None:
    """`GET /orders` after the mix: newest first, filters, pages with a cursor."""
    listed = http.get("/orders").json()["orders"]
    assert [o["order_id"] for o in listed] == [quick, *reversed(list(ids.values()))]
    assert "next_cursor" not in http.get("/orders").json()
    cancelled = http.get("/orders", params={"status": "cancelled"}).json()["orders"]
    assert {o["order_id"] for o in cancelled} == {
        ids[t] for t, s in OUTCOMES.items() if s == "cancelled"
    }
    mine = http.get("/orders", params={"customer_id": "c-tok_error"}).json()["orders"]
    assert [(o["order_id"], o["status"]) for o in mine] == [(ids["tok_error"], "failed")]
    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = http.get("/orders", params=params).json()
        seen += [o["order_id"] for o in page["orders"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    assert seen == [o["order_id"] for o in listed]


def _check_late_refund_timeline(http: httpx.Client, late: str) -> None:
    """tok_late: the charge lands after the order was cancelled and is refunded in the
    payment stream; the timeline shows both beside the order's events."""

    def late_refund() -> dict[str, Any] | None:
        entries = http.get(f"/orders/{late}/timeline").json()["entries"]
        refunds = [e for e in entries if e["type"] == "ChargeRefunded"]
        return refunds[0] if refunds else None

    refund = wait_until(late_refund, timeout=10)
    assert (refund["source"], refund["compensation"]) == ("payment", True)
    entries = http.get(f"/orders/{late}/timeline").json()["entries"]
    times = [e["time"] for e in entries]
    assert times == sorted(times)
    assert all(e["duration_ms"] >= 0 for e in entries)
    kinds = {(e["type"], e["source"], e["compensation"]) for e in entries}
    assert ("InventoryReleased", "order", True) in kinds
    assert ("ChargeSucceeded", "payment", False) in kinds
    assert ("OrderCancelled", "order", False) in kinds


def _check_metrics_after_the_mix(text: str) -> None:
    """The metrics after one order of each outcome (and the quick one)."""
    assert _metric(text, "orders_total", outcome="paid") == 2
    assert _metric(text, "orders_total", outcome="cancelled") == 3
    assert _metric(text, "orders_total", outcome="failed") == 1
    assert _metric(text, "orders_in_flight") == 0
    released = sum(1 for s in OUTCOMES.values() if s != "paid")
    assert _metric(text, "compensations_total", kind="inventory_released") == released
    assert _metric(text, "compensations_total", kind="charge_refunded") == 1  # tok_late
    assert _metric(text, "compensations_total", kind="payment_voided") >= 2
    assert _metric(text, "order_step_seconds_count", step="reserve") == 6
    assert _metric(text, "order_step_seconds_count", step="record") == 6
    assert _metric(text, "order_seconds_count") == 6
    assert _metric(text, "store_commit_seconds_count") > 0
    assert _metric(text, "store_batch_size_sum") >= _metric(text, "store_batch_size_count")
    # nothing died in this run (tok_error's failure is a reply, not a death): exported, 0
    assert "# TYPE supervision_restarts_total counter" in text
    assert _metric(text, "supervision_restarts_total", actor="saga") == 0


def test_errors_are_problem_documents(start_server: Callable[..., Server]) -> None:
    server = start_server()
    with _http(server) as http:

        def problem(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
            assert reply.status_code == status, reply.text
            assert reply.headers["content-type"] == PROBLEM
            body: dict[str, Any] = reply.json()
            assert (body["code"], body["status"]) == (code, status)
            assert all(body[key] for key in ("title", "detail", "type"))
            return body

        problem(http.get("/orders/nope"), 404, "not_found")
        problem(http.get("/orders/nope/timeline"), 404, "not_found")
        problem(http.get("/orders/nope/events"), 404, "not_found")
        problem(http.get("/orders/bad%20id"), 422, "invalid")
        body = problem(_place(http, "o-1", "tok_visa", lines=[]), 422, "invalid")
        assert "lines" in body["detail"]
        problem(_place(http, "o-1", "tok_visa", surprise=1), 422, "invalid")  # unknown field
        problem(_place(http, "o-1", "tok_visa", wait="yes"), 422, "invalid")  # strict bool
        bad_json = http.post(
            "/orders", content=b"{not json", headers={"content-type": "application/json"}
        )
        problem(bad_json, 422, "invalid")
        problem(http.get("/orders", params={"status": "lost"}), 422, "invalid")
        problem(http.get("/orders", params={"limit": 1001}), 422, "invalid")
        problem(http.get("/orders", params={"cursor": "abc"}), 422, "invalid")
        problem(http.get("/stock", params={"product_id": "NOPE"}), 404, "not_found")
        problem(http.get("/nothing-here"), 404, "not_found")
        problem(http.delete("/orders"), 405, "unknown_op")
        big = b'{"order_id": "' + b"x" * (1 << 20) + b'"}'
        problem(
            http.post("/orders", content=big, headers={"content-type": "application/json"}),
            413,
            "too_large",
        )

        def chunks() -> Any:  # no Content-Length: the size is counted as it arrives
            for _ in range(17):
                yield b" " * 65536

        chunked = http.post(
            "/orders", content=chunks(), headers={"content-type": "application/json"}
        )
        problem(chunked, 413, "too_large")
        # the same order id with other contents: conflict
        order_id = new_id()
        assert _place(http, order_id, "tok_visa", wait=True).status_code == 201
        problem(_place(http, order_id, "tok_chargeDeclined"), 409, "conflict")


def test_admin_token_guards_operator_ops(start_server: Callable[..., Server]) -> None:
    server = start_server(extra=("--admin-token", "s3cret"))
    with _http(server) as http:
        assert http.put("/stock/SKU-002", json={"on_hand": 7}).status_code == 403
        wrong = http.put(
            "/stock/SKU-002", json={"on_hand": 7}, headers={"Authorization": "Bearer nope"}
        )
        assert (wrong.status_code, wrong.json()["code"]) == (403, "forbidden")
        right = http.put(
            "/stock/SKU-002", json={"on_hand": 7}, headers={"Authorization": "Bearer s3cret"}
        )
        assert right.status_code == 200, right.text
        assert right.json()["SKU-002"]["on_hand"] == 7
        stock = http.get("/stock", params={"product_id": ["SKU-002", "SKU-003"]}).json()
        assert stock["SKU-002"] == {"on_hand": 7, "reserved": 0, "available": 7}
        assert set(stock) == {"SKU-002", "SKU-003"}
        assert len(http.get("/stock").json()) == 10
        negative = http.put(
            "/stock/SKU-002", json={"on_hand": -1}, headers={"Authorization": "Bearer s3cret"}
        )
        assert negative.json()["code"] == "invalid"


def test_host_and_origin_checks(start_server: Callable[..., Server]) -> None:
    server = start_server()
    assert server.http_url is not None
    port = server.http_url.rsplit(":", 1)[1]
    with _http(server) as http:
        # DNS rebinding: our address under another name
        for host in ("evil.example:" + port, "localhost:1", "127.0.0.1", ""):
            reply = http.get("/orders", headers={"Host": host})
            assert (reply.status_code, reply.json()["code"]) == (403, "forbidden"), host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert http.get("/healthz", headers={"Host": host}).status_code == 200
        # CSRF: a page elsewhere posting to us
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": f"http://evil.example:{port}"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            reply = http.post(
                "/orders",
                json={"order_id": new_id(), "customer_id": "c", "lines": LINES},
                headers=headers,
            )
            assert (reply.status_code, reply.json()["code"]) == (403, "forbidden"), headers
        same = http.post(
            "/orders",
            json={"order_id": new_id(), "customer_id": "c", "lines": LINES},
            headers={"Origin": server.http_url, "Sec-Fetch-Site": "same-origin"},
        )
        assert same.status_code == 201, same.text
        # reads are not refused for a foreign Origin (browsers keep the answer from the page)
        assert http.get("/healthz", headers={"Origin": "http://evil.example"}).status_code == 200
        assert http.get("/").headers["x-frame-options"] == "DENY"


def test_live_feed_sends_new_orders(start_server: Callable[..., Server]) -> None:
    server = start_server()
    with _http(server) as http, http.stream("GET", "/feed") as feed:
        assert feed.headers["content-type"].startswith("text/event-stream")
        order_id = new_id()
        assert _place(http, order_id, "tok_visa").status_code == 201
        event = None
        for line in feed.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "orders":
                orders = json.loads(line[6:])["orders"]
                if any(o["order_id"] == order_id and o["status"] == "paid" for o in orders):
                    break


def test_http_port_defaults() -> None:
    assert parse_args([]).http_port == 8300
    assert parse_args(["--port", "0"]).http_port == -1  # any free port, like the gateway
    assert parse_args(["--http-port", "0"]).http_port is None  # disabled
    assert parse_args(["--http-port", "9000"]).http_port == 9000


def test_http_disabled(start_server: Callable[..., Server]) -> None:
    server = start_server(extra=("--http-port", "0"))
    assert server.http_url is None
    assert server.client().ping()["pong"] is True


def test_cancel_products_and_nodes_through_http(start_server: Callable[..., Server]) -> None:
    server = start_server(extra=("--admin-token", "s3cret"))
    admin = {"Authorization": "Bearer s3cret"}
    with _http(server) as http:
        product = {"product_id": "SKU-HTTP", "on_hand": 4}
        assert http.post("/products", json=product).status_code == 403
        added = http.post("/products", json=product, headers=admin)
        assert added.status_code == 201, added.text
        assert added.json()["SKU-HTTP"] == {"on_hand": 4, "reserved": 0, "available": 4}
        again = http.post("/products", json=product, headers=admin)
        assert (again.status_code, again.json()["code"]) == (409, "conflict")
        unknown = http.put("/stock/SKU-TYPO", json={"on_hand": 1}, headers=admin)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")

        paid = new_id("paid")
        assert _place(http, paid, "tok_visa", wait=True).json()["status"] == "paid"
        late = http.post(f"/orders/{paid}/cancel", json={"reason": "changed my mind"})
        assert (late.status_code, late.json()["code"]) == (409, "conflict")  # paid, no shipping
        pending = new_id("slow")
        assert _place(http, pending, "tok_timeout").json()["status"] == "pending"
        cancelled = http.post(f"/orders/{pending}/cancel", json={"reason": "too slow"})
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        events = http.get(f"/orders/{pending}/events").json()["events"]
        assert events[-1]["type"] == "OrderCancelled"
        assert events[-1]["data"]["cancelled_by"] == "Customer"
        ghost = http.post(f"/orders/{new_id('ghost')}/cancel", json={})
        assert (ghost.status_code, ghost.json()["code"]) == (404, "not_found")

        nodes = http.get("/nodes")
        assert nodes.status_code == 200, nodes.text
        assert nodes.json(), "a node on a store of its own lists itself"
        (single,) = nodes.json()["nodes"]
        assert (single["state"], single["address"]) == ("single", f"{server.host}:{server.port}")
        assert (single["orders_owned"], single["orders_in_flight"]) == (2, 0)


ADDRESS = {"name": "Ada", "line1": "1 Main St", "city": "Paris", "postal_code": "75001"}


def test_shipped_orders_in_the_list_and_their_shipment_in_the_timeline(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()
    with _http(server) as http:
        shipped, refused = new_id("ship"), new_id("refused")
        for order_id, carrier in ((shipped, "ship_standard"), (refused, "ship_refused")):
            shipping = {"address": {**ADDRESS, "country": "FR"}, "carrier": carrier}
            reply = _place(http, order_id, "tok_visa", wait=True, shipping=shipping)
            assert reply.status_code == 201, reply.text
        # the order index follows OrderPaid to the shipping outcome
        listed = {o["order_id"]: o["status"] for o in http.get("/orders").json()["orders"]}
        assert listed == {shipped: "shipped", refused: "cancelled"}
        only = http.get("/orders", params={"status": "shipped"}).json()["orders"]
        assert [o["order_id"] for o in only] == [shipped]
        wait_until(lambda: _metric(http.get("/metrics").text, "orders_in_flight") == 0)
        assert _metric(http.get("/metrics").text, "orders_total", outcome="shipped") == 1

        entries = http.get(f"/orders/{shipped}/timeline").json()["entries"]
        created = [e for e in entries if e["type"] == "ShipmentCreated"]
        assert [e["source"] for e in created] == ["shipment"]
        assert created[0]["stream"] == f"shipment-{shipped}"
        assert entries[-1]["type"] == "OrderShipped"
        steps = [e["type"] for e in http.get(f"/orders/{refused}/timeline").json()["entries"]]
        assert "ShipmentRefused" in steps
        assert "ShipmentFailed" in steps
