"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real run.py: the order list with the right statuses (``shipped`` too), a cancelled
order's timeline with its compensation, a shipped order's shipment records, a cancel from the
order's page (and one that comes too late), stock, the nodes, the audit, and a new order showing
up without a reload.

Screenshots go to ``test-artifacts/`` (git-ignored). Chromium is required: a missing browser
fails the test with the command that installs it, rather than skipping it unseen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Retrying assertions (`expect`) need no eval in the page, which the console's CSP forbids.
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ROOT, Server, new_id

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# A browser here must not reach the network (the machine's is closed) nor phone home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LINES = [{"product_id": "SKU-003", "quantity": 1, "unit_price": "12.50"}]
OUTCOMES = {
    "tok_visa": "paid",
    "tok_chargeDeclined": "cancelled",
    "tok_timeout": "cancelled",
    "tok_late": "cancelled",
    "tok_error": "failed",
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
            "(as root; .ci/run does this), or point CHROMIUM at a binary. Never run "
            "`playwright install` here: it downloads browsers and the network is closed.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


def test_console_shows_orders_timeline_stock_audit_live(
    start_server: Callable[..., Server], browser: Any
) -> None:
    server = start_server()
    assert server.http_url is not None
    ids = {token: new_id(token.replace("_", "-")) for token in OUTCOMES}
    with httpx.Client(base_url=server.http_url, timeout=30.0) as http:
        for token, order_id in ids.items():
            reply = http.post(
                "/orders",
                json={
                    "order_id": order_id,
                    "customer_id": f"cust-{token[4:]}",
                    "lines": LINES,
                    "payment_method": token,
                    "wait": True,
                },
            )
            assert reply.json()["status"] == OUTCOMES[token], reply.text

        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.set_default_timeout(15_000)
        page.goto(server.http_url + "/")

        # the list: every order with its status
        for token, order_id in ids.items():
            row = page.locator(f'tr[data-order-id="{order_id}"]')
            row.wait_for()
            assert row.locator(".status").inner_text() == OUTCOMES[token]
        page.locator("#live.on").wait_for()  # the feed is connected
        page.locator("#chart-rate path.rate").wait_for()  # a second of stats has arrived
        _shot(page, "orders")

        # filters: by status, then by customer
        page.select_option("#filter-status", "cancelled")
        expect(page.locator("#orders-body tr")).to_have_count(3)
        statuses = page.locator("#orders-body tr").evaluate_all("r => r.map(x => x.dataset.status)")
        assert statuses == ["cancelled"] * 3
        page.select_option("#filter-status", "")
        page.fill("#filter-customer", "cust-error")
        page.click("#filters button")
        expect(page.locator("#orders-body tr")).to_have_count(1)
        assert page.locator(f'tr[data-order-id="{ids["tok_error"]}"]').count() == 1
        page.fill("#filter-customer", "")
        page.click("#filters button")
        expect(page.locator("#orders-body tr")).to_have_count(5)

        # a cancelled order: its timeline marks the compensation
        page.click(f'a[href="#/order/{ids["tok_chargeDeclined"]}"]')
        page.locator("#order-status.cancelled").wait_for()
        released = page.locator('.tl-row[data-type="InventoryReleased"]')
        released.wait_for()
        assert released.get_attribute("data-compensation") == "true"
        assert "compensation" in released.inner_text()
        types = page.locator(".tl-row[data-type]").evaluate_all("r => r.map(x => x.dataset.type)")
        assert types[0] == "OrderPlaced"
        assert types[-1] == "OrderCancelled" or "OrderCancelled" in types
        assert "ChargeDeclined" in types  # the provider's record, beside the order's events
        _shot(page, "order-declined")

        # tok_late: the late charge and its refund in the payment column
        page.goto(f"{server.http_url}/#/order/{ids['tok_late']}")
        refund = page.locator('.tl-row[data-type="ChargeRefunded"]')
        refund.wait_for()
        assert refund.get_attribute("data-source") == "payment"
        assert refund.get_attribute("data-compensation") == "true"
        _shot(page, "order-late")

        page.click('nav a[data-page="stock"]')
        page.locator('tr[data-product="SKU-003"]').wait_for()
        assert page.locator("#stock-body tr").count() == 10
        _shot(page, "stock")

        page.click('nav a[data-page="audit"]')
        page.locator("#audit-result.ok").wait_for()
        assert page.locator(".check.ok").count() == 5
        _shot(page, "audit")

        # live: a new order appears in the open list without a reload
        page.click('nav a[data-page="orders"]')
        page.locator(f'tr[data-order-id="{ids["tok_visa"]}"]').wait_for()
        page.evaluate("window.__sameDocument = true")
        fresh = new_id("fresh")
        http.post(
            "/orders",
            json={"order_id": fresh, "customer_id": "cust-live", "lines": LINES},
        )
        page.locator(f'tr[data-order-id="{fresh}"][data-status="paid"]').wait_for()
        assert page.evaluate("window.__sameDocument") is True  # the page was not reloaded
        first = page.locator("#orders-body tr").first.get_attribute("data-order-id")
        assert first == fresh  # newest on top
        _shot(page, "orders-live")
        context.close()
        assert not problems, problems


SHIPPING = {
    "address": {
        "name": "Ada Lovelace",
        "line1": "12 St James's Square",
        "city": "London",
        "postal_code": "SW1Y 4JH",
        "country": "GB",
    },
    "carrier": "ship_standard",
}


def _page(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    """A new page at `url` that collects the page's script errors."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.set_default_timeout(15_000)
    page.goto(url)
    return context, page, problems


def _shipped_order(page: Any, order_id: str) -> None:
    """Its shipment records in a column of their own, payment records beside; no Cancel."""
    page.click(f'a[href="#/order/{order_id}"]')
    page.locator("#order-status.shipped").wait_for()
    created = page.locator('.tl-row[data-type="ShipmentCreated"]')
    expect(created).to_have_attribute("data-source", "shipment")
    expect(created.locator(".tl-cell.shipment")).to_have_count(1)
    expect(page.locator(".tl-head.shipment")).to_have_text(
        f"Shipment records (shipment-{order_id})"
    )
    types = page.locator(".tl-row[data-type]").evaluate_all("r => r.map(x => x.dataset.type)")
    assert types[-1] == "OrderShipped", types
    assert "ChargeSucceeded" in types
    expect(page.locator("#cancel-order")).to_be_hidden()
    _shot(page, "order-shipped")


def _cancel_from_its_page(page: Any, url: str, order_id: str) -> None:
    """The pending order cancelled with the customer's reason: its compensations shown."""
    page.goto(f"{url}/#/order/{order_id}")
    page.locator("#order-status.pending").wait_for()
    page.once("dialog", lambda dialog: dialog.accept("changed my mind"))
    page.click("#cancel-order")
    page.locator("#order-status.cancelled").wait_for()
    expect(page.locator("#cancel-order")).to_be_hidden()
    expect(page.locator("#order-facts")).to_contain_text("Customer")
    cancelled = page.locator('.tl-row[data-type="OrderCancelled"]')
    cancelled.wait_for()
    assert "Customer" in (cancelled.locator(".tl-name").get_attribute("title") or "")
    released = page.locator('.tl-row[data-type="InventoryReleased"]')
    expect(released).to_have_attribute("data-compensation", "true")
    _shot(page, "order-cancelled")


def _cancel_too_late(page: Any, url: str, order_id: str) -> None:
    """A page still showing `pending` for an order since paid (no shipping) asks, and shows
    the server's conflict instead of pretending the cancel worked."""

    def stale(route: Any) -> None:
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "status": "pending"})

    page.route(f"**/orders/{order_id}", stale)
    page.goto(f"{url}/#/order/{order_id}")
    page.locator("#order-status.pending").wait_for()
    page.unroute(f"**/orders/{order_id}")
    page.once("dialog", lambda dialog: dialog.accept("too late"))
    page.click("#cancel-order")
    expect(page.locator("#cancel-note.bad")).to_contain_text("Not cancelled")
    expect(page.locator("#cancel-note.bad")).to_contain_text("too late to cancel")
    page.locator("#order-status.paid").wait_for()
    _shot(page, "order-conflict")


def test_console_shipping_cancel_and_nodes(
    start_server: Callable[..., Server], browser: Any
) -> None:
    # A long step timeout: the tok_timeout order stays pending until the customer cancels it.
    server = start_server(step_timeout=30.0)
    url = server.http_url
    assert url is not None
    shipped, slow, paid = new_id("shipped"), new_id("slow"), new_id("paid")
    with httpx.Client(base_url=url, timeout=30.0) as http:
        order = {"customer_id": "cust-ship", "lines": LINES}
        reply = http.post(
            "/orders", json={**order, "order_id": shipped, "shipping": SHIPPING, "wait": True}
        )
        assert reply.json()["status"] == "shipped", reply.text
        reply = http.post("/orders", json={**order, "order_id": paid, "wait": True})
        assert reply.json()["status"] == "paid", reply.text
        reply = http.post(
            "/orders", json={**order, "order_id": slow, "payment_method": "tok_timeout"}
        )
        assert reply.json()["status"] == "pending", reply.text

        context, page, problems = _page(browser, url + "/")
        expect(page.locator(f'tr[data-order-id="{shipped}"] .status')).to_have_text("shipped")
        expect(page.locator(f'tr[data-order-id="{slow}"] .status')).to_have_text("pending")
        _shot(page, "orders-shipped")
        page.select_option("#filter-status", "shipped")
        expect(page.locator("#orders-body tr")).to_have_count(1)
        page.select_option("#filter-status", "")
        # a few seconds of stats, so the charts draw lines rather than a lone point
        expect(page.locator("#chart-rate path.rate")).to_have_attribute("d", re.compile("(L.*){3}"))
        page.locator(".charts").screenshot(path=str(ARTIFACTS / "console-charts.png"))

        _shipped_order(page, shipped)
        _cancel_from_its_page(page, url, slow)
        view = http.get(f"/orders/{slow}").json()
        assert (view["status"], view["cancelled_by"]) == ("cancelled", "Customer")
        assert view["reason"] == "changed my mind"
        _cancel_too_late(page, url, paid)

        # the nodes page lists this node and follows its orders
        page.click('nav a[data-page="nodes"]')
        node = page.locator("#nodes-body tr")
        expect(node).to_have_count(1)
        expect(node).to_contain_text(f"{server.host}:{server.port}")
        expect(node).to_contain_text("this node")
        owned = node.locator("td").nth(5)
        expect(owned).to_have_text("3")
        http.post("/orders", json={**order, "order_id": new_id("more"), "wait": True})
        expect(owned).to_have_text("4")  # refreshed without a reload
        _shot(page, "nodes")
        context.close()
        # the 409 of the stale cancel is the browser's own console error for a failed fetch
        assert [p for p in problems if "409" not in p] == [], problems
