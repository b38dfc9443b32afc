"""A bare reference saga on Thespian: reserve, append, charge, append; no gateway, no pydantic.

It is the floor of the runtime the product is built on: the same actor-per-order shape, the
same SQLite file in WAL mode with synchronous=FULL and group commit, and nothing else (no
validation, no idempotency, no compensation, no timers). `bench.py` runs it beside the full
system on each base so the table shows how close the product comes to it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ActorSystem, ActorTypeDispatcher

from runtime import thespian_fixes


@dataclass(frozen=True)
class Go:
    """Run `orders` orders with `concurrency` in flight, on the database at `db`."""

    orders: int
    concurrency: int
    db: str


@dataclass(frozen=True)
class Done:
    """Per-order latencies (seconds) and the wall time of the run."""

    latencies: list[float]
    wall: float


@dataclass(frozen=True)
class Start:
    """A saga's order number and its peers."""

    n: int
    store: Any
    inventory: Any
    payment: Any


@dataclass(frozen=True)
class Reserve:
    """Hold one unit."""

    n: int


@dataclass(frozen=True)
class Reserved:
    """Held."""

    n: int


@dataclass(frozen=True)
class Charge:
    """Charge the order."""

    n: int


@dataclass(frozen=True)
class Charged:
    """Charged."""

    n: int


@dataclass(frozen=True)
class Append:
    """Append one event row."""

    stream: str
    kind: str


@dataclass(frozen=True)
class Appended:
    """Committed."""


@dataclass(frozen=True)
class Flush:
    """Group commit trigger (sent by the store to itself)."""


@dataclass(frozen=True)
class SagaDone:
    """The saga finished order n."""

    n: int


class RefStore(ActorTypeDispatcher):
    """Appends rows; everything queued before the flush shares one commit."""

    def __init__(self) -> None:
        super().__init__()
        self._conn: sqlite3.Connection | None = None
        self._buffer: list[tuple[Append, Any]] = []
        self._versions: dict[str, int] = {}

    def receiveMsg_str(self, db: str, sender: Any) -> None:
        self._conn = sqlite3.connect(db, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS events (position INTEGER PRIMARY KEY, stream TEXT,"
            " version INTEGER, type TEXT, payload BLOB, UNIQUE(stream, version))"
        )
        self.send(sender, "ready")

    def receiveMsg_Append(self, msg: Append, sender: Any) -> None:
        if not self._buffer:
            self.send(self.myAddress, Flush())
        self._buffer.append((msg, sender))

    def receiveMsg_Flush(self, msg: Flush, sender: Any) -> None:
        batch, self._buffer = self._buffer, []
        assert self._conn is not None
        rows = []
        for append, _ in batch:
            version = self._versions.get(append.stream, -1) + 1
            self._versions[append.stream] = version
            rows.append((append.stream, version, append.kind, b"{}"))
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.executemany(
            "INSERT INTO events (stream, version, type, payload) VALUES (?, ?, ?, ?)", rows
        )
        self._conn.execute("COMMIT")
        for _, requester in batch:
            self.send(requester, Appended())

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        if self._conn is not None:
            self._conn.close()


class RefInventory(ActorTypeDispatcher):
    """Counts units; always has stock."""

    def __init__(self) -> None:
        super().__init__()
        self.reserved = 0

    def receiveMsg_Reserve(self, msg: Reserve, sender: Any) -> None:
        self.reserved += 1
        self.send(sender, Reserved(msg.n))


class RefPayment(ActorTypeDispatcher):
    """Approves everything."""

    def receiveMsg_Charge(self, msg: Charge, sender: Any) -> None:
        self.send(sender, Charged(msg.n))


class RefSaga(ActorTypeDispatcher):
    """reserve -> append -> charge -> append -> done, then exit."""

    def __init__(self) -> None:
        super().__init__()
        self._start: Start | None = None
        self._driver: Any = None
        self._appends = 0

    def receiveMsg_Start(self, msg: Start, sender: Any) -> None:
        self._start, self._driver = msg, sender
        self.send(msg.inventory, Reserve(msg.n))

    def receiveMsg_Reserved(self, msg: Reserved, sender: Any) -> None:
        assert self._start is not None
        self.send(self._start.store, Append(f"order-{msg.n}", "InventoryReserved"))

    def receiveMsg_Appended(self, msg: Appended, sender: Any) -> None:
        assert self._start is not None
        self._appends += 1
        if self._appends == 1:
            self.send(self._start.payment, Charge(self._start.n))
        else:
            self.send(self._driver, SagaDone(self._start.n))
            self.send(self.myAddress, ActorExitRequest())

    def receiveMsg_Charged(self, msg: Charged, sender: Any) -> None:
        assert self._start is not None
        self.send(self._start.store, Append(f"order-{msg.n}", "OrderPaid"))


class RefDriver(ActorTypeDispatcher):
    """Creates one saga per order, keeping `concurrency` in flight; times each order."""

    def __init__(self) -> None:
        super().__init__()
        self._go: Go | None = None
        self._requester: Any = None
        self._peers: tuple[Any, Any, Any] | None = None
        self._started: dict[int, float] = {}
        self._latencies: list[float] = []
        self._next = 0
        self._t0 = 0.0

    def receiveMsg_Go(self, msg: Go, sender: Any) -> None:
        self._go, self._requester = msg, sender
        store = self.createActor(RefStore)
        self._peers = (store, self.createActor(RefInventory), self.createActor(RefPayment))
        self.send(store, msg.db)

    def receiveMsg_str(self, msg: str, sender: Any) -> None:  # the store is ready
        assert self._go is not None
        self._t0 = time.perf_counter()
        for _ in range(min(self._go.concurrency, self._go.orders)):
            self._launch()

    def _launch(self) -> None:
        assert self._peers is not None
        n, self._next = self._next, self._next + 1
        self._started[n] = time.perf_counter()
        store, inventory, payment = self._peers
        self.send(self.createActor(RefSaga), Start(n, store, inventory, payment))

    def receiveMsg_SagaDone(self, msg: SagaDone, sender: Any) -> None:
        assert self._go is not None
        self._latencies.append(time.perf_counter() - self._started.pop(msg.n))
        if self._next < self._go.orders:
            self._launch()
        elif not self._started:
            wall = time.perf_counter() - self._t0
            self.send(self._requester, Done(self._latencies, wall))
            assert self._peers is not None
            for peer in self._peers:
                self.send(peer, ActorExitRequest())


def run_reference(
    system_base: str, orders: int, concurrency: int, db: str, timeout: float = 600.0
) -> Done:
    """Run the reference saga on a fresh actor system of `system_base`."""
    if os.path.exists(db):
        raise FileExistsError(db)
    thespian_fixes.apply()  # the reference runs on the same patched Thespian as the system
    asys = ActorSystem(system_base, transientUnique=True)
    try:
        driver = asys.createActor(RefDriver)
        reply = asys.ask(driver, Go(orders, concurrency, db), timedelta(seconds=timeout))
    finally:
        asys.shutdown()
    if not isinstance(reply, Done):
        raise RuntimeError(f"reference run on {system_base} gave {reply!r}")
    return reply
