"""A Gateway on its own event-loop thread against a fake bridge and, if asked, a fake clock:
the gateway's tests wait on replies, connections and held requests, never on time passing.

``FakeBridge`` has the interface of ``runtime.bridge.ActorBridge`` that the gateway uses and
answers at once, or holds the orders until the test releases them. ``FakeClock`` runs the
gateway's deadlines only when the test advances it.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from gateway.connection import Connection
from gateway.server import Gateway, GatewayLimits
from messages.commands import (
    ActorMessage,
    Drain,
    DrainStatus,
    GetStock,
    Identify,
    Identities,
    OrderReply,
    PlaceOrder,
    SetStock,
    StockReport,
)
from messages.events import INVENTORY_STREAM, StockSet
from store import CODEC, NO_STREAM, SqliteEventStore
from tests.conftest import wait_until

IO = 10.0
T = TypeVar("T")


class FakeTimer:
    """A timer of the fake clock."""

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self._when = when
        self.callback = callback
        self.cancelled = False

    def when(self) -> float:
        """When it fires."""
        return self._when

    def cancel(self) -> None:
        """Never fire."""
        self.cancelled = True

    def __lt__(self, other: FakeTimer) -> bool:
        return self._when < other._when


class FakeClock:
    """A clock that stands still until `advance` (called on the gateway's loop) moves it."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._timers: list[FakeTimer] = []

    def now(self) -> float:
        """The fake time."""
        return self._now

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> FakeTimer:
        """Fire `callback(*args)` once `advance` reaches `when`."""
        timer = FakeTimer(when, functools.partial(callback, *args))
        heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move time on, firing every timer due in order (also those armed meanwhile)."""
        end = self._now + seconds
        while self._timers and self._timers[0].when() <= end:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._now = max(self._now, timer.when())
                timer.callback()
        self._now = end


class FakeBridge:
    """Answers the gateway's requests at once as a healthy system would; with `hold`, orders
    wait until `release`; with `silent`, nothing is ever answered."""

    base = "simple"

    def __init__(self) -> None:
        self.hold = False
        self.silent = False
        self.seen: list[ActorMessage] = []  # every message sent, in order
        self.forgotten: list[int] = []  # requests the gateway gave up on
        self._held: dict[int, tuple[ActorMessage, asyncio.Future[ActorMessage]]] = {}
        self._ids = itertools.count(1)
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit_async(
        self, make: Callable[[int], ActorMessage]
    ) -> tuple[int, asyncio.Future[ActorMessage]]:
        """Like ActorBridge.submit_async."""
        self._loop = asyncio.get_running_loop()
        req_id = next(self._ids)
        message = make(req_id)
        future: asyncio.Future[ActorMessage] = self._loop.create_future()
        with self._changed:
            self.seen.append(message)
            if self.silent or (self.hold and isinstance(message, PlaceOrder)):
                self._held[req_id] = (message, future)
            else:
                future.set_result(self._answer(message))
            self._changed.notify_all()
        return req_id, future

    def forget(self, req_id: int) -> None:
        """Like ActorBridge.forget."""
        with self._changed:
            self._held.pop(req_id, None)
            self.forgotten.append(req_id)
            self._changed.notify_all()

    def held(self) -> int:
        """How many requests wait for `release`."""
        with self._changed:
            return len(self._held)

    def wait_for(self, predicate: Callable[[FakeBridge], bool], timeout: float = IO) -> None:
        """Block until `predicate(self)` holds (fails after `timeout`)."""
        with self._changed:
            assert self._changed.wait_for(lambda: predicate(self), timeout), "bridge: timed out"

    def release(self) -> None:
        """Answer every held request."""
        with self._changed:
            held, self._held = list(self._held.values()), {}
        for message, future in held:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_settle, future, self._answer(message))

    def _answer(self, message: ActorMessage) -> ActorMessage:
        if isinstance(message, PlaceOrder):
            order = {"order_id": message.order_id, "status": "paid", "version": 3}
            return OrderReply(req_id=message.req_id, order=order)
        if isinstance(message, GetStock):
            level = {"on_hand": 1000, "reserved": 0, "available": 1000}
            stock = dict.fromkeys(message.product_ids, level)
            return StockReport(req_id=message.req_id, stock=stock)
        if isinstance(message, SetStock):
            level = {"on_hand": message.on_hand, "reserved": 0, "available": message.on_hand}
            return StockReport(req_id=message.req_id, stock={message.product_id: level})
        if isinstance(message, Drain):
            orders = sum(isinstance(m, PlaceOrder) for m, _ in self._held.values())
            return DrainStatus(req_id=message.req_id, in_flight=orders)
        assert isinstance(message, Identify), message
        return Identities(req_id=message.req_id, pids={})


def _settle(future: asyncio.Future[ActorMessage], reply: ActorMessage) -> None:
    if not future.done():
        future.set_result(reply)


def seed_inventory(db: Path, events: int) -> None:
    """Append `events` StockSet events to the inventory stream: a read of it is a big reply
    (~70 KB for 400), without running any order."""
    store = SqliteEventStore(db, synchronous="NORMAL")
    try:
        now = datetime.now(UTC)
        batch = [
            CODEC.encode(StockSet(product_id=f"SKU-{n % 10 + 1:03d}", on_hand=n, set_at=now))
            for n in range(events)
        ]
        store.append(INVENTORY_STREAM, batch, NO_STREAM)
    finally:
        store.close()


class GatewayHarness:
    """A Gateway over a FakeBridge (and a FakeClock unless `fake_clock` is False) on its own
    event-loop thread, listening on loopback."""

    def __init__(
        self, db: Path, limits: GatewayLimits, *, fake_clock: bool = True, inventory: int = 0
    ) -> None:
        if inventory:
            seed_inventory(db, inventory)
        else:
            SqliteEventStore(db).close()  # the schema, for the gateway's read-only connection
        self.bridge = FakeBridge()
        self.clock = FakeClock() if fake_clock else None
        self.gateway = Gateway(self.bridge, str(db), limits=limits, clock=self.clock)
        self.loop = asyncio.new_event_loop()
        self.server_side: dict[socket.socket, Connection] = {}
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

    def on_loop(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the gateway's loop (its state is only consistent there)."""

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(IO)

    def advance(self, seconds: float) -> None:
        """Move the fake clock on; the deadlines due fire, and what they queued runs."""
        assert self.clock is not None, "a harness on the real clock"
        self.on_loop(lambda: self.clock.advance(seconds) if self.clock else None)
        self.on_loop(lambda: None)  # one more pass: writes and closes they scheduled

    def wait_until(self, predicate: Callable[[], object]) -> None:
        """Until `predicate()`, evaluated on the loop, is true (fails after IO seconds)."""
        wait_until(lambda: self.on_loop(predicate), timeout=IO, interval=0.005)

    def open_connections(self) -> int:
        """How many connections the gateway holds."""
        return self.on_loop(lambda: len(self.gateway.connections))

    def connect(self, rcvbuf: int | None = None) -> socket.socket:
        """A client socket, returned once the gateway has taken the connection in (its
        server side is `server_side[sock]`)."""
        before = set(self.on_loop(lambda: list(self.gateway.connections)))
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(IO)
        sock.connect(self.address)
        new: list[Connection] = []

        def accepted() -> bool:
            new[:] = set(self.gateway.connections) - before
            return bool(new)

        self.wait_until(accepted)
        self.server_side[sock] = new[0]
        return sock

    def connect_raw(self) -> socket.socket:
        """A client socket that the gateway may refuse."""
        return socket.create_connection(self.address, timeout=IO)

    def close(self) -> None:
        """Stop the gateway and its loop."""
        self.bridge.release()
        asyncio.run_coroutine_threadsafe(self.gateway.close(), self.loop).result(IO)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO)
        self.loop.close()
