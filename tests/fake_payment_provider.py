"""A small Stripe-style payment provider for tests: a real HTTP server on loopback, in a thread.

It answers by test token, like the simulator: ``tok_visa`` charges; ``tok_chargeDeclined`` is
402 ``card_error``; ``tok_error`` is 500 ``api_error`` (nothing charged, nothing remembered,
so a retry may succeed); ``tok_timeout`` charges at once but answers only after ``hang``
seconds (longer than the client waits: the answer is lost, the money is not); any other token
is 400 ``resource_missing``. Idempotency as Stripe keeps it: a key seen before gets the first
answer again (header ``Idempotent-Replayed: true``), a key whose first request is still being
handled gets 409. ``fail_next`` makes the next N requests answer 500 whatever they are.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SEARCH = re.compile(r"metadata\['order_id'\]:'([^']*)'")


@dataclass
class Ledger:
    """What the fake provider holds; read by the tests (under `lock`)."""

    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: dict[str, tuple[int, dict[str, Any], str]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)  # keys whose first request is being handled
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, key
    lock: threading.Lock = field(default_factory=threading.Lock)

    def charges_of(self, order_id: str) -> list[dict[str, Any]]:
        """The charges made for an order."""
        with self.lock:
            return [dict(c) for c in self.charges.values() if c["metadata"]["order_id"] == order_id]


def error(status: int, kind: str, code: str, message: str) -> tuple[int, dict[str, Any]]:
    """A Stripe-style error answer."""
    return status, {"error": {"type": kind, "code": code, "message": message}}


class FakePaymentProvider:
    """Start with ``with FakePaymentProvider() as fake:``; ``fake.url`` is its base URL."""

    def __init__(self, *, hang: float = 2.0) -> None:
        self.hang = hang
        self.fail_next = 0
        self.ledger = Ledger()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests read the ledger

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True  # a hanging answer never holds up the test's end
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakePaymentProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- serving ----------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode() if length else ""
        form = {k: v[-1] for k, v in parse_qs(raw).items()}
        key = handler.headers.get("Idempotency-Key")
        ledger = self.ledger
        with ledger.lock:
            ledger.requests.append((method, url.path, key))
            failing = self.fail_next > 0
            if failing:
                self.fail_next -= 1
            seen = ledger.answers.get(key) if key else None
            busy = key is not None and key in ledger.pending
            if key is not None and seen is None and not busy and not failing:
                ledger.pending.add(key)
        replayed = False
        if failing:
            status, body = error(500, "api_error", "internal", "Something went wrong")
        elif seen is not None:
            status, body, first = seen
            if first != raw:
                status, body = error(
                    400, "idempotency_error", "idempotency_key_in_use", "Different parameters"
                )
            replayed = True
        elif busy:
            status, body = error(
                409, "idempotency_error", "idempotency_key_in_use", "Request in progress"
            )
        else:
            try:
                status, body, delay = self._handle(method, url.path, url.query, form)
                # The request stays in progress (409 to its key) until it is answered.
                time.sleep(delay)
                if key is not None and status < 500:  # as Stripe: a 500 is not kept; retry it
                    with ledger.lock:
                        ledger.answers[key] = (status, body, raw)
            finally:
                with ledger.lock:
                    ledger.pending.discard(key or "")
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            if replayed:
                handler.send_header("Idempotent-Replayed", "true")
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a timeout test): the answer is lost

    def _handle(
        self, method: str, path: str, query: str, form: dict[str, str]
    ) -> tuple[int, dict[str, Any], float]:
        if method == "POST" and path == "/v1/charges":
            return self._charge(form)
        if method == "POST" and path == "/v1/refunds":
            return (*self._refund(form), 0.0)
        if method == "GET" and path == "/v1/charges/search":
            match = SEARCH.search(parse_qs(query).get("query", [""])[-1])
            if match is None:
                return (*error(400, "invalid_request_error", "parameter_invalid", "query"), 0.0)
            return 200, {"object": "search_result", "data": self.ledger.charges_of(match[1])}, 0.0
        return (*error(404, "invalid_request_error", "resource_missing", path), 0.0)

    def _charge(self, form: dict[str, str]) -> tuple[int, dict[str, Any], float]:
        token = form.get("source", "")
        try:
            amount = int(form["amount"])
        except (KeyError, ValueError):
            return (*error(400, "invalid_request_error", "parameter_invalid", "amount"), 0.0)
        if token == "tok_chargeDeclined":
            return (
                *error(402, "card_error", "card_declined", "Your card was declined."),
                0.0,
            )
        if token == "tok_error":
            return (*error(500, "api_error", "internal", "An error occurred on our side."), 0.0)
        if token not in ("tok_visa", "tok_timeout"):
            return (
                *error(
                    400, "invalid_request_error", "resource_missing", f"No such token: {token!r}"
                ),
                0.0,
            )
        charge: dict[str, Any] = {
            "id": f"ch_{uuid.uuid4().hex[:16]}",
            "object": "charge",
            "amount": amount,
            "currency": form.get("currency", "usd"),
            "source": token,
            "status": "succeeded",
            "refunded": False,
            "amount_refunded": 0,
            "metadata": {"order_id": form.get("metadata[order_id]", "")},
        }
        with self.ledger.lock:
            self.ledger.charges[charge["id"]] = charge
        return 200, dict(charge), self.hang if token == "tok_timeout" else 0.0

    def _refund(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.ledger.lock:
            charge = self.ledger.charges.get(form.get("charge", ""))
            if charge is None:
                return error(404, "invalid_request_error", "resource_missing", "No such charge")
            if charge["refunded"]:
                return error(
                    400, "invalid_request_error", "charge_already_refunded", "Already refunded"
                )
            charge["refunded"] = True
            charge["amount_refunded"] = charge["amount"]
            refund = {
                "id": f"re_{uuid.uuid4().hex[:16]}",
                "object": "refund",
                "charge": charge["id"],
                "amount": charge["amount"],
                "status": "succeeded",
            }
            self.ledger.refunds[refund["id"]] = refund
            return 200, dict(refund)
