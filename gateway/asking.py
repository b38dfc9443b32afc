"""Asking the OrderManager through the bridge: the request deadline, and the bound on requests
in the actor system at once (``max_in_flight``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from gateway.clock import Clock
from messages.commands import ActorMessage, Refused
from messages.errors import ErrorCode, ServiceError

log = logging.getLogger("orders.gateway")


class Bridge(Protocol):
    """What the gateway needs of ``runtime.bridge.ActorBridge`` (tests pass a fake)."""

    base: str

    def submit_async(
        self, make: Callable[[int], ActorMessage]
    ) -> tuple[int, asyncio.Future[ActorMessage]]:
        """Send `make(req_id)` to the OrderManager; the loop future gets its reply."""
        ...

    def forget(self, req_id: int) -> None:
        """Stop waiting for the reply to `req_id`."""
        ...


class ManagerClient:
    """Requests to the OrderManager, each with a deadline; clients' requests take one of
    `max_in_flight` slots (waiting at most `saturated_wait` for one), the operator's do not."""

    def __init__(
        self,
        bridge: Bridge,
        clock: Clock,
        *,
        request_timeout: float,
        max_in_flight: int,
        saturated_wait: float,
    ) -> None:
        self._bridge = bridge
        self._clock = clock
        self._request_timeout = request_timeout
        self._saturated_wait = saturated_wait
        self._slots = asyncio.Semaphore(max_in_flight)
        self.stalls = 0  # requests refused because the actor system was saturated

    async def ask(
        self,
        make: Callable[[int], ActorMessage],
        *,
        control: bool = False,
        timeout: float | None = None,
    ) -> ActorMessage:
        """Send `make(req_id)` and wait for the reply (at most `timeout`, by default the
        request timeout); a ``Refused`` reply raises its ``ServiceError``."""
        if control:
            return await self._ask_now(make, timeout)
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self._saturated_wait)
            except TimeoutError:
                self.stalls += 1
                log.warning("gateway: actor system saturated (%d stalls so far)", self.stalls)
                raise ServiceError(
                    ErrorCode.UNAVAILABLE, "the system is saturated; retry later"
                ) from None
        else:
            await self._slots.acquire()  # free slot: returns at once, no task, no timer
        try:
            return await self._ask_now(make, timeout)
        finally:
            self._slots.release()

    async def _ask_now(
        self, make: Callable[[int], ActorMessage], timeout: float | None
    ) -> ActorMessage:
        req_id, future = self._bridge.submit_async(make)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            future.cancel()

        # One timer per request (asyncio.wait_for would add a waiter and callbacks).
        wait = self._request_timeout if timeout is None else timeout
        timer = self._clock.call_at(self._clock.now() + wait, expire)
        try:
            reply = await future
        except asyncio.CancelledError:
            self._bridge.forget(req_id)
            if expired:
                raise ServiceError(
                    ErrorCode.UNAVAILABLE,
                    "no answer in time; the request may still complete "
                    "(it is idempotent: send it again)",
                ) from None
            raise  # the caller was cancelled (its connection closed)
        finally:
            timer.cancel()
        if isinstance(reply, Refused):
            raise ServiceError(reply.code, reply.message)
        return reply
