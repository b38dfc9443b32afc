"""Hostile input at the client interface (DESIGN.md section 6), against a real run.py.

A mutation engine throws random, truncated, oversized, non-map, wrongly typed, deeply nested,
extension-typed and pickled frames at the gateway over several connections; after every batch the
server must still answer `ping`, take an order to `paid`, and hold its memory steady. Around it:
a hypothesis test of single requests, proof that a pickle is never unpickled, idle and half-open
connections that must not delay a real client, loopback-only listening sockets, and the admin
token. The regression tests at the end pin the server bugs this suite found (all fixed).

`test_fuzz_frames_short` runs in `make test` (FUZZ_FRAMES, default 3,000 frames);
`test_fuzz_frames_long` is marked slow (FUZZ_FRAMES, default 100,000 frames).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from client import Client, ClientError
from messages.base import Money
from messages.wire import MAX_FRAME
from runtime.proc_tree import all_pids, descendants, listening_tcp, socket_inodes, status_kib
from tests.conftest import ROOT, Server, new_id

log = logging.getLogger(__name__)

KNOWN_CODES = frozenset(
    {"invalid", "unknown_op", "not_found", "conflict", "too_large", "forbidden", "unavailable"}
)
OPS = ("ping", "place_order", "get_order", "read_stream", "stock", "set_stock", "audit")
SKUS = tuple(f"SKU-{n:03d}" for n in range(1, 11))
# The health check orders a product the fuzzer never names, so fuzzed set_stock and orders
# cannot starve it and turn a healthy server into a failed check.
HEALTH_SKU = "HEALTH-1"
TOKENS = ("tok_visa", "tok_chargeDeclined", "tok_error", "tok_crash")
RSS_GROWTH_LIMIT_KIB = 50 * 1024
IO_TIMEOUT = 30.0
_MONEY = TypeAdapter(Money)


# --- raw wire access -----------------------------------------------------------------------------


def frame_of(body: bytes) -> bytes:
    """A well-framed body: 4-byte big-endian length, then the bytes."""
    return struct.pack(">I", len(body)) + body


class RawConnection:
    """A bare socket to the gateway: send any bytes, read reply frames, see the server close."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT)

    def send(self, data: bytes) -> None:
        """Write all of `data`."""
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes | None:
        chunks: list[bytes] = []
        got = 0
        while got < n:
            chunk = self.sock.recv(min(n - got, 1 << 20))
            if not chunk:
                if got == 0:
                    return None
                raise AssertionError(f"server closed mid-frame ({got}/{n} bytes)")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def reply(self) -> dict[str, Any] | None:
        """The next reply frame, decoded; None when the server closed the connection."""
        header = self._recv_exact(4)
        if header is None:
            return None
        (length,) = struct.unpack(">I", header)
        assert length <= MAX_FRAME, f"reply frame of {length} bytes"
        body = self._recv_exact(length)
        assert body is not None, "server closed between header and body"
        reply = msgpack.unpackb(body, raw=False, strict_map_key=False)
        assert isinstance(reply, dict), f"reply is not a map: {reply!r}"
        return reply

    def expect_reply(self) -> dict[str, Any]:
        """The next reply frame; fails if the server closed instead."""
        reply = self.reply()
        assert reply is not None, "server closed the connection instead of replying"
        return reply

    def expect_closed(self) -> None:
        """The server closes the connection without sending anything more."""
        rest = self.sock.recv(1 << 16)
        assert rest == b"", f"expected the server to close, got {rest[:200]!r}"

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def exchange(server: Server, body: bytes) -> dict[str, Any]:
    """Send one framed body on a fresh connection and return its reply."""
    conn = RawConnection(server)
    try:
        conn.send(frame_of(body))
        return conn.expect_reply()
    finally:
        conn.close()


def check_reply(reply: dict[str, Any]) -> str:
    """Assert `reply` is a well-formed reply with no `internal` error; returns `ok` or the code."""
    assert reply.get("ok") in (True, False), f"reply without ok: {reply!r}"
    if reply["ok"]:
        assert "result" in reply, f"ok reply without result: {reply!r}"
        return "ok"
    error = reply.get("error")
    assert isinstance(error, dict), f"error reply without an error map: {reply!r}"
    code = error.get("code")
    assert code != "internal", f"the server raised on a client frame: {reply!r}"
    assert code in KNOWN_CODES, f"unknown error code: {reply!r}"
    return str(code)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    kib = status_kib(pid, "VmRSS")
    assert kib is not None, f"no VmRSS for {pid}"
    return kib


def line(product: str, quantity: Any = 1, unit_price: Any = "9.99") -> dict[str, Any]:
    """One order line as the wire carries it."""
    return {"product_id": product, "quantity": quantity, "unit_price": unit_price}


def assert_healthy(server: Server) -> None:
    """The server answers ping and takes a fresh order to `paid`."""
    with Client(server.host, server.port, timeout=IO_TIMEOUT) as client:
        assert client.ping()["pong"] is True
        order = client.place_order(new_id("health"), "health", [line(HEALTH_SKU, 1, "1.00")])
        assert order["status"] == "paid", order


# --- the mutation engine -------------------------------------------------------------------------


class _Mkdir:
    """Unpickling this calls os.mkdir(path): a visible trace if anything ever unpickles it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@dataclass(frozen=True)
class Frame:
    """Bytes for the wire and what the server must do with them."""

    data: bytes
    kind: str
    # None: one reply; "too_large": a too_large reply then the server closes;
    # "truncated": no reply, the connection waits for bytes that never come.
    terminal: str | None = None
    req_id: int | None = None  # an id the reply must echo (requests sent unmutated)


# msgpack type bytes worth planting: nil/bool, containers with 32-bit lengths, ext, fixmaps...
_INTERESTING = bytes.fromhex(
    "00 7f 80 8f 90 9f a0 bf c0 c1 c2 c3 c4 c6 c7 c9 ca cb cf d3 d4 d8 d9 db dc dd de df ff"
)


@dataclass
class FrameFuzzer:
    """Generates hostile frames from a seed; fast enough for 100,000 frames."""

    seed: int
    trace_dir: Path
    rng: random.Random = field(init=False)
    next_id: int = 1

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- values ---------------------------------------------------------------------------------

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def junk_value(self, depth: int = 0) -> Any:
        """Any msgpack value of the wrong kind for most fields."""
        r = self.rng
        pick = r.randrange(14 if depth < 3 else 10)
        values: list[Callable[[], Any]] = [
            lambda: None,
            lambda: r.choice((True, False)),
            lambda: r.choice((0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 1_000_001)),
            lambda: r.randint(-(2**40), 2**40),
            lambda: r.choice((0.0, -0.0, 1.5, 1e308, float("inf"), float("nan"))),
            lambda: r.choice(("", "x", "SKU-001", "tok_visa", "é" * 3, "\x00", "a" * 300)),
            lambda: r.randbytes(r.randrange(0, 40)),
            lambda: "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(20))),
            lambda: msgpack.Timestamp(r.randrange(2**32), r.randrange(10**9)),
            lambda: r.choice(("1e999999", "NaN", "-1", "0.00001", "9" * 40, "1_0", " 1 ")),
            lambda: [self.junk_value(depth + 1) for _ in range(r.randrange(4))],
            lambda: {
                r.choice(("product_id", "quantity", "x", "")): self.junk_value(depth + 1)
                for _ in range(r.randrange(4))
            },
            lambda: [line(r.choice(SKUS), r.randint(1, 3))] * r.randrange(3),
            lambda: {"admin_token": self.junk_value(depth + 1)},
        ]
        return values[pick]()

    def good_args(self, op: str) -> dict[str, Any]:
        """Arguments the server accepts for `op` (orders stay small and distinct per product)."""
        r = self.rng
        if op == "place_order":
            products = r.sample(SKUS, r.randint(1, 3))
            wait = r.random() < 0.5
            tokens = TOKENS if wait else (*TOKENS, "tok_timeout", "tok_late")
            return {
                "order_id": f"fz-{self.seed}-{r.randrange(60)}",  # reused: conflicts happen
                "customer_id": f"c{r.randrange(5)}",
                "lines": [
                    line(p, r.randint(1, 3), str(Decimal(r.randint(0, 99_999)) / 100))
                    for p in products
                ],
                "payment_method": r.choice(tokens),
                "wait": wait,
            }
        if op == "get_order":
            return {"order_id": r.choice((f"fz-{self.seed}-{r.randrange(60)}", "nope"))}
        if op == "read_stream":
            stream = r.choice((f"order-fz-{self.seed}-{r.randrange(60)}", "inventory", "x"))
            return {"stream": stream, "from_version": r.randrange(5)}
        if op == "stock":
            return {"product_ids": r.sample(SKUS, r.randint(0, 3))}
        if op == "set_stock":
            return {"product_id": r.choice(SKUS), "on_hand": r.randint(500, 5000)}
        return {}

    def wrong_args(self, op: str) -> dict[str, Any]:
        """Arguments of `op` with some fields swapped for junk, dropped, or added."""
        r = self.rng
        args = self.good_args(op)
        for _ in range(r.randint(1, 3)):
            action = r.randrange(5)
            if action == 0 and args:
                args[r.choice(list(args))] = self.junk_value()
            elif action == 1 and args:
                del args[r.choice(list(args))]
            elif action == 2:
                args[r.choice(("extra", "admin_token", "wait", "id", "op"))] = self.junk_value()
            elif action == 3 and isinstance(args.get("lines"), list) and args["lines"]:
                lines = args["lines"]
                target = r.randrange(len(lines))
                key = r.choice(("product_id", "quantity", "unit_price", "bogus"))
                if isinstance(lines[target], dict):
                    lines[target] = {**lines[target], key: self.junk_value()}
            elif action == 4:
                args = {"product_ids": [self.junk_value() for _ in range(r.randrange(5))]}
        return args

    def request(self, good: bool = True) -> dict[str, Any]:
        """A request map (its `id` unique)."""
        r = self.rng
        op = r.choices(OPS, weights=(10, 8, 6, 6, 6, 3, 0.3 if good else 2))[0]
        args = self.good_args(op) if good else self.wrong_args(op)
        return {"id": self._id(), "op": op, "args": args}

    # -- frames ---------------------------------------------------------------------------------

    def _mutate(self, body: bytes) -> bytes:
        r = self.rng
        data = bytearray(body)
        for _ in range(r.randint(1, 4)):
            if not data:
                data += r.randbytes(r.randint(1, 8))
                continue
            i = r.randrange(len(data))
            action = r.randrange(7)
            if action == 0:
                data[i] ^= 1 << r.randrange(8)
            elif action == 1:
                data[i] = r.choice(_INTERESTING)
            elif action == 2:
                del data[i : i + r.randint(1, 8)]
            elif action == 3:
                data[i:i] = r.randbytes(r.randint(1, 8))
            elif action == 4:
                data[i:i] = data[i : i + r.randint(1, 16)]
            elif action == 5:
                del data[i:]
            else:
                other = msgpack.packb(self.request(good=r.random() < 0.5))
                j = r.randrange(len(other))
                data[i:] = other[j:]
        return bytes(data)

    def _nested(self) -> bytes:
        r = self.rng
        depth = r.choice((100, 1_000, 10_000, 50_000))
        kind = r.randrange(3)
        if kind == 0:  # 10,000 nested arrays
            return b"\x91" * depth + b"\xc0"
        if kind == 1:  # nested maps
            return b"\x81\xa1k" * depth + b"\xc0"
        inner = b"\x91" * min(depth, 2_000) + b"\xc0"  # nesting inside a real request's args
        head = msgpack.packb({"id": self._id(), "op": r.choice(OPS)})
        return b"\x83" + head[1:] + b"\xa4args" + b"\x81\xa5lines" + inner

    def _ext(self) -> bytes:
        r = self.rng
        code = r.choice((-1, -2, 0, 1, 42, 127, -128))
        raw = r.choice(
            (
                bytes([0xD4, code & 0xFF, 0]),  # fixext 1
                bytes([0xD6, code & 0xFF]) + r.randbytes(4),  # fixext 4 (timestamp 32)
                bytes([0xD7, code & 0xFF]) + r.randbytes(8),  # fixext 8 (timestamp 64)
                bytes([0xC7, 12, code & 0xFF]) + r.randbytes(12),  # ext 8 (timestamp 96)
                bytes([0xC9, 0xFF, 0xFF, 0xFF, 0xFF, code & 0xFF]),  # ext 32 claiming 4 GiB
            )
        )
        where = r.randrange(3)
        if where == 0:
            return raw
        if where == 1:
            return b"\x83\xa2id" + raw + b"\xa2op\xa4ping\xa4args\x80"
        return b"\x83\xa2id\x01\xa2op\xa4ping\xa4args\x81\xa1x" + raw

    def _pickle(self) -> bytes:
        r = self.rng
        payload: object = r.choice(
            (
                {"id": 1, "op": "ping", "args": {}},
                _Mkdir(str(self.trace_dir / f"fuzz-pwned-{self.seed}")),
                ("ping", {}),
            )
        )
        data = pickle.dumps(payload, protocol=r.randint(0, pickle.HIGHEST_PROTOCOL))
        if r.random() < 0.5:
            return data
        return msgpack.packb({"id": self._id(), "op": "ping", "args": {"blob": data}})

    def _non_map(self) -> bytes:
        r = self.rng
        value: object = r.choice(
            ([1, "ping", {}], 7, -7, "ping", None, True, 1.5, b"bin", [], [[{}]], 2**64 - 1)
        )
        return msgpack.packb(value)

    def _bad_envelope(self) -> bytes:
        r = self.rng
        request: dict[Any, Any] = {
            "id": r.choice((self.junk_value(), self._id())),
            "op": r.choice((self.junk_value(), r.choice(OPS), "PING", "ping\x00", "__init__")),
            "args": r.choice((self.junk_value(), {}, None)),
        }
        if r.random() < 0.3:
            del request[r.choice(list(request))]
        if r.random() < 0.2:
            request[r.choice((1, b"op", 2.5))] = "ping"  # non-str keys (refused as strict keys)
        return msgpack.packb(request, use_bin_type=r.random() < 0.8)

    def _huge(self) -> bytes:
        r = self.rng
        size = r.choice((10_000, 100_000, 900_000))
        kind = r.randrange(5)
        if kind == 0:
            request = {"id": self._id(), "op": "get_order", "args": {"order_id": "a" * size}}
        elif kind == 1:
            args = self.good_args("place_order")
            args["customer_id"] = r.choice(("x", "é")) * (size // 2)
            request = {"id": self._id(), "op": "place_order", "args": args}
        elif kind == 2:
            # Megabyte-sized line lists have their own regression test below.
            args = self.good_args("place_order")
            count = r.choice((101, 500, 2_000))
            args["lines"] = [line(f"P{i}", 1, "1") for i in range(count)]
            request = {"id": self._id(), "op": "place_order", "args": args}
        elif kind == 3:
            ids = [f"SKU-{i}" for i in range(r.choice((1_001, 2_000)))]
            request = {"id": self._id(), "op": "stock", "args": {"product_ids": ids}}
        else:
            request = {"id": self._id(), "op": "ping", "args": {}, "pad": r.randbytes(size)}
        return msgpack.packb(request)

    def _boundary(self) -> bytes:
        r = self.rng
        return r.choice(
            (
                b"",
                b"\xc1",  # never-used type byte
                b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion items
                b"\xdf\xff\xff\xff\xff",  # map claiming 4 billion pairs
                b"\xdb\xff\xff\xff\xffabc",  # str claiming 4 GiB
                b"\xc6\xff\xff\xff\xff",  # bin claiming 4 GiB
                b"\xa3\xff\xfe\xfd",  # str that is not UTF-8
                msgpack.packb({"id": 1, "op": "ping"}) + b"\x00",  # trailing bytes
                b"\x80" + r.randbytes(MAX_FRAME - 1),  # exactly the limit
            )
        )

    def frame(self) -> Frame:
        r = self.rng
        kind = r.choices(
            (
                "valid",
                "wrong_args",
                "mutated",
                "random",
                "non_map",
                "envelope",
                "nested",
                "ext",
                "pickle",
                "huge",
                "boundary",
                "too_large",
                "truncated",
            ),
            weights=(12, 18, 25, 8, 6, 8, 2, 4, 3, 1.5, 0.5, 1, 1),
        )[0]
        if kind == "valid":
            request = self.request(good=True)
            return Frame(frame_of(msgpack.packb(request)), kind, req_id=request["id"])
        if kind == "wrong_args":
            request = self.request(good=False)
            return Frame(frame_of(msgpack.packb(request)), kind, req_id=request["id"])
        if kind == "too_large":
            length = r.choice((MAX_FRAME + 1, 2 * MAX_FRAME, 2**31, 2**32 - 1))
            tail = r.randbytes(r.randrange(0, 64))
            return Frame(struct.pack(">I", length) + tail, kind, terminal="too_large")
        if kind == "truncated":
            body = msgpack.packb(self.request(good=r.random() < 0.5))
            cut = r.randrange(len(body))
            data = r.choice((struct.pack(">I", len(body))[: r.randrange(1, 4)], frame_of(body)))
            return Frame(data[: 4 + cut] if len(data) > 4 else data, kind, terminal="truncated")
        makers: dict[str, Callable[[], bytes]] = {
            "mutated": lambda: self._mutate(msgpack.packb(self.request(good=r.random() < 0.5))),
            "random": lambda: r.randbytes(r.choice((1, 2, 8, 64, 512, 4096))),
            "non_map": self._non_map,
            "envelope": self._bad_envelope,
            "nested": self._nested,
            "ext": self._ext,
            "pickle": self._pickle,
            "huge": self._huge,
            "boundary": self._boundary,
        }
        return Frame(frame_of(makers[kind]()), kind)


# --- the fuzz driver -----------------------------------------------------------------------------


@dataclass
class FuzzStats:
    """What a fuzz run did."""

    frames: int = 0
    replies: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    rss_kib: list[int] = field(default_factory=list)


class _Pool:
    """A few open connections; a closed one is replaced by a new one."""

    def __init__(self, server: Server, size: int, stats: FuzzStats) -> None:
        self.server = server
        self.stats = stats
        self.conns: list[RawConnection] = []
        for _ in range(size):
            self.conns.append(self._open())

    def _open(self) -> RawConnection:
        self.stats.connections += 1
        return RawConnection(self.server)

    def replace(self, index: int) -> None:
        self.conns[index].close()
        self.conns[index] = self._open()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def _send_window(conn: RawConnection, window: list[Frame], stats: FuzzStats) -> None:
    """Pipeline a window of well-framed frames, then read exactly one reply each."""
    conn.send(b"".join(f.data for f in window))
    got: Counter[Any] = Counter()
    for _ in window:
        reply = conn.expect_reply()
        stats.replies[check_reply(reply)] += 1
        got[reply.get("id")] += 1
    wanted = Counter(f.req_id for f in window if f.req_id is not None)
    missing = wanted - got
    assert not missing, f"no reply for request ids {sorted(missing)}"


def _send_terminal(conn: RawConnection, frame: Frame, stats: FuzzStats) -> None:
    """A frame after which the connection is done: check how the server ends it."""
    conn.send(frame.data)
    if frame.terminal == "too_large":
        reply = conn.expect_reply()
        assert check_reply(reply) == "too_large", reply
        stats.replies["too_large"] += 1
        conn.expect_closed()
    else:
        # The server waits for the rest of the frame; end the stream: it must close quietly.
        conn.sock.shutdown(socket.SHUT_WR)
        conn.expect_closed()


def run_fuzz(server: Server, total: int, seed: int, trace_dir: Path) -> FuzzStats:
    """Send `total` hostile frames in batches; check health and RSS after each batch."""
    fuzzer = FrameFuzzer(seed, trace_dir)
    stats = FuzzStats()
    batches = max(5, min(40, total // 250))
    per_batch = -(-total // batches)
    started = time.monotonic()
    pool = _Pool(server, 4, stats)
    try:
        while stats.frames < total:
            batch_end = min(total, stats.frames + per_batch)
            window: list[Frame] = []
            index = fuzzer.rng.randrange(len(pool.conns))
            while stats.frames < batch_end:
                frame = fuzzer.frame()
                stats.frames += 1
                stats.kinds[frame.kind] += 1
                if frame.terminal is None:
                    window.append(frame)
                    if len(window) < 32 and stats.frames < batch_end:
                        continue
                if window:
                    _send_window(pool.conns[index], window, stats)
                    window = []
                if frame.terminal is not None:
                    _send_terminal(pool.conns[index], frame, stats)
                    pool.replace(index)
                index = fuzzer.rng.randrange(len(pool.conns))
            assert_healthy(server)
            stats.rss_kib.append(rss_kib(server.proc.pid))
    finally:
        pool.close()
    elapsed = time.monotonic() - started
    log.info(
        "fuzz seed=%d: %d frames in %.1fs over %d connections; replies %s; kinds %s; "
        "RSS KiB per batch %s",
        seed,
        stats.frames,
        elapsed,
        stats.connections,
        dict(stats.replies),
        dict(stats.kinds),
        stats.rss_kib,
    )
    return stats


def check_memory(stats: FuzzStats) -> None:
    """After the warm-up batch, RSS may not grow by more than the limit."""
    baseline, *rest = stats.rss_kib
    growth = max(rest, default=baseline) - baseline
    assert growth <= RSS_GROWTH_LIMIT_KIB, f"RSS grew {growth} KiB: {stats.rss_kib}"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One run.py for the module; it must still shut down cleanly at the end."""
    server = Server(tmp_path_factory.mktemp("hostile"))
    try:
        with Client(server.host, server.port, timeout=IO_TIMEOUT) as client:
            client.add_product(HEALTH_SKU, 1_000_000)
        yield server
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_fuzz_frames_short(fuzz_server: Server, tmp_path: Path) -> None:
    """FUZZ_FRAMES hostile frames (default 3,000): the server stays correct and steady."""
    total = int(os.environ.get("FUZZ_FRAMES", "3000"))
    stats = run_fuzz(fuzz_server, total, seed=1, trace_dir=tmp_path)
    assert stats.frames == total
    check_memory(stats)
    assert not list(tmp_path.iterdir()), "a fuzzed pickle was unpickled"


@pytest.mark.slow
def test_fuzz_frames_long(fuzz_server: Server, tmp_path: Path) -> None:
    """The long run (make fuzz): FUZZ_FRAMES hostile frames, default 100,000."""
    total = int(os.environ.get("FUZZ_FRAMES", "100000"))
    stats = run_fuzz(fuzz_server, total, seed=2, trace_dir=tmp_path)
    assert stats.frames == total
    check_memory(stats)
    assert not list(tmp_path.iterdir()), "a fuzzed pickle was unpickled"


# --- one request at a time, generated by hypothesis ----------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(0, 3), inner, max_size=4)
    ),
    max_leaves=12,
)
_prices = (
    st.decimals(min_value=0, max_value=10**6, places=2).map(str)
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=True)
    | st.sampled_from(("1e3", "-0", "1E+5", "0.00001", "NaN", "Infinity", "", "x"))
    | _values
)
_lines = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "product_id": st.sampled_from(SKUS) | st.text(max_size=70) | _values,
            "quantity": st.integers(-2, 1_000_001) | _values,
            "unit_price": _prices,
            "extra": _values,
        },
    ),
    max_size=105,
)
_ARGS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "ping": st.fixed_dictionaries({}, optional={"x": _values}),
    "audit": st.just({}),
    "place_order": st.fixed_dictionaries(
        {},
        optional={
            "order_id": st.from_regex(r"[A-Za-z0-9_.:-]{1,130}", fullmatch=True) | _values,
            "customer_id": st.text(max_size=130) | _values,
            "lines": _lines | _values,
            "payment_method": st.sampled_from(TOKENS) | st.text(max_size=70) | _values,
            "wait": st.booleans() | _values,
        },
    ),
    "get_order": st.fixed_dictionaries({"order_id": st.text(max_size=130) | _values}),
    "read_stream": st.fixed_dictionaries(
        {},
        optional={
            "stream": st.text(max_size=210) | _values,
            "from_version": st.integers(-(2**63), 2**64 - 1) | _values,
        },
    ),
    "stock": st.fixed_dictionaries(
        {}, optional={"product_ids": st.lists(st.sampled_from(SKUS) | st.text(), max_size=5)}
    ),
    "set_stock": st.fixed_dictionaries(
        {},
        optional={
            "product_id": st.sampled_from(("FZ-HYP-1", "FZ-HYP-2")) | st.text() | _values,
            "on_hand": st.integers(-1, 2**40) | _values,
            "admin_token": _values,
        },
    ),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[Any, Any]:
    """A request map: usually a known op with typed-but-hostile args, sometimes anything."""
    op = draw(st.sampled_from(OPS) | st.text(max_size=20) | _values)
    known_op = isinstance(op, str) and op in _ARGS
    args = draw(_ARGS[op]) if isinstance(op, str) and op in _ARGS else draw(_values)
    request: dict[Any, Any] = {"id": draw(st.integers(-(2**63), 2**64 - 1) | _values), "op": op}
    if known_op or draw(st.booleans()):
        request["args"] = args
    return request


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(request=requests())
def test_each_generated_request_gets_a_known_reply(
    fuzz_server: Server, request: dict[Any, Any]
) -> None:
    """Every request gets exactly one well-formed reply with a known code, never `internal`."""
    body = msgpack.packb(request, use_bin_type=True)
    assume(len(body) <= MAX_FRAME)
    reply = exchange(fuzz_server, body)
    check_reply(reply)


# --- regressions: bugs this suite found, fixed in the server --------------------------------------


def test_repeated_product_over_the_quantity_limit_is_refused(
    start_server: Callable[..., Server],
) -> None:
    """Two lines of one product, 1,000,000 units each: a reply, and the server keeps working."""
    server = start_server()
    try:
        with Client(server.host, server.port, timeout=5) as client:
            poison = [line("SKU-001", 1_000_000, "1"), line("SKU-001", 1_000_000, "1")]
            with pytest.raises(ClientError) as refused:
                client.place_order(new_id(), "c", poison, wait=False)
            assert refused.value.code == "invalid"
        with Client(server.host, server.port, timeout=5) as client:
            order = client.place_order(new_id(), "c", [line("SKU-002", 1, "1.00")])
            assert order["status"] == "paid"
    finally:
        # SIGTERM would wait out a drain that never ends under the bug.
        server.kill()


def test_order_total_over_the_money_limit_is_refused(fuzz_server: Server) -> None:
    """1,000,000 units at 99,999,999.9999: refused as `invalid`, not an internal error."""
    body = msgpack.packb(
        {
            "id": 1,
            "op": "place_order",
            "args": {
                "order_id": new_id(),
                "customer_id": "c",
                "lines": [line("SKU-003", 1_000_000, "99999999.9999")],
                "wait": False,
            },
        }
    )
    assert check_reply(exchange(fuzz_server, body)) == "invalid"


def test_read_stream_from_a_huge_version_is_refused(fuzz_server: Server) -> None:
    """from_version 2**64 - 1 gets `invalid` or `not_found`, not an internal error."""
    body = msgpack.packb(
        {"id": 1, "op": "read_stream", "args": {"stream": "inventory", "from_version": 2**64 - 1}}
    )
    assert check_reply(exchange(fuzz_server, body)) in {"invalid", "not_found", "ok"}


def test_a_huge_line_list_does_not_stall_other_clients(start_server: Callable[..., Server]) -> None:
    """While a 1 MiB line list is refused, pings on another connection stay prompt (< 2 s)."""
    server = start_server()
    count = (MAX_FRAME - 100) // 2
    args = {"order_id": new_id(), "customer_id": "c", "lines": [{}] * count}
    body = msgpack.packb({"id": 1, "op": "place_order", "args": args})
    hostile = RawConnection(server)
    slowest = 0.0
    try:
        with Client(server.host, server.port, timeout=60) as client:
            hostile.send(frame_of(body))
            deadline = time.monotonic() + 60
            while not select.select([hostile.sock], [], [], 0)[0]:
                assert time.monotonic() < deadline, "the huge frame was never answered"
                started = time.monotonic()
                client.ping()
                slowest = max(slowest, time.monotonic() - started)
            assert check_reply(hostile.expect_reply()) == "invalid"
    finally:
        hostile.close()
    assert slowest < 2.0, f"a ping waited {slowest:.1f}s behind one hostile frame"


# --- pickles are never unpickled -----------------------------------------------------------------


def test_pickle_payloads_are_never_unpickled(fuzz_server: Server, tmp_path: Path) -> None:
    """A pickle that would mkdir a trace, as a frame body, a bin value and a string: `invalid`."""
    trace = tmp_path / "pwned"
    payloads = [
        pickle.dumps(_Mkdir(str(trace)), protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)
    ]
    # Sanity: these payloads do leave the trace when unpickled (in a throwaway directory).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Mkdir(str(probe))))  # our own payload, on purpose
    assert probe.is_dir()
    probe.rmdir()

    bodies: list[bytes] = []
    for payload in payloads:
        text = payload.decode("latin-1")
        bodies += [
            payload,  # the frame body itself
            msgpack.packb({"id": 1, "op": "ping", "args": {"x": payload}}),  # bin in args
            msgpack.packb({"id": 2, "op": "get_order", "args": {"order_id": payload}}),
            msgpack.packb({"id": 3, "op": "get_order", "args": {"order_id": text}}),  # string
            msgpack.packb({"id": 4, "op": "stock", "args": {"product_ids": [text]}}),
            msgpack.packb(
                {
                    "id": 5,
                    "op": "place_order",
                    "args": {
                        "order_id": new_id(),
                        "customer_id": "c",
                        "lines": [line("SKU-004", 1, payload)],
                    },
                }
            ),
        ]
    conn = RawConnection(fuzz_server)
    try:
        for body in bodies:
            conn.send(frame_of(body))
            reply = conn.expect_reply()
            assert check_reply(reply) == "invalid", (body[:60], reply)
    finally:
        conn.close()
    # Any unpickling would have happened while handling those frames; round trips after them
    # make sure the server has finished with every one before looking for the trace.
    with Client(fuzz_server.host, fuzz_server.port, timeout=IO_TIMEOUT) as client:
        for _ in range(20):
            client.ping()
        client.stock(["SKU-004"])
    assert not trace.exists(), "a client pickle was unpickled"


# --- idle and half-open connections --------------------------------------------------------------


def test_idle_and_half_open_connections_do_not_delay_an_order(
    start_server: Callable[..., Server],
) -> None:
    """200 sockets that say nothing, half a header, or a header then stop; an order still flows."""
    server = start_server()
    with contextlib.ExitStack() as stack:
        for n in range(200):
            sock = stack.enter_context(socket.create_connection((server.host, server.port), 10))
            if n % 4 == 1:
                sock.sendall(b"\x00\x00")  # half a header
            elif n % 4 == 2:
                sock.sendall(struct.pack(">I", 100))  # a header, no body
            elif n % 4 == 3:
                sock.sendall(struct.pack(">I", 100) + b"\x83\xa2id")  # part of a body
        client = stack.enter_context(Client(server.host, server.port, timeout=IO_TIMEOUT))
        started = time.monotonic()
        order = client.place_order(new_id(), "c", [line("SKU-005", 1, "2.50")])
        elapsed = time.monotonic() - started
        assert order["status"] == "paid"
        assert elapsed < 5.0, f"the order took {elapsed:.1f}s with 200 idle connections open"
        assert client.ping()["pong"] is True


# --- listening sockets ---------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """`pid` and every process below it."""
    return {pid, *descendants(pid)}


def _listening_ss(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of `pids`, from `ss -ltnpH`."""
    out = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    found = set()
    for row in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", row)}
        if owners & pids:
            local = row.split()[3]
            host, port = local.rsplit(":", 1)
            found.add((host.strip("[]").split("%")[0], int(port)))
    return found


def _listening_proc(pids: set[int]) -> set[tuple[str, int]]:
    """The same from /proc/net/tcp{,6} and the processes' socket inodes (no `ss` needed)."""
    return listening_tcp(pids)


def service_pids(pid: int) -> set[int]:
    """`pid`, its descendants, and every process sharing a socket with them.

    Thespian's TCP base daemonizes its admin and actor processes (they are re-parented to
    init), so they are found by the socket they all inherited from run.py instead.
    """
    pids = _descendants(pid)
    while True:
        inodes = set().union(*(socket_inodes(p) for p in pids))
        sharing = {p for p in all_pids() if p not in pids and socket_inodes(p) & inodes}
        if not sharing:
            return pids
        for other in sharing:
            pids |= _descendants(other)


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """Listening TCP sockets of the run.py process `pid` and the processes it started."""
    pids = service_pids(pid)
    return _listening_ss(pids) if shutil.which("ss") else _listening_proc(pids)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


LOOPBACK = {"127.0.0.1", "::1"}


@pytest.mark.parametrize(
    "base",
    [
        "simple",
        pytest.param("queue", marks=pytest.mark.process),
        pytest.param("tcp", marks=pytest.mark.process),
    ],
)
def test_only_loopback_sockets_listen(start_server: Callable[..., Server], base: str) -> None:
    """Every listening socket of run.py and its children is on loopback; on the simple and
    queue bases the gateway's and the HTTP API's ports are the only ones."""
    # Not Thespian's default admin port 1900: other test runs on this machine may hold it.
    extra = ("--admin-port", str(_free_port())) if base == "tcp" else ()
    server = start_server(base=base, extra=extra)
    sockets = listening_sockets(server.proc.pid)
    assert (server.host, server.port) in sockets, sockets
    exposed = {s for s in sockets if s[0] not in LOOPBACK}
    assert not exposed, f"listening beyond loopback: {sorted(exposed)}"
    if base in ("simple", "queue"):
        assert sockets == _served(server), sockets


def test_proc_and_ss_agree_on_listening_sockets(fuzz_server: Server) -> None:
    """The /proc fallback parser finds what `ss` finds (so either can be trusted)."""
    if not shutil.which("ss"):
        pytest.skip("ss is not installed")
    pids = service_pids(fuzz_server.proc.pid)
    assert _listening_proc(pids) == _listening_ss(pids) == _served(fuzz_server)


def _served(server: Server) -> set[tuple[str, int]]:
    """The sockets run.py is meant to listen on: the gateway's and the HTTP API's."""
    http = server.http_address
    return {(server.host, server.port), *([http] if http is not None else [])}


# --- the admin token -----------------------------------------------------------------------------


def test_admin_ops_need_the_token(start_server: Callable[..., Server]) -> None:
    """With --admin-token, set_stock and system_info are `forbidden` without the right token."""
    server = start_server(extra=("--admin-token", "s3cret"))
    with Client(server.host, server.port, timeout=IO_TIMEOUT) as client:
        for token in (None, "", "wrong", "s3cret ", "S3CRET"):
            args: dict[str, Any] = {"product_id": "SKU-006", "on_hand": 5}
            if token is not None:
                args["admin_token"] = token
            with pytest.raises(ClientError) as refused:
                client.call("set_stock", args)
            assert refused.value.code == "forbidden", token
            with pytest.raises(ClientError) as refused:
                client.call("system_info", {} if token is None else {"admin_token": token})
            assert refused.value.code == "forbidden", token
        assert client.stock(["SKU-006"])["SKU-006"]["on_hand"] == 1000
        stock = client.call(
            "set_stock", {"product_id": "SKU-006", "on_hand": 5, "admin_token": "s3cret"}
        )
        assert stock["SKU-006"]["on_hand"] == 5
        info = client.call("system_info", {"admin_token": "s3cret"})
        assert info["gateway_pid"] == server.proc.pid
        # Ordinary ops need no token.
        assert client.ping()["pong"] is True
    # The command line passes it too (--admin-token or ORDER_ADMIN_TOKEN).
    cli = [sys.executable, str(ROOT / "client.py"), "--port", str(server.port)]
    env = {k: v for k, v in os.environ.items() if k != "ORDER_ADMIN_TOKEN"}
    refused_cli = subprocess.run(
        [*cli, "set-stock", "SKU-006", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert refused_cli.returncode == 1
    assert "forbidden" in refused_cli.stderr
    allowed = subprocess.run(
        [*cli, "--admin-token", "s3cret", "set-stock", "SKU-006", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert '"on_hand": 7' in allowed.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_non_loopback_host_without_token_is_refused(tmp_path: Path, host: str) -> None:
    """run.py --host <all interfaces> without a token exits non-zero before listening."""
    env = {k: v for k, v in os.environ.items() if k != "ORDER_ADMIN_TOKEN"}
    db = tmp_path / "refused.db"
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--host", host, "--port", "0", "--db", str(db)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "refusing to listen" in done.stderr, done.stderr
    assert "ready" not in done.stdout
    assert not db.exists(), "run.py got as far as creating its database"
