"""The HTTP API's gate, in front of every route: which hosts and origins may talk to it and how
big a body may be. Pure ASGI, so a refused request costs no routing and no validation.

- ``Host`` must name this server (DNS rebinding: a page on evil.example whose name resolves to
  127.0.0.1 sends ``Host: evil.example``), with the bound port.
- A request that changes something (not GET/HEAD/OPTIONS) from a browser must come from this
  server's own pages: a foreign ``Origin`` or ``Sec-Fetch-Site: cross-site`` is refused (CSRF).
  Non-browser clients send neither header and pass.
- Bodies are read up to ``max_body`` bytes (the gateway's frame limit) before the route runs;
  one byte more is ``too_large``, whether or not a ``Content-Length`` announced it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from messages.errors import ErrorCode
from messages.wire import MAX_FRAME

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
# Every response: no sniffing, no framing by other sites (clickjacking), no foreign scripts.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    ),
]

PROBLEM_TITLES: dict[str, str] = {
    ErrorCode.INVALID: "Invalid request",
    ErrorCode.NOT_FOUND: "Not found",
    ErrorCode.CONFLICT: "Conflict",
    ErrorCode.TOO_LARGE: "Request too large",
    ErrorCode.UNKNOWN_OP: "Unknown operation",
    ErrorCode.UNAVAILABLE: "Service unavailable",
    ErrorCode.FORBIDDEN: "Forbidden",
    ErrorCode.INTERNAL: "Internal error",
}
# The HTTP status of each gateway error code (`unknown_op`: a method the route does not have).
PROBLEM_STATUS: dict[str, int] = {
    ErrorCode.INVALID: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNKNOWN_OP: 405,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INTERNAL: 500,
}


def problem_body(code: str, detail: str, status: int | None = None) -> dict[str, Any]:
    """An RFC 9457 problem document; ``code`` is the gateway's error code."""
    return {
        "type": f"urn:order-saga:error:{code}",
        "title": PROBLEM_TITLES.get(code, code),
        "status": status or PROBLEM_STATUS.get(code, 500),
        "detail": detail,
        "code": str(code),
    }


class HostPolicy:
    """Which ``Host`` values (and browser origins) name this server."""

    def __init__(self, bound_host: str, port: int) -> None:
        self.port = port
        self._wildcard = bound_host in ("0.0.0.0", "::", "")
        host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._names = LOOPBACK_NAMES | {host.lower()}

    def host_ok(self, value: str | None) -> bool:
        """`value` is ``name:port`` for one of our names and the bound port. Bound to every
        interface, any IP literal is accepted too: a rebinding attack needs a DNS name."""
        if not value:
            return False
        name, sep, port = value.lower().rpartition(":")
        if not sep or name.endswith("[") or port != str(self.port):
            return False  # no port (or an IPv6 literal without one)
        if name in self._names:
            return True
        if self._wildcard:
            try:
                ipaddress.ip_address(name.strip("[]"))
            except ValueError:
                return False
            return True
        return False

    def origin_ok(self, origin: str) -> bool:
        """A browser origin of one of our own pages (``http://host:port``)."""
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme == "http" and "/" not in rest and self.host_ok(rest)


class Guard:
    """ASGI middleware enforcing the module docstring's rules."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, max_body: int = MAX_FRAME) -> None:
        self.app = app
        self.policy = policy
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        send = _with_security_headers(send)
        if not self.policy.host_ok(headers.get("host")):
            await _problem(send, "forbidden", "this server is not reached under that Host name")
            return
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if (origin is not None and not self.policy.origin_ok(origin)) or headers.get(
                "sec-fetch-site"
            ) == "cross-site":
                await _problem(send, "forbidden", "cross-site requests are refused")
                return
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body:
                await _problem(send, "too_large", f"body over {self.max_body} bytes")
                return
            body = await self._read_body(receive)
            if body is None:
                await _problem(send, "too_large", f"body over {self.max_body} bytes")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""  # the client left; the route sees an empty body and no one reads
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # after the body: wait for the disconnect as usual
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
        await send(message)

    return wrapped


async def _problem(send: Send, code: str, detail: str) -> None:
    body = problem_body(code, detail)
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": body["status"],
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
