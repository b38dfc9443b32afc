"""Reads of the event store from the gateway: a pool of two threads over a read-only store,
so that a long read never blocks the event loop and costs the actors nothing."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from gateway.connection import read_slot
from messages.errors import ErrorCode, ServiceError
from store import EventStore


class StoreReads:
    """Runs functions of the read-only store in the read pool, each within the request
    timeout. Per connection, at most ``READS_PER_CONNECTION`` run or wait in the pool at once,
    and none starts while that client has its replies unread, so one connection cannot queue
    thousands of reads ahead of everyone else's or pile their results up in memory."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._store: EventStore | None = None
        self.url: str | None = None  # the store's URL, for a child process to open it
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="reads")
        self._exclusive = asyncio.Lock()  # audits: one full scan at a time

    def open(self, store: EventStore, url: str | None = None) -> None:
        """Read from `store` (opened read-only by the caller from `url`) from now on."""
        self._store = store
        self.url = url

    async def close(self) -> None:
        """Stop the pool and close the store; a read still running finishes in its thread,
        the loop does not wait on it."""
        await asyncio.to_thread(self._pool.shutdown, True)
        if self._store is not None:
            self._store.close()

    async def read(self, fn: Callable[[EventStore], Any], *, exclusive: bool = False) -> Any:
        """`fn(store)` in the pool. `exclusive` reads (the audit) also run one at a time
        across all connections; their lock is taken after this connection's read slot (a
        client not reading its replies holds only its own slot, never every client's audit)
        and released when the scan ends, not when a caller stops waiting."""
        async with read_slot():
            return await self._read_now(fn, exclusive)

    async def _read_now(self, fn: Callable[[EventStore], Any], exclusive: bool) -> Any:
        assert self._store is not None
        loop = asyncio.get_running_loop()
        if exclusive:
            try:
                await asyncio.wait_for(self._exclusive.acquire(), self._timeout)
            except TimeoutError:
                raise ServiceError(
                    ErrorCode.UNAVAILABLE, "another audit is running; try later"
                ) from None
        try:
            future = loop.run_in_executor(self._pool, fn, self._store)
        except BaseException:
            if exclusive:
                self._exclusive.release()
            raise
        if exclusive:
            # Held until the scan ends, even if nobody waits for it any more.
            future.add_done_callback(lambda _: self._exclusive.release())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the read took too long; try again") from None
