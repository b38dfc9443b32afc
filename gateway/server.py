"""The gateway: the client-facing socket server.

Clients never reach Thespian: they speak length-prefixed msgpack (``messages.wire``) to an
asyncio server; validated requests become typed actor messages that the bridge
(``runtime.bridge``) hands to the OrderManager. Reads (``get_order``, ``read_stream``, ``audit``)
go straight to the SQLite file through a read-only connection, so they cost the actors nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from messages.commands import (
    ActorMessage,
    Drain,
    DrainStatus,
    GetStock,
    Identify,
    Identities,
    OrderReply,
    PlaceOrder,
    Refused,
    SetStock,
    StockReport,
)
from messages.events import order_stream
from messages.requests import (
    AdminArgs,
    GetOrderArgs,
    NoArgs,
    PlaceOrderArgs,
    ReadStreamArgs,
    SetStockArgs,
    StockArgs,
)
from messages.wire import HEADER, MAX_FRAME, FrameError, decode_body, encode_frame, error_reply
from messages.wire import ok_reply as ok_frame
from runtime.bridge import ActorBridge, OpError
from saga.audit import audit
from saga.views import decode_stream, event_view, order_view
from store import SqliteEventStore

log = logging.getLogger("orders.gateway")

# --- the server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayLimits:
    """What one client may cost the server."""

    max_frame: int = MAX_FRAME
    idle_timeout: float = 300.0  # seconds a connection may sit without sending a frame
    frame_timeout: float = 10.0  # seconds to deliver the rest of a frame once it has begun
    # Seconds a client with a MiB of replies waiting may go without taking any of them.
    write_timeout: float = 30.0
    max_connections: int = 1024
    max_pending_per_connection: int = 2048
    request_timeout: float = 60.0
    # Requests in the actor system at once; the queue base deadlocks past a few dozen messages
    # in flight (Thespian #76, #91), so run.py lowers this there.
    max_in_flight: int = 20_000
    saturated_wait: float = 5.0


Handler = Callable[[Any], Awaitable[Any]]


WRITE_HIGH_WATER = 1 << 20  # bytes of unsent replies before a connection stops being read
EVICT_IDLE_AFTER = 1.0  # seconds of silence after which a full gateway may close a connection
MAX_ID_LENGTH = 256  # characters of a string request id
MAX_ARG_VALUES = 10_000  # values (map keys included) in a request's args; an order needs ~500
READS_PER_CONNECTION = 2  # store reads one connection may have running or queued at once
DRAIN_ASK_TIMEOUT = 2.0  # seconds a drain waits for the manager's answer before asking again
_current_connection: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar(
    "gateway_connection", default=None
)


class _Connection(asyncio.Protocol):
    """One client connection: frames are cut out of whatever the socket delivers, so a
    pipelining client costs no task or timer per frame (reading each frame with
    ``readexactly`` under ``wait_for`` did), and the replies that become ready in one pass of
    the event loop leave in one write (a write per reply was 7 % of the CPU).

    Limits: the idle deadline runs while the connection has no partial frame and nothing in
    flight, the frame deadline from a frame's header to its last byte; a frame over the limit is
    answered ``too_large`` and the connection closed (the rest of the stream cannot be trusted to
    be framed); at most ``max_pending_per_connection`` requests run at once, and a client that
    does not read its replies stops being read from.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._limits = gateway._limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._frame_started: float | None = None  # when the header of a partial frame arrived
        self.last_activity = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._lost = False  # connection_lost was called
        self._writing_paused = False
        self._reads = asyncio.Semaphore(READS_PER_CONNECTION)
        self._writable = asyncio.Event()
        self._writable.set()
        self._stalled_since = 0.0  # writing paused: when the client last took reply bytes
        self._stalled_size = 0
        self._closing = False
        self._eof = False  # the client sent its last frame (EOF, or one that cannot be framed)
        self._last_word: dict[str, Any] | None = None  # a reply to send just before closing

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        connections = self._gateway._connections
        if len(connections) >= self._limits.max_connections:
            # Make room by closing the connection silent the longest among those idle (nothing
            # in flight, no partial frame) or not reading their replies: such sockets cannot
            # hold every slot for the whole idle timeout. With none, the newcomer is refused.
            now = self._loop.time()
            idle = [c for c in connections if c.evictable(now)]
            if not idle:
                self._refuse(error_reply(None, "unavailable", "too many connections"))
                return
            victim = min(idle, key=lambda c: c.last_activity)
            log.info("gateway: at %d connections; closing the idlest", len(connections))
            victim.close()
        self._gateway._connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._arm_timer(min(self._limits.idle_timeout, self._limits.frame_timeout))

    def data_received(self, data: bytes) -> None:
        if self._closing or self._eof:
            return
        self._buffer += data
        self.last_activity = self._loop.time()
        self._cut_frames()

    def eof_received(self) -> bool | None:
        """The client finished sending: answer what it sent, then close."""
        self._eof = True
        self._cut_frames()  # complete frames still held back run; a partial one is dropped
        if not self._tasks:
            self._finish()
        return True  # keep our side open for the replies still to come

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._lost = True
        self._gateway._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        """Over a MiB of replies unread: stop reading (and starting) its requests."""
        self._writing_paused = True
        self._writable.clear()
        self._start_write_clock()
        self._update_reading()
        self._wake_by(self._stalled_since + self._limits.write_timeout)

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable.set()
        if self._buffer and not self._closing:
            self._cut_frames()  # frames read before the pause
        else:
            self._update_reading()

    # --- frames in ------------------------------------------------------------------------

    def _cut_frames(self) -> None:
        buffer, size = self._buffer, HEADER.size
        while (
            not self._closing
            and not self._writing_paused
            and len(self._tasks) < self._limits.max_pending_per_connection
        ):
            if len(buffer) < size:
                self._partial_frame()
                break
            (length,) = HEADER.unpack_from(buffer)
            if length > self._limits.max_frame:
                # Nothing after this header can be trusted to be framed: read no more, answer
                # what came before, then this, then close.
                self._last_word = error_reply(
                    None, "too_large", f"frame of {length} bytes exceeds {self._limits.max_frame}"
                )
                buffer.clear()
                self._eof = True
                if self._transport is not None and self._transport.is_reading():
                    self._transport.pause_reading()
                if not self._tasks:
                    self._finish()
                return
            if len(buffer) < size + length:
                self._partial_frame()
                break
            body = bytes(buffer[size : size + length])
            del buffer[: size + length]
            self._frame_started = None
            request = self._gateway.parse_frame(body)
            del body  # a waiting request keeps only its validated arguments
            if isinstance(request, dict):
                self.send(request)  # refused at once
                continue
            _current_connection.set(self)  # the task's context: reads find their connection
            task = self._loop.create_task(self._answer(request))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        self._update_reading()

    @contextlib.asynccontextmanager
    async def read_slot(self) -> AsyncIterator[None]:
        """One of this connection's read slots, taken once its replies are being read."""
        async with self._reads:
            await self._writable.wait()
            yield

    def _partial_frame(self) -> None:
        """Part of a frame (maybe only part of its header) is in: its deadline starts now."""
        if not self._buffer:
            self._frame_started = None
        elif self._eof:
            self._buffer.clear()  # the client sent its last bytes: this frame never completes
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = self._loop.time()
            self._wake_by(self._frame_started + self._limits.frame_timeout)

    async def _answer(self, request: ParsedRequest) -> None:
        self.send(await self._gateway._execute(request))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._closing and self._buffer:
            self._cut_frames()  # frames held back by the pending limit
        if self._eof and not self._tasks:
            self._finish()
        else:
            self._update_reading()

    def _finish(self) -> None:
        """Everything asked is answered: write the last replies and close."""
        transport = self._transport
        if self._closing or transport is None:
            return
        if self._last_word is not None:
            self._out.append(encode_frame(self._last_word))
        self._flush()
        self._close_after_writing()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing or self._eof or transport.is_closing():
            return
        full = len(self._tasks) >= self._limits.max_pending_per_connection
        if self._writing_paused or full:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()
            if self._frame_started is not None:
                # The frame deadline counts only while we read: restart it.
                self._frame_started = self._loop.time()
                self._wake_by(self._frame_started + self._limits.frame_timeout)

    # --- deadlines ------------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._loop.call_later(max(delay, 0.01), self._check_deadlines)

    def _wake_by(self, when: float) -> None:
        """Make sure the deadline check runs no later than `when`."""
        if self._timer is not None and self._timer.when() > when:
            self._timer.cancel()
            self._arm_timer(when - self._loop.time())

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
        if self._closing or transport is None:
            return
        now = self._loop.time()
        limits = self._limits
        if self._writing_paused:
            left = self._write_time_left(now)
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

    # --- replies out ----------------------------------------------------------------------

    def send(self, reply: dict[str, Any]) -> None:
        """Queue one reply; every reply queued in this loop pass leaves in one write, or at
        once when a MiB is queued (so the transport's pause applies before more is cut)."""
        if self._closing:
            return
        frame = encode_frame(reply)
        self._out.append(frame)
        self._out_bytes += len(frame)
        if self._out_bytes >= WRITE_HIGH_WATER:
            self._flush()  # the transport calls pause_writing() now if it is over the mark
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        frames, self._out, self._out_bytes = self._out, [], 0
        transport = self._transport
        if frames and transport is not None and not transport.is_closing():
            transport.write(b"".join(frames))

    def _refuse(self, reply: dict[str, Any]) -> None:
        """Answer once and close."""
        transport = self._transport
        assert transport is not None
        self._flush()  # replies already made go out first
        transport.write(encode_frame(reply))
        self._close_after_writing()

    def _start_write_clock(self) -> None:
        """Replies are waiting on the client: the write deadline starts now."""
        self._stalled_since = self._loop.time()
        self._stalled_size = self._transport.get_write_buffer_size() if self._transport else 0

    def _write_time_left(self, now: float) -> float:
        """Seconds the client has left to take some of its replies; any progress (the write
        buffer shrank) restarts the clock."""
        size = self._transport.get_write_buffer_size() if self._transport else 0
        if size < self._stalled_size:
            self._stalled_since = now  # it is reading, slowly
        self._stalled_size = size
        return self._stalled_since + self._limits.write_timeout - now

    def _close_after_writing(self) -> None:
        """Close once what is buffered is written; a client that takes none of it for
        write_timeout is cut off (one that keeps reading, however slowly, gets it all)."""
        transport = self._transport
        assert transport is not None
        self._closing = True
        transport.close()
        self._start_write_clock()
        self._watch_close()

    def _watch_close(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        if self._write_time_left(self._loop.time()) <= 0:
            transport.abort()
            return
        self._loop.call_later(min(1.0, self._limits.write_timeout), self._watch_close)

    def evictable(self, now: float) -> bool:
        """Silent for EVICT_IDLE_AFTER seconds and either idle (nothing in flight, no partial
        frame) or not reading its replies."""
        return (
            not self._closing
            and (self._writing_paused or (not self._tasks and not self._buffer))
            and now - self.last_activity >= EVICT_IDLE_AFTER
        )

    def close(self) -> None:
        """Drop the connection (a deadline passed, the gateway is closing, or it made room for
        a newcomer). Replies a client has not taken are discarded: ``close`` alone would wait
        for it to read them, and one that never reads would hold its slot for ever."""
        self._closing = True
        self._gateway._connections.discard(self)
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


@dataclass(frozen=True)
class ParsedRequest:
    """A decoded, validated request waiting to run."""

    req_id: Any
    handler: Handler
    args: BaseModel


class Gateway:
    """The client interface: ops of DESIGN.md section 6 over length-prefixed msgpack frames."""

    def __init__(
        self,
        bridge: ActorBridge,
        db_path: str,
        *,
        limits: GatewayLimits,
        admin_token: str | None = None,
    ) -> None:
        self._bridge = bridge
        self._db_path = db_path
        self._limits = limits
        self._admin_token = admin_token
        self._reader: SqliteEventStore | None = None
        # Reads run in a thread of their own so a long audit never blocks the event loop.
        self._read_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="reads")
        self._connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._slots: asyncio.Semaphore | None = None
        self._exclusive = asyncio.Lock()  # audits: one full scan at a time
        self.accepting_orders = True
        self.stalls = 0  # requests refused because the actor system was saturated
        self._ops: dict[str, tuple[type[BaseModel], Handler]] = {
            "ping": (NoArgs, self._ping),
            "place_order": (PlaceOrderArgs, self._place_order),
            "get_order": (GetOrderArgs, self._get_order),
            "read_stream": (ReadStreamArgs, self._read_stream),
            "stock": (StockArgs, self._stock),
            "set_stock": (SetStockArgs, self._set_stock),
            "audit": (NoArgs, self._audit),
            "system_info": (AdminArgs, self._system_info),
        }

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 picks a free one)."""
        self._reader = SqliteEventStore(self._db_path, readonly=True)
        self._slots = asyncio.Semaphore(self._limits.max_in_flight)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), host, port
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            await self._server.wait_closed()
        # A read still running finishes in its thread; the loop does not wait on it.
        await asyncio.to_thread(self._read_pool.shutdown, True)
        if self._reader is not None:
            self._reader.close()

    # --- connections ----------------------------------------------------------------------

    # --- requests -------------------------------------------------------------------------

    async def handle_frame(self, body: bytes) -> dict[str, Any]:
        """One request frame in, one reply map out; nothing a client sends can raise past here."""
        request = self.parse_frame(body)
        return request if isinstance(request, dict) else await self._execute(request)

    def parse_frame(self, body: bytes) -> ParsedRequest | dict[str, Any]:
        """Decode and validate a frame: the request to run, or the error reply to send.

        Runs before the request waits for anything, so a pending request holds only its small
        validated arguments, never the (up to 1 MiB) frame: that is what bounds the memory a
        connection with many requests in flight can pin.
        """
        req_id: Any = None
        try:
            request = decode_body(body)
            req_id = request.get("id")
            if not isinstance(req_id, int | str | None) or isinstance(req_id, bool):
                req_id = None
                raise OpError("invalid", "id must be an integer or a string")
            if isinstance(req_id, str) and len(req_id) > MAX_ID_LENGTH:
                # A pending request keeps its id, and every reply echoes it: bounded, so
                # 2,048 pending requests cannot pin gigabytes.
                req_id = None
                raise OpError("invalid", f"id longer than {MAX_ID_LENGTH} characters")
            extra = set(request) - {"id", "op", "args"}
            if extra:
                raise OpError("invalid", f"unknown request keys: {sorted(map(str, extra))[:5]}")
            op, args = request.get("op"), request.get("args", {})
            if not isinstance(op, str):
                raise OpError("invalid", "op must be a string")
            if op not in self._ops:
                raise OpError(
                    "unknown_op", f"unknown op {op[:64]!r}; known: {', '.join(sorted(self._ops))}"
                )
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise OpError("invalid", "args must be a map")
            if not _within(args, MAX_ARG_VALUES):
                # Checked before validation: a frame of a million values would otherwise be
                # validated (and every error described) on the event loop, stalling everyone.
                raise OpError("invalid", f"args hold more than {MAX_ARG_VALUES} values")
            model, handler = self._ops[op]
            try:
                return ParsedRequest(req_id, handler, model.model_validate(args))
            except ValidationError as e:
                raise OpError("invalid", _describe(e)) from None
        except (FrameError, OpError) as e:
            return error_reply(req_id, e.code, e.message)
        except Exception:
            log.exception("gateway: request failed")
            return error_reply(req_id, "internal", "internal error")

    async def _execute(self, request: ParsedRequest) -> dict[str, Any]:
        try:
            return ok_frame(request.req_id, await request.handler(request.args))
        except OpError as e:
            return error_reply(request.req_id, e.code, e.message)
        except Exception:
            log.exception("gateway: request failed")
            return error_reply(request.req_id, "internal", "internal error")

    async def _ask(
        self,
        make: Callable[[int], ActorMessage],
        *,
        control: bool = False,
        timeout: float | None = None,
    ) -> ActorMessage:
        """Send a request to the OrderManager and wait for its reply (at most `timeout`, by
        default the request timeout). Clients' requests take one of the `max_in_flight`
        slots; the operator's (`control`) never wait for one."""
        if control:
            return await self._ask_now(make, timeout)
        assert self._slots is not None
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self._limits.saturated_wait)
            except TimeoutError:
                self.stalls += 1
                log.warning("gateway: actor system saturated (%d stalls so far)", self.stalls)
                raise OpError("unavailable", "the system is saturated; retry later") from None
        else:
            await self._slots.acquire()  # free slot: returns at once, no task, no timer
        try:
            return await self._ask_now(make, timeout)
        finally:
            self._slots.release()

    async def _ask_now(
        self, make: Callable[[int], ActorMessage], timeout: float | None = None
    ) -> ActorMessage:
        req_id, future = self._bridge.submit_async(make)
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            future.cancel()

        # One timer handle per request (asyncio.wait_for would add a waiter and callbacks).
        timer = asyncio.get_running_loop().call_later(
            self._limits.request_timeout if timeout is None else timeout, expire
        )
        try:
            reply = await future
        except asyncio.CancelledError:
            self._bridge.forget(req_id)
            if expired:
                raise OpError(
                    "unavailable",
                    "no answer in time; the request may still complete "
                    "(it is idempotent: send it again)",
                ) from None
            raise  # the caller was cancelled (its connection closed)
        finally:
            timer.cancel()
        if isinstance(reply, Refused):
            raise OpError(reply.code, reply.message)
        return reply

    async def _read(self, fn: Callable[[SqliteEventStore], Any], *, exclusive: bool = False) -> Any:
        """Run `fn` on the read-only store in the read pool. Per connection, at most
        READS_PER_CONNECTION run or wait in the pool at once, and none starts while that
        client has a MiB of replies unread, so one connection cannot queue thousands of reads
        ahead of everyone else's or pile their results up in memory. `exclusive` reads (the
        audit) also run one at a time across all connections."""
        connection = _current_connection.get()
        async with connection.read_slot() if connection else contextlib.nullcontext():
            return await self._read_now(fn, exclusive)

    async def _read_now(self, fn: Callable[[SqliteEventStore], Any], exclusive: bool) -> Any:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        timeout = self._limits.request_timeout
        if exclusive:
            try:
                await asyncio.wait_for(self._exclusive.acquire(), timeout)
            except TimeoutError:
                raise OpError("unavailable", "another audit is running; try later") from None
        try:
            future = loop.run_in_executor(self._read_pool, fn, self._reader)
        except BaseException:
            if exclusive:
                self._exclusive.release()
            raise
        if exclusive:
            # Held until the scan ends, even if nobody waits for it any more.
            future.add_done_callback(lambda _: self._exclusive.release())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise OpError("unavailable", "the read took too long; try again") from None

    async def _ping(self, args: NoArgs) -> Any:
        return {"pong": True, "base": self._bridge.base}

    async def _place_order(self, args: PlaceOrderArgs) -> Any:
        if not self.accepting_orders:
            raise OpError("unavailable", "the system is shutting down")
        reply = await self._ask(
            lambda req_id: PlaceOrder(
                req_id=req_id,
                order_id=args.order_id,
                customer_id=args.customer_id,
                lines=args.lines,
                payment_method=args.payment_method,
                wait=args.wait,
            )
        )
        assert isinstance(reply, OrderReply)
        return reply.order

    async def _get_order(self, args: GetOrderArgs) -> Any:
        events = await self._read(
            lambda r: decode_stream(r.read_stream(order_stream(args.order_id)))
        )
        if not events:
            raise OpError("not_found", f"no order {args.order_id}")
        return order_view(args.order_id, events)

    async def _read_stream(self, args: ReadStreamArgs) -> Any:
        # One page per request, decoded in the read thread: a long stream (`inventory`) can
        # neither block the event loop nor make a reply of tens of megabytes.
        views = await self._read(
            lambda r: [
                event_view(s) for s in r.read_stream(args.stream, args.from_version, args.limit)
            ]
        )
        if not views and args.from_version == 0:
            raise OpError("not_found", f"no stream {args.stream}")
        page: dict[str, Any] = {"stream": args.stream, "events": views}
        if len(views) == args.limit:
            page["next_version"] = views[-1]["version"] + 1
        return page

    async def _stock(self, args: StockArgs) -> Any:
        reply = await self._ask(
            lambda req_id: GetStock(req_id=req_id, product_ids=args.product_ids)
        )
        assert isinstance(reply, StockReport)
        missing = [p for p in args.product_ids if p not in reply.stock]
        if missing:
            raise OpError("not_found", f"unknown products: {', '.join(missing[:20])}")
        return reply.stock

    def _check_admin(self, op: str, token: str | None) -> None:
        if self._admin_token is not None and token != self._admin_token:
            raise OpError("forbidden", f"{op} needs the admin token")

    async def _system_info(self, args: AdminArgs) -> Any:
        self._check_admin("system_info", args.admin_token)
        return {
            "base": self._bridge.base,
            "pids": await self.identities(),
            "gateway_pid": os.getpid(),
            "stalls": self.stalls,
        }

    async def _set_stock(self, args: SetStockArgs) -> Any:
        self._check_admin("set_stock", args.admin_token)
        reply = await self._ask(
            lambda req_id: SetStock(req_id=req_id, product_id=args.product_id, on_hand=args.on_hand)
        )
        assert isinstance(reply, StockReport)
        return reply.stock

    async def _audit(self, args: NoArgs) -> Any:
        """A full scan of the store, one at a time so audits cannot crowd out the other reads.
        The lock is taken after this connection's read slot (a client not reading its replies
        holds only its own slot, never every client's audit), waits at most the request
        timeout, and is released when the scan ends, not when a caller stops waiting."""
        return await self._read(audit, exclusive=True)

    # --- operator side --------------------------------------------------------------------

    async def drain(self, deadline: float, hurry: asyncio.Event | None = None) -> int:
        """Refuse new orders and wait (up to `deadline` seconds, or until `hurry` is set) for
        in-flight ones to end; returns how many were left (they resume on the next start)."""
        self.accepting_orders = False
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        in_flight = -1  # unknown until the manager answers
        while not (hurry is not None and hurry.is_set()):
            left = end - loop.time()
            with contextlib.suppress(OpError):  # no answer in time: ask again until the end
                reply = await self._ask(
                    lambda req_id: Drain(req_id=req_id),
                    control=True,
                    timeout=min(max(left, 0.1), DRAIN_ASK_TIMEOUT),
                )
                assert isinstance(reply, DrainStatus)
                in_flight = reply.in_flight
            if in_flight == 0 or loop.time() >= end:
                break
            await asyncio.sleep(0.05)
        # Thespian stops the services before the manager; it must not restart them.
        with contextlib.suppress(OpError):
            await self._ask(
                lambda req_id: Drain(req_id=req_id, final=True),
                control=True,
                timeout=DRAIN_ASK_TIMEOUT,
            )
        return max(in_flight, 0)

    async def identities(self) -> dict[str, int]:
        """The OS pids of the manager, services and live sagas."""
        reply = await self._ask(lambda req_id: Identify(req_id=req_id))
        assert isinstance(reply, Identities)
        return reply.pids


def _within(value: Any, budget: int) -> bool:
    """Whether `value` (decoded msgpack) holds at most `budget` values, counted without
    recursion and stopping as soon as the budget is spent."""
    stack, left = [value], budget
    while stack:
        item = stack.pop()
        left -= 1
        if left < 0:
            return False
        if isinstance(item, dict):
            left -= len(item)  # keys
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return left >= 0


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "args"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
