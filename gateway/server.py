"""The gateway: the client-facing socket server.

Clients never reach Thespian: they speak length-prefixed msgpack (``messages.wire``) to an
asyncio server; validated requests become typed actor messages that the bridge
(``runtime.bridge``) hands to the OrderManager. Reads (``get_order``, ``read_stream``, ``audit``)
go straight to the SQLite file through a read-only connection, so they cost the actors nothing.

The parts: ``connection`` (one client: deadlines, backpressure; ``framing`` and ``writer`` for
its bytes in and out), ``parsing`` (frame to request, admission limits), ``ops`` (the handlers,
over ``asking`` for the OrderManager and ``reads`` for the store). This module assembles them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gateway.asking import Bridge, ManagerClient
from gateway.clock import Clock, LoopClock
from gateway.connection import Connection
from gateway.ops import Ops, OpsConfig
from gateway.parsing import Parser
from gateway.reads import StoreReads
from messages.wire import MAX_FRAME
from store import open_store

log = logging.getLogger("orders.gateway")

EVICT_IDLE_AFTER = 1.0  # seconds of silence after which a full gateway may close a connection


@dataclass(frozen=True)
class GatewayLimits:
    """What one client may cost the server."""

    max_frame: int = MAX_FRAME
    idle_timeout: float = 300.0  # seconds a connection may sit without sending a frame
    frame_timeout: float = 10.0  # seconds to deliver the rest of a frame once it has begun
    # Seconds a client with `write_high_water` bytes of replies waiting may go without taking
    # any of them.
    write_timeout: float = 30.0
    write_high_water: int = 1 << 20  # bytes of unsent replies before a client stops being read
    max_connections: int = 1024
    max_pending_per_connection: int = 2048
    request_timeout: float = 60.0
    # Requests in the actor system at once; the queue base deadlocks past a few dozen messages
    # in flight (Thespian #76, #91), so run.py lowers this there.
    max_in_flight: int = 20_000
    saturated_wait: float = 5.0


class Connections:
    """The open connections, at most `limit` of them."""

    def __init__(self, limit: int, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._open: set[Connection] = set()

    def admit(self, connection: Connection) -> bool:
        """Take `connection` in. When all slots are taken, make room by closing the one silent
        the longest among those idle (nothing in flight, no partial frame) or not reading their
        replies, so that such sockets cannot hold every slot for the whole idle timeout; with
        none, refuse (False)."""
        if len(self._open) >= self._limit:
            now = self._clock.now()
            idle = [c for c in self._open if c.evictable(now, EVICT_IDLE_AFTER)]
            if not idle:
                return False
            log.info("gateway: at %d connections; closing the idlest", len(self._open))
            min(idle, key=lambda c: c.last_activity).close()
        self._open.add(connection)
        return True

    def discard(self, connection: Connection) -> None:
        """Forget a connection that is closing (its slot is free)."""
        self._open.discard(connection)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)


class Gateway:
    """The client interface: ops of DESIGN.md section 6 over length-prefixed msgpack frames.

    `clock` runs the deadlines (the event loop's by default); `bridge` is an
    ``runtime.bridge.ActorBridge`` or anything with its ``Bridge`` interface; `ops` says what the
    ops know of the node (admin token, order index, node id; by default none of them).
    """

    def __init__(
        self,
        bridge: Bridge,
        store_url: str,
        *,
        limits: GatewayLimits,
        ops: OpsConfig | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._store_url = store_url
        self._limits = limits
        self._clock = clock or LoopClock()
        self._reads = StoreReads(limits.request_timeout)
        manager = ManagerClient(
            bridge,
            self._clock,
            request_timeout=limits.request_timeout,
            max_in_flight=limits.max_in_flight,
            saturated_wait=limits.saturated_wait,
        )
        self._ops = Ops(manager, self._reads, bridge.base, ops or OpsConfig())
        self._table = self._ops.table()
        self.connections = Connections(limits.max_connections, self._clock)
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        self._reads.open(open_store(self._store_url, readonly=True), self._store_url)
        parser = Parser(self._table)
        limits, clock, connections = self._limits, self._clock, self.connections
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Connection(limits, clock, parser, connections), host, port
        )
        sockname = self._server.sockets[0].getsockname()
        self.node_address = f"{sockname[0]}:{sockname[1]}"
        return sockname[0], sockname[1]

    @property
    def node_address(self) -> str:
        """The address this node's gateway is reached at (what `nodes` lists for it)."""
        return self._ops.address

    @node_address.setter
    def node_address(self, address: str) -> None:
        self._ops.address = address

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for connection in self.connections:
                connection.close()
            await self._server.wait_closed()
        await self._reads.close()

    async def call(self, op: str, args: BaseModel) -> Any:
        """Run op `op` with validated `args`: the HTTP API's way in, so both interfaces share
        one implementation of each op. Raises ``ServiceError``."""
        model, handler = self._table[op]
        assert isinstance(args, model), f"{op} takes {model.__name__}"
        return await handler(args)

    async def drain(self, deadline: float, hurry: asyncio.Event | None = None) -> int:
        """Refuse new orders and wait (up to `deadline` seconds, or until `hurry` is set) for
        in-flight ones to end; returns how many were left (they resume on the next start)."""
        return await self._ops.drain(deadline, hurry)
