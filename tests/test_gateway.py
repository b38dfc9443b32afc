"""The gateway's connection handling with small limits: a real Gateway on a real loopback
socket, in this process so the limits can be tiny, over a fake bridge (orders answered at once,
or held until the test releases them) and a fake clock (deadlines pass when the test advances
it), so the tests wait on replies and states, not on time. The first test runs against a real
run.py (actors, SQLite) end to end.

What a client sees: frames cut out of any chunking, pipelined requests all answered, a
half-closed connection still answered, idle and half-sent frames cut off, oversized frames
refused, the connection cap (and the idlest connection making room), the per-connection pending
cap (delays, never drops), a client that does not read its replies not slowing others down,
and the request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from gateway.server import EVICT_IDLE_AFTER, GatewayLimits
from messages.commands import Drain, PlaceOrder
from messages.wire import MAX_FRAME
from tests.conftest import Server, new_id
from tests.gateway_harness import IO, GatewayHarness

PONG = {"ok": True, "result": {"pong": True, "base": "simple"}}
INVENTORY_EVENTS = 400  # a read of the inventory stream: a reply of ~70 KB


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[..., GatewayHarness]]:
    made: list[GatewayHarness] = []

    def make(*, fake_clock: bool = True, inventory: int = 0, **limits: Any) -> GatewayHarness:
        db = tmp_path / f"g{len(made)}.db"
        harness = GatewayHarness(
            db, GatewayLimits(**limits), fake_clock=fake_clock, inventory=inventory
        )
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def frame(request: dict[str, Any]) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def ping(n: int) -> bytes:
    return frame({"id": n, "op": "ping"})


def order(n: int) -> bytes:
    line = {"product_id": "SKU-001", "quantity": 1, "unit_price": "1.00"}
    args = {"order_id": new_id(), "customer_id": "c", "lines": [line], "payment_method": "tok_visa"}
    return frame({"id": n, "op": "place_order", "args": args})


READ_INVENTORY = {"op": "read_stream", "args": {"stream": "inventory"}}


def read_inventory(n: int) -> bytes:
    return frame({"id": n, **READ_INVENTORY})


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


def is_closed(sock: socket.socket, within: float = IO) -> bool:
    """Whether the server closed `sock` (EOF) within `within` seconds; its replies must all
    have been read."""
    sock.settimeout(within)
    return sock.recv(1) == b""


def is_open(sock: socket.socket) -> bool:
    """Whether the server has not closed `sock` (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def unread_flood(gw: GatewayHarness) -> socket.socket:
    """A client that asks for MiBs of replies (reads of a big stream) and never reads them;
    returned once the gateway stopped reading from it."""
    sock = gw.connect(rcvbuf=4096)
    sock.settimeout(0.5)
    with contextlib.suppress(TimeoutError, OSError):
        sock.sendall(b"".join(read_inventory(n) for n in range(100)))
    connection = gw.server_side[sock]
    gw.wait_until(lambda: connection.writing_paused)  # its replies pile up unread
    return sock


# --- end to end -------------------------------------------------------------------------------


def test_frames_split_and_pipelined_are_all_answered(start_server: Callable[..., Server]) -> None:
    """Against a real run.py: the actors place the order, the gateway cuts frames from any
    chunking."""
    server = start_server()
    with socket.create_connection((server.host, server.port), timeout=IO) as sock:
        data = b"".join(ping(n) for n in range(200)) + order(200)
        # Odd chunk sizes: headers and bodies split anywhere.
        for start in range(0, len(data), 7):
            sock.sendall(data[start : start + 7])
        replies = [read_reply(sock) for _ in range(201)]
    assert sorted(r["id"] for r in replies if r) == list(range(201))
    assert all(r and r["ok"] for r in replies)
    paid = next(r for r in replies if r and r["id"] == 200)
    assert paid["result"]["status"] == "paid"


# --- half-closed connections ------------------------------------------------------------------


def test_half_closed_connection_gets_its_answers(live: Any) -> None:
    gw = live()
    with gw.connect() as sock:
        sock.sendall(ping(1) + order(2) + ping(3))
        sock.shutdown(socket.SHUT_WR)
        replies = [read_reply(sock) for _ in range(3)]
        assert {r["id"] for r in replies if r} == {1, 2, 3}
        assert read_reply(sock) is None  # then the server closes


def test_a_half_closed_client_with_a_partial_frame_still_gets_its_answers(live: Any) -> None:
    gw = live(frame_timeout=0.3)
    gw.bridge.hold = True
    with gw.connect() as sock:
        sock.sendall(order(1) + ping(2)[:5])  # an order, then a frame that never completes
        sock.shutdown(socket.SHUT_WR)
        gw.bridge.wait_for(lambda b: b.held() == 1)
        gw.advance(1.0)  # the order takes three frame deadlines
        gw.bridge.release()
        reply = read_reply(sock)
        assert reply is not None
        assert reply["id"] == 1
        assert reply["result"]["status"] == "paid"
        assert read_reply(sock) is None


# --- deadlines --------------------------------------------------------------------------------


def test_idle_connection_and_half_sent_frame_are_cut_off(live: Any) -> None:
    gw = live(idle_timeout=0.4, frame_timeout=0.4)
    with gw.connect() as idle, gw.connect() as partial, gw.connect() as busy:
        partial.sendall(ping(1)[:6])  # header and part of the body, then silence
        half_sent = gw.server_side[partial]
        gw.wait_until(lambda: half_sent.receiving_frame)
        for n in range(6):  # a client that keeps talking is never idle
            busy.sendall(ping(n))
            assert read_reply(busy) is not None
            gw.advance(0.1)
        assert is_closed(idle)
        assert is_closed(partial)
        busy.sendall(ping(99))
        reply = read_reply(busy)
        assert reply is not None
        assert reply["result"]["pong"] is True


def test_a_half_sent_frame_is_cut_off_at_the_frame_deadline_not_the_idle_one(live: Any) -> None:
    gw = live(idle_timeout=30.0, frame_timeout=0.5)
    with gw.connect() as sock:
        sock.sendall(struct.pack(">I", 1 << 20) + b"x" * 1000)  # a MiB announced, 1,000 sent
        connection = gw.server_side[sock]
        gw.wait_until(lambda: connection.receiving_frame)
        gw.advance(0.4)
        assert is_open(sock)
        gw.advance(0.2)
        assert is_closed(sock)


def test_a_half_sent_header_is_cut_off_too(live: Any) -> None:
    gw = live(idle_timeout=30.0, frame_timeout=0.5)
    with gw.connect() as sock:
        sock.sendall(b"\x00\x00")  # half a header
        connection = gw.server_side[sock]
        gw.wait_until(lambda: connection.receiving_frame)
        gw.advance(0.6)
        assert is_closed(sock)


def test_request_deadline_answers_unavailable(live: Any) -> None:
    gw = live(request_timeout=0.3)
    gw.bridge.hold = True  # the order never completes
    with gw.connect() as sock:
        sock.sendall(order(1))
        gw.bridge.wait_for(lambda b: b.held() == 1)
        gw.advance(0.2)
        assert is_open(sock)
        gw.advance(0.2)
        reply = read_reply(sock)
        assert reply is not None
        assert reply["error"]["code"] == "unavailable"
        assert "no answer in time" in reply["error"]["message"]
        assert gw.bridge.forgotten == [1]  # a late answer is dropped
        sock.sendall(ping(2))  # the connection is still fine
        assert read_reply(sock) is not None


# --- admission --------------------------------------------------------------------------------


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
        with gw.connect_raw() as extra:
            reply = read_reply(extra)
            assert reply is not None
            assert reply["error"]["code"] == "unavailable"
            assert read_reply(extra) is None
        socks.pop().close()
        gw.wait_until(lambda: len(gw.gateway.connections) == 2)
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
        gw.advance(0.3)
        idle.sendall(ping(5))  # idle, but less long than `oldest`
        assert read_reply(idle) is not None
        busy.sendall(order(6)[:-1])  # a partial frame: never evicted
        partial = gw.server_side[busy]
        gw.wait_until(lambda: partial.receiving_frame)
        gw.advance(EVICT_IDLE_AFTER)  # past it for oldest and idle
        with gw.connect() as newcomer:
            newcomer.sendall(ping(7))
            assert read_reply(newcomer) is not None
            assert is_closed(oldest)  # the one silent the longest
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
    gw.bridge.hold = True
    with gw.connect() as sock:
        sock.sendall(b"".join(order(n) for n in range(12)))
        for _ in range(6):
            gw.bridge.wait_for(lambda b: b.held() >= 2)
            assert gw.bridge.held() == 2  # never more than the cap at once
            gw.bridge.release()
        replies = [read_reply(sock) for _ in range(12)]
    assert sorted(r["id"] for r in replies if r) == list(range(12))
    assert all(r and r["result"]["status"] == "paid" for r in replies)


# --- clients that do not read -----------------------------------------------------------------


def test_one_connection_cannot_queue_its_reads_ahead_of_everyone(live: Any) -> None:
    gw = live(inventory=INVENTORY_EVENTS)
    with gw.connect() as hog, gw.connect() as other:
        hog.sendall(b"".join(read_inventory(n) for n in range(400)))
        first = read_reply(hog)  # its reads are running, 399 more behind this one
        started = time.monotonic()
        other.sendall(frame({"id": 1, "op": "get_order", "args": {"order_id": "nope"}}))
        reply = read_reply(other)
        waited = time.monotonic() - started
        assert reply is not None
        assert reply["error"]["code"] == "not_found"
        assert waited < 1.0, f"a small read waited {waited:.1f}s behind another client's"
        replies = [first] + [read_reply(hog) for _ in range(399)]  # the hog is served, in turn
        assert all(r and r["ok"] for r in replies)


def test_a_client_that_never_reads_its_replies_is_dropped(live: Any) -> None:
    gw = live(write_timeout=1.0, max_connections=1, inventory=INVENTORY_EVENTS)
    with unread_flood(gw) as hog:
        gw.advance(0.9)
        assert len(gw.gateway.connections) == 1
        gw.advance(0.2)  # past the write deadline
        gw.wait_until(lambda: len(gw.gateway.connections) == 0)
        with gw.connect() as newcomer:  # its slot is free again
            newcomer.sendall(ping(1))
            assert read_reply(newcomer) == PONG | {"id": 1}
        hog.settimeout(2)
        with pytest.raises(ConnectionError):
            fill(hog, ping(2))  # reset: the server dropped what it had not delivered


def test_an_evicted_client_that_never_reads_frees_its_slot(live: Any) -> None:
    gw = live(max_connections=1, inventory=INVENTORY_EVENTS)
    with unread_flood(gw):
        gw.advance(EVICT_IDLE_AFTER)  # idle past it, a MiB of replies unread
        with gw.connect() as newcomer:  # evicts it
            newcomer.sendall(ping(1))
            assert read_reply(newcomer) == PONG | {"id": 1}
        gw.wait_until(lambda: len(gw.gateway.connections) == 0)  # the newcomer's close
        with gw.connect() as again:  # the hog did not linger in its slot
            again.sendall(ping(2))
            assert read_reply(again) == PONG | {"id": 2}


def test_a_slow_reader_gets_every_reply(live: Any) -> None:
    """Backpressure pauses a pipelining client that reads slowly; it is not cut off."""
    gw = live(frame_timeout=0.5, write_timeout=5.0, inventory=INVENTORY_EVENTS)
    gw.bridge.hold = True
    sock = gw.connect(rcvbuf=65536)
    with sock:
        data = b"".join(order(n) for n in range(5)) + b"".join(
            read_inventory(n) for n in range(5, 60)
        )
        sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
        sender.start()
        connection = gw.server_side[sock]
        # Done what it can until the client reads: paused, or only the held orders left.
        gw.wait_until(
            lambda: (
                connection.writing_paused
                or (connection.bytes_received == len(data) and connection.in_flight == 5)
            )
        )
        for _ in range(4):  # busy elsewhere: reads nothing for four frame deadlines
            gw.advance(0.5)
        gw.bridge.release()
        replies = [read_reply(sock) for _ in range(60)]
        sender.join(IO)
    assert sorted(r["id"] for r in replies if r) == list(range(60))
    assert [r["result"]["status"] for r in replies if r and r["id"] < 5] == ["paid"] * 5
    assert all(len(r["result"]["events"]) > 300 for r in replies if r and r["id"] >= 5)


def test_a_half_closed_slow_reader_gets_every_reply(live: Any) -> None:
    """Reading slowly, for longer than the fixed 5 s the gateway used to allow a closing
    connection, it still gets every reply: only a client that takes nothing is cut off."""
    gw = live(write_timeout=1.0, write_high_water=64 * 1024)
    sock = gw.connect(rcvbuf=4096)
    with sock:
        count = 6_000  # ~300 KB of replies
        sock.sendall(b"".join(ping(n) for n in range(count)))
        sock.shutdown(socket.SHUT_WR)
        assert gw.clock is not None
        started, got = gw.clock.now(), 0
        while read_reply(sock) is not None:
            got += 1
            if got % 100 == 0:
                gw.advance(0.1)  # ~50 KB/s: slow, but never silent for write_timeout
        assert got == count
        assert gw.clock.now() - started > 5.5  # slower than the old cut-off


def test_requests_refused_at_once_cannot_pile_up_replies(live: Any) -> None:
    """256 KiB of tiny bad frames, each answered with a reply 16 times its size, never read."""
    gw = live()
    with gw.connect(rcvbuf=4096) as sock:
        bad = frame({"op": ""})
        data = bad * (256 * 1024 // len(bad))
        sock.sendall(data)
        connection = gw.server_side[sock]
        # Until it stopped reading them, or has read them all.
        gw.wait_until(lambda: connection.writing_paused or connection.bytes_received == len(data))
        held = gw.on_loop(lambda: connection.unsent_bytes)
        assert held < 2 * 1024 * 1024, f"{held} bytes of replies held for one connection"


def test_a_client_not_reading_does_not_hold_up_other_clients_audits(live: Any) -> None:
    gw = live(inventory=INVENTORY_EVENTS)
    with gw.connect(rcvbuf=4096) as hog, gw.connect() as other:
        hog.sendall(
            b"".join(read_inventory(n) for n in range(300)) + frame({"id": 300, "op": "audit"})
        )
        connection = gw.server_side[hog]
        # Its replies pile up unread; its audit waits for its read slots.
        gw.wait_until(lambda: connection.writing_paused)
        started = time.monotonic()
        other.settimeout(5.0)
        other.sendall(frame({"id": 1, "op": "audit"}))
        reply = read_reply(other)
        assert reply is not None
        assert reply["result"]["ok"] is True
        assert time.monotonic() - started < 2.0


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


# --- draining ---------------------------------------------------------------------------------


def test_drain_works_when_every_slot_is_taken(live: Any) -> None:
    """Draining is the operator's request: it does not queue behind clients' orders."""
    gw = live(fake_clock=False, max_in_flight=1, saturated_wait=0.2)
    gw.bridge.hold = True
    with gw.connect() as sock:
        sock.sendall(order(1))  # holds the only slot until released
        gw.bridge.wait_for(lambda b: b.held() == 1)
        drain = asyncio.run_coroutine_threadsafe(gw.gateway.drain(10.0), gw.loop)
        gw.bridge.wait_for(lambda b: any(isinstance(m, Drain) for m in b.seen))
        assert not drain.done()  # the manager says one order is in flight
        gw.bridge.release()
        assert drain.result(IO) == 0  # waited for the order, then stopped the manager
        assert [m.final for m in gw.bridge.seen if isinstance(m, Drain)][-1] is True
        reply = read_reply(sock)
        assert reply is not None
        assert reply["result"]["status"] == "paid"
        assert sum(isinstance(m, PlaceOrder) for m in gw.bridge.seen) == 1


def test_drain_keeps_its_deadline_when_the_actors_do_not_answer(live: Any) -> None:
    """Review finding: each drain request waited the full request timeout (60 s here)."""
    gw = live(fake_clock=False, request_timeout=60.0)
    gw.bridge.silent = True  # the actor system is gone: nothing will answer
    started = time.monotonic()
    drain = asyncio.run_coroutine_threadsafe(gw.gateway.drain(1.0), gw.loop)
    assert drain.result(IO) == 0
    assert time.monotonic() - started < 5.0
