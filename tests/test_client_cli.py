"""Unit tests for client.py against a tiny in-test fake gateway (real sockets, real framing).

The end-to-end tests through a real `run.py` live elsewhere; here the fake server lets us force
the awkward cases: out-of-order replies, error replies, a connection dropped mid-request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest

import client
from client import Client, ClientError, ConnectionFailed, main
from messages.errors import ErrorCode
from messages.wire import HEADER, decode_body, encode_frame, error_reply, ok_reply

DEADLINE = 10.0  # seconds; every wait has one so a broken client fails instead of hanging


class FakeConn:
    """One accepted connection, seen from the fake server's side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _recv_exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def recv(self) -> dict[str, Any] | None:
        """The next request, or None once the client has gone."""
        header = self._recv_exact(HEADER.size)
        if header is None:
            return None
        body = self._recv_exact(HEADER.unpack(header)[0])
        return None if body is None else decode_body(body)

    def send(self, reply: dict[str, Any]) -> None:
        """Send one reply frame."""
        self.sock.sendall(encode_frame(reply))


Handler = Callable[[FakeConn], None]


class FakeServer:
    """Accepts connections one at a time on a free port and runs `handler` on each."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.errors: list[BaseException] = []
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-gateway", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down by stop()
            self.connections += 1
            self._conn = sock
            with sock:
                try:
                    self.handler(FakeConn(sock))
                except OSError:
                    pass  # the client hung up first, which some tests do on purpose
                except BaseException as e:  # surfaced by stop() so the test fails loudly
                    self.errors.append(e)
            self._conn = None

    def stop(self) -> None:
        """Stop accepting, drop any open connection, and join the server thread."""
        # shutdown (not just close) is what wakes a thread blocked in accept/recv on Linux.
        for sock in (self.listener, self._conn):
            if sock is not None:
                # OSError: already closed by its owner, nothing to wake.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(DEADLINE)
        self.listener.close()
        assert not self._thread.is_alive(), "fake server thread did not stop"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], FakeServer]]:
    """Start fake servers for a test and always stop them afterwards."""
    servers: list[FakeServer] = []

    def start(handler: Handler) -> FakeServer:
        server = FakeServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def echo_until_eof(conn: FakeConn) -> None:
    """Reply to each request in order with its op and args."""
    while (req := conn.recv()) is not None:
        conn.send(ok_reply(req["id"], {"op": req["op"], "args": req["args"]}))


def free_port() -> int:
    """A port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- library ------------------------------------------------------------------------------------


def test_pipelined_requests_matched_by_id_when_replies_come_back_reversed(
    serve: Callable[[Handler], FakeServer],
) -> None:
    n = 6

    def reversed_replies(conn: FakeConn) -> None:
        # Hold every reply until all requests are in, so they are truly in flight together.
        batch = [conn.recv() for _ in range(n)]
        for req in reversed(batch):
            assert req is not None
            conn.send(ok_reply(req["id"], {"echo": req["args"]["k"]}))
        echo_until_eof(conn)

    server = serve(reversed_replies)
    with Client(port=server.port, timeout=DEADLINE) as c:
        futures = [c.submit("echo", {"k": i}) for i in range(n)]
        assert [f.result(DEADLINE) for f in futures] == [{"echo": i} for i in range(n)]


def test_many_threads_share_one_client(serve: Callable[[Handler], FakeServer]) -> None:
    n = 8

    def reversed_replies(conn: FakeConn) -> None:
        batch = [conn.recv() for _ in range(n)]
        for req in reversed(batch):
            assert req is not None
            conn.send(ok_reply(req["id"], req["args"]["k"]))

    server = serve(reversed_replies)
    with Client(port=server.port, timeout=DEADLINE) as c, ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: c.call("echo", {"k": i}), range(n)))
    assert results == list(range(n))


def test_error_reply_raises_client_error_with_server_code(
    serve: Callable[[Handler], FakeServer],
) -> None:
    def not_found_then_echo(conn: FakeConn) -> None:
        req = conn.recv()
        assert req is not None
        conn.send(error_reply(req["id"], ErrorCode.NOT_FOUND, "no order o-404"))
        echo_until_eof(conn)

    server = serve(not_found_then_echo)
    with Client(port=server.port, timeout=DEADLINE) as c:
        with pytest.raises(ClientError) as info:
            c.get_order("o-404")
        assert (info.value.code, info.value.message) == ("not_found", "no order o-404")
        assert not isinstance(info.value, ConnectionFailed)
        # An error reply is per request: the connection stays usable.
        assert c.ping() == {"op": "ping", "args": {}}


def test_server_closing_mid_request_fails_pending_and_later_requests(
    serve: Callable[[Handler], FakeServer],
) -> None:
    got_request = threading.Event()

    def hang_up(conn: FakeConn) -> None:
        assert conn.recv() is not None
        got_request.set()

    server = serve(hang_up)
    with Client(port=server.port, timeout=DEADLINE) as c:
        with pytest.raises(ConnectionFailed) as info:
            c.ping()
        assert got_request.is_set()
        assert info.value.code == "unavailable"
        with pytest.raises(ConnectionFailed):
            c.ping()


def test_decimal_prices_are_sent_as_strings(serve: Callable[[Handler], FakeServer]) -> None:
    server = serve(echo_until_eof)
    line = {"product_id": "SKU-001", "quantity": 2, "unit_price": Decimal("9.99")}
    with Client(port=server.port, timeout=DEADLINE) as c:
        echoed = c.place_order("o-1", "cust-1", [line], wait=False)
    assert echoed["op"] == "place_order"
    assert echoed["args"] == {
        "order_id": "o-1",
        "customer_id": "cust-1",
        "lines": [{"product_id": "SKU-001", "quantity": 2, "unit_price": "9.99"}],
        "payment_method": "tok_visa",
        "wait": False,
    }


def test_connect_refused_raises_connection_failed() -> None:
    with pytest.raises(ConnectionFailed):
        Client(port=free_port(), timeout=DEADLINE)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_exit_3_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", str(free_port()), "--timeout", str(DEADLINE), "ping"]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: unavailable: ")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    "bad_line",
    ["SKU:x:1", "SKU:1", "SKU:0:1", "SKU:-2:1", ":1:1", "SKU:1:abc", "SKU:1:-1", "S:1:NaN"],
)
def test_cli_malformed_line_exits_2_without_connecting(
    bad_line: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_connect(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the CLI contacted the server despite a malformed --line")

    monkeypatch.setattr(client, "Client", must_not_connect)
    argv = ["place", "--order-id", "o-1", "--customer", "c-1", "--line", "SKU-001:1:1.00"]
    assert main([*argv, "--line", bad_line]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert repr(bad_line) in captured.err


def test_cli_stock_prints_server_result_as_json(
    serve: Callable[[Handler], FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    levels = {"SKU-001": {"on_hand": 1000, "reserved": 2, "available": 998}}
    requests: list[dict[str, Any]] = []

    def stock(conn: FakeConn) -> None:
        while (req := conn.recv()) is not None:
            requests.append(req)
            conn.send(ok_reply(req["id"], levels))

    server = serve(stock)
    assert main(["--port", str(server.port), "stock", "SKU-001"]) == 0
    assert json.loads(capsys.readouterr().out) == levels
    assert [(r["op"], r["args"]) for r in requests] == [("stock", {"product_ids": ["SKU-001"]})]


def test_cli_place_sends_parsed_lines(
    serve: Callable[[Handler], FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(echo_until_eof)
    argv = ["--port", str(server.port), "place", "--order-id", "o-9", "--customer", "c-9"]
    argv += ["--line", "SKU-001:2:9.99", "--line", "SKU-002:1:0", "--no-wait"]
    assert main(argv) == 0
    args = json.loads(capsys.readouterr().out)["args"]
    assert args["lines"] == [
        {"product_id": "SKU-001", "quantity": 2, "unit_price": "9.99"},
        {"product_id": "SKU-002", "quantity": 1, "unit_price": "0"},
    ]
    assert (args["wait"], args["payment_method"]) == (False, "tok_visa")


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        ("invalid", 2),
        ("too_large", 2),
        ("unknown_op", 2),
        ("not_found", 4),
        ("conflict", 4),
        ("unavailable", 1),
        ("internal", 1),
    ],
)
def test_cli_exit_code_follows_server_error_code(
    code: str,
    exit_code: int,
    serve: Callable[[Handler], FakeServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(conn: FakeConn) -> None:
        while (req := conn.recv()) is not None:
            conn.send(error_reply(req["id"], ErrorCode(code), "nope"))

    server = serve(refuse)
    assert main(["--port", str(server.port), "status", "o-1"]) == exit_code
    assert capsys.readouterr().err == f"error: {code}: nope\n"


@pytest.mark.parametrize(("ok", "exit_code"), [(True, 0), (False, 1)])
def test_cli_audit_exit_code_follows_ok(
    ok: bool,
    exit_code: int,
    serve: Callable[[Handler], FakeServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = {"ok": ok, "checks": {"stock": {"ok": ok, "violations": []}}}

    def audit(conn: FakeConn) -> None:
        while (req := conn.recv()) is not None:
            conn.send(ok_reply(req["id"], report))

    server = serve(audit)
    assert main(["--port", str(server.port), "audit"]) == exit_code
    assert json.loads(capsys.readouterr().out) == report


def test_cli_global_options_also_work_after_the_command(
    serve: Callable[[Handler], FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = serve(echo_until_eof)
    assert main(["status", "o-1", "--port", str(server.port)]) == 0
    assert json.loads(capsys.readouterr().out)["args"] == {"order_id": "o-1"}
    # given before the command, an option is not reset by the command's own parser
    assert main(["--port", str(server.port), "status", "o-2"]) == 0
    assert json.loads(capsys.readouterr().out)["args"] == {"order_id": "o-2"}


@pytest.mark.parametrize(
    ("status", "exit_code"), [("paid", 0), ("cancelled", 5), ("failed", 6), ("pending", 7)]
)
@pytest.mark.usefixtures("capsys")
def test_cli_place_exit_status_tells_outcomes_apart(
    status: str, exit_code: int, serve: Callable[[Handler], FakeServer]
) -> None:
    def answer(conn: FakeConn) -> None:
        while (req := conn.recv()) is not None:
            conn.send(ok_reply(req["id"], {"order_id": "o-1", "status": status}))

    server = serve(answer)
    argv = ["place", "--order-id", "o-1", "--customer", "c", "--line", "SKU-001:1:1"]
    assert main([*argv, "--port", str(server.port)]) == 0  # without the flag: 0 whatever it is
    assert main([*argv, "--port", str(server.port), "--exit-status"]) == exit_code
