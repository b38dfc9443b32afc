"""What grows with every order a node has processed: tracemalloc lines and gc counts by type.

    python -m benchmarks.memory_growth [--warm 5000] [--orders 20000] [--top 15] [--out PATH.md]

A private `run.py` on the simple base (one process: every actor's memory is in it) runs with
tracemalloc on. It takes `--warm` orders (caches, pools and the interpreter settle), a
snapshot is taken, it takes `--orders` more, a second snapshot is taken; the report lists the
source lines whose live memory grew most between the two, with bytes per order, and the object
types whose count grew. Something that grows by a fixed amount per order is held per order
forever (docs/performance.md "Memory"); what is bounded shows little or nothing.

The node is run through this module (`--serve`), which starts tracemalloc, answers SIGUSR1 by
writing a snapshot and the gc counts next to the database, and then runs run.py as __main__.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import runpy
import signal
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from benchmarks.soak_memory import drive
from loadgen.plan import OrderShape, parse_mix
from loadgen.spawn import ROOT, SpawnedServer

SNAPSHOT_WAIT = 120.0


def serve(argv: Sequence[str]) -> None:
    """Run run.py with tracemalloc on; each SIGUSR1 writes snapshot-N.bin and gc-N.json
    beside the database (`--db`, which SpawnedServer always gives)."""
    out = Path(argv[list(argv).index("--db") + 1]).parent
    tracemalloc.start(1)
    count = 0

    def dump(_signum: int, _frame: FrameType | None) -> None:
        nonlocal count
        count += 1
        gc.collect()
        types = Counter(type(o).__qualname__ for o in gc.get_objects())
        tracemalloc.take_snapshot().dump(str(out / f"snapshot-{count}.tmp"))
        (out / f"gc-{count}.json").write_text(json.dumps(types))
        (out / f"snapshot-{count}.tmp").rename(out / f"snapshot-{count}.bin")

    signal.signal(signal.SIGUSR1, dump)
    sys.argv = [str(ROOT / "run.py"), *argv]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


def snapshot(server: SpawnedServer, out: Path, number: int) -> tracemalloc.Snapshot:
    """Ask the node for its snapshot `number` and load it."""
    server.proc.send_signal(signal.SIGUSR1)
    path = out / f"snapshot-{number}.bin"
    deadline = time.monotonic() + SNAPSHOT_WAIT
    while not path.exists():
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"no {path.name} from the node; its log:\n{server.log_tail()}")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def report(
    first: tracemalloc.Snapshot,
    second: tracemalloc.Snapshot,
    types: tuple[Counter[str], Counter[str]],
    orders: int,
    top: int,
) -> str:
    """The lines and the types that grew, as markdown."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = second.filter_traces(ignore).compare_to(first.filter_traces(ignore), "lineno")
    total = sum(d.size_diff for d in diff)
    lines = [
        f"Traced memory grew {total / 1024:,.0f} KiB over {orders:,} orders "
        f"({total / orders:,.0f} B per order).",
        "",
        "| KiB | B/order | blocks | source line |",
        "|---:|---:|---:|---|",
    ]
    for d in diff[:top]:
        frame = d.traceback[0]
        where = (
            os.path.relpath(frame.filename, ROOT)
            if frame.filename.startswith(str(ROOT))
            else frame.filename
        )
        lines.append(
            f"| {d.size_diff / 1024:,.0f} | {d.size_diff / orders:,.0f} | {d.count_diff:+,} "
            f"| `{where}:{frame.lineno}` |"
        )
    grown = (types[1] - types[0]).most_common(top)
    lines += ["", "| objects | per order | type |", "|---:|---:|---|"]
    lines += [f"| {n:+,} | {n / orders:.2f} | `{name}` |" for name, n in grown]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["--serve"]:
        serve(raw[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_growth")
    parser.add_argument("--warm", type=int, default=5_000)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--mix", default="tok_visa")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(raw)
    shape = OrderShape(mix=parse_mix(args.mix))
    server = SpawnedServer(entry=[sys.executable, "-m", "benchmarks.memory_growth", "--serve"])
    work = server.dir
    assert work is not None
    try:
        drive(server, orders=args.warm, concurrency=args.concurrency, shape=shape, seed=1)
        first = snapshot(server, work, 1)
        counts = [Counter(json.loads((work / "gc-1.json").read_text()))]
        drive(server, orders=args.orders, concurrency=args.concurrency, shape=shape, seed=2)
        second = snapshot(server, work, 2)
        counts.append(Counter(json.loads((work / "gc-2.json").read_text())))
    finally:
        server.stop()
        server.remove()
    text = report(first, second, (counts[0], counts[1]), args.orders, args.top)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
