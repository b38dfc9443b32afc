"""`python loadtest.py` / `python -m loadgen`: plan, (spawn,) prepare stock, drive, audit, report.

Exit status: 0 when the audit is ok and every order reached paid/cancelled/failed; 1 otherwise;
2 for bad arguments (and --plot without matplotlib); 3 when the server cannot be spawned or
reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from client import Client, ClientError, ConnectionFailed
from loadgen.drive import LoadRun
from loadgen.nodes import SpawnedNodes, nodes_line
from loadgen.options import UsageError, parse_args
from loadgen.plan import OrderShape, PlannedOrder, arrival_offsets, format_mix, plan_orders
from loadgen.plot import PlotUnavailableError, require_matplotlib, write_plot
from loadgen.progress import Progress
from loadgen.report import RunShape, fulfilment, render_report, server_figures, summarize
from loadgen.spawn import SpawnedServer, SpawnError
from loadgen.stock import apply_changes, check_scarce, describe_changes, stock_changes

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _error(message: str) -> None:
    print(f"loadtest.py: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; returns the exit status (see the module docstring)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except UsageError as e:
        _error(f"error: {e}")
        return EXIT_USAGE
    if args.plot:
        try:
            require_matplotlib()
        except PlotUnavailableError as e:
            _error(f"error: {e}")
            return EXIT_USAGE

    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    run_id = uuid.uuid4().hex[:8]
    plan = plan_orders(args.orders, rng=random.Random(args.seed), run_id=run_id, shape=_shape(args))
    try:
        server, nodes = _spawn(args)
    except SpawnError as e:
        _error(str(e))
        return EXIT_UNAVAILABLE
    try:
        return _drive(args, run_id, plan, server, nodes)
    except ConnectionFailed as e:
        _error(e.message)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("\nloadtest.py: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        _stop(server, nodes)


def _stop(server: SpawnedServer | None, nodes: SpawnedNodes | None) -> None:
    """Stop what `_spawn` started (PostgreSQL too), saying if anything exited badly."""
    if server is not None:
        code = server.stop()
        if code != 0:
            _error(f"run.py exited with status {code}; its log:\n{server.log_tail()}")
        server.remove()
    if nodes is not None:
        tails = nodes.log_tails()
        codes = nodes.stop()
        if any(codes):
            _error(f"nodes exited with statuses {codes}; their logs:\n{tails}")


def _spawn(args: argparse.Namespace) -> tuple[SpawnedServer | None, SpawnedNodes | None]:
    """Start the private run.py (--spawn) or the nodes on a private PostgreSQL
    (--spawn-nodes), and aim the run at them; nothing for a named target."""
    if args.spawn_nodes:
        nodes = SpawnedNodes(args.spawn_nodes, base=args.base, extra=_run_py_options(args))
        args.targets = nodes.targets
        where = ", ".join(f"n{n} {h}:{p}" for n, (h, p) in enumerate(args.targets, 1))
        print(
            f"spawned PostgreSQL (fsync off), {args.spawn_nodes} nodes (base {args.base}): {where}"
        )
        return None, nodes
    if not args.spawn:
        return None, None
    server = SpawnedServer(base=args.base, extra=_run_py_options(args))
    args.targets = [(server.host, server.port)]
    print(
        f"spawned run.py (pid {server.proc.pid}, base {args.base}) at {server.host}:{server.port}"
    )
    return server, None


def _shape(args: argparse.Namespace) -> OrderShape:
    return OrderShape(
        mix=args.mix,
        lines=args.lines,
        scarce_share=args.scarce_share if args.scarce > 0 else 0.0,
        ship_share=args.ship_share,
        carrier_mix=args.carrier_mix,
        cancel_share=args.cancel_share,
        cancel_within=args.cancel_within,
    )


def _run_py_options(args: argparse.Namespace) -> list[str]:
    options = {
        "--step-timeout": args.step_timeout,
        "--payment-latency": args.payment_latency,
        "--synchronous": args.synchronous,
        "--warm-sagas": args.warm_sagas,
    }
    return [item for k, v in options.items() if v is not None for item in (k, str(v))]


def _fulfilment_line(args: argparse.Namespace) -> str:
    """The run's shipping and cancels, for its first line (nothing when it has neither)."""
    parts = []
    if args.ship_share > 0:
        parts.append(f"shipping {args.ship_share:g} ({format_mix(args.carrier_mix)})")
    if args.cancel_share > 0:
        parts.append(f"cancels {args.cancel_share:g} within {args.cancel_within:g} s")
    return "".join(f", {part}" for part in parts)


@contextlib.contextmanager
def _connected(
    targets: Sequence[tuple[str, int]], count: int, timeout: float
) -> Iterator[list[Client]]:
    """`count` clients, round-robin over the targets (the first of each target comes first)."""
    clients: list[Client] = []
    try:
        for n in range(count):
            host, port = targets[n % len(targets)]
            clients.append(Client(host, port, timeout=timeout))
        yield clients
    finally:
        for client in clients:
            client.close()


def _prepare(
    args: argparse.Namespace, admins: Sequence[Client], plan: Sequence[PlannedOrder], own: bool
) -> int:
    """Set the stock on every target; returns SKU-SCARCE's units reserved before the run.

    On a server we did not start, say what changes before changing it (on stderr, so it is seen
    even when stdout goes to a file).
    """
    scarce_before = 0
    for (host, port), admin in zip(args.targets, admins, strict=False):
        changes, scarce_before = stock_changes(admin, plan, args.scarce)
        text = describe_changes(changes, plan)
        if own:
            print(text)
        else:
            _error(
                f"this run changes the server at {host}:{port}: it places {len(plan)} orders "
                f"there (they stay in its store); {text}"
            )
        apply_changes(admin, changes, args.admin_token)
    return scarce_before


def _drive(
    args: argparse.Namespace,
    run_id: str,
    plan: Sequence[PlannedOrder],
    server: SpawnedServer | None,
    nodes: SpawnedNodes | None,
) -> int:
    # The client's own timeout only bounds connect and the setup/audit calls; orders have theirs.
    timeout = max(60.0, args.order_timeout)
    with _connected(args.targets, args.connections, timeout) as clients:
        admins = clients[: len(args.targets)]
        base = args.base if server is not None else admins[0].ping().get("base")
        try:
            scarce_before = _prepare(args, admins, plan, own=server is not None or bool(nodes))
        except ClientError as e:
            if isinstance(e, ConnectionFailed):
                raise
            _error(f"preparing stock failed: {e}")
            return EXIT_FAILED
        rate = args.rate or None
        mode = f"open loop at {rate:g} orders/s, cap" if rate else "concurrency"
        print(
            f"run {run_id}: {args.orders} orders, {mode} {args.concurrency}, "
            f"{args.connections} connections, seed {args.seed}, mix {format_mix(args.mix)}"
            + _fulfilment_line(args)
        )
        server_cpu0 = server.cpu_seconds() if server is not None else None
        nodes_cpu0 = nodes.cpu_seconds() if nodes is not None else {}
        # The server's RSS before the orders arrive: the base that in-flight orders add to.
        rss_before = server.rss_kib() if server is not None else None
        result = LoadRun(
            clients,
            plan,
            concurrency=args.concurrency,
            order_timeout=args.order_timeout,
            progress=None if args.no_progress else Progress(sys.stderr),
            on_tick=server.sample_rss if server is not None else None,
            arrivals=arrival_offsets(len(plan), rate, args.seed) if rate else None,
        ).run()
        shape = RunShape(
            base=base,
            concurrency=args.concurrency,
            connections=args.connections,
            mix=args.mix,
            seed=args.seed,
            lines=args.lines,
            rate=rate,
        )
        summary = summarize(len(plan), result, shape)
        summary.update(fulfilment(plan, result))
        if server is not None:
            # Closed loop: orders in flight at the peak are at most `concurrency` (open loop has
            # no such bound: the cap is not the number in flight).
            in_flight = None if rate else min(args.concurrency, args.orders)
            summary["server"] = server_figures(
                server, result.wall_s, server_cpu0, rss_before, in_flight
            )
        if nodes is not None:
            terminal = len(plan) - summary["not_terminal"]
            summary["nodes"] = nodes.figures(result.wall_s, nodes_cpu0, terminal, os.cpu_count())
        scarce_ok = True
        if args.scarce > 0:
            summary["scarce"] = check_scarce(
                admins[0], args.scarce, plan, result.statuses, scarce_before
            )
            scarce_ok = summary["scarce"]["ok"]
        audit = _audit(args.targets, admins)
    summary["audit"] = audit
    print(render_report(summary, audit))
    if "nodes" in summary:
        print(nodes_line(summary["nodes"]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"summary written to {args.json}")
    if args.plot:
        meta = {**summary, "mix": format_mix(args.mix), "rate": rate}
        write_plot(args.plot, result, meta)
        print(f"plot written to {args.plot}")
    ok = audit.get("ok") is True and summary["not_terminal"] == 0 and scarce_ok
    return EXIT_OK if ok else EXIT_FAILED


def _audit(targets: Sequence[tuple[str, int]], admins: Sequence[Client]) -> dict[str, Any]:
    """The audit of the one target, or every target's under `targets` and ok if all are."""
    audits: dict[str, dict[str, Any]] = {}
    for (host, port), admin in zip(targets, admins, strict=True):
        try:
            audits[f"{host}:{port}"] = admin.audit()
        except ClientError as e:
            audits[f"{host}:{port}"] = {"ok": False, "error": f"{e.code}: {e.message}"}
    if len(audits) == 1:
        return next(iter(audits.values()))
    return {"ok": all(a.get("ok") is True for a in audits.values()), "targets": audits}
