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

_EXPIRED = "request deadline"  # the cancel message of a wait whose timer fired


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
        request timeout); a ``Refused`` reply raises its ``ServiceError``.

        One coroutine, one future and one timer per request, and no closure: with 10,000
        orders in flight each of these is held 10,000 times (docs/performance.md "Memory")."""
        if not control:
            await self._take_slot()
        try:
            req_id, future = self._bridge.submit_async(make)
            del make  # its message is sent; what it captured need not wait with us
            # One timer per request (asyncio.wait_for would add a waiter and callbacks); its
            # cancel message tells an expired wait from a caller that went away.
            wait = self._request_timeout if timeout is None else timeout
            timer = self._clock.call_at(self._clock.now() + wait, future.cancel, _EXPIRED)
            try:
                reply = await future
            except asyncio.CancelledError as e:
                self._bridge.forget(req_id)
                if e.args == (_EXPIRED,):
                    raise ServiceError(
                        ErrorCode.UNAVAILABLE,
                        "no answer in time; the request may still complete "
                        "(it is idempotent: send it again)",
                    ) from None
                raise  # the caller was cancelled (its connection closed)
            finally:
                timer.cancel()
        finally:
            if not control:
                self._slots.release()
        if isinstance(reply, Refused):
            raise ServiceError(reply.code, reply.message)
        return reply

    async def _take_slot(self) -> None:
        """One of the `max_in_flight` slots, waiting at most `saturated_wait` for it."""
        if not self._slots.locked():
            await self._slots.acquire()  # free slot: returns at once, no task, no timer
            return
        try:
            await asyncio.wait_for(self._slots.acquire(), self._saturated_wait)
        except TimeoutError:
            self.stalls += 1
            log.warning("gateway: actor system saturated (%d stalls so far)", self.stalls)
            raise ServiceError(
                ErrorCode.UNAVAILABLE, "the system is saturated; retry later"
            ) from None
