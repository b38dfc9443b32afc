"""The benchmark's own parts: the bare reference saga really runs orders, and the table adds up."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import (
    MIXED_ARGS,
    _kinds,
    _parser,
    median_row,
    node_counts,
    open_loop_row,
    render,
    render_nodes,
)
from benchmarks.reference import run_reference


@pytest.mark.parametrize(
    "system_base",
    ["simpleSystemBase", pytest.param("multiprocQueueBase", marks=pytest.mark.process)],
)
def test_reference_saga_runs_every_order(tmp_path: Path, system_base: str) -> None:
    done = run_reference(system_base, orders=40, concurrency=8, db=str(tmp_path / "r.db"))
    assert len(done.latencies) == 40
    assert all(latency > 0 for latency in done.latencies)
    assert done.wall > 0


def test_median_row_and_table() -> None:
    runs = [
        {"throughput_orders_per_s": t, "latency_ms": {"p50": t, "p90": t, "p99": t, "max": t}}
        for t in (10.0, 30.0, 20.0)
    ]
    assert median_row(runs) == {
        "orders_per_s": 20.0,
        "p50": 20.0,
        "p90": 20.0,
        "p99": 20.0,
        "max": 20.0,
    }
    table = {
        "simple/full": {
            "orders": 5,
            "concurrency": 2,
            "median": median_row(runs),
            "audits": "3/3 ok",
        },
        "simple/reference": {
            "orders": 5,
            "concurrency": 2,
            "median": median_row([{**runs[0], "throughput_orders_per_s": 40.0}]),
        },
    }
    meta = {"started": "now", "reps": 3, "machine": {"cpus": 2, "cpu": "x", "python": "3.11"}}
    text = render(table, meta)
    assert "| simple | full | 5 | 2 | 20 |" in text
    assert "| 50% |  | 3/3 ok |" in text  # 20 of the reference's 40 orders/s
    table["simple/in-flight"] = {
        "orders": 9,
        "concurrency": 9,
        "median": median_row(runs),
        "runs": [{"server": {"kib_per_in_flight_order": k}} for k in (12.0, 14.0, 13.0)],
        "audits": "3/3 ok",
    }
    assert "| simple | in-flight | 9 | 9 | 20 |" in render(table, meta)
    assert "|  | 13.0 | 3/3 ok |" in render(table, meta)  # median KiB per order in flight


def test_runs_without_latencies_do_not_break_the_table() -> None:
    """Review finding: a run whose every order failed has no percentiles."""
    none = {"p50": None, "p90": None, "p99": None, "max": None}
    runs = [
        {"throughput_orders_per_s": 0.0, "latency_ms": none},
        {"throughput_orders_per_s": 10.0, "latency_ms": dict.fromkeys(none, 5.0)},
    ]
    assert median_row(runs)["p99"] == 5.0
    assert median_row(runs[:1])["p99"] is None
    table = {"simple/full": {"orders": 1, "concurrency": 1, "median": median_row(runs[:1])}}
    meta = {"started": "now", "reps": 1, "machine": {"cpus": 2, "cpu": "x", "python": "3.11"}}
    assert "| n/a | n/a |" in render(table, meta)


def test_open_loop_rows_get_a_table_of_their_own() -> None:
    lat = {"p50": 2.0, "p90": 4.0, "p99": 9.0, "p99.9": 30.0, "max": 40.0}
    runs = [
        {
            "throughput_orders_per_s": 990.0,
            "latency_ms": {k: v * scale for k, v in lat.items()},
            "open_loop": {"offered_rate": 1000.0, "achieved_rate": a, "late_starts": late},
        }
        for scale, a, late in ((1.0, 998.0, 3), (2.0, 990.0, 9), (3.0, 1001.0, 5))
    ]
    row = open_loop_row(runs)
    assert row == {
        "offered": 1000.0,
        "achieved": 998.0,
        "late_starts": 5,
        "p50": 4.0,
        "p90": 8.0,
        "p99": 18.0,
        "p99.9": 60.0,
        "max": 80.0,
    }
    table = {
        "simple/full": {"orders": 5, "concurrency": 2, "median": median_row(runs)},
        "simple/open-loop": {
            "orders": 10000,
            "concurrency": 1000,
            "median": median_row(runs),
            "runs": runs,
            "audits": "3/3 ok",
        },
    }
    meta = {"started": "now", "reps": 3, "machine": {"cpus": 2, "cpu": "x", "python": "3.11"}}
    text = render(table, meta)
    assert "| simple | open-loop |" not in text  # not in the closed-loop table
    assert (
        "| simple | 10000 | 1000 | 1000 | 998 | 4.0 | 8.0 | 18.0 | 60.0 | 80.0 | 5 | 3/3 ok |"
        in text
    )


def test_the_mixed_row_runs_by_default_on_the_simple_base_and_can_be_skipped() -> None:
    args = _parser().parse_args([])
    assert _kinds("simple", args) == ["full", "reference", "in-flight", "open-loop", "mixed"]
    assert _kinds("queue", args) == ["full", "reference"]
    skipped = _parser().parse_args(["--mixed-orders", "0", "--in-flight", "0", "--rate", "0"])
    assert _kinds("simple", skipped) == ["full", "reference"]
    # Half the orders with shipping, 5 % cancelled: loadtest.py's own options.
    options = dict(zip(MIXED_ARGS[::2], MIXED_ARGS[1::2], strict=True))
    assert options["--ship-share"] == "0.5"
    assert options["--cancel-share"] == "0.05"
    runs = [
        {
            "throughput_orders_per_s": 900.0,
            "latency_ms": dict.fromkeys(("p50", "p90", "p99", "max"), 7.0),
        }
    ]
    table = {
        "simple/mixed": {
            "orders": 50,
            "concurrency": 5,
            "median": median_row(runs),
            "audits": "1/1 ok",
        }
    }
    meta = {"started": "now", "reps": 1, "machine": {"cpus": 2, "cpu": "x", "python": "3.11"}}
    assert "| simple | mixed | 50 | 5 | 900 | 7.0 | 7.0 | 7.0 | 7.0 |  |  | 1/1 ok |" in render(
        table, meta
    )


def test_node_rows_table() -> None:
    def run(orders_per_s: float) -> dict[str, object]:
        return {
            "throughput_orders_per_s": orders_per_s,
            "latency_ms": {"p50": 5.0, "p90": 6.0, "p99": 9.0, "max": 10.0},
            "nodes": {
                "orders_per_s_per_core": orders_per_s / 2,
                "cores_busy": 1.5,
                "orders_per_cpu_s": 600.0,
            },
        }

    runs = [run(t) for t in (800.0, 600.0, 700.0)]
    table = {
        "nodes/2": {
            "orders": 30,
            "concurrency": 12,
            "median": median_row(runs),
            "runs": runs,
            "audits": "3/3 ok",
        },
    }
    text = render_nodes(table)
    assert "| 2 | 30 | 12 | 700 | 350 | 350 | 1.50 | 600 | 5.0 | 9.0 | 3/3 ok |" in text
    meta = {"started": "now", "reps": 3, "machine": {"cpus": 2, "cpu": "x", "python": "3.11"}}
    assert "| nodes |" not in render(table, meta).split("\n", 1)[1]  # not among the bases
    assert render_nodes({}) == ""
    assert node_counts("1,2,3") == [1, 2, 3]
    assert node_counts("0") == []
