"""Benchmark: the full system through its real client path, per system base, beside a bare
Thespian reference saga, several repetitions, medians. (`make bench`)

    python bench.py [--bases simple,queue,tcp] [--reps 3] [--orders 5000] [--concurrency 100]
                    [--process-orders 300] [--process-concurrency 24] [--in-flight 10000]
                    [--rate 1000] [--open-loop-orders 10000] [--mixed-orders 5000]
                    [--nodes 1,2,3] [--node-orders 3000] [--out bench-results]

Each repetition runs, for every base: `loadtest.py --spawn` (a fresh run.py on a fresh SQLite
file, synchronous=FULL, tok_visa, orders placed with wait=true over the gateway) and the
reference saga of `benchmarks/reference.py` (reserve, append, charge, append; no gateway) on
the same base; on the simple base also `--in-flight` orders all placed at once, each held 3 s by
the payment provider (memory per order in flight), and an open-loop run: `--open-loop-orders`
arriving at `--rate` orders/s (Poisson), latency from each order's intended start, so a stall
shows in p99/p99.9 instead of slowing the arrivals, and a mixed row: `--mixed-orders` like the
full row but half of them placed with shipping and 5 % cancelled by their customer shortly after
placement (`--mixed-orders 0` skips it). Bases and kinds are interleaved so machine
noise spreads over all of them. With `--nodes 1,2,3` (`--nodes 0`: none) each repetition also
runs `loadtest.py --spawn-nodes N` for each N: a private PostgreSQL and N nodes on one database,
the same workload through the gateways whatever N (`--node-orders` orders, 120 in flight, 100
units of SKU-SCARCE to race for), in a table of its own: orders/s in total, per node, per core
and per CPU-second used (the nodes' and PostgreSQL's). The medians go to stdout as markdown
tables and, with every run's raw figures, to `OUT/bench-<timestamp>.json` and `.md`. Exit status
1 if any audit failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.reference import run_reference
from loadgen.options import OPEN_LOOP_CONCURRENCY
from loadgen.report import percentile

ROOT = Path(__file__).resolve().parent
SYSTEM_BASES = {
    "simple": "simpleSystemBase",
    "queue": "multiprocQueueBase",
    "tcp": "multiprocTCPBase",
}


def _run_json(cmd: list[str], out: Path) -> dict[str, Any]:
    """Run a child that writes its summary to `out`; the summary, with the exit status."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    if not out.exists():
        raise RuntimeError(f"{cmd[1]} failed ({done.returncode}): {done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(out.read_text())
    summary["exit_status"] = done.returncode
    return summary


def run_full(
    base: str, orders: int, concurrency: int, tmp: Path, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One loadtest run against a freshly spawned run.py; returns its --json summary."""
    out = tmp / f"full-{base}-{time.monotonic_ns()}.json"
    return _run_json(
        [
            sys.executable,
            str(ROOT / "loadtest.py"),
            "--spawn",
            "--base",
            base,
            "--orders",
            str(orders),
            "--concurrency",
            str(concurrency),
            "--json",
            str(out),
            "--no-progress",
            "--mix",
            "tok_visa=1",
            *extra,
        ],
        out,
    )


# Every order in flight at once, each held 3 s by the payment provider: admission, timers and
# memory at scale rather than CPU per order (issue 5's "10,000 orders in flight").
IN_FLIGHT_ARGS = ("--connections", "8", "--payment-latency", "3", "--step-timeout", "30")


# The mixed row: like the full row, but half the orders placed with shipping (2 % of those
# refused by the carrier) and 5 % cancelled by their customer within 50 ms of placement.
MIXED_ARGS = (
    "--ship-share",
    "0.5",
    "--carrier-mix",
    "ship_standard=98,ship_refused=2",
    "--cancel-share",
    "0.05",
)
# Rows that are the full row's run with more options.
FULL_LIKE = {"full": (), "mixed": MIXED_ARGS}


NODE_ARGS = ("--concurrency", "120", "--scarce", "100")  # the nodes' workload, same for every N


def node_counts(text: str) -> list[int]:
    """`--nodes`: node counts separated by commas; 0 (or nothing) for none."""
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: node counts such as 1,2,3 (0: none)") from None
    return [n for n in counts if n > 0]


def run_node_rows(
    counts: list[int],
    orders: int,
    tmp: Path,
    runs: dict[str, list[dict[str, Any]]],
    shape: dict[str, tuple[int, int]],
) -> None:
    """One run per node count (`loadtest.py --spawn-nodes N`), added to `runs` (and its
    orders and concurrency to `shape`) under `nodes/N`."""
    for count in counts:
        shape[f"nodes/{count}"] = (orders, int(NODE_ARGS[1]))
        out = tmp / f"nodes-{count}-{time.monotonic_ns()}.json"
        cmd = [sys.executable, str(ROOT / "loadtest.py"), "--spawn-nodes", str(count)]
        cmd += ["--orders", str(orders), *NODE_ARGS, "--json", str(out), "--no-progress"]
        run = _run_json(cmd, out)
        runs.setdefault(f"nodes/{count}", []).append(run)
        print(
            f"nodes/{count}: {run['throughput_orders_per_s']:.0f} orders/s, "
            f"audit {'ok' if run['audit']['ok'] else 'FAILED'}",
            file=sys.stderr,
            flush=True,
        )


def render_nodes(table: dict[str, dict[str, Any]]) -> str:
    """The node rows' table of medians (empty without node rows)."""
    rows = {key: row for key, row in table.items() if key.startswith("nodes/")}
    if not rows:
        return ""
    lines = [
        "",
        "",
        "Nodes on one PostgreSQL (fsync off), the same workload through the gateways "
        "(loadtest.py --spawn-nodes N)",
        "",
        "| nodes | orders | concurrency | orders/s | per node | per core | cores busy "
        "| per CPU-second | p50 ms | p99 ms | audits |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, row in rows.items():
        m = row["median"]
        figures = [r["nodes"] for r in row["runs"]]
        per_core = _median([f["orders_per_s_per_core"] for f in figures])
        busy = _median([f["cores_busy"] for f in figures])
        per_cpu = _median([f["orders_per_cpu_s"] for f in figures])
        count = int(key.split("/")[1])
        per_node = None if m["orders_per_s"] is None else m["orders_per_s"] / count
        lines.append(
            f"| {count} | {row['orders']} | {row['concurrency']} | {_ms(m['orders_per_s'], 0)} | "
            f"{_ms(per_node, 0)} | {_ms(per_core, 0)} | {_ms(busy, 2)} | {_ms(per_cpu, 0)} | "
            f"{_ms(m['p50'])} | {_ms(m['p99'])} | {row.get('audits', '')} |"
        )
    return "\n".join(lines)


def run_reference_child(base: str, orders: int, concurrency: int, tmp: Path) -> dict[str, Any]:
    """The reference saga, in a child process of its own (a clean interpreter per run)."""
    out = tmp / f"ref-{base}-{time.monotonic_ns()}.json"
    return _run_json(
        [
            sys.executable,
            str(ROOT / "bench.py"),
            "--reference",
            base,
            "--orders",
            str(orders),
            "--concurrency",
            str(concurrency),
            "--reference-out",
            str(out),
        ],
        out,
    )


def _reference_main(base: str, orders: int, concurrency: int, out: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("THESPLOG_FILE", str(Path(tmp) / "thespian.log"))
        done = run_reference(SYSTEM_BASES[base], orders, concurrency, str(Path(tmp) / "r.db"))
    millis = sorted(x * 1000 for x in done.latencies)
    out.write_text(
        json.dumps(
            {
                "orders": orders,
                "throughput_orders_per_s": orders / done.wall,
                "latency_ms": {
                    "p50": percentile(millis, 50),
                    "p90": percentile(millis, 90),
                    "p99": percentile(millis, 99),
                    "max": max(millis),
                },
            }
        )
    )
    return 0


def commit() -> str:
    """The code being measured (and whether it had uncommitted changes)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def median_row(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians of throughput and latency percentiles over repetitions (a run without a single
    latency, e.g. one whose every order failed, has none to give; its audit column says so)."""

    return {
        "orders_per_s": _median([r["throughput_orders_per_s"] for r in runs]),
        **{k: _median([r["latency_ms"][k] for r in runs]) for k in ("p50", "p90", "p99", "max")},
    }


def open_loop_row(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians of an open-loop row: offered and achieved rates, the latency tail, late starts."""

    loops = [r.get("open_loop", {}) for r in runs]
    return {
        "offered": _median([o.get("offered_rate") for o in loops]),
        "achieved": _median([o.get("achieved_rate") for o in loops]),
        "late_starts": _median([o.get("late_starts") for o in loops]),
        **{
            k: _median([r["latency_ms"].get(k) for r in runs])
            for k in ("p50", "p90", "p99", "p99.9", "max")
        },
    }


def _ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown table of medians."""
    lines = [
        f"bench {meta['started']}  commit {meta.get('commit', '?')}  reps={meta['reps']}  "
        f"machine: {meta['machine']['cpus']} cpus, "
        f"{meta['machine']['cpu']}, Python {meta['machine']['python']}",
        "",
        "| base | kind | orders | concurrency | orders/s | p50 ms | p90 ms | p99 ms | max ms "
        "| full/ref | KiB per order in flight | audits |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, row in table.items():
        base, kind = key.split("/")
        if kind == "open-loop" or base == "nodes":
            continue
        m = row["median"]
        ratio = ""
        if kind == "full" and f"{base}/reference" in table:
            ref = table[f"{base}/reference"]["median"]["orders_per_s"]
            if ref and m["orders_per_s"] is not None:
                ratio = f"{m['orders_per_s'] / ref:.0%}"
        audits = row.get("audits", "")
        memory = ""
        if kind == "in-flight":
            per_order = statistics.median(
                r["server"]["kib_per_in_flight_order"] for r in row["runs"]
            )
            memory = f"{per_order:.1f}"
        lines.append(
            f"| {base} | {kind} | {row['orders']} | {row['concurrency']} | "
            f"{_ms(m['orders_per_s'], 0)} | {_ms(m['p50'])} | {_ms(m['p90'])} | "
            f"{_ms(m['p99'])} | {_ms(m['max'])} | {ratio} | {memory} | {audits} |"
        )
    open_rows = {key: row for key, row in table.items() if key.endswith("/open-loop")}
    if open_rows:
        lines += [
            "",
            "Open loop: Poisson arrivals at the offered rate, latency from each order's intended "
            "start",
            "",
            "| base | orders | cap | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
            "| max ms | late starts | audits |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for key, row in open_rows.items():
            o = open_loop_row(row["runs"])
            lines.append(
                f"| {key.split('/')[0]} | {row['orders']} | {row['concurrency']} | "
                f"{_ms(o['offered'], 0)} | {_ms(o['achieved'], 0)} | {_ms(o['p50'])} | "
                f"{_ms(o['p90'])} | {_ms(o['p99'])} | {_ms(o['p99.9'])} | {_ms(o['max'])} | "
                f"{_ms(o['late_starts'], 0)} | {row.get('audits', '')} |"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bases", default="simple,queue,tcp")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--orders", type=int, default=5000, help="orders per run, simple base")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--process-orders",
        type=int,
        default=300,
        help="orders per run on the process bases (a process per order)",
    )
    parser.add_argument("--process-concurrency", type=int, default=24)
    parser.add_argument(
        "--in-flight",
        type=int,
        default=10_000,
        help="simple base: also run this many orders all in flight at once, each charged "
        "with 3 s of provider latency (0: skip)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="simple base: also run an open loop at this many orders/s offered (0: skip)",
    )
    parser.add_argument(
        "--open-loop-orders", type=int, default=10_000, help="orders in the open-loop run"
    )
    parser.add_argument(
        "--mixed-orders",
        type=int,
        default=5000,
        help="simple base: also run this many orders, half with shipping and 5%% cancelled "
        "(0: skip)",
    )
    parser.add_argument(
        "--nodes",
        type=node_counts,
        default="1,2,3",
        help="node counts for the rows of nodes on one PostgreSQL (0: skip them)",
    )
    parser.add_argument("--node-orders", type=int, default=3000, help="orders per node row")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--reference", choices=sorted(SYSTEM_BASES), help=argparse.SUPPRESS)
    parser.add_argument("--reference-out", help=argparse.SUPPRESS)
    return parser


def _kinds(base: str, args: argparse.Namespace) -> list[str]:
    """The rows one repetition runs on `base`."""
    kinds = ["full", "reference"]
    if base == "simple" and args.in_flight > 0:
        kinds.append("in-flight")
    if base == "simple" and args.rate > 0:
        kinds.append("open-loop")
    if base == "simple" and args.mixed_orders > 0:
        kinds.append("mixed")
    return kinds


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --reference, one reference run in this process)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.reference:
        return _reference_main(
            args.reference, args.orders, args.concurrency, Path(args.reference_out)
        )

    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = [b for b in bases if b not in SYSTEM_BASES]
    if unknown:
        parser.error(f"unknown bases {unknown}")
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "reps": args.reps,
        "machine": machine(),
        "commit": commit(),
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    shape: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for rep in range(args.reps):
            for base in bases:
                orders, concurrency = (
                    (args.orders, args.concurrency)
                    if base == "simple"
                    else (args.process_orders, args.process_concurrency)
                )
                for kind in _kinds(base, args):
                    key = f"{base}/{kind}"
                    if kind == "open-loop":
                        shape[key] = (args.open_loop_orders, OPEN_LOOP_CONCURRENCY)
                        run = run_full(
                            base,
                            args.open_loop_orders,
                            OPEN_LOOP_CONCURRENCY,
                            tmp,
                            ("--rate", str(args.rate)),
                        )
                    elif kind == "in-flight":
                        shape[key] = (args.in_flight, args.in_flight)
                        run = run_full(base, args.in_flight, args.in_flight, tmp, IN_FLIGHT_ARGS)
                    elif kind in FULL_LIKE:
                        count = args.mixed_orders if kind == "mixed" else orders
                        shape[key] = (count, concurrency)
                        run = run_full(base, count, concurrency, tmp, FULL_LIKE[kind])
                    else:
                        shape[key] = (orders, concurrency)
                        run = run_reference_child(base, orders, concurrency, tmp)
                    runs.setdefault(key, []).append(run)
                    audit = run.get("audit", {}).get("ok")
                    print(
                        f"rep {rep + 1}/{args.reps} {key}: "
                        f"{run['throughput_orders_per_s']:.0f} orders/s, "
                        f"p99 {_ms(run['latency_ms']['p99'])} ms"
                        + (
                            f", p99.9 {_ms(run['latency_ms'].get('p99.9'))} ms"
                            if kind == "open-loop"
                            else ""
                        )
                        + ("" if audit is None else f", audit {'ok' if audit else 'FAILED'}"),
                        file=sys.stderr,
                        flush=True,
                    )
            run_node_rows(args.nodes, args.node_orders, tmp, runs, shape)
    table: dict[str, dict[str, Any]] = {}
    audits_ok = True
    for key, key_runs in runs.items():
        row: dict[str, Any] = {
            "orders": shape[key][0],
            "concurrency": shape[key][1],
            "median": median_row(key_runs),
            "runs": key_runs,
        }
        if not key.endswith("/reference"):
            ok = [bool(r["audit"]["ok"]) and r["exit_status"] == 0 for r in key_runs]
            row["audits"] = f"{sum(ok)}/{len(ok)} ok"
            audits_ok &= all(ok)
        table[key] = row
    text = render(table, meta) + render_nodes(table)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.md").write_text(text + "\n")
    (out / f"bench-{stamp}.json").write_text(json.dumps({**meta, "table": table}, indent=1))
    print(f"\nwritten to {out}/bench-{stamp}.md and .json", file=sys.stderr)
    return 0 if audits_ok else 1


if __name__ == "__main__":
    sys.exit(main())
