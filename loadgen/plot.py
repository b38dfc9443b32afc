"""`--plot`: the latency distribution by outcome and the completions per second, as a PNG.

matplotlib is optional (`pip install -e '.[plot]'`), so `require_matplotlib` is called before
any load is driven: finding out it is missing after a ten-minute run is no use to anyone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from loadgen.drive import RunResult
from loadgen.report import percentile

INSTALL_HINT = ".venv/bin/pip install -e '.[plot]'"
OUTCOME_COLOURS = {
    "paid": "tab:green",
    "cancelled": "tab:orange",
    "failed": "tab:red",
    "error:timeout": "tab:gray",
}


class PlotUnavailableError(Exception):
    """matplotlib cannot be imported."""


def require_matplotlib() -> None:
    """Raise PlotUnavailableError, with what to install, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401, PLC0415 -- optional, never a dependency
    except ImportError as e:
        raise PlotUnavailableError(
            f"--plot needs matplotlib, which is not installed ({INSTALL_HINT})"
        ) from e


def _log_bins(lo: float, hi: float, count: int = 60) -> list[float]:
    # Latencies span from a millisecond to the step timeout and beyond: on a linear axis a
    # handful of 5-second timeouts squash every other order into the first bin.
    lo, hi = max(lo, 1e-3), max(hi, lo * 1.01)
    step = (math.log10(hi) - math.log10(lo)) / count
    return [10 ** (math.log10(lo) + i * step) for i in range(count + 1)]


def write_plot(path: str, result: RunResult, meta: Mapping[str, Any]) -> None:
    """Latency histogram (log x, stacked by outcome, p50/p99 marked) and completions per second.

    `meta` gives the title: base, mix, seed and, for the open loop, the offered rate.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by_status: dict[str, list[float]] = {}
    for status, seconds in result.samples:
        by_status.setdefault(status, []).append(seconds * 1000)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    if by_status:
        everything = sorted(ms for values in by_status.values() for ms in values)
        names = sorted(by_status, key=lambda s: -len(by_status[s]))
        ax1.hist(
            [by_status[name] for name in names],
            bins=_log_bins(everything[0], everything[-1]),
            stacked=True,
            label=[f"{name} ({len(by_status[name])})" for name in names],
            color=[OUTCOME_COLOURS.get(name, "tab:purple") for name in names],
        )
        for q, style in ((50, "--"), (99, ":")):
            value = percentile(everything, q)
            ax1.axvline(value, color="black", linestyle=style, linewidth=1)
            ax1.annotate(
                f"p{q} {value:.1f} ms",
                xy=(value, 1),
                xycoords=("data", "axes fraction"),
                # p99 sits near the right edge: its label goes to the left of its line
                xytext=(3, -12) if q == 50 else (-3, -24),
                textcoords="offset points",
                ha="left" if q == 50 else "right",
                fontsize=8,
            )
        ax1.legend(fontsize=8, title="outcome")
    ax1.set_xscale("log")
    since = "intended start" if meta.get("rate") else "placement"
    ax1.set_xlabel(f"latency (ms, log scale), {since} -> terminal")
    ax1.set_ylabel("orders")
    ax1.set_title("Latency by outcome")
    buckets = Counter(int(t) for t in result.finished_at)
    second_marks = list(range(max(buckets, default=0) + 1))
    ax2.bar(second_marks, [buckets.get(s, 0) for s in second_marks], width=1.0, align="edge")
    ax2.set_xlabel("seconds since start")
    ax2.set_ylabel("orders completed")
    ax2.set_title("Completed orders/s (1 s buckets)")
    title = f"base {meta.get('base')}, mix {meta.get('mix')}, seed {meta.get('seed')}"
    if meta.get("rate"):
        title += f", open loop at {meta['rate']:g} orders/s offered"
    else:
        title += f", closed loop, concurrency {meta.get('concurrency')}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
