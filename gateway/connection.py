"""One client connection: the asyncio protocol with its deadlines, its backpressure and its
write clock. What a frame means is the parser's business (``RequestParser``)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from gateway.clock import Clock, Timer
from gateway.framing import FrameReader
from gateway.writer import ReplyWriter
from messages.errors import ErrorCode, ServiceError
from messages.wire import error_reply

if TYPE_CHECKING:
    from gateway.server import GatewayLimits

log = logging.getLogger("orders.gateway")

READS_PER_CONNECTION = 2  # store reads one connection may have running or queued at once


class Request(Protocol):
    """A validated request waiting to run."""

    async def run(self) -> dict[str, Any]:
        """Carry it out; the reply map (an error reply if it failed), never an exception."""
        ...


class RequestParser(Protocol):
    """Turns a frame body into a request to run, or into the error reply to send at once."""

    def parse(self, body: bytes) -> Request | dict[str, Any]:
        """Decode and validate one frame body."""
        ...


class Registry(Protocol):
    """Where the open connections are counted (``gateway.connections.Connections``)."""

    def admit(self, connection: Connection) -> bool:
        """Take `connection` in, making room if needed; False if there is none."""
        ...

    def discard(self, connection: Connection) -> None:
        """Forget a connection that is closing."""
        ...


_current: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "gateway_connection", default=None
)


def read_slot() -> contextlib.AbstractAsyncContextManager[None]:
    """One of the current request's connection's read slots (none outside a connection)."""
    connection = _current.get()
    return connection.read_slot() if connection is not None else contextlib.nullcontext()


class Connection(asyncio.Protocol):
    """One client connection.

    Limits: the idle deadline runs while the connection has no partial frame and nothing in
    flight, the frame deadline from a frame's header to its last byte; a frame over the limit is
    answered ``too_large`` and the connection closed; at most ``max_pending_per_connection``
    requests run at once, and a client that does not read its replies stops being read from.
    """

    def __init__(
        self, limits: GatewayLimits, clock: Clock, parser: RequestParser, registry: Registry
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._parser = parser
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._frames = FrameReader(limits.max_frame)
        self._writer = ReplyWriter(clock, limits.write_timeout, limits.write_high_water)
        self._frame_started: float | None = None  # when the header of a partial frame arrived
        self.last_activity = clock.now()
        self.bytes_received = 0
        self._timer: Timer | None = None
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self._writing_paused = False
        self._reads = asyncio.Semaphore(READS_PER_CONNECTION)
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False  # the client sent its last frame (EOF, or one that cannot be framed)
        self._last_word: dict[str, Any] | None = None  # a reply to send just before closing

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Take a slot (or refuse with ``unavailable``) and start the deadlines."""
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._writer.attach(transport)
        if not self._registry.admit(self):
            self._writer.refuse(error_reply(None, ErrorCode.UNAVAILABLE, "too many connections"))
            return
        self._arm_timer(min(self._limits.idle_timeout, self._limits.frame_timeout))

    def data_received(self, data: bytes) -> None:
        """Run the frames that are complete."""
        if self._writer.closing or self._eof:
            return
        self._frames.feed(data)
        self.bytes_received += len(data)
        self.last_activity = self._clock.now()
        self._cut_frames()

    def eof_received(self) -> bool | None:
        """The client finished sending: answer what it sent, then close."""
        self._eof = True
        self._cut_frames()  # complete frames still held back run; a partial one is dropped
        if not self._tasks:
            self._finish()
        return True  # keep our side open for the replies still to come

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel whatever still runs for it."""
        self._writer.closing = True
        self._writer.lost = True
        self._registry.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        """Over the high-water mark of replies unread: stop reading (and starting) requests."""
        self._writing_paused = True
        self._writable.clear()
        self._writer.start_write_clock()
        self._update_reading()
        self._wake_by(self._writer.stalled_since + self._limits.write_timeout)

    def resume_writing(self) -> None:
        """The client took its replies: read on."""
        self._writing_paused = False
        self._writable.set()
        if self._frames.pending and not self._writer.closing:
            self._cut_frames()  # frames read before the pause
        else:
            self._update_reading()

    # --- what others may ask --------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        """Reply bytes made and not yet taken by the client."""
        return self._writer.unsent_bytes

    @property
    def in_flight(self) -> int:
        """Requests of this connection running now."""
        return len(self._tasks)

    @property
    def receiving_frame(self) -> bool:
        """Whether part of a frame has arrived (its deadline runs)."""
        return self._frame_started is not None

    @property
    def writing_paused(self) -> bool:
        """Whether the client has left so many replies unread that it is no longer read."""
        return self._writing_paused

    @contextlib.asynccontextmanager
    async def read_slot(self) -> AsyncIterator[None]:
        """One of this connection's read slots, taken once its replies are being read."""
        async with self._reads:
            await self._writable.wait()
            yield

    def evictable(self, now: float, idle_for: float) -> bool:
        """Silent for `idle_for` seconds and either idle (nothing in flight, no partial frame)
        or not reading its replies."""
        return (
            not self._writer.closing
            and (self._writing_paused or (not self._tasks and not self._frames.pending))
            and now - self.last_activity >= idle_for
        )

    def close(self) -> None:
        """Drop the connection (a deadline passed, the gateway is closing, or it made room for
        a newcomer). Replies a client has not taken are discarded: ``close`` alone would wait
        for it to read them, and one that never reads would hold its slot for ever."""
        self._registry.discard(self)
        self._writer.drop()

    # --- frames in ------------------------------------------------------------------------

    def _cut_frames(self) -> None:
        frames, writer = self._frames, self._writer
        cap = self._limits.max_pending_per_connection
        while not writer.closing and not self._writing_paused and len(self._tasks) < cap:
            try:
                body = frames.next_frame()
            except ServiceError as e:
                # Nothing after it can be trusted to be framed: read no more, answer what
                # came before, then this, then close.
                self._last_word = error_reply(None, e.code, e.message)
                self._eof = True
                if self._transport is not None and self._transport.is_reading():
                    self._transport.pause_reading()
                if not self._tasks:
                    self._finish()
                return
            if body is None:
                self._partial_frame()
                break
            self._frame_started = None
            request = self._parser.parse(body)
            del body  # a waiting request keeps only its validated arguments
            if isinstance(request, dict):
                writer.send(request)  # refused at once
                continue
            _current.set(self)  # the task's context: its reads find their connection
            task = self._loop.create_task(request.run())
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._update_reading()

    def _partial_frame(self) -> None:
        """Part of a frame (maybe only part of its header) is in: its deadline starts now."""
        if not self._frames.pending:
            self._frame_started = None
        elif self._eof:
            self._frames.clear()  # the client sent its last bytes: this frame never completes
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = self._clock.now()
            self._wake_by(self._frame_started + self._limits.frame_timeout)

    def _task_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():  # the run catches every error: its result is the reply
            try:
                self._writer.send(task.result())
            except Exception:  # a reply that cannot be encoded must not stop the cleanup below
                log.exception("gateway: a reply could not be sent")
        if not self._writer.closing and self._frames.pending:
            self._cut_frames()  # frames held back by the pending limit
        if self._eof and not self._tasks:
            self._finish()
        else:
            self._update_reading()

    def _finish(self) -> None:
        """Everything asked is answered: write the last replies and close."""
        if self._writer.closing or self._transport is None:
            return
        if self._last_word is not None:
            self._writer.send(self._last_word)
        self._writer.flush()
        self._writer.close_after_writing()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._writer.closing or self._eof or transport.is_closing():
            return
        full = len(self._tasks) >= self._limits.max_pending_per_connection
        if self._writing_paused or full:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()
            if self._frame_started is not None:
                # The frame deadline counts only while we read: restart it.
                self._frame_started = self._clock.now()
                self._wake_by(self._frame_started + self._limits.frame_timeout)

    # --- deadlines ------------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._clock.call_at(
            self._clock.now() + max(delay, 0.01), self._check_deadlines
        )

    def _wake_by(self, when: float) -> None:
        """Make sure the deadline check runs no later than `when`."""
        if self._timer is not None and self._timer.when() > when:
            self._timer.cancel()
            self._arm_timer(when - self._clock.now())

    def _check_deadlines(self) -> None:
        """One timer per connection, re-armed for whichever deadline is next (at least every
        frame_timeout):

        - replies unread (writing paused): the client must take some of them within
          write_timeout, or it is cut off (it pins a MiB of replies and its slot);
        - reading paused by us (requests at the pending cap): no deadline for the client;
        - a partial frame: its rest must arrive within frame_timeout of its header;
        - nothing in flight: idle_timeout of silence closes the connection.
        """
        transport = self._transport
        if self._writer.closing or transport is None:
            return
        now = self._clock.now()
        limits = self._limits
        if self._writing_paused:
            left = self._writer.write_time_left(now)
            if left <= 0:
                log.info("gateway: dropping a client that does not read its replies")
                self.close()
                return
        elif not transport.is_reading():
            self.last_activity = now  # we paused it (pending cap): waiting on us
            left = limits.idle_timeout
        elif self._frame_started is not None:
            left = self._frame_started + limits.frame_timeout - now
            if left <= 0:
                self.close()  # a frame begun and never finished
                return
        elif self._tasks:
            self.last_activity = now  # requests running: waiting on us
            left = limits.idle_timeout
        else:
            left = self.last_activity + limits.idle_timeout - now
            if left <= 0:
                self.close()
                return
        self._arm_timer(min(left, limits.frame_timeout))
