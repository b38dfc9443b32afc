"""The bridge into the actor system: one thread owns the Thespian ``ActorSystem`` and hands it
the gateway's requests, in batches, and the replies back.

Thespian's external API is not thread-safe, and on the simple base the actors run inside the
calling thread's ``tell``/``listen``: this thread never stops pumping. Callers on any thread use
``submit`` (a concurrent future); the event loop uses ``submit_async`` (a loop future; each pass's
replies reach the loop in one call).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from thespian.actors import ActorSystem, ActorSystemException, PoisonMessage

from actors.manager import OrderManager
from messages.commands import ActorMessage, Batch, Configure, Configured, Refused
from messages.errors import ErrorCode, ServiceError
from runtime import thespian_fixes
from runtime.proc_tree import RUN_MARKER, descendants, marked

log = logging.getLogger("orders.bridge")

SYSTEM_BASES = {
    "simple": "simpleSystemBase",
    "queue": "multiprocQueueBase",
    "tcp": "multiprocTCPBase",
}


# --- the bridge -------------------------------------------------------------------------------


_AnyFuture = concurrent.futures.Future[ActorMessage] | asyncio.Future[ActorMessage]


class ActorBridge:
    """Owns the ActorSystem on one thread: Thespian's external API is not thread-safe, and on
    the simple base the actors run inside that thread's ``tell``/``listen`` calls (timers fire
    only while it listens), so that thread never stops pumping."""

    def __init__(
        self,
        base: str,
        *,
        capabilities: dict[str, Any] | None = None,
        log_defs: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self._system_base = SYSTEM_BASES[base]
        self._capabilities = capabilities or {}
        self._log_defs = log_defs
        self._outbox: queue.Queue[tuple[int, ActorMessage]] = queue.Queue()
        self._futures: dict[int, _AnyFuture] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = concurrent.futures.Future[None]()
        # Replies for asyncio futures, handed to their loop in one call per pass of the pump
        # (one cross-thread wake-up per batch instead of one per reply).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: list[tuple[asyncio.Future[ActorMessage], ActorMessage]] = []

    def start(self, timeout: float = 60.0) -> None:
        """Start the actor system and the OrderManager (blocks until both exist)."""
        self._thread = threading.Thread(target=self._run, name="actor-bridge", daemon=True)
        self._thread.start()
        self._started.result(timeout)

    def submit(
        self, make: Callable[[int], ActorMessage]
    ) -> tuple[int, concurrent.futures.Future[ActorMessage]]:
        """Send the message `make(req_id)` to the OrderManager; the future gets its reply
        (for callers on any thread)."""
        future: concurrent.futures.Future[ActorMessage] = concurrent.futures.Future()
        return self._submit(make, future), future

    def submit_async(
        self, make: Callable[[int], ActorMessage]
    ) -> tuple[int, asyncio.Future[ActorMessage]]:
        """Like `submit`, from the event loop's thread: an asyncio future of that loop."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        if loop is not self._loop:
            raise RuntimeError("one event loop per bridge")
        future: asyncio.Future[ActorMessage] = loop.create_future()
        return self._submit(make, future), future

    def _submit(self, make: Callable[[int], ActorMessage], future: _AnyFuture) -> int:
        req_id = next(self._ids)
        with self._lock:
            self._futures[req_id] = future
        self._outbox.put((req_id, make(req_id)))
        return req_id

    def forget(self, req_id: int) -> None:
        """Stop waiting for a reply (the caller gave up); a late reply is dropped."""
        with self._lock:
            self._futures.pop(req_id, None)

    def stop(self) -> None:
        """Shut the actor system down (actors get ActorExitRequest) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.base != "simple":
            _kill_leftovers()

    def _run(self) -> None:
        try:
            thespian_fixes.apply()
            system = ActorSystem(self._system_base, self._capabilities, logDefs=self._log_defs)
            manager = system.createActor(OrderManager)
        except BaseException as e:
            self._started.set_exception(e)
            return
        self._started.set_result(None)
        simple = self.base == "simple"
        try:
            while not self._stop.is_set():
                try:
                    self._pump(system, manager, simple)
                except ActorSystemException:
                    raise
                except Exception:
                    # One bad delivery must not end the bridge (and with it every order).
                    log.exception("bridge: a hand-over failed; going on")
        except Exception:
            log.exception("bridge: the actor system failed")
        finally:
            with self._lock:
                pending, self._futures = list(self._futures.values()), {}
            stopped = Refused(
                req_id=0, code=ErrorCode.UNAVAILABLE, message="the actor system stopped"
            )
            for future in pending:
                self._set(future, stopped)
            self._hand_over()
            system.shutdown()

    def _pump(self, system: Any, manager: Any, simple: bool) -> None:
        # The simple base runs actors synchronously inside tell/listen and a listen with nothing
        # to do returns at once, so block on the outbox instead; the process bases run actors
        # elsewhere, so block briefly in listen for their replies.
        batch: list[tuple[int, ActorMessage]] = []
        with contextlib.suppress(queue.Empty):
            batch.append(self._outbox.get(timeout=0.002 if simple else 0))
            while len(batch) < 256:
                batch.append(self._outbox.get_nowait())
        if len(batch) == 1:
            system.tell(manager, batch[0][1])
        elif batch:
            system.tell(manager, Batch(messages=tuple(message for _, message in batch)))
        wait = timedelta(milliseconds=0.5 if simple else 2)
        try:
            while True:
                reply = system.listen(wait)
                if reply is None:
                    return
                if not simple:
                    wait = timedelta(0)  # drain what has arrived, then hand over
                # On the simple base a listen runs the actors only until the first reply, and
                # a listen of 0 s runs nothing: keep a non-zero wait so the work behind that
                # reply (timers that fired, a slow payment completing) goes on in this pass.
                # With 0 s here, orders finishing on timers came out one per 2 ms poll.
                self._deliver(reply)
        finally:
            self._hand_over()

    def _deliver(self, reply: Any) -> None:
        if isinstance(reply, PoisonMessage):
            # The manager raised on a request (or on a batch of them): fail each one now
            # rather than let its caller wait out the request timeout.
            poisoned = reply.poisonMessage
            inner = poisoned.messages if isinstance(poisoned, Batch) else (poisoned,)
            for request in inner:
                req_id = getattr(request, "req_id", None)
                if req_id is not None:
                    self._resolve(
                        req_id,
                        Refused(
                            req_id=req_id,
                            code=ErrorCode.INTERNAL,
                            message="the system failed on this request",
                        ),
                    )
            return
        req_id = getattr(reply, "req_id", None)
        if req_id is None:
            log.debug("bridge: unmatched reply %r", reply)
            return
        self._resolve(req_id, reply)

    def _resolve(self, req_id: int, reply: ActorMessage) -> None:
        with self._lock:
            future = self._futures.pop(req_id, None)
        if future is not None:
            self._set(future, reply)

    def _set(self, future: _AnyFuture, reply: ActorMessage) -> None:
        if isinstance(future, asyncio.Future):
            self._ready.append((future, reply))
            return
        # The caller may cancel the future (timeout, disconnect) at any moment from another
        # thread: a cancelled future refuses its result, and that is fine.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_result(reply)

    def _hand_over(self) -> None:
        """Give the event loop every reply of this pass in one thread-safe call."""
        if not self._ready or self._loop is None:
            return
        ready, self._ready = self._ready, []
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(_settle, ready)


def _settle(ready: list[tuple[asyncio.Future[ActorMessage], ActorMessage]]) -> None:
    for future, reply in ready:
        if not future.done():  # a caller that gave up (timeout, disconnect) cancelled it
            future.set_result(reply)


def _kill_leftovers(grace: float = 5.0) -> None:
    """After shutdown, make sure no Thespian process of this run outlives run.py: the process
    bases' admin can be left waiting for an actor that is gone, and it is no child of ours
    (it runs in a session of its own), so it is found by the run marker it inherited."""
    run_id = os.environ.get(RUN_MARKER)
    deadline = time.monotonic() + grace
    while True:
        left = sorted(set(descendants(os.getpid())) | set(marked(run_id) if run_id else []))
        if not left:
            return
        if time.monotonic() > deadline:
            log.warning("bridge: killing %d leftover actor processes", len(left))
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def configure(bridge: ActorBridge, message: Callable[[int], Configure], timeout: float) -> int:
    """Boot the OrderManager (services, recovery); returns how many orders it is recovering."""
    reply = bridge.submit(message)[1].result(timeout)
    if isinstance(reply, Refused):
        raise ServiceError(reply.code, reply.message)
    if not isinstance(reply, Configured):
        unexpected = f"unexpected answer to Configure: {type(reply).__name__}"
        raise ServiceError(ErrorCode.INTERNAL, unexpected)
    return reply.recovered
