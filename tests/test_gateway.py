"""The gateway's connection handling with small limits: a real Gateway and ActorBridge (simple
base, real SQLite file) on a real loopback socket, in this process so the limits can be tiny.

What a client sees: frames cut out of any chunking, pipelined requests all answered, a
half-closed connection still answered, idle and half-sent frames cut off, oversized frames
refused, the connection cap (and the idlest connection making room), the per-connection pending
cap (delays, never drops), a client that
does not read its replies not slowing others down, and the request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.server import Gateway, GatewayLimits
from messages.commands import Configure
from messages.wire import MAX_FRAME
from runtime.bridge import ActorBridge, configure
from tests.conftest import new_id

IO = 10.0
PONG = {"ok": True, "result": {"pong": True, "base": "simple"}}


class LiveGateway:
    """A Gateway on its own event-loop thread."""

    def __init__(self, db: Path, limits: GatewayLimits, payment_latency: float = 0.0) -> None:
        self.bridge = ActorBridge("simple")
        self.bridge.start()
        configure(
            self.bridge,
            lambda req_id: Configure(
                req_id=req_id,
                db_path=str(db),
                synchronous="NORMAL",
                step_timeout=5.0,
                crash_exits_process=False,
                payment_latency=payment_latency,
            ),
            60,
        )
        self.gateway = Gateway(self.bridge, str(db), limits=limits)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.address: tuple[str, int] = ("", 0)

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.address = self.loop.run_until_complete(self.gateway.start("127.0.0.1", 0))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(IO)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.close(), self.loop).result(IO)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO)
        self.loop.close()
        self.bridge.stop()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=IO)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Any]:
    made: list[LiveGateway] = []

    def make(payment_latency: float = 0.0, **limits: Any) -> LiveGateway:
        gateway = LiveGateway(tmp_path / "g.db", GatewayLimits(**limits), payment_latency)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.close()


def frame(request: dict[str, Any]) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def ping(n: int) -> bytes:
    return frame({"id": n, "op": "ping"})


def order(n: int) -> bytes:
    line = {"product_id": "SKU-001", "quantity": 1, "unit_price": "1.00"}
    args = {"order_id": new_id(), "customer_id": "c", "lines": [line], "payment_method": "tok_visa"}
    return frame({"id": n, "op": "place_order", "args": args})


def read_reply(sock: socket.socket) -> dict[str, Any] | None:
    """The next reply, or None if the server closed the connection."""
    header = recv_exact(sock, 4)
    if header is None:
        return None
    body = recv_exact(sock, struct.unpack(">I", header)[0])
    assert body is not None, "closed mid-frame"
    reply: dict[str, Any] = msgpack.unpackb(body, raw=False)
    return reply


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            assert not data, "closed mid-frame"
            return None
        data += chunk
    return data


def fill(sock: socket.socket, blob: bytes) -> None:
    """Send `blob` over and over until the socket blocks (its timeout raises)."""
    while True:
        sock.sendall(blob)


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed `sock` (fails after `seconds`)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    assert sock.recv(1) == b"", "expected the server to close the connection"
    return time.monotonic() - started


def test_frames_split_and_pipelined_are_all_answered(live: Any) -> None:
    gw = live()
    with gw.connect() as sock:
        data = b"".join(ping(n) for n in range(200)) + order(200)
        # Odd chunk sizes: headers and bodies split anywhere.
        for start in range(0, len(data), 7):
            sock.sendall(data[start : start + 7])
        replies = [read_reply(sock) for _ in range(201)]
    assert sorted(r["id"] for r in replies if r) == list(range(201))
    assert all(r and r["ok"] for r in replies)
    paid = next(r for r in replies if r and r["id"] == 200)
    assert paid["result"]["status"] == "paid"


def test_half_closed_connection_gets_its_answers(live: Any) -> None:
    gw = live()
    with gw.connect() as sock:
        sock.sendall(ping(1) + order(2) + ping(3))
        sock.shutdown(socket.SHUT_WR)
        replies = [read_reply(sock) for _ in range(3)]
        assert {r["id"] for r in replies if r} == {1, 2, 3}
        assert read_reply(sock) is None  # then the server closes


def test_idle_connection_and_half_sent_frame_are_cut_off(live: Any) -> None:
    gw = live(idle_timeout=0.4, frame_timeout=0.4)
    with gw.connect() as idle, gw.connect() as partial, gw.connect() as busy:
        partial.sendall(ping(1)[:6])  # header and part of the body, then silence
        for n in range(6):  # a client that keeps talking is never idle
            busy.sendall(ping(n))
            assert read_reply(busy) is not None
            time.sleep(0.1)
        assert closed_within(idle, 3.0) < 3.0
        assert closed_within(partial, 3.0) < 3.0
        busy.sendall(ping(99))
        reply = read_reply(busy)
        assert reply is not None
        assert reply["result"]["pong"] is True


def test_a_half_sent_frame_is_cut_off_at_the_frame_deadline_not_the_idle_one(live: Any) -> None:
    gw = live(idle_timeout=30.0, frame_timeout=0.5)
    with gw.connect() as sock:
        sock.sendall(struct.pack(">I", 1 << 20) + b"x" * 1000)  # a MiB announced, 1,000 sent
        assert closed_within(sock, 5.0) < 2.0


def test_a_half_sent_header_is_cut_off_too(live: Any) -> None:
    gw = live(idle_timeout=30.0, frame_timeout=0.5)
    with gw.connect() as sock:
        sock.sendall(b"\x00\x00")  # half a header
        assert closed_within(sock, 5.0) < 2.0


def test_a_half_closed_client_with_a_partial_frame_still_gets_its_answers(live: Any) -> None:
    gw = live(payment_latency=1.0, frame_timeout=0.3)
    with gw.connect() as sock:
        sock.sendall(order(1) + ping(2)[:5])  # an order, then a frame that never completes
        sock.shutdown(socket.SHUT_WR)
        reply = read_reply(sock)  # the order takes a second, three frame deadlines
        assert reply is not None
        assert reply["id"] == 1
        assert reply["result"]["status"] == "paid"
        assert read_reply(sock) is None


def test_long_ids_and_huge_argument_lists_are_refused_cheaply(live: Any) -> None:
    gw = live()
    with gw.connect() as sock, gw.connect() as other:
        sock.sendall(frame({"id": "x" * 300, "op": "ping"}))
        reply = read_reply(sock)
        assert reply is not None
        assert reply["id"] is None
        assert reply["error"]["code"] == "invalid"
        started = time.monotonic()
        sock.sendall(frame({"id": 1, "op": "stock", "args": {"product_ids": [1] * 200_000}}))
        other.sendall(ping(2))
        assert read_reply(other) == PONG | {"id": 2}
        reply = read_reply(sock)
        assert reply is not None
        assert reply["error"]["code"] == "invalid"
        assert time.monotonic() - started < 1.0  # it used to stall every client for seconds


def test_one_connection_cannot_queue_its_reads_ahead_of_everyone(live: Any) -> None:
    gw = live()
    grow_inventory(gw)
    with gw.connect() as hog, gw.connect() as other:
        hog.sendall(b"".join(frame({"id": n, **READ_INVENTORY}) for n in range(400)))
        time.sleep(0.2)
        started = time.monotonic()
        other.sendall(frame({"id": 1, "op": "get_order", "args": {"order_id": "nope"}}))
        reply = read_reply(other)
        waited = time.monotonic() - started
        assert reply is not None
        assert reply["error"]["code"] == "not_found"
        assert waited < 1.0, f"a small read waited {waited:.1f}s behind another client's"
        replies = [read_reply(hog) for _ in range(400)]  # the hog is served too, in turn
        assert all(r and r["ok"] for r in replies)


READ_INVENTORY = {"op": "read_stream", "args": {"stream": "inventory"}}


def grow_inventory(gw: LiveGateway, orders: int = 300) -> None:
    """Place orders until reading the inventory stream gives a big reply (~80 KB)."""
    with gw.connect() as sock:
        sock.sendall(b"".join(order(n) for n in range(orders)))
        assert all(read_reply(sock) for _ in range(orders))


def unread_flood(gw: LiveGateway) -> socket.socket:
    """A client that asks for MiBs of replies (reads of a big stream) and never reads them."""
    grow_inventory(gw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(gw.address)
    sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError, OSError):
        sock.sendall(b"".join(frame({"id": n, **READ_INVENTORY}) for n in range(100)))
    time.sleep(0.5)  # the reads run and their replies pile up unread
    return sock


def test_a_client_that_never_reads_its_replies_is_dropped(live: Any) -> None:
    gw = live(write_timeout=1.0, max_connections=1)
    with unread_flood(gw) as hog:
        time.sleep(2.5)  # past the write deadline
        with gw.connect() as newcomer:  # its slot is free again
            newcomer.sendall(ping(1))
            assert read_reply(newcomer) == PONG | {"id": 1}
        hog.settimeout(2)
        with pytest.raises(ConnectionError):
            fill(hog, ping(2))  # reset: the server dropped what it had not delivered


def test_an_evicted_client_that_never_reads_frees_its_slot(live: Any) -> None:
    gw = live(max_connections=1)
    with unread_flood(gw):
        time.sleep(1.2)  # idle past EVICT_IDLE_AFTER, a MiB of replies unread
        with gw.connect() as newcomer:  # evicts it
            newcomer.sendall(ping(1))
            assert read_reply(newcomer) == PONG | {"id": 1}
        time.sleep(0.3)
        with gw.connect() as again:  # the hog did not linger in its slot
            again.sendall(ping(2))
            assert read_reply(again) == PONG | {"id": 2}


def test_a_slow_reader_gets_every_reply(live: Any) -> None:
    """Backpressure pauses a pipelining client that reads slowly; it is not cut off."""
    gw = live(payment_latency=0.5, frame_timeout=0.5, write_timeout=5.0)
    grow_inventory(gw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(gw.address)
    with sock:
        data = b"".join(order(n) for n in range(5)) + b"".join(
            frame({"id": n, **READ_INVENTORY}) for n in range(5, 60)
        )
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        time.sleep(2.0)  # busy elsewhere: reads nothing for four frame deadlines
        sock.settimeout(IO)
        replies = [read_reply(sock) for _ in range(60)]
        sender.join(IO)
    assert sorted(r["id"] for r in replies if r) == list(range(60))
    assert [r["result"]["status"] for r in replies if r and r["id"] < 5] == ["paid"] * 5
    assert all(len(r["result"]["events"]) > 300 for r in replies if r and r["id"] >= 5)


def test_a_half_closed_slow_reader_gets_every_reply(live: Any) -> None:
    """Reading slowly, for longer than the fixed 5 s the gateway used to allow a closing
    connection, it still gets every reply: only a client that takes nothing is cut off."""
    gw = live(write_timeout=1.0, write_high_water=64 * 1024)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(gw.address)
    with sock:
        count = 6_000  # ~300 KB of replies
        sock.sendall(b"".join(ping(n) for n in range(count)))
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(IO)
        started, got = time.monotonic(), 0
        while read_reply(sock) is not None:
            got += 1
            if got % 100 == 0:
                time.sleep(0.1)  # ~50 KB/s: slow, but never silent for write_timeout
        assert got == count
        assert time.monotonic() - started > 5.5  # slower than the old cut-off


def test_requests_refused_at_once_cannot_pile_up_replies(live: Any) -> None:
    """256 KiB of tiny bad frames, each answered with a reply 16 times its size, never read."""
    gw = live()
    with gw.connect() as sock:
        bad = frame({"op": ""})
        sock.sendall(bad * (256 * 1024 // len(bad)))
        time.sleep(0.5)
        (connection,) = gw.gateway.connections
        held = connection.unsent_bytes
        assert held < 2 * 1024 * 1024, f"{held} bytes of replies held for one connection"


def test_a_client_not_reading_does_not_hold_up_other_clients_audits(live: Any) -> None:
    gw = live()
    grow_inventory(gw)
    with gw.connect() as hog, gw.connect() as other:
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.settimeout(IO)
        hog.sendall(
            b"".join(frame({"id": n, **READ_INVENTORY}) for n in range(300))
            + frame({"id": 300, "op": "audit"})
        )
        time.sleep(1.0)  # its replies pile up unread; its audit waits for its read slots
        started = time.monotonic()
        other.settimeout(5.0)
        other.sendall(frame({"id": 1, "op": "audit"}))
        reply = read_reply(other)
        assert reply is not None
        assert reply["result"]["ok"] is True
        assert time.monotonic() - started < 2.0


def test_drain_works_when_every_slot_is_taken(live: Any) -> None:
    """Draining is the operator's request: it does not queue behind clients' orders."""
    gw = live(payment_latency=1.0, max_in_flight=1, saturated_wait=0.2)
    with gw.connect() as sock:
        sock.sendall(order(1))  # holds the only slot for a second
        time.sleep(0.2)
        drain = asyncio.run_coroutine_threadsafe(gw.gateway.drain(10.0), gw.loop)
        assert drain.result(IO) == 0  # waited for the order, then stopped the manager
        reply = read_reply(sock)
        assert reply is not None
        assert reply["result"]["status"] == "paid"


def test_drain_keeps_its_deadline_when_the_actors_do_not_answer(live: Any) -> None:
    """Review finding: each drain request waited the full request timeout (60 s here)."""
    gw = live(request_timeout=60.0)
    gw.bridge.stop()  # the actor system is gone: nothing will answer
    started = time.monotonic()
    drain = asyncio.run_coroutine_threadsafe(gw.gateway.drain(1.0), gw.loop)
    assert drain.result(IO) == 0
    assert time.monotonic() - started < 5.0


def test_oversized_frame_is_refused_and_closed(live: Any) -> None:
    gw = live()
    with gw.connect() as sock:
        sock.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        reply = read_reply(sock)
        assert reply is not None
        assert reply["error"]["code"] == "too_large"
        assert read_reply(sock) is None
    with gw.connect() as sock:  # what came before the bad frame is still answered, first
        sock.sendall(ping(1) + struct.pack(">I", MAX_FRAME + 1))
        replies = [read_reply(sock), read_reply(sock), read_reply(sock)]
        assert replies[0] == {"id": 1, "ok": True, "result": {"pong": True, "base": "simple"}}
        assert replies[1] is not None
        assert replies[1]["error"]["code"] == "too_large"
        assert replies[2] is None


def test_connection_cap(live: Any) -> None:
    gw = live(max_connections=3)
    socks = [gw.connect() for _ in range(3)]
    try:
        for n, sock in enumerate(socks):  # all three are served
            sock.sendall(ping(n))
            assert read_reply(sock) is not None
        with gw.connect() as extra:
            reply = read_reply(extra)
            assert reply is not None
            assert reply["error"]["code"] == "unavailable"
            assert read_reply(extra) is None
        socks.pop().close()
        time.sleep(0.2)
        with gw.connect() as again:  # a slot freed up
            again.sendall(ping(7))
            assert read_reply(again) is not None
    finally:
        for sock in socks:
            sock.close()


def test_a_full_gateway_closes_its_idlest_connection_for_a_newcomer(live: Any) -> None:
    """Idle sockets cannot hold every slot for the idle timeout (300 s by default)."""
    gw = live(max_connections=3)
    oldest, idle, busy = gw.connect(), gw.connect(), gw.connect()
    try:
        for n, sock in enumerate((oldest, idle, busy)):
            sock.sendall(ping(n))
            assert read_reply(sock) is not None
        time.sleep(0.3)
        idle.sendall(ping(5))  # idle, but less long than `oldest`
        assert read_reply(idle) is not None
        busy.sendall(order(6)[:-1])  # a partial frame: never evicted
        time.sleep(1.0)  # past EVICT_IDLE_AFTER for oldest and idle
        with gw.connect() as newcomer:
            newcomer.sendall(ping(7))
            assert read_reply(newcomer) is not None
            assert closed_within(oldest, 3.0) < 3.0  # the one silent the longest
            idle.sendall(ping(8))
            assert read_reply(idle) is not None
            busy.sendall(order(6)[-1:])
            reply = read_reply(busy)
            assert reply is not None
            assert reply["result"]["status"] == "paid"
    finally:
        for sock in (oldest, idle, busy):
            sock.close()


def test_pending_cap_delays_but_answers_everything(live: Any) -> None:
    gw = live(max_pending_per_connection=2)
    with gw.connect() as sock:
        sock.sendall(b"".join(order(n) for n in range(12)))
        replies = [read_reply(sock) for _ in range(12)]
    assert sorted(r["id"] for r in replies if r) == list(range(12))
    assert all(r and r["result"]["status"] == "paid" for r in replies)


def test_a_client_that_does_not_read_does_not_stall_others(live: Any) -> None:
    gw = live()
    with gw.connect() as hog, gw.connect() as other:
        hog.settimeout(0.5)
        blob = b"".join(ping(n) for n in range(5000))
        with pytest.raises(TimeoutError):
            fill(hog, blob)  # until the server stops reading from it
        started = time.monotonic()
        for n in range(20):
            other.sendall(ping(n))
            assert read_reply(other) is not None
        assert time.monotonic() - started < 5.0


def test_request_deadline_answers_unavailable(live: Any) -> None:
    gw = live(payment_latency=3.0, request_timeout=0.3)
    with gw.connect() as sock:
        started = time.monotonic()
        sock.sendall(order(1))
        reply = read_reply(sock)
        assert reply is not None
        assert reply["error"]["code"] == "unavailable"
        assert "no answer in time" in reply["error"]["message"]
        assert time.monotonic() - started < 2.5
        sock.sendall(ping(2))  # the connection is still fine
        assert read_reply(sock) is not None
