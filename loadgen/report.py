"""Percentiles, the run's summary (the `--json` document) and the report printed at the end."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadgen.drive import LATE_AFTER, RunResult
from loadgen.plan import SCARCE_SKU, PlannedOrder
from loadgen.spawn import SpawnedServer
from messages.base import TERMINAL_STATUSES

# The latency_ms keys: DESIGN.md's p50/p90/p99/max, and p99.9 for the open loop's tail.
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}


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


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9 and max in milliseconds (all None without a single value)."""
    if not seconds:
        return {**dict.fromkeys(PERCENTILES), "max": None}
    ordered = sorted(seconds)
    figures = {k: round(percentile(ordered, q) * 1000, 3) for k, q in PERCENTILES.items()}
    return {**figures, "max": round(ordered[-1] * 1000, 3)}


@dataclass(frozen=True)
class RunShape:
    """How the run was set up, as the report repeats it: the server's base (None for a target
    not spawned here), the clients, the order mix and the seed, and the open loop's rate."""

    base: str | None
    concurrency: int
    connections: int
    mix: Mapping[str, float]
    seed: int
    lines: int
    rate: float | None


def summarize(orders: int, result: RunResult, shape: RunShape) -> dict[str, Any]:
    """The run's figures; the DESIGN.md keys first, then this tool's own."""
    base, concurrency, connections = shape.base, shape.concurrency, shape.connections
    mix, seed, lines, rate = shape.mix, shape.seed, shape.lines, shape.rate
    counts = Counter(result.statuses)
    terminal = sum(counts[s] for s in TERMINAL_STATUSES)
    summary: dict[str, Any] = {
        "orders": orders,
        "throughput_orders_per_s": round(terminal / result.wall_s, 2),
        "latency_ms": latency_ms(result.latencies),
        "status_counts": dict(sorted(counts.items())),
        "base": base,
        "concurrency": concurrency,
        "connections": connections,
        "mode": "closed" if rate is None else "open",
        "mix": dict(mix),
        "wall_s": round(result.wall_s, 4),
        "not_terminal": orders - terminal,
        "seed": seed,
        "lines": lines,
        "load_generator": {
            "cpu_s": round(result.client_cpu_s, 3),
            "cpu_percent_of_core": round(100 * result.client_cpu_s / result.wall_s, 1),
            "cpu_us_per_order": round(1e6 * result.client_cpu_s / max(orders, 1), 1),
        },
    }
    if rate is not None:
        lags = result.start_lags
        summary["open_loop"] = {
            "offered_rate": rate,
            # submissions per second over the time it took to make them: below the offered rate
            # when the generator (or the concurrency cap) could not keep up
            "achieved_rate": round(len(lags) / max(result.submit_span_s, 1e-9), 2),
            # the rate of this seed's arrivals as planned: Poisson arrivals over a short run
            # stray from the mean rate by themselves
            "planned_rate": round(len(lags) / max(result.planned_span_s, 1e-9), 2),
            "late_starts": sum(lag > LATE_AFTER for lag in lags),
            "late_after_ms": LATE_AFTER * 1000,
            "start_lag_ms": latency_ms(lags),
        }
    return summary


def fulfilment(plan: Sequence[PlannedOrder], result: RunResult) -> dict[str, Any]:
    """Shipping and customers' cancels: `shipped` (the orders that ended shipped, as in
    status_counts), `cancelled_by_customer` (the orders that ended cancelled by their customer:
    a share of status_counts' `cancelled`), and the `shipping` and `cancels` blocks."""
    counts = Counter(result.statuses)
    with_shipping = [
        s for order, s in zip(plan, result.statuses, strict=True) if "shipping" in order.args
    ]
    carriers = Counter(
        order.args["shipping"]["carrier"] for order in plan if "shipping" in order.args
    )
    return {
        "shipped": counts.get("shipped", 0),
        "cancelled_by_customer": result.cancelled_by_customer,
        "shipping": {
            "orders": len(with_shipping),
            "carriers": dict(sorted(carriers.items())),
            "status_counts": dict(sorted(Counter(with_shipping).items())),
        },
        "cancels": {
            "sent": sum(order.cancel_after is not None for order in plan),
            "replies": result.cancel_replies,
        },
    }


def server_figures(
    server: SpawnedServer,
    wall_s: float,
    cpu0: float | None,
    rss_before: int | None,
    in_flight_bound: int | None,
) -> dict[str, Any]:
    """CPU and memory of the spawned run.py over the run.

    With `in_flight_bound` (the most orders that can have been in flight at once) the memory
    growth is also given per in-flight order; a lower bound on the concurrency actually reached
    would only make that figure larger.
    """
    cpu1 = server.cpu_seconds()
    cpu = None if cpu1 is None or cpu0 is None else cpu1 - cpu0
    figures: dict[str, Any] = {
        "pid": server.proc.pid,
        "cpu_s": None if cpu is None else round(cpu, 3),
        "cpu_percent_of_core": None if cpu is None else round(100 * cpu / wall_s, 1),
        "peak_rss_kib": server.own_peak_kib(),
        "peak_tree_rss_kib": server.peak_tree_kib,
        "peak_tree_procs": server.peak_tree_procs,
        "rss_before_kib": rss_before,
    }
    peak = server.peak_tree_kib or server.own_peak_kib()
    if peak and rss_before is not None and in_flight_bound:
        figures["kib_per_in_flight_order"] = round((peak - rss_before) / in_flight_bound, 2)
    return figures


def _fmt_kib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _tick(ok: object) -> str:
    return "✓" if ok is True else "✗"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_report(summary: Mapping[str, Any], audit: Mapping[str, Any]) -> str:
    """The human-readable report printed at the end."""
    lat = summary["latency_ms"]
    out = [
        f"orders          {summary['orders']}  (concurrency {summary['concurrency']}, "
        f"{summary['connections']} connections, base {summary['base']})",
        f"wall time       {summary['wall_s']:.2f} s",
        f"throughput      {summary['throughput_orders_per_s']:.1f} orders/s (terminal)",
    ]
    open_loop = summary.get("open_loop")
    if open_loop:
        lag = open_loop["start_lag_ms"]
        out.append(
            f"open loop       offered {open_loop['offered_rate']:g}/s (this seed's arrivals "
            f"{open_loop['planned_rate']:.1f}/s), achieved {open_loop['achieved_rate']:.1f}/s; "
            f"{open_loop['late_starts']} started more than "
            f"{open_loop['late_after_ms']:g} ms late (lag p99 {_ms(lag['p99'])} ms, "
            f"max {_ms(lag['max'])} ms)"
        )
    if lat["p50"] is None:
        out.append("latency         (no replies)")
    else:
        since = "intended start" if open_loop else "submission"
        out.append(
            f"latency ms      p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  "
            f"p99.9 {lat['p99.9']:.1f}  max {lat['max']:.1f}  (from {since})"
        )
    counts = summary["status_counts"]
    out.append(
        "statuses        "
        + "  ".join(f"{name} {counts[name]}" for name in sorted(counts, key=lambda s: -counts[s]))
    )
    out.append(f"not terminal    {summary['not_terminal']}")
    out.extend(_fulfilment_lines(summary))
    gen = summary["load_generator"]
    out.append(
        f"load generator  {gen['cpu_s']:.2f} s CPU = {gen['cpu_percent_of_core']:.0f}% of one core "
        f"({gen['cpu_us_per_order']:.0f} µs/order, reader threads included)"
    )
    server = summary.get("server")
    if server:
        out.append("server          " + "; ".join(_server_parts(server)))
    scarce = summary.get("scarce")
    if scarce:
        out.append(
            f"{SCARCE_SKU}      {scarce['paid_orders']} of {scarce['orders']} contending orders "
            f"paid (and {scarce.get('shipped_orders', 0)} shipped) for {scarce['units']} units; "
            "reserved by this run "
            f"{scarce['reserved_by_run']} {_tick(scarce['ok'])}"
        )
        if scarce.get("error"):
            out.append(f"  {scarce['error']}")
    targets = audit.get("targets")
    audits = targets.items() if isinstance(targets, dict) else [(None, audit)]
    for name, one in audits:
        out.extend(_audit_lines(one, name))
    return "\n".join(out)


def _fulfilment_lines(summary: Mapping[str, Any]) -> list[str]:
    out = []
    shipping = summary.get("shipping") or {}
    if shipping.get("orders"):
        statuses = shipping["status_counts"]
        out.append(
            f"shipping        {shipping['orders']} orders placed with shipping: "
            f"{summary['shipped']} shipped; "
            + "  ".join(f"{name} {n}" for name, n in statuses.items() if name != "shipped")
        )
    cancels = summary.get("cancels") or {}
    if cancels.get("sent"):
        replies = "  ".join(f"{name} {n}" for name, n in cancels["replies"].items())
        out.append(
            f"cancels         {cancels['sent']} sent, {summary['cancelled_by_customer']} orders "
            f"cancelled by the customer; answers: {replies or 'none'}"
        )
    return out


def _server_parts(server: Mapping[str, Any]) -> list[str]:
    parts = []
    if server.get("cpu_s") is not None:
        parts.append(
            f"run.py {server['cpu_s']:.2f} s CPU = {server['cpu_percent_of_core']:.0f}% of one core"
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
    return parts


def _audit_lines(audit: Mapping[str, Any], target: str | None) -> list[str]:
    label = f"audit {target}" if target else "audit"
    out = [
        f"{label:<15} {_tick(audit.get('ok'))} {'ok' if audit.get('ok') is True else 'FAILED'}"
        f"  (orders in store {audit.get('orders', '?')}, in flight "
        f"{audit.get('in_flight_count', '?')})"
    ]
    if "error" in audit:
        out.append(f"  audit could not run: {audit['error']}")
    for name, check in (audit.get("checks") or {}).items():
        count = check.get("violation_count", len(check.get("violations", [])))
        out.append(
            f"  {_tick(check.get('ok'))} {name}" + (f"  ({count} violations)" if count else "")
        )
        if check.get("ok") is not True:
            out.extend(f"      - {v}" for v in check.get("violations", [])[:20])
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
    return out
