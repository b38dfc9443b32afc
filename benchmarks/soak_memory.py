"""`make soak-memory`: is a node's memory bounded by the work in flight, not by its history?

    python -m benchmarks.soak_memory [--orders 1000000] [--concurrency 100] [--base simple]
                                     [--mix tok_visa] [--out test-artifacts/soak-memory]

One private `run.py` on a fresh SQLite file takes `--orders` orders through the real client
path (the load generator's closed loop, `--concurrency` in flight, in chunks so the client's
own bookkeeping stays small); the server's resident memory (the whole process tree on the
process bases) is sampled every second with the orders finished so far. Then the node is
stopped and started again on the same database (the time from launch to its `ready` line and
its RSS), and a node on a fresh database is started the same way for comparison; each of the
two then takes the same few thousand orders at `--concurrency` in flight, so "fresh plus what
the in-flight orders need" is measured, not guessed.

Written to `--out`: `soak-memory.csv` (one row per second), `soak-memory.json` (the summary),
`soak-memory.md` (a table of RSS and orders/s at every tenth of the run, and the restart
figures) and `soak-memory.png` (RSS and orders/s over time; needs matplotlib, the `plot`
extra). Every server it starts is stopped before it returns, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client import Client
from gateway.audit_process import audit_in_child
from loadgen.drive import LoadRun
from loadgen.plan import OrderShape, parse_mix, plan_orders
from loadgen.plot import PlotUnavailableError, require_matplotlib
from loadgen.spawn import SpawnedServer
from loadgen.stock import apply_changes, stock_changes

CHUNK = 50_000  # orders planned and driven at a time
SAMPLE_INTERVAL = 1.0
PROGRESS_EVERY = 30  # samples between two progress lines on stderr
SETTLE_S = 3.0  # after `ready`, the RSS is read again this much later
# What the restarted and the fresh node each take after their start: more than the bounded
# windows (the order index's newest 10,000 orders, Payment's and Shipping's 10,000 cached
# records), so both end up holding the same fixed caches and the comparison shows only what a
# long history adds. With 5,000 the fresh node's windows were half full, the restarted one's
# full from its first pass (the index), which is not history but looked like it.
WARM_ORDERS = 20_000
ORDER_TIMEOUT = 60.0
TARGET_GROWTH = 0.15  # RSS at the end within 15% of its value at a tenth of the run
TARGET_READY_S = 2.0
START_TIMEOUT = 600.0  # a start that reads all of history takes long; it is measured, not failed


@dataclass
class Sample:
    """One second of the soak."""

    t: float  # seconds since the first order
    orders: int  # orders finished so far
    rss_mib: float
    orders_per_s: float  # in the second before


@dataclass
class Start:
    """One start of a node: how long to `ready`, its RSS then and after a while and load."""

    db: str
    ready_s: float
    rss_ready_mib: float
    rss_settled_mib: float
    # peak while taking WARM_ORDERS at the soak's concurrency and listing them after
    rss_loaded_mib: float = 0.0
    warm_orders: int = 0


@dataclass
class Soak:
    """The whole run."""

    base: str
    orders: int
    concurrency: int
    mix: str
    samples: list[Sample] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    audit_ok: bool | None = None
    audit_s: float = 0.0
    restart: Start | None = None
    fresh: Start | None = None
    settle_s: float = SETTLE_S


def tree_rss_mib(server: SpawnedServer) -> float:
    """The server's resident memory in MiB, every process of the run counted."""
    return server.tree_rss_kib() / 1024


@contextlib.contextmanager
def clients_of(server: SpawnedServer, count: int) -> Iterator[list[Client]]:
    """`count` connections to the server, closed afterwards."""
    clients: list[Client] = []
    try:
        for _ in range(count):
            clients.append(Client(server.host, server.port, timeout=ORDER_TIMEOUT))
        yield clients
    finally:
        for client in clients:
            client.close()


def drive(  # noqa: PLR0913 - keyword-only settings of one stretch of load
    server: SpawnedServer,
    *,
    orders: int,
    concurrency: int,
    shape: OrderShape,
    seed: int,
    on_run: Any = None,
) -> dict[str, int]:
    """Place `orders` orders at `concurrency` in flight, in chunks; their statuses counted.
    `on_run(run)` is told each chunk's LoadRun as it starts (the sampler reads its progress)."""
    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    tag = uuid.uuid4().hex[:8]
    with clients_of(server, 4) as clients:
        done = 0
        chunk_no = 0
        while done < orders:
            plan = plan_orders(
                min(CHUNK, orders - done), rng=rng, run_id=f"{tag}-{chunk_no}", shape=shape
            )
            changes, _ = stock_changes(clients[0], plan, 0)
            apply_changes(clients[0], changes, None)
            run = LoadRun(clients, plan, concurrency=concurrency, order_timeout=ORDER_TIMEOUT)
            if on_run is not None:
                on_run(run, done)
            result = run.run()
            for status in result.statuses:
                statuses[status] = statuses.get(status, 0) + 1
            done += len(plan)
            chunk_no += 1
    return statuses


class Sampler:
    """A thread that reads the server's RSS and the orders finished every second."""

    def __init__(self, server: SpawnedServer) -> None:
        self._server = server
        self._run: LoadRun | None = None
        self._before = 0  # orders finished by the chunks before the current one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.samples: list[Sample] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def on_run(self, run: LoadRun, before: int) -> None:
        with self._lock:
            self._run, self._before = run, before

    def _finished(self) -> int:
        with self._lock:
            return self._before + (self._run.finished if self._run is not None else 0)

    def _loop(self) -> None:
        t0 = time.monotonic()
        # Every SAMPLE_INTERVAL from the start (no drift), and once more when stopped.
        while not self._stop.wait(
            max(0.0, t0 + len(self.samples) * SAMPLE_INTERVAL - time.monotonic())
        ):
            self._sample(time.monotonic() - t0)
        self._sample(time.monotonic() - t0)

    def _sample(self, t: float) -> None:
        n = self._finished()
        last = self.samples[-1] if self.samples else Sample(0.0, 0, 0.0, 0.0)
        rate = (n - last.orders) / (t - last.t) if t > last.t else 0.0
        rss = tree_rss_mib(self._server)
        self.samples.append(Sample(round(t, 2), n, round(rss, 1), round(rate, 1)))
        if len(self.samples) % PROGRESS_EVERY == 0:
            print(f"soak: {t:.0f} s, {n:,} orders, RSS {rss:.1f} MiB", file=sys.stderr)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def list_orders(server: SpawnedServer) -> None:
    """One `list_orders`: the order index catches up with the store. A start fills the index
    at once (its first pass); a node nobody lists never reads it, so without this the fresh
    node's peak would leave out the index window that the restarted one holds."""
    with clients_of(server, 1) as (client,):
        client.call("list_orders", {"limit": 1})


def start_node(args: argparse.Namespace, workdir: Path, db: Path, shape: OrderShape) -> Start:
    """Start a node on `db`, time it to `ready`, read its RSS, give it WARM_ORDERS, list its
    orders (the index caught up), stop it."""
    launched = time.monotonic()
    server = SpawnedServer(workdir, base=args.base, db=db, ready_timeout=START_TIMEOUT)
    try:
        ready_s = time.monotonic() - launched
        at_ready = tree_rss_mib(server)
        time.sleep(args.settle)
        start = Start(
            str(db), round(ready_s, 3), round(at_ready, 1), round(tree_rss_mib(server), 1)
        )
        peak = threading.Event()
        highest = [start.rss_settled_mib]

        def watch() -> None:
            while not peak.wait(0.2):
                highest[0] = max(highest[0], tree_rss_mib(server))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            drive(server, orders=args.warm, concurrency=args.concurrency, shape=shape, seed=7)
            list_orders(server)
            time.sleep(args.settle)  # a sample or more with the index full
        finally:
            peak.set()
            watcher.join()
        start.rss_loaded_mib = round(highest[0], 1)
        start.warm_orders = args.warm
        return start
    finally:
        server.stop()


def soak(args: argparse.Namespace) -> Soak:
    """The soak, then the restart on its database and a start on a fresh one."""
    shape = OrderShape(mix=parse_mix(args.mix))
    out: Path = args.out
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    db = work / "soak.db"
    for stale in work.glob("*.db*"):
        stale.unlink()
    result = Soak(args.base, args.orders, args.concurrency, args.mix, settle_s=args.settle)
    server = SpawnedServer(work, base=args.base, db=db)
    try:
        sampler = Sampler(server)
        sampler.start()
        t0 = time.monotonic()
        try:
            result.statuses = drive(
                server,
                orders=args.orders,
                concurrency=args.concurrency,
                shape=shape,
                seed=args.seed,
                on_run=sampler.on_run,
            )
        finally:
            sampler.stop()
        result.wall_s = round(time.monotonic() - t0, 1)
        result.samples = sampler.samples
        print(f"soak: {args.orders} orders in {result.wall_s} s {result.statuses}", file=sys.stderr)
    finally:
        server.stop()
    if args.audit:
        # The audit op's own child process, run on the stopped node's file: at a million
        # orders it takes longer than the node's request timeout.
        audit_t0 = time.monotonic()
        audit = audit_in_child(f"sqlite:///{db}")
        result.audit_s = round(time.monotonic() - audit_t0, 1)
        result.audit_ok = audit.get("ok") is True
        print(f"soak: audit ok={result.audit_ok} in {result.audit_s} s", file=sys.stderr)
    result.restart = start_node(args, work, db, shape)
    print(f"soak: restart {result.restart}", file=sys.stderr)
    result.fresh = start_node(args, work, work / "fresh.db", shape)
    print(f"soak: fresh {result.fresh}", file=sys.stderr)
    return result


def at_orders(samples: Sequence[Sample], orders: int) -> Sample | None:
    """The first sample with at least `orders` orders finished."""
    return next((s for s in samples if s.orders >= orders), None)


def rate_around(samples: Sequence[Sample], sample: Sample, window: int = 10) -> float:
    """The median orders/s of the `window` seconds up to `sample`."""
    index = samples.index(sample)
    rates = [s.orders_per_s for s in samples[max(0, index - window + 1) : index + 1]]
    return statistics.median(rates) if rates else 0.0


def summary(result: Soak) -> dict[str, Any]:
    """The figures the targets are about."""
    tenth = at_orders(result.samples, result.orders // 10)
    last = result.samples[-1] if result.samples else None
    figures: dict[str, Any] = {}
    if tenth is not None and last is not None:
        figures["rss_at_tenth_mib"] = tenth.rss_mib
        figures["rss_at_end_mib"] = last.rss_mib
        figures["growth"] = round(last.rss_mib / tenth.rss_mib - 1, 3)
        figures["flat"] = figures["growth"] <= TARGET_GROWTH
    if result.restart is not None and result.fresh is not None:
        figures["restart_ready_s"] = result.restart.ready_s
        figures["restart_fast"] = result.restart.ready_s < TARGET_READY_S
        figures["restart_vs_fresh_loaded"] = round(
            result.restart.rss_loaded_mib / result.fresh.rss_loaded_mib - 1, 3
        )
        figures["restart_lean"] = figures["restart_vs_fresh_loaded"] <= TARGET_GROWTH
    return figures


def markdown(result: Soak, label: str) -> str:
    """The soak as a table: a row per tenth of the orders, then the two starts."""
    lines = [
        f"# Memory soak{f' ({label})' if label else ''}",
        "",
        f"{result.orders:,} orders, {result.concurrency} in flight, base {result.base}, "
        f"mix {result.mix}; {result.wall_s} s; statuses {result.statuses}; audit "
        f"{'ok' if result.audit_ok else result.audit_ok} ({result.audit_s} s).",
        "",
        "| orders finished | elapsed (s) | RSS (MiB) | orders/s (median of 10 s) |",
        "|---:|---:|---:|---:|",
    ]
    for tenth in range(1, 11):
        sample = at_orders(result.samples, result.orders * tenth // 10)
        if sample is not None:
            lines.append(
                f"| {sample.orders:,} | {sample.t:.0f} | {sample.rss_mib:.1f} | "
                f"{rate_around(result.samples, sample):.0f} |"
            )
    lines += [
        "",
        f"| start | ready (s) | RSS at ready (MiB) | after {result.settle_s:g} s (MiB) | "
        f"peak under {result.fresh.warm_orders if result.fresh else 0:,} orders at "
        f"{result.concurrency} in flight, then its orders listed (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, start in (
        ("restart on the soak's database", result.restart),
        ("fresh database", result.fresh),
    ):
        if start is not None:
            lines.append(
                f"| {name} | {start.ready_s:.2f} | {start.rss_ready_mib:.1f} | "
                f"{start.rss_settled_mib:.1f} | {start.rss_loaded_mib:.1f} |"
            )
    lines += ["", "Targets: " + json.dumps(summary(result)), ""]
    return "\n".join(lines)


def write_png(result: Soak, path: Path, label: str) -> None:
    """RSS and orders/s over time, on two axes."""
    import matplotlib  # noqa: PLC0415 -- optional (the plot extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [s.t for s in result.samples]
    fig, rss_axis = plt.subplots(figsize=(10, 5))
    rss_axis.plot(t, [s.rss_mib for s in result.samples], color="tab:blue", label="RSS (MiB)")
    rss_axis.set_xlabel("seconds")
    rss_axis.set_ylabel("RSS (MiB)", color="tab:blue")
    rss_axis.set_ylim(bottom=0)
    rate_axis = rss_axis.twinx()
    rate_axis.plot(
        t, [s.orders_per_s for s in result.samples], color="tab:green", alpha=0.5, linewidth=0.8
    )
    rate_axis.set_ylabel("orders/s", color="tab:green")
    rate_axis.set_ylim(bottom=0)
    title = f"{result.orders:,} orders, {result.concurrency} in flight, {result.base} base"
    rss_axis.set_title(f"{title}{f' ({label})' if label else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: Soak, out: Path, label: str) -> None:
    """The csv, json, md and png files."""
    with (out / "soak-memory.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "orders_finished", "rss_mib", "orders_per_s"])
        for s in result.samples:
            writer.writerow([s.t, s.orders, s.rss_mib, s.orders_per_s])
    document = {**asdict(result), "summary": summary(result), "label": label}
    document.pop("samples")
    (out / "soak-memory.json").write_text(json.dumps(document, indent=2) + "\n")
    (out / "soak-memory.md").write_text(markdown(result, label))
    write_png(result, out / "soak-memory.png", label)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--base", default="simple")
    parser.add_argument("--mix", default="tok_visa")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--warm", type=int, default=WARM_ORDERS, help="orders after each start")
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_S,
        help="seconds after a start's `ready`, and after its listing, before RSS is read again",
    )
    parser.add_argument(
        "--audit",
        action="store_true",
        help="audit the store after the load (reads every event: minutes and GBs at 1M orders)",
    )
    parser.add_argument("--label", default="", help="a word for the titles (before, after)")
    parser.add_argument("--out", type=Path, default=Path("test-artifacts/soak-memory"))
    args = parser.parse_args(argv)
    if args.settle < 0:
        parser.error("--settle must not be negative")
    if args.orders < 10 or args.concurrency < 1 or args.warm < 0:
        parser.error("--orders must be at least 10, --concurrency and --warm positive")
    parse_mix(args.mix)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        require_matplotlib()
    except PlotUnavailableError as e:
        print(f"soak-memory: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = soak(args)
    write(result, args.out, args.label)
    print(markdown(result, args.label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
