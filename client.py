"""Client for the order service gateway (DESIGN.md section 6), as a library and a CLI.

Library: `Client` keeps one TCP connection and pipelines requests on it. Any number of threads
may share one `Client`; a background reader thread matches replies to requests by `id`, so replies
may arrive in any order.

    with Client() as c:
        c.place_order("o-1", "cust-1", [{"product_id": "SKU-001", "quantity": 2,
                                         "unit_price": "9.99"}])

CLI (`python client.py [--host H] [--port P] [--server H:P,H:P...] [--timeout S] COMMAND ...`):

    place --order-id ID --customer C --line SKU:QTY:UNIT_PRICE [--line ...]
          [--payment-method TOKEN] [--ship-to "NAME;LINE1;CITY;POSTAL;CC" [--carrier TOKEN]]
          [--no-wait]
    cancel ID [--reason R]
    status ID | events ID | stock [SKU ...] | set-stock SKU QTY | add-product SKU QTY
    audit | nodes | ping

`--server` names several nodes of one shared store: each command goes to the first that
answers, and one whose node dies on the way is carried on by the next (`place` places again,
which is idempotent, and follows the order with `get_order` until it is terminal).

`--host`/`--port` default to the ORDER_HOST / ORDER_PORT environment variables, else
127.0.0.1:7300. Results are printed as JSON on stdout; errors go to stderr as one line,
`error: <code>: <message>`.

Exit codes:
    0  success
    1  any other server error (and `audit` when the audit's `ok` is false)
    2  bad input: a usage error, a malformed --line, or a server reply `invalid`, `too_large`
       or `unknown_op`
    3  cannot connect to the server (refused, connect timeout) or the connection was lost
    4  the server answered `not_found` or `conflict`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from messages.base import TERMINAL_STATUSES
from messages.errors import ErrorCode, ServiceError
from messages.wire import HEADER, MAX_FRAME, decode_body, encode_frame

__all__ = [
    "Client",
    "ClientError",
    "ConnectionFailed",
    "follow",
    "main",
    "on_any",
    "parse_servers",
    "place_on_any",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7300
DEFAULT_TIMEOUT = 30.0

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
# `place --exit-status`: a script tells the outcomes apart without parsing the JSON.
EXIT_CANCELLED = 5
EXIT_FAILED = 6
EXIT_PENDING = 7
_EXIT_BY_STATUS = {"cancelled": EXIT_CANCELLED, "failed": EXIT_FAILED, "pending": EXIT_PENDING}

# Server error codes that mean "the request itself was wrong" versus "the request was fine but
# names something missing or contradicts what exists"; scripts branch on the difference.
_BAD_INPUT_CODES = frozenset({ErrorCode.INVALID, ErrorCode.TOO_LARGE, ErrorCode.UNKNOWN_OP})
_NOT_FOUND_CODES = frozenset({ErrorCode.NOT_FOUND, ErrorCode.CONFLICT})


class ClientError(Exception):
    """An error reply from the server (or a local failure expressed the same way).

    `code` is the wire error code (`invalid`, `not_found`, `conflict`, `too_large`,
    `unknown_op`, `unavailable`, ...) and `message` the human-readable explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionFailed(ClientError):  # noqa: N818 -- name fixed by the client contract
    """The server cannot be reached, or the connection was lost with requests in flight."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)


def _wire_value(value: Any) -> Any:
    """Make `value` msgpack-encodable: Decimals travel as strings so no precision is lost."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _wire_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire_value(v) for v in value]
    return value


class Client:
    """A synchronous, thread-safe connection to the order gateway.

    Connects in the constructor (raising `ConnectionFailed` if it cannot). Requests from any
    thread are written whole under a lock and may be in flight together; a reader thread
    completes one `concurrent.futures.Future` per request id. If the connection drops, every
    pending future fails with `ConnectionFailed`, as does every later request.
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {e}") from e
        # The connect timeout must not apply to reads: the reader blocks until a reply or EOF,
        # and per-request deadlines are enforced on the futures instead.
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._closed_reason: str | None = None
        # Daemon, so a client that is never closed cannot keep the interpreter alive.
        self._reader = threading.Thread(
            target=self._read_loop, name=f"client-reader-{host}:{port}", daemon=True
        )
        self._reader.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- core ---------------------------------------------------------------------------------

    def submit(
        self, op: str, args: Mapping[str, Any] | None = None
    ) -> concurrent.futures.Future[Any]:
        """Send one request without waiting; the future yields `result` or raises ClientError."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._state_lock:
            if self._closed_reason is not None:
                raise ConnectionFailed(self._closed_reason)
            req_id = next(self._ids)
            frame = encode_frame({"id": req_id, "op": op, "args": _wire_value(dict(args or {}))})
            # The server would refuse it anyway; refusing here keeps the connection usable.
            if len(frame) - HEADER.size > MAX_FRAME:
                raise ClientError(
                    ErrorCode.TOO_LARGE, f"request is {len(frame)} bytes, limit is {MAX_FRAME}"
                )
            self._pending[req_id] = future
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as e:
            self._fail_all(f"connection to {self.host}:{self.port} lost while sending: {e}")
        return future

    def call(
        self, op: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send one request and wait for its reply; returns `result` or raises ClientError.

        Raises `ClientError("timeout", ...)` if no reply comes within `timeout` seconds
        (default: the client's timeout); the late reply, if any, is then discarded.
        """
        future = self.submit(op, args)
        wait = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            with self._state_lock:
                for req_id, pending in list(self._pending.items()):
                    if pending is future:
                        del self._pending[req_id]
            raise ClientError(ErrorCode.TIMEOUT, f"no reply to {op!r} within {wait}s") from None

    def close(self) -> None:
        """Close the connection; requests still pending fail with ConnectionFailed."""
        self._fail_all("client closed")
        # shutdown wakes the reader thread blocked in recv; close alone would not. OSError
        # means the peer already disconnected, so there is nothing left to wake.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join()
        self._sock.close()

    # -- reader side --------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes | None:
        """Exactly `n` bytes, or None on a clean EOF before the first byte."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            count = self._sock.recv_into(view[got:])
            if count == 0:
                if got == 0:
                    return None
                raise ConnectionError(f"connection closed mid-frame ({got}/{n} bytes)")
            got += count
        return bytes(buf)

    def _read_loop(self) -> None:
        reason = f"connection to {self.host}:{self.port} closed by the server"
        try:
            while True:
                header = self._recv_exact(HEADER.size)
                if header is None:
                    break
                (length,) = HEADER.unpack(header)
                if length > MAX_FRAME:
                    raise ServiceError(ErrorCode.TOO_LARGE, f"reply frame of {length} bytes")
                body = self._recv_exact(length)
                if body is None:
                    raise ConnectionError("connection closed mid-frame")
                self._dispatch(decode_body(body))
        except (OSError, ServiceError) as e:
            # After close() the socket errors are expected; otherwise this is a real loss.
            reason = f"connection to {self.host}:{self.port} lost: {e}"
        self._fail_all(reason)

    def _dispatch(self, reply: dict[str, Any]) -> None:
        req_id = reply.get("id")
        with self._state_lock:
            future = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
        if future is None:
            # A reply to a request that timed out, or a server error about a frame it could
            # not attribute (id null): nobody waits for it, but it is worth seeing.
            logger.warning("discarding reply with unmatched id %r: %r", req_id, reply)
            return
        if reply.get("ok") is True:
            future.set_result(reply.get("result"))
            return
        error = reply.get("error")
        if isinstance(error, Mapping):
            code = str(error.get("code", "error"))
            message = str(error.get("message", ""))
        else:
            code, message = ErrorCode.PROTOCOL, f"malformed reply: {reply!r}"
        future.set_exception(ClientError(code, message))

    def _fail_all(self, reason: str) -> None:
        """Mark the client closed and fail every pending future with ConnectionFailed."""
        with self._state_lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            pending = list(self._pending.values())
            self._pending.clear()
        for future in pending:
            future.set_exception(ConnectionFailed(reason))

    # -- convenience ops ----------------------------------------------------------------------

    def ping(self) -> Any:
        """Round-trip a `ping`; returns the server's result."""
        return self.call("ping")

    def place_order(  # noqa: PLR0913 - the place_order op's fields, as the wire names them
        self,
        order_id: str,
        customer_id: str,
        lines: Sequence[Mapping[str, Any]],
        payment_method: str = "tok_visa",
        wait: bool = True,
        *,
        shipping: Mapping[str, Any] | None = None,
    ) -> Any:
        """Place an order; with `wait` the reply is the terminal status object.

        `lines` are `{"product_id", "quantity", "unit_price"}` maps; a Decimal unit price is
        sent as its string form so the server parses it exactly. `shipping` is
        `{"address": {"name", "line1", "city", "postal_code", "country"}, "carrier"}`.
        """
        args: dict[str, Any] = {
            "order_id": order_id,
            "customer_id": customer_id,
            "lines": [dict(line) for line in lines],
            "payment_method": payment_method,
            "wait": wait,
        }
        if shipping is not None:
            args["shipping"] = shipping
        return self.call("place_order", args)

    def cancel_order(self, order_id: str, reason: str | None = None) -> Any:
        """Cancel an order: the cancelled order's status object once it is cancelled (also
        if it was already); `conflict` if it is too late (shipped, failed, or paid without
        shipping)."""
        args: dict[str, Any] = {"order_id": order_id}
        if reason is not None:
            args["reason"] = reason
        return self.call("cancel_order", args)

    def get_order(self, order_id: str) -> Any:
        """The order's current status object."""
        return self.call("get_order", {"order_id": order_id})

    def read_stream(self, stream: str, from_version: int = 0) -> Any:
        """The events of `stream` from `from_version` on, as the server returns them."""
        return self.call("read_stream", {"stream": stream, "from_version": from_version})

    def stock(self, product_ids: Iterable[str] = ()) -> Any:
        """Stock levels for `product_ids` (all products when empty)."""
        return self.call("stock", {"product_ids": list(product_ids)})

    def set_stock(self, product_id: str, on_hand: int, admin_token: str | None = None) -> Any:
        """Set an existing product's on-hand quantity (with the admin token when the server
        has one); `not_found` for a product that does not exist."""
        return self.call("set_stock", _stock_args(product_id, on_hand, admin_token))

    def add_product(self, product_id: str, on_hand: int, admin_token: str | None = None) -> Any:
        """Add a new product with its on-hand quantity; `conflict` if it exists."""
        return self.call("add_product", _stock_args(product_id, on_hand, admin_token))

    def audit(self) -> Any:
        """Run the store invariant checks (DESIGN.md section 7)."""
        return self.call("audit")

    def nodes(self) -> Any:
        """The nodes sharing the server's store: leases, orders owned and in flight."""
        return self.call("nodes")


# -- several nodes ------------------------------------------------------------------------------

FOLLOW_INTERVAL = 0.1  # seconds between get_order polls of an order followed on another node


def parse_servers(text: str) -> list[tuple[str, int]]:
    """`HOST:PORT[,HOST:PORT...]` as (host, port) pairs; raises ArgumentTypeError."""
    servers = []
    for item in (part.strip() for part in text.split(",")):
        host, sep, port = item.rpartition(":")
        if not item:
            continue
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{item!r} is not HOST:PORT")
        servers.append((host, int(port)))
    if not servers:
        raise argparse.ArgumentTypeError("no HOST:PORT given")
    return servers


def on_any(
    servers: Sequence[tuple[str, int]],
    action: Callable[[Client], Any],
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """`action(client)` on the first server that answers; if the connection is lost midway
    (its node died), again on the next ones in turn. Raises the last ConnectionFailed when none
    is left. `action` must be safe to repeat (every op is, `place_order` by its order id)."""
    failure: ConnectionFailed | None = None
    for host, port in servers:
        try:
            with Client(host, port, timeout=timeout) as client:
                return action(client)
        except ConnectionFailed as e:
            failure = e
    assert failure is not None
    raise failure


def is_terminal(order: Mapping[str, Any]) -> bool:
    """Whether an order's view is final: `paid` is, unless the order waits for shipment."""
    status = order.get("status")
    return status in TERMINAL_STATUSES and not (status == "paid" and order.get("shipping"))


def follow(client: Client, order_id: str, timeout: float) -> Any:
    """Poll `get_order` until the order is terminal (or `timeout` seconds pass: its status
    then). For an order whose node died mid-wait: another node takes it over and ends it."""
    deadline = time.monotonic() + timeout
    while True:
        order = client.get_order(order_id)
        if is_terminal(order) or time.monotonic() > deadline:
            return order
        time.sleep(FOLLOW_INTERVAL)


def place_on_any(
    servers: Sequence[tuple[str, int]],
    order: Mapping[str, Any],
    *,
    wait: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """Place an order (`Client.place_order`'s arguments as a mapping) on the first server that
    answers; if that node dies before answering, place it again on the next (the same order id:
    found, not doubled) and, with `wait`, follow it there until terminal."""
    tries = 0

    def place(client: Client) -> Any:
        nonlocal tries
        tries += 1
        result = client.place_order(**order, wait=wait)
        if wait and tries > 1 and not is_terminal(result):
            return follow(client, order["order_id"], timeout)
        return result

    return on_any(servers, place, timeout)


# -- CLI ----------------------------------------------------------------------------------------


def parse_line(text: str) -> dict[str, Any]:
    """Parse `SKU:QTY:UNIT_PRICE` into an order line; raises ArgumentTypeError naming `text`."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"bad line {text!r}: expected SKU:QTY:UNIT_PRICE")
    sku, qty_text, price_text = parts
    if not sku:
        raise argparse.ArgumentTypeError(f"bad line {text!r}: SKU is empty")
    try:
        quantity = int(qty_text)
    except ValueError:
        quantity = 0
    if quantity <= 0:
        raise argparse.ArgumentTypeError(
            f"bad line {text!r}: QTY {qty_text!r} is not a positive integer"
        )
    try:
        price = Decimal(price_text)
    except InvalidOperation:
        price = Decimal("NaN")
    if not price.is_finite() or price < 0:
        raise argparse.ArgumentTypeError(
            f"bad line {text!r}: UNIT_PRICE {price_text!r} is not a decimal >= 0"
        )
    return {"product_id": sku, "quantity": quantity, "unit_price": str(price)}


SHIP_TO_FIELDS = ("name", "line1", "city", "postal_code", "country")


def parse_ship_to(text: str) -> dict[str, str]:
    """Parse `NAME;LINE1;CITY;POSTAL;CC` into a shipping address; the server checks each
    field (lengths, the ISO 3166 country code)."""
    parts = [part.strip() for part in text.split(";")]
    if len(parts) != len(SHIP_TO_FIELDS) or not all(parts):
        raise argparse.ArgumentTypeError(
            f"bad --ship-to {text!r}: expected NAME;LINE1;CITY;POSTAL;CC, every part non-empty"
        )
    return dict(zip(SHIP_TO_FIELDS, parts, strict=True))


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return value


def _stock_args(product_id: str, on_hand: int, admin_token: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"product_id": product_id, "on_hand": on_hand}
    if admin_token is not None:
        args["admin_token"] = admin_token
    return args


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_EPILOG = """\
exit codes:
  0  success
  1  other server error; `audit` found violations
  2  bad input (usage, malformed --line, server error invalid/too_large/unknown_op)
  3  cannot connect to the server, or the connection was lost
  4  server error not_found or conflict
  place --exit-status only: 5 cancelled, 6 failed, 7 still pending (0: paid or shipped)
  cancel: 4 (conflict) when it is too late: the order shipped, failed or was paid without
  shipping

Global options (--host, --port, --server, --timeout, --admin-token) go before or after the
command.
"""


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes. Subcommands get them with suppressed defaults, so an
    option given before the command is not reset by the subcommand's parser."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--host",
        default=default(os.environ.get("ORDER_HOST", DEFAULT_HOST)),
        help="gateway host (env ORDER_HOST; default %(default)s)" if defaults else None,
    )
    parser.add_argument(
        "--port",
        type=int,
        default=default(os.environ.get("ORDER_PORT", DEFAULT_PORT)),
        help="gateway port (env ORDER_PORT; default %(default)s)" if defaults else None,
    )
    parser.add_argument(
        "--server",
        type=parse_servers,
        default=default(None),
        metavar="HOST:PORT[,HOST:PORT...]",
        help="several nodes of one shared store, tried in turn (instead of --host/--port)"
        if defaults
        else None,
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        help="seconds to connect and per reply (default %(default)s)" if defaults else None,
    )
    parser.add_argument(
        "--admin-token",
        default=default(os.environ.get("ORDER_ADMIN_TOKEN")),
        help="for set-stock when the server requires one (env ORDER_ADMIN_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="client.py",
        description="Talk to the order service gateway; prints JSON results on stdout.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    place = command(
        "place",
        "place an order (waits for its terminal status)",
        "Place an order and print its status once terminal (paid, shipped, cancelled or\n"
        "failed). Payment tokens: tok_visa (approved), tok_chargeDeclined, tok_error,\n"
        "tok_timeout, tok_late, tok_crash. With --ship-to the paid order is shipped; carrier\n"
        "tokens: ship_standard (default), ship_refused, ship_timeout, ship_error (see README).",
    )
    place.add_argument("--order-id", required=True)
    place.add_argument("--customer", required=True)
    place.add_argument(
        "--line",
        dest="lines",
        action="append",
        required=True,
        type=parse_line,
        metavar="SKU:QTY:UNIT_PRICE",
    )
    place.add_argument("--payment-method", default="tok_visa", help="default %(default)s")
    place.add_argument(
        "--ship-to",
        type=parse_ship_to,
        metavar="NAME;LINE1;CITY;POSTAL;CC",
        help="ship the order to this address (CC: ISO 3166 alpha-2 country code)",
    )
    place.add_argument(
        "--carrier", help="carrier token for --ship-to (default ship_standard)", default=None
    )
    place.add_argument(
        "--no-wait", dest="wait", action="store_false", help="reply once OrderPlaced is durable"
    )
    place.add_argument(
        "--exit-status",
        action="store_true",
        help="exit 5 if the order ends cancelled, 6 failed, 7 still pending (0 paid)",
    )

    cancel = command(
        "cancel",
        "cancel an order (waits until it is cancelled)",
        "Cancel an order and print it once cancelled (also if it was already). While it is\n"
        "pending the saga stops and gives back what it holds; while it is paid and waiting\n"
        "for shipment the charge is refunded, the stock released and the shipment cancelled.\n"
        "Exit 4 (conflict) if it is too late: shipped, failed, or paid without shipping.",
    )
    cancel.add_argument("order_id", help="the id the order was placed with")
    cancel.add_argument("--reason", help="why (recorded in OrderCancelled)")

    status = command(
        "status",
        "an order's status",
        'Print {"order_id", "status", "version", "reason", ...}: status is pending, paid,\n'
        "cancelled or failed; version is the stream's last event version. Exit 4 if unknown.",
    )
    status.add_argument("order_id", help="the id the order was placed with")
    events = command(
        "events",
        "an order's event stream",
        "Print the events of stream order-ID in order: type, version, position, event_id,\n"
        "recorded_at and the event's data. Exit 4 if the order is unknown.",
    )
    events.add_argument("order_id", help="the id the order was placed with")
    stock = command(
        "stock", "stock levels (all products if none given)", "Print on_hand/reserved/available."
    )
    stock.add_argument("skus", nargs="*", metavar="SKU")
    set_stock = command(
        "set-stock",
        "set a product's on-hand quantity",
        "Set a product's units on hand (needs --admin-token when the server has one).",
    )
    set_stock.add_argument("sku", metavar="SKU")
    set_stock.add_argument("qty", type=non_negative_int, metavar="QTY")
    add_product = command(
        "add-product",
        "add a new product with its on-hand quantity",
        "Add a product (set-stock only changes existing ones, so a typo never makes a product;\n"
        "needs --admin-token when the server has one). Exit 4 if it exists.",
    )
    add_product.add_argument("sku", metavar="SKU")
    add_product.add_argument("qty", type=non_negative_int, metavar="QTY")
    command(
        "audit",
        "check the store invariants; exit 1 if any fails",
        "Check the five invariants (docs/architecture.md): one terminal event, gapless\n"
        "versions, stock consistent, reservations settled, money balanced.",
    )
    command(
        "nodes",
        "the nodes sharing the store",
        "List the nodes of a shared store: id, address, lease state, epoch, lease age,\n"
        "orders owned and in flight.",
    )
    command("ping", "check the server answers", "Check the server answers.")
    return parser


def _order(args: argparse.Namespace) -> dict[str, Any]:
    """`place`'s order as the wire's place_order arguments (without `wait`)."""
    order: dict[str, Any] = {
        "order_id": args.order_id,
        "customer_id": args.customer,
        "lines": args.lines,
        "payment_method": args.payment_method,
    }
    if args.ship_to is not None:
        order["shipping"] = {"address": args.ship_to}
        if args.carrier is not None:
            order["shipping"]["carrier"] = args.carrier
    return order


def _run(client: Client, args: argparse.Namespace) -> Any:
    command: str = args.command
    if command == "cancel":
        return client.cancel_order(args.order_id, args.reason)
    if command == "nodes":
        return client.nodes()
    if command == "status":
        return client.get_order(args.order_id)
    if command == "events":
        return client.read_stream(f"order-{args.order_id}")
    if command == "stock":
        return client.stock(args.skus)
    if command == "set-stock":
        return client.set_stock(args.sku, args.qty, args.admin_token)
    if command == "add-product":
        return client.add_product(args.sku, args.qty, args.admin_token)
    if command == "audit":
        return client.audit()
    if command == "ping":
        return client.ping()
    raise AssertionError(f"unhandled command {command!r}")  # argparse restricts the choices


def exit_code_for(error: ClientError) -> int:
    """The CLI exit code for a failed request (see the module docstring)."""
    if isinstance(error, ConnectionFailed):
        return EXIT_UNAVAILABLE
    if error.code in _BAD_INPUT_CODES:
        return EXIT_BAD_INPUT
    if error.code in _NOT_FOUND_CODES:
        return EXIT_NOT_FOUND
    return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    try:
        # Everything is validated here, before any connection is attempted.
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "place" and args.carrier is not None and args.ship_to is None:
            parser.error("--carrier needs --ship-to")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    servers = args.server or [(args.host, args.port)]
    try:
        if args.command == "place":
            result = place_on_any(servers, _order(args), wait=args.wait, timeout=args.timeout)
        else:
            result = on_any(servers, lambda client: _run(client, args), args.timeout)
    except ClientError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return exit_code_for(e)
    print(json.dumps(result, indent=2, sort_keys=False, default=_json_default))
    if args.command == "audit" and not (isinstance(result, Mapping) and result.get("ok") is True):
        return EXIT_ERROR
    if args.command == "place" and args.exit_status and isinstance(result, Mapping):
        return _EXIT_BY_STATUS.get(str(result.get("status")), EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
