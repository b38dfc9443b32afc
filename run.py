"""Start the order service: the Thespian actor system and the client gateway in front of it.

    python run.py [--base simple|queue|tcp] [--store URL | --db PATH] [--host 127.0.0.1]
                  [--port 7300] [--node-id ID] [--lease-ttl S] [--step-timeout SECONDS]
                  [--payment-provider simulated|URL]

--store takes sqlite:///PATH (the default, sqlite:///orders.db), postgresql://USER@HOST:PORT/DB
or memory: (everything in this process, nothing durable; simple base only); --db PATH is short
for sqlite:///PATH.

On PostgreSQL the process is one node of several sharing the database (DESIGN.md section 10):
it holds a lease under --node-id, owns the orders it places, takes over the orders of nodes
whose leases expire, and exits with status 4 if it cannot keep its own lease.

Prints ``ready <host>:<port>`` once clients can connect. SIGINT/SIGTERM stop taking orders, let
the orders in flight finish (up to --drain-timeout), shut the actors down and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import logging.config
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from gateway.http.server import HttpServer
from gateway.ops import OpsConfig
from gateway.server import Gateway, GatewayLimits
from messages.commands import Configure, LeaseLost, TakeOver
from messages.events import FINAL_TYPE_NAMES, order_id_of, order_stream
from observability.tail import StoreTail
from runtime.bridge import ActorBridge, configure
from runtime.lease import DEFAULT_TTL, NodeLease, acquire, default_node_id
from runtime.logs import FORMATS, log_config
from runtime.proc_tree import RUN_MARKER
from store import (
    EventStore,
    Fence,
    LeaseHeldError,
    PostgresOptions,
    describe,
    open_store,
    sqlite_path,
    store_url,
)
from store.records import StoreError

ORDERS = order_stream("")
EXIT_LEASE_LOST = 4  # the node lost its lease: another node owns its orders now
DEFAULT_DB = "orders.db"
DEFAULT_STORE = f"sqlite:///{DEFAULT_DB}"
DEFAULT_HTTP_PORT = 8300


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the layout of the description and shows every option's default."""


PAYMENT_TOKENS = """payment test tokens (client.py place --payment-method):
  tok_visa            approved: paid (default)
  tok_chargeDeclined  declined: stock released, cancelled
  tok_error           the Payment actor raises: compensated, failed
  tok_timeout         never answers: step timeout, payment voided, cancelled
  tok_late            approves after the step timeout: cancelled, the late charge refunded
  tok_crash           the Payment actor's process exits (process bases): failed, Payment restarts
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of DESIGN.md section 6, plus operator knobs."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=PAYMENT_TOKENS, formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--base",
        choices=("simple", "queue", "tcp"),
        default="simple",
        help="Thespian system base (simple: one process)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--store",
        help=f"event store URL: sqlite:///PATH, postgresql://USER@HOST:PORT/DB or memory: "
        f"(default {DEFAULT_STORE})",
    )
    where.add_argument("--db", help="SQLite event store file (created): short for sqlite:///PATH")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address")
    parser.add_argument("--port", type=int, default=7300, help="gateway port (0: any free)")
    parser.add_argument(
        "--node-id",
        default=None,
        help="this node's id on a shared (PostgreSQL) store; default HOSTNAME:PORT, the same "
        "across restarts",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=DEFAULT_TTL,
        help="seconds a node's lease lasts without renewal (renewed about once a second); "
        "another node takes its orders over once it expires",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"HTTP API and console port on the gateway's host; not given: {DEFAULT_HTTP_PORT}, "
        "or any free port when --port is 0 (throwaway nodes do not collide); 0: disabled",
    )
    parser.add_argument(
        "--step-timeout",
        type=float,
        default=5.0,
        help="seconds a saga waits for a step before compensating",
    )
    parser.add_argument(
        "--synchronous",
        choices=("FULL", "NORMAL"),
        default="FULL",
        help="SQLite synchronous mode (FULL: every commit survives power loss)",
    )
    parser.add_argument(
        "--admin-token",
        default=argparse.SUPPRESS,  # never printed by --help: it may come from the environment
        help="token required by admin ops (set_stock); env ORDER_ADMIN_TOKEN",
    )
    parser.add_argument(
        "--payment-latency",
        type=float,
        default=0.0,
        help="seconds the simulated provider takes to approve tok_visa",
    )
    parser.add_argument(
        "--payment-provider",
        default="simulated",
        metavar="simulated|URL",
        help="who moves the money: simulated (the test tokens) or http://HOST:PORT, a "
        "Stripe-style HTTP API (providers/http_payment.py)",
    )
    parser.add_argument(
        "--warm-sagas",
        type=int,
        default=8,
        help="process bases: saga actors forked ahead of need (0: fork one per order on demand)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight orders finish on SIGINT/SIGTERM",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="seconds a client connection may stay silent",
    )
    parser.add_argument(
        "--admin-port",
        type=int,
        default=1900,
        help="Thespian admin port of the tcp base (private network only)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ORDER_LOG_LEVEL", "WARNING"),
        help="logging level; env ORDER_LOG_LEVEL",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="plain",
        help="log lines as text, or one JSON object per line (with order_id) for machines",
    )
    args = parser.parse_args(argv)
    if "admin_token" not in args:
        args.admin_token = os.environ.get("ORDER_ADMIN_TOKEN")
    if args.store is None:
        args.store = store_url(args.db) if args.db is not None else DEFAULT_STORE
    elif not args.store.startswith(("sqlite:///", "postgresql://", "postgres://", "memory:")):
        parser.error(f"--store {args.store!r}: use sqlite:///PATH, postgresql://... or memory:")
    path = sqlite_path(args.store)
    if path is not None:
        args.store = store_url(str(path))  # absolute: every actor process opens the same file
    if args.store.startswith("memory:") and args.base != "simple":
        parser.error(
            f"--store {args.store} keeps the events in one process's memory, but the {args.base} "
            "base runs each actor in a process of its own: use --base simple, or "
            "sqlite:///PATH or postgresql://..."
        )
    if args.payment_provider != "simulated" and not args.payment_provider.startswith(
        ("http://", "https://")
    ):
        parser.error(f"--payment-provider {args.payment_provider!r}: use simulated or http://...")
    if args.http_port is None:
        args.http_port = -1 if args.port == 0 else DEFAULT_HTTP_PORT
    elif args.http_port == 0:
        args.http_port = None  # disabled
    if args.step_timeout <= 0:
        parser.error("--step-timeout must be positive")
    if args.lease_ttl <= 0:
        parser.error("--lease-ttl must be positive")
    args.shared = args.store.startswith(("postgresql://", "postgres://"))
    if args.shared and args.node_id is None:
        # With --port 0 this is HOSTNAME:0 for every such node: a second one waits for the
        # first's lease, then refuses to start. Several nodes on one machine need --node-id.
        args.node_id = default_node_id(args.host, args.port)
    if not _is_loopback(args.host) and not args.admin_token:
        parser.error(
            f"refusing to listen on non-loopback {args.host} without --admin-token "
            "(or ORDER_ADMIN_TOKEN)"
        )
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status."""
    serving = _Serving(args)
    serving.catch_signals()
    # The actor system (and on the process bases its processes) starts before the gateway
    # socket exists, so no actor process inherits the client-facing socket.
    await serving.loop.run_in_executor(None, serving.bridge.start)
    try:
        return await serving.run()
    finally:
        await serving.close()


class _Serving:
    """One run of the node, in start-up steps: join the shared store as a node, configure the
    actors (recovery), open the gateway and the HTTP API, wait for a signal and drain. Each
    step keeps what it started, so ``close`` stops exactly that."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        capabilities: dict[str, Any] = {}
        if args.base == "tcp":
            capabilities["Admin Port"] = args.admin_port
        self.bridge = ActorBridge(
            args.base,
            capabilities=capabilities,
            log_defs=log_config(args.log_level, args.log_format),
        )
        self.loop = asyncio.get_running_loop()
        self.stop, self.hurry = asyncio.Event(), asyncio.Event()
        self.node: Node | None = None
        self.tail: StoreTail | None = None
        self.gateway: Gateway | None = None
        self.http: HttpServer | None = None

    def catch_signals(self) -> None:
        """Signals are ours from the start: one arriving during start-up (recovery can take a
        while) stops the system in order instead of killing run.py and orphaning its actor
        processes. A second one cuts the drain short."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()

    async def run(self) -> int:
        """The steps after the actor system started; returns the exit status."""
        if self.stop.is_set():
            return 0
        if self.args.shared and not await self._join_node():
            return 1
        recovered = await self.loop.run_in_executor(
            None, lambda: configure(self.bridge, self._configure_message, 120.0)
        )
        gateway, tail = self._open_gateway()
        if self.stop.is_set():
            await gateway.drain(0.0)  # stopped during start-up: tell the manager, then stop
            return 0  # the orders being recovered resume on the next start
        address = await self._listen(gateway, tail)
        node = self.node
        node_text = (
            f" node={node.fence.node_id} epoch={node.fence.epoch}" if node is not None else ""
        )
        print(
            f"ready {address} base={self.args.base} store={describe(self.args.store)} "
            f"recovering={recovered}{node_text}",
            flush=True,
        )
        return await self._serve_until_stopped(gateway)

    async def _join_node(self) -> bool:
        """On a shared store: take this node's lease; False if it cannot."""
        try:
            self.node = await self.loop.run_in_executor(None, Node.join, self.args, self.bridge)
        except (LeaseHeldError, StoreError) as e:
            _say(f"cannot join as node {self.args.node_id!r}: {e}")
            return False
        return True

    def _configure_message(self, req_id: int) -> Configure:
        args, node = self.args, self.node
        return Configure(
            req_id=req_id,
            store_url=args.store,
            synchronous=args.synchronous,
            step_timeout=args.step_timeout,
            crash_exits_process=args.base != "simple",
            warm_sagas=args.warm_sagas if args.base != "simple" else 0,
            payment_latency=args.payment_latency,
            payment_provider=args.payment_provider,
            node_id=node.fence.node_id if node is not None else None,
            epoch=node.fence.epoch if node is not None else 0,
        )

    def _open_gateway(self) -> tuple[Gateway, StoreTail]:
        """The store tail and the gateway over the configured actors (not listening yet)."""
        args = self.args
        limits = GatewayLimits(
            idle_timeout=args.idle_timeout,
            request_timeout=max(60.0, 10 * args.step_timeout),
            max_in_flight=20_000 if args.base == "simple" else 24,
        )
        # One reader follows the store for list_orders, the metrics and the console's feed.
        tail = self.tail = StoreTail(lambda: open_store(args.store, readonly=True))
        tail.start()
        ops = OpsConfig(admin_token=args.admin_token, orders=tail, node_id=args.node_id)
        self.gateway = Gateway(self.bridge, args.store, limits=limits, ops=ops)
        return self.gateway, tail

    async def _listen(self, gateway: Gateway, tail: StoreTail) -> str:
        """Open the gateway's socket, start taking orders over (as a node) and open the HTTP
        API; the addresses for the ready line."""
        host, port = await gateway.start(self.args.host, self.args.port)
        if self.node is not None:
            self.node.lease.address = f"{host}:{port}"
            self.node.lease.start_taking_over()
            gateway.node_address = self.node.lease.address
        if self.args.http_port is None:
            return f"{host}:{port}"
        self.http = HttpServer(gateway, tail, ready=lambda: not self.stop.is_set())
        http_host, http_port = await self.http.start(self.args.host, max(self.args.http_port, 0))
        return f"{host}:{port} http={http_host}:{http_port}"

    async def _serve_until_stopped(self, gateway: Gateway) -> int:
        """Serve until a signal (then drain) or, as a node, until the lease is lost."""
        node = self.node
        if node is not None and await node.watch(self.stop):
            _say(
                f"{node.lease.lost()}: stopped driving orders; the other nodes take them "
                f"over. Exiting with status {EXIT_LEASE_LOST}; start it again to rejoin."
            )
            await node.stop_driving(self.bridge)
            return EXIT_LEASE_LOST
        await self.stop.wait()
        _say(
            f"stopping: no new orders; letting the orders in flight finish (up to "
            f"{self.args.drain_timeout:g} s; a second Ctrl-C stops at once)"
        )
        left = await gateway.drain(self.args.drain_timeout, self.hurry)
        if left:
            _say(f"stopping with {left} orders in flight; they resume on the next start")
        return 0

    async def close(self) -> None:
        """Stop what the steps started, the HTTP API first and the lease last."""
        if self.http is not None:
            await self.http.close()
        if self.gateway is not None:
            await self.gateway.close()
        if self.tail is not None:
            self.tail.stop()
        await self.loop.run_in_executor(None, self.bridge.stop)
        if self.node is not None:
            # After the actors stopped: a released lease lets another node take the orders
            # left in flight over at once.
            await self.loop.run_in_executor(None, self.node.close)


class Node:
    """This process as one node of a shared store: its lease (renewed in a thread), the
    takeovers it hands to the manager, and the watch that stops it when the lease is lost."""

    def __init__(self, store: EventStore, lease: NodeLease) -> None:
        self.store = store
        self.lease = lease
        self.fence = lease.fence

    @classmethod
    def join(cls, args: argparse.Namespace, bridge: ActorBridge) -> Node:
        """Take the node id's lease (waiting out a previous incarnation's), adopt unfinished
        orders nobody owns (placed before there were nodes), and start renewing."""
        store = open_store(args.store, postgres=PostgresOptions(pool_size=2))
        try:
            address = f"{args.host}:{args.port}"
            epoch = acquire(store, args.node_id, address, args.lease_ttl)
            fence = Fence(args.node_id, epoch)
            adopted = store.adopt_unowned(args.node_id, ORDERS, FINAL_TYPE_NAMES)
            if adopted:
                _say(f"node {args.node_id}: adopted {adopted} unfinished orders nobody owned")

            def hand_over(moved: dict[str, list[str]]) -> None:
                order_ids = tuple(order_id_of(s) for streams in moved.values() for s in streams)
                future = bridge.submit(lambda req_id: TakeOver(req_id=req_id, order_ids=order_ids))
                future[1].result(60)

            lease = NodeLease(store, fence, address, args.lease_ttl, hand_over)
            lease.start()
        except BaseException:
            store.close()
            raise
        return cls(store, lease)

    async def watch(self, stop: asyncio.Event) -> bool:
        """Wait for `stop` (False) or for the lease to be lost (True), checking the lease
        several times per renewal interval."""
        while not stop.is_set():
            if self.lease.lost() is not None:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease.interval / 4)
        return False

    async def stop_driving(self, bridge: ActorBridge) -> None:
        """Tell the manager to stop every saga now (the store refuses their writes anyway)."""
        reason = self.lease.lost() or "lease lost"
        _, future = bridge.submit(lambda req_id: LeaseLost(req_id=req_id, reason=reason))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(future), 2.0)

    def close(self) -> None:
        """Stop renewing; release the lease if it is still ours."""
        self.lease.stop(release=True)
        self.store.close()


def _say(text: str) -> None:
    """What a person at the terminal should see whatever the log level: start and stop."""
    print(f"run.py: {text}", file=sys.stderr, flush=True)


def _tune_gc() -> None:
    """Collect young garbage less often. Every order allocates thousands of short-lived objects
    (messages, events, saga states); at the default threshold (700) the collector ran hundreds
    of times a second and its pauses were the latency tail: paired runs at 100 in flight,
    ~960 -> ~1,150-1,300 orders/s and p99 ~200 -> ~110-135 ms (docs/performance.md). Orders
    leave no reference cycles now (tests/test_thespian_fixes.py), so what remains is walking
    the objects that are still alive; collection stays on for the cycles of rarer paths
    (exceptions, failures)."""
    gc.set_threshold(100_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    # Every process of this run (the actors on the process bases) inherits the marker, so the
    # bridge can find and stop them all at the end, even those not below run.py.
    os.environ.setdefault(RUN_MARKER, uuid.uuid4().hex)
    _tune_gc()
    if args.base == "tcp":
        # Thespian's TCP transport unpickles what reaches it: keep it on loopback unless the
        # operator names a private-network address (runtime.thespian_fixes binds to it).
        os.environ.setdefault("THESPIAN_BASE_IPADDR", "127.0.0.1")
    # Thespian logs to $TMPDIR/thespian.log by default, shared by everything on the machine.
    db = sqlite_path(args.store)
    log_dir = db.parent if db is not None else Path.cwd()
    os.environ.setdefault("THESPLOG_FILE", str(log_dir / "thespian.log"))
    logging.config.dictConfig(log_config(args.log_level, args.log_format))
    try:
        code = asyncio.run(serve(args))
    except KeyboardInterrupt:
        code = 0
    _say("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
