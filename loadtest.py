"""Drive orders through the gateway and report throughput, latency and the audit (DESIGN.md 6, 7).

    python loadtest.py [--orders 1000] [--concurrency 100] [--connections 4]
                       [--spawn [--base simple|queue|tcp] [--step-timeout S]
                                [--payment-latency S] [--synchronous FULL|NORMAL]]
                       [--host H] [--port P] [--mix tok_visa=90,tok_timeout=10]
                       [--scarce N [--scarce-share 0.2]] [--lines L] [--seed S]
                       [--json PATH] [--plot PATH.png] [--no-progress]

Exactly `--concurrency` orders are kept in flight, spread over `--connections` pipelined
clients; every order is placed with `wait=true`, so its latency runs from placement to its
terminal status. `--spawn` starts a private `run.py` on a fresh database in a temporary directory
and stops it (SIGTERM) at the end.

Exit status: 0 when the audit is ok and every order reached paid/cancelled/failed; 1 otherwise;
2 for bad arguments; 3 when the server cannot be spawned or reached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import math
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Client,
    ClientError,
    ConnectionFailed,
    non_negative_int,
)
from messages.base import TERMINAL_STATUSES, OrderStatus
from runtime.proc_tree import RUN_MARKER, descendants, marked

__all__ = ["main", "parse_mix", "percentile"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

ROOT = Path(__file__).resolve().parent
TERMINAL = TERMINAL_STATUSES
PRODUCTS = tuple(f"SKU-{i:03d}" for i in range(1, 11))
SCARCE_SKU = "SKU-SCARCE"
MAX_QUANTITY = 3
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0  # run.py drains for up to 30 s (--drain-timeout), then stops its actors
PROGRESS_INTERVAL = 0.2
RSS_SAMPLE_INTERVAL = 1.0


class UsageError(Exception):
    """A bad command line; main() turns it into exit status 2."""


class SpawnError(Exception):
    """The private run.py could not be started; main() turns it into exit status 3."""


# -- pure helpers -------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """Parse `tok_visa=90,tok_timeout=10` into token weights; raises ValueError when malformed.

    A bare token (`tok_visa`) weighs 1. Weights must be finite and >= 0, and not all 0.
    """
    mix: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, weight_text = item.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"bad token name {name!r} in mix {text!r}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} for {name} in mix {text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight for {name} must be a finite number >= 0, got {weight_text!r}")
        if name in mix:
            raise ValueError(f"token {name} appears twice in mix {text!r}")
        mix[name] = weight
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no token with a positive weight")
    return mix


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted `values`, interpolating linearly between ranks.

    Same definition as numpy's default ("linear"); raises ValueError on an empty sequence.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _price(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# -- the plan: every order is generated before the clock starts ---------------------------------


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    """One order of the run: its wire args, and whether it competes for the scarce product."""

    args: dict[str, Any]
    scarce: bool


def plan_orders(
    count: int,
    *,
    rng: random.Random,
    run_id: str,
    mix: Mapping[str, float],
    lines: int,
    scarce_share: float,
) -> list[PlannedOrder]:
    """Generate the run's orders up front so the timed loop only submits.

    A scarce order's first line is 1 unit of SKU-SCARCE; the other lines use distinct products.
    """
    tokens = list(mix)
    weights = list(mix.values())
    methods = rng.choices(tokens, weights=weights, k=count)
    plan: list[PlannedOrder] = []
    for n in range(count):
        scarce = scarce_share > 0 and rng.random() < scarce_share
        order_lines: list[dict[str, Any]] = []
        if scarce:
            order_lines.append(
                {
                    "product_id": SCARCE_SKU,
                    "quantity": 1,
                    "unit_price": _price(rng.randint(100, 9999)),
                }
            )
        for sku in rng.sample(PRODUCTS, lines - len(order_lines)):
            order_lines.append(
                {
                    "product_id": sku,
                    "quantity": rng.randint(1, MAX_QUANTITY),
                    "unit_price": _price(rng.randint(100, 9999)),
                }
            )
        args = {
            "order_id": f"lt-{run_id}-{n}",
            "customer_id": f"cust-{rng.randrange(1_000_000):06d}",
            "lines": order_lines,
            "payment_method": methods[n],
            "wait": True,
        }
        plan.append(PlannedOrder(args, scarce))
    return plan


def units_needed(plan: Sequence[PlannedOrder]) -> Counter[str]:
    """Units per regular product that the plan could reserve at most."""
    needed: Counter[str] = Counter()
    for order in plan:
        for line in order.args["lines"]:
            if line["product_id"] != SCARCE_SKU:
                needed[line["product_id"]] += line["quantity"]
    return needed


# -- the spawned server -------------------------------------------------------------------------


def _proc_status_kib(pid: int, key: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style line of /proc/PID/status in KiB, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` from /proc/PID/stat, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        fields = stat[stat.rfind(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


class SpawnedServer:
    """A private `run.py` on a fresh database in a temporary directory.

    Started in its own session so a Ctrl-C at the terminal reaches only the load test, which
    then stops the server itself (SIGTERM, and SIGKILL after STOP_TIMEOUT).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="loadtest-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "run.log"
        self.base: str = args.base
        cmd = [
            sys.executable,
            str(ROOT / "run.py"),
            "--db",
            str(self.dir / "orders.db"),
            "--port",
            "0",
            "--base",
            args.base,
        ]
        if args.step_timeout is not None:
            cmd += ["--step-timeout", str(args.step_timeout)]
        if args.payment_latency is not None:
            cmd += ["--payment-latency", str(args.payment_latency)]
        if args.synchronous is not None:
            cmd += ["--synchronous", args.synchronous]
        if args.warm_sagas is not None:
            cmd += ["--warm-sagas", str(args.warm_sagas)]
        # The run marker lets us find every process of this run (the process bases' actors
        # are no children of run.py), to measure them and to make sure none outlives the run.
        self.run_id = uuid.uuid4().hex
        env = {
            **os.environ,
            "THESPLOG_FILE": str(self.dir / "thespian.log"),
            RUN_MARKER: self.run_id,
        }
        self._log: IO[bytes] = self.log_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self._log.close()
            self._tmp.cleanup()
            raise SpawnError(f"cannot start run.py: {e}") from e
        # A thread drains stdout to EOF so run.py can never block on a full pipe.
        self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._stdout_reader.start()
        self.peak_tree_kib = 0
        self.peak_tree_procs = 0
        self.host, self.port = self._wait_ready()

    def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for raw in stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def _wait_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
                problem = f"no 'ready' line within {READY_TIMEOUT:.0f}s"
            else:
                problem = "run.py exited before it was ready"
            if line is None:
                tail = self.log_tail()
                self.stop(quiet=True)
                raise SpawnError(f"{problem}; its log:\n{tail}")
            words = line.split()
            if len(words) >= 2 and words[0] == "ready":
                host, _, port = words[1].rpartition(":")
                return host, int(port)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of run.py's stderr, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def sample_rss(self) -> None:
        """Record the process tree's current total RSS if it is a new peak."""
        pids = sorted({self.proc.pid, *descendants(self.proc.pid), *marked(self.run_id)})
        total = sum(_proc_status_kib(pid, "VmRSS") or 0 for pid in pids)
        if total > self.peak_tree_kib:
            self.peak_tree_kib = total
            self.peak_tree_procs = len(pids)

    def own_peak_kib(self) -> int | None:
        """run.py's own peak RSS (VmHWM) while it is alive."""
        return _proc_status_kib(self.proc.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        """CPU time run.py itself has used (without its child processes)."""
        return _cpu_seconds(self.proc.pid)

    def stop(self, *, quiet: bool = False) -> int | None:
        """SIGTERM, wait (SIGKILL after STOP_TIMEOUT), close pipes, delete the temp dir.

        Returns run.py's exit status.
        """
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"run.py did not exit within {STOP_TIMEOUT:.0f}s; killing it", file=sys.stderr)
            self.proc.kill()
            code = self.proc.wait()
        for pid in marked(self.run_id):  # actors run.py could not stop keep its stdout open
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._stdout_reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        if code != 0 and not quiet:
            print(f"run.py exited with status {code}; its log:\n{self.log_tail()}", file=sys.stderr)
        self._tmp.cleanup()
        return code


# -- the run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What the driven orders did."""

    statuses: list[str]
    # seconds, unsorted: one per order that reached a terminal status, and one per order given
    # up on (counted at the moment it was given up, so a run's tail is never hidden); error
    # replies are not latencies (they count as not terminal)
    latencies: list[float]
    finished_at: list[float]  # seconds since the first submit, one per reply
    wall_s: float
    client_cpu_s: float


@dataclass
class _RunState:
    """Shared between the submitting thread, the client reader threads and the monitor."""

    total: int
    statuses: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: dict[int, float] = field(default_factory=dict)  # order index -> submit time
    latencies: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    completed: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class LoadRun:
    """Keeps exactly `concurrency` orders in flight across the clients until the plan is done.

    The submitting thread takes a semaphore slot per order; the slot is given back by the
    future's callback (on a client's reader thread) or by the monitor when the order's deadline
    passes, so a lost reply can neither hang the run nor shrink the concurrency.
    """

    def __init__(
        self,
        clients: Sequence[Client],
        plan: Sequence[PlannedOrder],
        *,
        concurrency: int,
        order_timeout: float,
        progress: IO[str] | None,
        server: SpawnedServer | None,
    ) -> None:
        self._clients = clients
        self._plan = plan
        self._slots = threading.Semaphore(concurrency)
        self._order_timeout = order_timeout
        self._progress = progress
        self._server = server
        self._state = _RunState(total=len(plan), statuses=["not_submitted"] * len(plan))
        self._t0 = 0.0

    def run(self) -> RunResult:
        """Submit every planned order and wait for all of them to finish or time out."""
        st = self._state
        stop_monitor = threading.Event()
        monitor = threading.Thread(target=self._monitor, args=(stop_monitor,), daemon=True)
        cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        monitor.start()
        try:
            clients = self._clients
            k = len(clients)
            for n, order in enumerate(self._plan):
                self._slots.acquire()
                client = clients[n % k]
                with st.lock:
                    st.in_flight[n] = time.perf_counter()
                try:
                    future = client.submit("place_order", order.args)
                except ClientError as e:
                    self._finish(n, time.perf_counter(), f"error:{e.code}")
                    continue
                future.add_done_callback(functools.partial(self._on_reply, n))
            while not st.done.wait(0.5):
                pass
            wall = time.perf_counter() - self._t0
        finally:
            stop_monitor.set()
            monitor.join()
        return RunResult(
            statuses=st.statuses,
            latencies=st.latencies,
            finished_at=st.finished,
            wall_s=wall,
            client_cpu_s=time.process_time() - cpu0,
        )

    def _on_reply(self, n: int, future: concurrent.futures.Future[Any]) -> None:
        end = time.perf_counter()
        exc = future.exception()
        if exc is None:
            result = future.result()
            status = result.get("status") if isinstance(result, dict) else None
            status = status if isinstance(status, str) else "malformed_reply"
        elif isinstance(exc, ClientError):
            status = f"error:{exc.code}"
        else:
            status = f"error:{type(exc).__name__}"
        self._finish(n, end, status)

    def _finish(self, n: int, end: float, status: str) -> None:
        st = self._state
        with st.lock:
            start = st.in_flight.pop(n, None)
            if start is None:  # the monitor already gave up on it and freed its slot
                return
            st.statuses[n] = status
            if status in TERMINAL:
                st.latencies.append(end - start)
            st.finished.append(end - self._t0)
            st.completed += 1
            if st.completed == st.total:
                st.done.set()
        self._slots.release()

    def _expire(self, now: float) -> None:
        """Give up on orders past their deadline; in_flight is in submission order."""
        st = self._state
        expired = 0
        with st.lock:
            deadline = now - self._order_timeout
            for n, start in list(st.in_flight.items()):
                if start > deadline:
                    break
                del st.in_flight[n]
                st.statuses[n] = "error:timeout"
                st.latencies.append(now - start)  # at least the order timeout
                st.completed += 1
                expired += 1
            if st.completed == st.total:
                st.done.set()
        for _ in range(expired):
            self._slots.release()

    def _monitor(self, stop: threading.Event) -> None:
        next_rss = 0.0
        while True:
            stopping = stop.wait(PROGRESS_INTERVAL)
            now = time.perf_counter()
            self._expire(now)
            if self._server is not None and now >= next_rss:
                self._server.sample_rss()
                next_rss = now + RSS_SAMPLE_INTERVAL
            if self._progress is not None:
                self._draw(now, final=stopping)
            if stopping:
                return

    def _draw(self, now: float, *, final: bool) -> None:
        assert self._progress is not None
        st = self._state
        with st.lock:
            done, in_flight = st.completed, len(st.in_flight)
        elapsed = max(now - self._t0, 1e-9)
        width = 30
        filled = width * done // st.total
        line = (
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{st.total} "
            f"{done / elapsed:7.0f} orders/s  in flight {in_flight:5d}  {elapsed:6.1f}s"
        )
        self._progress.write(line + ("\n" if final else ""))
        self._progress.flush()


# -- setup before the clock starts --------------------------------------------------------------


def _set_stock(client: Client, sku: str, on_hand: int, admin_token: str | None) -> None:
    args: dict[str, Any] = {"product_id": sku, "on_hand": on_hand}
    if admin_token:
        args["admin_token"] = admin_token
    client.call("set_stock", args)


def _reserved(client: Client, sku: str) -> int:
    """Units of `sku` reserved now; 0 for a product the server does not know yet."""
    try:
        level = client.stock([sku]).get(sku) or {}
    except ClientError as e:
        if e.code == "not_found":
            return 0
        raise
    return int(level.get("reserved", 0))


def prepare_stock(
    client: Client, plan: Sequence[PlannedOrder], scarce: int, admin_token: str | None
) -> int:
    """Raise regular stock so the run never runs out by accident; make SKU-SCARCE scarce.

    Returns how many SKU-SCARCE units were reserved before the run (0 on a fresh database).
    """
    needed = units_needed(plan)
    levels: Mapping[str, Any] = client.stock(sorted(needed)) if needed else {}
    raised: list[str] = []
    for sku in sorted(needed):
        level = levels.get(sku) or {}
        on_hand, reserved = int(level.get("on_hand", 0)), int(level.get("reserved", 0))
        target = max(on_hand, reserved + needed[sku])
        if target != on_hand:
            _set_stock(client, sku, target, admin_token)
            raised.append(f"{sku} {on_hand}->{target}")
    if raised:
        print(f"stock raised so the run cannot run out: {', '.join(raised)}")
    elif needed:
        print(
            f"stock already sufficient for {len(needed)} products (need <= {max(needed.values())})"
        )
    if scarce <= 0:
        return 0
    reserved = _reserved(client, SCARCE_SKU)
    # Units already held by earlier runs stay held; SCARCE units are what this run competes for.
    _set_stock(client, SCARCE_SKU, reserved + scarce, admin_token)
    contenders = sum(order.scarce for order in plan)
    print(
        f"{SCARCE_SKU}: on_hand {reserved + scarce} ({scarce} available); "
        f"{contenders} orders want 1 unit each"
    )
    return reserved


# -- the report ---------------------------------------------------------------------------------


def _fmt_kib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _tick(ok: object) -> str:
    return "✓" if ok is True else "✗"


def render_report(summary: Mapping[str, Any], audit: Mapping[str, Any]) -> str:
    """The human-readable report printed at the end."""
    out: list[str] = []
    lat = summary["latency_ms"]
    out.append(
        f"orders          {summary['orders']}  (concurrency {summary['concurrency']}, "
        f"{summary['connections']} connections, base {summary['base']})"
    )
    out.append(f"wall time       {summary['wall_s']:.2f} s")
    out.append(f"throughput      {summary['throughput_orders_per_s']:.1f} orders/s (terminal)")
    if lat["p50"] is None:
        out.append("latency         (no replies)")
    else:
        out.append(
            f"latency ms      p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
            f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}"
        )
    counts = summary["status_counts"]
    out.append(
        "statuses        "
        + "  ".join(f"{name} {counts[name]}" for name in sorted(counts, key=lambda s: -counts[s]))
    )
    out.append(f"not terminal    {summary['not_terminal']}")
    gen = summary["load_generator"]
    out.append(
        f"load generator  {gen['cpu_s']:.2f} s CPU = {gen['cpu_percent_of_core']:.0f}% of one core "
        f"({gen['cpu_us_per_order']:.0f} µs/order, reader threads included)"
    )
    server = summary.get("server")
    if server:
        parts = []
        if server.get("cpu_s") is not None:
            parts.append(
                f"run.py {server['cpu_s']:.2f} s CPU = {server['cpu_percent_of_core']:.0f}% "
                "of one core"
            )
        if server.get("peak_rss_kib"):
            parts.append(f"peak RSS {_fmt_kib(server['peak_rss_kib'])} (VmHWM)")
        if server.get("peak_tree_rss_kib"):
            parts.append(
                f"process tree peak {_fmt_kib(server['peak_tree_rss_kib'])} over "
                f"{server['peak_tree_procs']} processes (sampled 1/s)"
            )
        if server.get("kib_per_in_flight_order") is not None:
            parts.append(
                f"{server['kib_per_in_flight_order']:.1f} KiB per in-flight order "
                f"(peak - {_fmt_kib(server['rss_before_kib'])} before, / concurrency)"
            )
        out.append("server          " + "; ".join(parts))
    scarce = summary.get("scarce")
    if scarce:
        out.append(
            f"{SCARCE_SKU}      {scarce['paid_orders']} of {scarce['orders']} contending orders "
            f"paid for {scarce['units']} units; reserved by this run "
            f"{scarce['reserved_by_run']} {_tick(scarce['ok'])}"
        )
    out.append(
        f"audit           {_tick(audit.get('ok'))} {'ok' if audit.get('ok') is True else 'FAILED'}"
        f"  (orders in store {audit.get('orders', '?')}, in flight "
        f"{audit.get('in_flight_count', '?')})"
    )
    if "error" in audit:
        out.append(f"  audit could not run: {audit['error']}")
    checks = audit.get("checks") or {}
    for name, check in checks.items():
        count = check.get("violation_count", len(check.get("violations", [])))
        out.append(
            f"  {_tick(check.get('ok'))} {name}" + (f"  ({count} violations)" if count else "")
        )
        if check.get("ok") is not True:
            violations = check.get("violations", [])
            out.extend(f"      - {v}" for v in violations[:20])
            if count > 20:
                out.append(f"      ... and {count - 20} more")
    if audit.get("in_flight_count"):
        shown = audit.get("in_flight", [])[:20]
        out.append(f"  in flight: {', '.join(map(str, shown))}")
    if "charged" in audit:
        out.append(
            f"  money: charged {audit['charged']}, refunded {audit['refunded']}, "
            f"paid total {audit['paid_total']}"
        )
    return "\n".join(out)


def write_plot(path: str, result: RunResult) -> None:
    """Latency histogram and completed orders per second; skipped if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 -- optional, never a dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print(
            f"--plot: matplotlib is not installed (.venv/bin/pip install -e '.[plot]'); "
            f"no plot written to {path}"
        )
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.hist([x * 1000 for x in result.latencies], bins=50)
    ax1.set_xlabel("latency (ms), placement -> terminal")
    ax1.set_ylabel("orders")
    ax1.set_title("Latency")
    buckets = Counter(int(t) for t in result.finished_at)
    seconds = list(range(max(buckets, default=0) + 1))
    ax2.bar(seconds, [buckets.get(s, 0) for s in seconds], width=1.0, align="edge")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("orders completed")
    ax2.set_title("Completed orders/s (1 s buckets)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot written to {path}")


# -- command line -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _mix_arg(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="loadtest.py",
        description="Drive orders through the gateway; report throughput, latency and the audit.",
    )
    p.add_argument("--orders", type=_positive_int, default=1000, help="orders to place")
    p.add_argument(
        "--concurrency", type=_positive_int, default=100, help="orders in flight at once"
    )
    p.add_argument(
        "--connections", type=_positive_int, default=4, help="pipelined client connections"
    )
    p.add_argument("--host", default=None, help=f"gateway host (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"gateway port (default {DEFAULT_PORT})")
    p.add_argument("--spawn", action="store_true", help="start a private run.py on a fresh DB")
    p.add_argument("--base", choices=("simple", "queue", "tcp"), default=None, help="with --spawn")
    p.add_argument("--step-timeout", type=_positive_float, default=None, help="with --spawn")
    p.add_argument("--payment-latency", type=_non_negative_float, default=None, help="with --spawn")
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default=None, help="with --spawn")
    p.add_argument(
        "--warm-sagas",
        type=int,
        default=None,
        help="with --spawn on a process base: saga processes forked ahead of need",
    )
    p.add_argument(
        "--mix",
        type=_mix_arg,
        default=parse_mix("tok_visa=1"),
        help="payment token weights, e.g. tok_visa=90,tok_chargeDeclined=5,tok_timeout=5",
    )
    p.add_argument(
        "--scarce",
        type=non_negative_int,
        default=0,
        help=f"units of {SCARCE_SKU} that a share of the orders race for (0: off)",
    )
    p.add_argument(
        "--scarce-share",
        type=float,
        default=0.2,
        help=f"share of the orders asking for 1 unit of {SCARCE_SKU} (default 0.2)",
    )
    p.add_argument(
        "--lines", type=_positive_int, default=1, help=f"lines per order (1..{len(PRODUCTS)})"
    )
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random)")
    p.add_argument(
        "--order-timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to wait for one order's reply before counting it as not terminal",
    )
    p.add_argument(
        "--admin-token",
        default=os.environ.get("ORDER_ADMIN_TOKEN"),
        help="token for set_stock if the server requires one (env ORDER_ADMIN_TOKEN)",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="write the summary as JSON")
    p.add_argument("--plot", metavar="PATH.png", default=None, help="plot (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and cross-check the options; raises UsageError (or SystemExit for --help)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    spawn_only = {
        "--base": args.base,
        "--step-timeout": args.step_timeout,
        "--payment-latency": args.payment_latency,
        "--synchronous": args.synchronous,
    }
    if args.spawn:
        if args.host is not None or args.port is not None:
            raise UsageError("--host/--port name an existing server; --spawn starts its own")
        args.base = args.base or "simple"
    else:
        given = [name for name, value in spawn_only.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --spawn")
        args.host = args.host or os.environ.get("ORDER_HOST", DEFAULT_HOST)
        args.port = (
            args.port if args.port is not None else int(os.environ.get("ORDER_PORT", DEFAULT_PORT))
        )
    if args.lines > len(PRODUCTS):
        raise UsageError(f"--lines must be 1..{len(PRODUCTS)}")
    if not 0 <= args.scarce_share <= 1:
        raise UsageError("--scarce-share must be between 0 and 1")
    return args


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _connected(host: str, port: int, count: int, timeout: float) -> Iterator[list[Client]]:
    clients: list[Client] = []
    try:
        for _ in range(count):
            clients.append(Client(host, port, timeout=timeout))
        yield clients
    finally:
        for client in clients:
            client.close()


def _summarize(
    args: argparse.Namespace,
    base: str | None,
    plan: Sequence[PlannedOrder],
    result: RunResult,
) -> dict[str, Any]:
    counts = Counter(result.statuses)
    terminal = sum(counts[s] for s in TERMINAL)
    latencies = sorted(result.latencies)
    lat_ms: dict[str, float | None] = {"p50": None, "p90": None, "p99": None, "max": None}
    if latencies:
        lat_ms = {
            "p50": round(percentile(latencies, 50) * 1000, 3),
            "p90": round(percentile(latencies, 90) * 1000, 3),
            "p99": round(percentile(latencies, 99) * 1000, 3),
            "max": round(latencies[-1] * 1000, 3),
        }
    return {
        "orders": len(plan),
        "throughput_orders_per_s": round(terminal / result.wall_s, 2),
        "latency_ms": lat_ms,
        "status_counts": dict(sorted(counts.items())),
        "base": base,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "mix": args.mix,
        "wall_s": round(result.wall_s, 4),
        "not_terminal": len(plan) - terminal,
        "seed": args.seed,
        "lines": args.lines,
        "load_generator": {
            "cpu_s": round(result.client_cpu_s, 3),
            "cpu_percent_of_core": round(100 * result.client_cpu_s / result.wall_s, 1),
            "cpu_us_per_order": round(1e6 * result.client_cpu_s / max(len(plan), 1), 1),
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test; returns the exit status (see the module docstring)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except UsageError as e:
        print(f"loadtest.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(args.seed)
    run_id = uuid.uuid4().hex[:8]
    share = args.scarce_share if args.scarce > 0 else 0.0
    plan = plan_orders(
        args.orders, rng=rng, run_id=run_id, mix=args.mix, lines=args.lines, scarce_share=share
    )

    server: SpawnedServer | None = None
    if args.spawn:
        try:
            server = SpawnedServer(args)
        except SpawnError as e:
            print(f"loadtest.py: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        args.host, args.port = server.host, server.port
        print(
            f"spawned run.py (pid {server.proc.pid}, base {args.base}) at {args.host}:{args.port}"
        )
    try:
        return _drive(args, run_id, plan, server)
    except ConnectionFailed as e:
        print(f"loadtest.py: {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        print("\nloadtest.py: interrupted", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()


def _drive(
    args: argparse.Namespace,
    run_id: str,
    plan: Sequence[PlannedOrder],
    server: SpawnedServer | None,
) -> int:
    # The client's own timeout only bounds connect and the setup/audit calls; orders have theirs.
    timeout = max(60.0, args.order_timeout)
    with _connected(args.host, args.port, args.connections, timeout) as clients:
        admin = clients[0]
        base = args.base if server is not None else admin.ping().get("base")
        try:
            scarce_reserved_before = prepare_stock(admin, plan, args.scarce, args.admin_token)
        except ClientError as e:
            if isinstance(e, ConnectionFailed):
                raise
            print(f"loadtest.py: preparing stock failed: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(
            f"run {run_id}: {args.orders} orders, concurrency {args.concurrency}, "
            f"{args.connections} connections, seed {args.seed}, mix "
            + ",".join(f"{k}={v:g}" for k, v in args.mix.items())
        )
        server_cpu0 = server.cpu_seconds() if server is not None else None
        # The server's RSS before the orders arrive: the base that in-flight orders add to.
        rss_before = _proc_status_kib(server.proc.pid, "VmRSS") if server is not None else None
        result = LoadRun(
            clients,
            plan,
            concurrency=args.concurrency,
            order_timeout=args.order_timeout,
            progress=None if args.no_progress else sys.stderr,
            server=server,
        ).run()
        summary = _summarize(args, base, plan, result)
        if server is not None:
            cpu1 = server.cpu_seconds()
            server_cpu = None if cpu1 is None or server_cpu0 is None else cpu1 - server_cpu0
            summary["server"] = {
                "pid": server.proc.pid,
                "cpu_s": None if server_cpu is None else round(server_cpu, 3),
                "cpu_percent_of_core": None
                if server_cpu is None
                else round(100 * server_cpu / result.wall_s, 1),
                "peak_rss_kib": server.own_peak_kib(),
                "peak_tree_rss_kib": server.peak_tree_kib,
                "peak_tree_procs": server.peak_tree_procs,
                "rss_before_kib": rss_before,
            }
            peak = server.peak_tree_kib or server.own_peak_kib()
            if peak and rss_before is not None:
                # Orders in flight at the peak are at most `concurrency`: a lower bound on the
                # concurrency actually reached would only make this figure larger.
                summary["server"]["kib_per_in_flight_order"] = round(
                    (peak - rss_before) / min(args.concurrency, args.orders), 2
                )
        scarce_ok = True
        if args.scarce > 0:
            summary["scarce"] = _check_scarce(admin, args, plan, result, scarce_reserved_before)
            scarce_ok = summary["scarce"]["ok"]
        try:
            audit: dict[str, Any] = admin.audit()
        except ClientError as e:
            audit = {"ok": False, "error": f"{e.code}: {e.message}"}
    summary["audit"] = audit
    print(render_report(summary, audit))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"summary written to {args.json}")
    if args.plot:
        write_plot(args.plot, result)
    ok = audit.get("ok") is True and summary["not_terminal"] == 0 and scarce_ok
    return EXIT_OK if ok else EXIT_FAILED


def _check_scarce(
    client: Client,
    args: argparse.Namespace,
    plan: Sequence[PlannedOrder],
    result: RunResult,
    reserved_before: int,
) -> dict[str, Any]:
    """Did exactly the paid contenders keep a unit of SKU-SCARCE, and no more than there were?"""
    paid = sum(
        1
        for order, status in zip(plan, result.statuses, strict=True)
        if order.scarce and status == OrderStatus.PAID
    )
    try:
        reserved_by_run: int | None = _reserved(client, SCARCE_SKU) - reserved_before
    except ClientError as e:
        print(f"loadtest.py: reading {SCARCE_SKU} stock failed: {e}", file=sys.stderr)
        reserved_by_run = None
    return {
        "units": args.scarce,
        "orders": sum(order.scarce for order in plan),
        "paid_orders": paid,
        "reserved_by_run": reserved_by_run,
        "ok": paid <= args.scarce and reserved_by_run == paid,
    }


if __name__ == "__main__":
    sys.exit(main())
