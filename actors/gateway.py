"""Gateway glue: the client-facing socket server and the bridge into the actor system.

Clients never reach Thespian: they speak length-prefixed msgpack (``messages.wire``) to an
asyncio server; validated requests become typed actor messages that one bridge thread hands to
the OrderManager. Reads (``get_order``, ``read_stream``, ``audit``) go straight to the SQLite file
through a read-only connection, so they cost the actors nothing.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from thespian.actors import ActorSystem, ActorSystemException, PoisonMessage

from actors.audit import audit
from actors.manager import OrderManager
from actors.views import decode_stream, event_view, order_view
from messages.commands import (
    ActorMessage,
    Batch,
    Configure,
    Configured,
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
from store import SqliteEventStore

log = logging.getLogger("orders.gateway")

SYSTEM_BASES = {
    "simple": "simpleSystemBase",
    "queue": "multiprocQueueBase",
    "tcp": "multiprocTCPBase",
}


class OpError(Exception):
    """A request refused with a wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- the bridge -------------------------------------------------------------------------------


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
        self._futures: dict[int, concurrent.futures.Future[ActorMessage]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = concurrent.futures.Future[None]()

    def start(self, timeout: float = 60.0) -> None:
        """Start the actor system and the OrderManager (blocks until both exist)."""
        self._thread = threading.Thread(target=self._run, name="actor-bridge", daemon=True)
        self._thread.start()
        self._started.result(timeout)

    def submit(
        self, make: Callable[[int], ActorMessage]
    ) -> tuple[int, concurrent.futures.Future[ActorMessage]]:
        """Send the message `make(req_id)` to the OrderManager; the future gets its reply."""
        req_id = next(self._ids)
        future: concurrent.futures.Future[ActorMessage] = concurrent.futures.Future()
        with self._lock:
            self._futures[req_id] = future
        self._outbox.put((req_id, make(req_id)))
        return req_id, future

    def forget(self, req_id: int) -> None:
        """Stop waiting for a reply (the caller gave up); a late reply is dropped."""
        with self._lock:
            self._futures.pop(req_id, None)

    def stop(self) -> None:
        """Shut the actor system down (actors get ActorExitRequest) and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.base == "queue":
            _kill_leftover_children()

    def _run(self) -> None:
        try:
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
            for future in pending:
                if not future.done():
                    future.set_exception(OpError("unavailable", "the actor system stopped"))
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
        while True:
            reply = system.listen(wait)
            if reply is None:
                return
            wait = timedelta(0)
            self._deliver(reply)

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
                            code="internal",
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
        if future is None:
            return
        # The caller may cancel the future (timeout, disconnect) at any moment from the event
        # loop's thread: a cancelled future refuses its result, and that is fine.
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_result(reply)


def _kill_leftover_children(grace: float = 5.0) -> None:
    """After shutdown, make sure no Thespian process of ours outlives run.py (the queue base's
    admin can be left waiting for an actor that is gone; it keeps run.py's command line)."""
    deadline = time.monotonic() + grace
    while True:
        children = _descendants(os.getpid())
        if not children:
            return
        if time.monotonic() > deadline:
            log.warning("bridge: killing %d leftover actor processes", len(children))
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# --- the server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayLimits:
    """What one client may cost the server."""

    max_frame: int = MAX_FRAME
    idle_timeout: float = 300.0  # seconds a connection may sit without sending a frame
    frame_timeout: float = 10.0  # seconds to deliver the rest of a frame once it has begun
    max_connections: int = 1024
    max_pending_per_connection: int = 2048
    request_timeout: float = 60.0
    # Requests in the actor system at once; the queue base deadlocks past a few dozen messages
    # in flight (Thespian #76, #91), so run.py lowers this there.
    max_in_flight: int = 20_000
    saturated_wait: float = 5.0


Handler = Callable[[Any], Awaitable[Any]]


WRITE_HIGH_WATER = 1 << 20  # bytes of unsent replies before a connection stops being read


class _ReplyWriter:
    """Coalesces the replies that become ready in one event-loop pass into one socket write
    (a write per reply was 7 % of the CPU under load)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._frames: list[bytes] = []
        self._scheduled = False

    def send(self, reply: dict[str, Any]) -> None:
        self._frames.append(encode_frame(reply))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        frames, self._frames = self._frames, []
        if frames and not self._writer.is_closing():
            self._writer.write(b"".join(frames))


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
        self._connections: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self._slots: asyncio.Semaphore | None = None
        self._audit_lock = asyncio.Lock()
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
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=self._limits.max_frame + HEADER.size
        )
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
        self._read_pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()

    # --- connections ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._limits.max_connections:
            await self._send_and_close(
                writer, error_reply(None, "unavailable", "too many connections")
            )
            return
        self._connections.add(writer)
        out = _ReplyWriter(writer)
        pending = asyncio.Semaphore(self._limits.max_pending_per_connection)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                if writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    # A client that does not read its replies stops being read from.
                    await writer.drain()
                header = await asyncio.wait_for(
                    reader.readexactly(HEADER.size), self._limits.idle_timeout
                )
                (length,) = HEADER.unpack(header)
                if length > self._limits.max_frame:
                    # The rest of the stream cannot be trusted to be framed: answer and close.
                    await self._send_and_close(
                        writer,
                        error_reply(
                            None,
                            "too_large",
                            f"frame of {length} bytes exceeds {self._limits.max_frame}",
                        ),
                    )
                    return
                body = await asyncio.wait_for(
                    reader.readexactly(length), self._limits.frame_timeout
                )
                request = self.parse_frame(body)
                del body  # a waiting request keeps only its validated arguments
                if isinstance(request, dict):
                    out.send(request)  # refused at once
                    continue
                await pending.acquire()
                task = asyncio.create_task(self._answer(request, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: pending.release())
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            self._connections.discard(writer)
            for task in tasks:
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send_and_close(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            writer.write(encode_frame(reply))
            await asyncio.wait_for(writer.drain(), 5)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _answer(self, request: ParsedRequest, out: _ReplyWriter) -> None:
        out.send(await self._execute(request))

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

    async def _ask(self, make: Callable[[int], ActorMessage]) -> ActorMessage:
        assert self._slots is not None
        try:
            await asyncio.wait_for(self._slots.acquire(), self._limits.saturated_wait)
        except TimeoutError:
            self.stalls += 1
            log.warning("gateway: actor system saturated (%d stalls so far)", self.stalls)
            raise OpError("unavailable", "the system is saturated; retry later") from None
        try:
            req_id, future = self._bridge.submit(make)
            try:
                reply = await asyncio.wait_for(
                    asyncio.wrap_future(future), self._limits.request_timeout
                )
            except TimeoutError:
                self._bridge.forget(req_id)
                raise OpError(
                    "unavailable",
                    "no answer in time; the request may still complete "
                    "(it is idempotent: send it again)",
                ) from None
        finally:
            self._slots.release()
        if isinstance(reply, Refused):
            raise OpError(reply.code, reply.message)
        return reply

    async def _read(self, fn: Callable[[SqliteEventStore], Any]) -> Any:
        assert self._reader is not None
        reader = self._reader
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, fn, reader)

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
        # A full scan of the store: one at a time, so audits cannot crowd out the other reads.
        async with self._audit_lock:
            return await self._read(audit)

    # --- operator side --------------------------------------------------------------------

    async def drain(self, deadline: float) -> int:
        """Refuse new orders and wait (up to `deadline` seconds) for in-flight ones to end."""
        self.accepting_orders = False
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            reply = await self._ask(lambda req_id: Drain(req_id=req_id))
            assert isinstance(reply, DrainStatus)
            if reply.in_flight == 0 or loop.time() >= end:
                break
            await asyncio.sleep(0.05)
        # Thespian stops the services before the manager; it must not restart them.
        await self._ask(lambda req_id: Drain(req_id=req_id, final=True))
        return reply.in_flight

    async def identities(self) -> dict[str, int]:
        """The OS pids of the manager, services and live sagas."""
        reply = await self._ask(lambda req_id: Identify(req_id=req_id))
        assert isinstance(reply, Identities)
        return reply.pids


def configure(bridge: ActorBridge, message: Callable[[int], Configure], timeout: float) -> int:
    """Boot the OrderManager (services, recovery); returns how many orders it is recovering."""
    reply = bridge.submit(message)[1].result(timeout)
    if isinstance(reply, Refused):
        raise OpError(reply.code, reply.message)
    assert isinstance(reply, Configured)
    return reply.recovered


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "args"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
