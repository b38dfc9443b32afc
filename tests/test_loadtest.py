"""The load generator (loadgen/, loadtest.py): its helpers, its argument checks, and real runs
against a spawned run.py."""

from __future__ import annotations

import json
import random
import socket
import statistics
from pathlib import Path

import pytest

import loadtest
from loadgen import plan as loadplan
from loadgen.report import percentile


def test_parse_mix_reads_weights_and_bare_tokens() -> None:
    assert loadplan.parse_mix("tok_visa=90, tok_chargeDeclined=5,tok_timeout=5") == {
        "tok_visa": 90.0,
        "tok_chargeDeclined": 5.0,
        "tok_timeout": 5.0,
    }
    assert loadplan.parse_mix("tok_visa") == {"tok_visa": 1.0}
    assert loadplan.parse_mix("tok_visa=1,tok_error=0") == {"tok_visa": 1.0, "tok_error": 0.0}


@pytest.mark.parametrize(
    "text",
    ["", "tok_visa=0", "tok_visa=-1", "tok_visa=x", "=3", "tok-visa=1", "a=1,a=2", "a=inf"],
)
def test_parse_mix_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match=r"mix|weight|token"):
        loadplan.parse_mix(text)


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_percentile_matches_statistics_inclusive_quantiles() -> None:
    rng = random.Random(7)
    values = sorted(rng.expovariate(1.0) for _ in range(257))
    # statistics' "inclusive" method is the same linear interpolation; cut point k of 100 is
    # the k-th percentile.
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in (1, 10, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(cuts[q - 1])


def test_plan_is_seeded_unique_and_respects_scarce_share() -> None:
    def plan(seed: int) -> list[loadplan.PlannedOrder]:
        return loadplan.plan_orders(
            2000,
            rng=random.Random(seed),
            run_id="r",
            mix={"tok_visa": 1.0, "tok_timeout": 1.0},
            lines=3,
            scarce_share=0.25,
        )

    first = plan(1)
    assert first == plan(1)
    assert len({order.args["order_id"] for order in first}) == 2000
    scarce = [order for order in first if order.scarce]
    assert 400 < len(scarce) < 600
    for order in first:
        skus = [line["product_id"] for line in order.args["lines"]]
        assert len(skus) == 3
        assert len(set(skus)) == 3
        assert (loadplan.SCARCE_SKU in skus) == order.scarce
        for line in order.args["lines"]:
            whole, cents = line["unit_price"].split(".")
            assert whole.isdigit()
            assert len(cents) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--orders", "0"],
        ["--base", "queue", "--port", "7300"],  # only for a private run.py
        ["--step-timeout", "1", "--host", "127.0.0.1"],
        ["--targets", "127.0.0.1:7300", "--port", "7300"],
        ["--targets", "127.0.0.1"],
        ["--targets", "a:1,b:2", "--scarce", "5"],
        ["--rate", "-1"],
        ["--spawn", "--port", "7300"],
        ["--mix", "tok_visa=0"],
        ["--lines", "11"],
        ["--scarce-share", "1.5"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    assert loadtest.main(argv) == 2


def test_unreachable_server_exits_3() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused.
    assert loadtest.main(["--port", str(port), "--orders", "1", "--no-progress"]) == 3


def test_spawned_run_reaches_terminal_states_and_passes_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "r.json"
    code = loadtest.main(
        [
            "--spawn",
            "--orders",
            "200",
            "--concurrency",
            "50",
            "--mix",
            "tok_visa=8,tok_chargeDeclined=1,tok_timeout=1",
            "--step-timeout",
            "0.5",
            "--scarce",
            "30",
            "--json",
            str(report_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    design_keys = {
        "orders",
        "throughput_orders_per_s",
        "latency_ms",
        "status_counts",
        "audit",
        "base",
        "concurrency",
    }
    assert design_keys <= report.keys()
    assert {"connections", "mix", "wall_s", "not_terminal"} <= report.keys()
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["orders"] == 200
    assert report["base"] == "simple"
    assert report["concurrency"] == 50
    assert report["throughput_orders_per_s"] > 0
    assert report["not_terminal"] == 0

    counts = report["status_counts"]
    assert sum(counts.values()) == 200
    assert counts.get("paid", 0) + counts.get("cancelled", 0) + counts.get("failed", 0) == 200
    # 10% of the orders time out in payment, 10% are declined: both end cancelled.
    assert counts.get("cancelled", 0) > 0
    assert counts.get("paid", 0) > 0

    audit = report["audit"]
    assert audit["ok"] is True
    assert all(check["ok"] for check in audit["checks"].values())
    assert audit["in_flight_count"] == 0
    assert audit["orders"] == 200

    # About 40 orders race for 30 units: never more paid than there were units, and the
    # units the run holds are exactly those of its paid contenders.
    scarce = report["scarce"]
    assert scarce["units"] == 30
    assert scarce["paid_orders"] <= 30
    assert scarce["reserved_by_run"] == scarce["paid_orders"]
    assert scarce["ok"] is True
    assert "✓ stock_consistent" in out


def test_orders_given_up_on_count_in_the_latency_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review finding: orders that never answered were left out, and p99 looked fine."""
    report_path = tmp_path / "r.json"
    code = loadtest.main(
        [
            "--spawn",
            "--orders",
            "20",
            "--concurrency",
            "20",
            "--mix",
            "tok_visa=1,tok_timeout=1",
            "--step-timeout",
            "5",
            "--order-timeout",
            "1",
            "--json",
            str(report_path),
            "--no-progress",
        ]
    )
    capsys.readouterr()
    report = json.loads(report_path.read_text())
    assert code == 1  # orders that never ended fail the run
    assert report["not_terminal"] > 0
    assert report["latency_ms"]["max"] >= 1000  # ... and show in the tail
