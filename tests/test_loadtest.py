"""The load generator (loadgen/, loadtest.py): its helpers, its argument checks, and real runs
against a spawned run.py."""

from __future__ import annotations

import io
import itertools
import json
import random
import socket
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import loadgen.cli
import loadtest
from loadgen import plan as loadplan
from loadgen.drive import RunResult
from loadgen.options import parse_args, spread
from loadgen.plot import write_plot
from loadgen.progress import Progress
from loadgen.report import percentile
from runtime.proc_tree import with_cmdline
from tests.conftest import Server


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
        shape = loadplan.OrderShape(
            mix={"tok_visa": 1.0, "tok_timeout": 1.0}, lines=3, scarce_share=0.25
        )
        return loadplan.plan_orders(2000, rng=random.Random(seed), run_id="r", shape=shape)

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


def test_plan_ships_and_cancels_their_shares_without_changing_the_orders() -> None:
    plain = loadplan.OrderShape(mix={"tok_visa": 1.0}, lines=2)
    shape = loadplan.OrderShape(
        mix={"tok_visa": 1.0},
        lines=2,
        ship_share=0.5,
        carrier_mix={"ship_standard": 3.0, "ship_refused": 1.0},
        cancel_share=0.1,
        cancel_within=0.02,
    )
    orders = loadplan.plan_orders(4000, rng=random.Random(5), run_id="r", shape=shape)
    before = loadplan.plan_orders(4000, rng=random.Random(5), run_id="r", shape=plain)
    # The same orders as a run without shipping or cancels: only those two are added.
    for order, same in zip(orders, before, strict=True):
        assert {k: v for k, v in order.args.items() if k != "shipping"} == same.args
        assert same.cancel_after is None
    shipping = [order.args["shipping"] for order in orders if "shipping" in order.args]
    assert 1800 < len(shipping) < 2200
    assert all(s["address"] == loadplan.ADDRESS for s in shipping)
    refused = sum(s["carrier"] == "ship_refused" for s in shipping)
    assert 0.2 < refused / len(shipping) < 0.3
    delays = [order.cancel_after for order in orders if order.cancel_after is not None]
    assert 300 < len(delays) < 500
    assert all(0 <= d <= 0.02 for d in delays)


@pytest.mark.parametrize(
    "argv",
    [
        ["--ship-share", "1.5"],
        ["--cancel-share", "-0.1"],
        ["--cancel-within", "-1"],
        ["--mix", "tok_visa=9,ship_refused=1"],  # a carrier token in the payment mix
        ["--carrier-mix", "tok_visa=1"],
        ["--carrier-mix", "ship_standard=0"],
        ["--orders", "0"],
        ["--base", "queue", "--port", "7300"],  # only for a private run.py
        ["--step-timeout", "1", "--host", "127.0.0.1"],
        ["--targets", "127.0.0.1:7300", "--port", "7300"],
        ["--targets", "127.0.0.1"],
        ["--rate", "-1"],
        ["--spawn", "--port", "7300"],
        ["--spawn-nodes", "2", "--targets", "127.0.0.1:7300"],
        ["--spawn-nodes", "2", "--spawn"],
        ["--spawn-nodes", "-1"],
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


def test_help_shows_defaults_and_payment_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 1000)" in out  # --orders
    assert "(default: 100)" in out  # --concurrency
    assert "(default: tok_visa=1)" in out
    for token in loadplan.PAYMENT_TOKENS:
        assert token in out
    for option in ("--ship-share", "--carrier-mix", "--cancel-share", "--cancel-within"):
        assert option in out
    for token in loadplan.CARRIER_TOKENS:
        assert token in out


def test_arrivals_are_seeded_poisson_at_the_mean_rate() -> None:
    offsets = loadplan.arrival_offsets(20_000, 1000.0, seed=5)
    assert offsets == loadplan.arrival_offsets(20_000, 1000.0, seed=5)
    assert offsets != loadplan.arrival_offsets(20_000, 1000.0, seed=6)
    gaps = [b - a for a, b in itertools.pairwise([0.0, *offsets])]
    assert all(gap >= 0 for gap in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.001, rel=0.05)
    # exponential: the standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(0.001, rel=0.05)
    with pytest.raises(ValueError, match="rate"):
        loadplan.arrival_offsets(1, 0.0, seed=1)


@pytest.mark.parametrize("tty", [True, False])
def test_progress_redraws_only_on_a_terminal(tty: bool) -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=tty)
    for tenth in range(0, 120):
        progress.update(done=tenth, total=200, in_flight=3, elapsed=tenth / 10, final=False)
    progress.update(done=200, total=200, in_flight=0, elapsed=12.0, final=True)
    text = stream.getvalue()
    assert ("\r" in text) is tty
    if not tty:  # a plain line every 5 s (0, 5, 10) and the last one
        assert len(text.splitlines()) == 4
        assert text.splitlines()[-1].startswith("progress 200/200")


def test_plot_without_matplotlib_exits_2_before_any_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails

    def no_server(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a server was spawned before the plot check")

    monkeypatch.setattr(loadgen.cli, "SpawnedServer", no_server)
    png = tmp_path / "p.png"
    assert loadtest.main(["--orders", "10", "--plot", str(png)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err
    assert "pip install" in err
    assert not png.exists()


def test_plot_is_drawn_from_a_result(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = RunResult(
        statuses=["paid"] * 50 + ["cancelled"] * 5 + ["error:timeout"],
        samples=[("paid", 0.002 + i / 1000) for i in range(50)]
        + [("cancelled", 5.0)] * 5
        + [("error:timeout", 7.5)],
        finished_at=[i / 20 for i in range(56)],
        wall_s=3.0,
        client_cpu_s=0.1,
    )
    png = tmp_path / "p.png"
    write_plot(str(png), result, {"base": "simple", "mix": "tok_visa=1", "seed": 1, "rate": 50})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_target_server_is_told_what_changes_before_the_run(
    start_server: Callable[..., Server], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    code = loadtest.main(
        ["--port", str(server.port), "--orders", "600", "--lines", "10", "--no-progress"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.out
    warning = next(line for line in captured.err.splitlines() if "changes the server" in line)
    assert f"127.0.0.1:{server.port}" in warning
    assert "places 600 orders" in warning
    assert "stock raised" in warning  # 600 orders x 10 lines want ~1,200 of every SKU
    assert "spawned run.py" not in captured.out


def test_open_loop_run_keeps_its_rate_and_reports_the_tail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "open.json"
    code = loadtest.main(  # no --spawn: a private server is the default
        [
            "--orders",
            "200",
            "--rate",
            "200",
            "--seed",
            "11",
            "--json",
            str(report_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["mode"] == "open"
    assert report["not_terminal"] == 0
    assert sum(report["status_counts"].values()) == report["status_counts"]["paid"] == 200
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    open_loop = report["open_loop"]
    assert open_loop["offered_rate"] == 200
    # Poisson arrivals: 200 of them stray from the mean rate by ~7% (one sd) by themselves;
    # the generator itself must keep to the arrivals it planned.
    assert 140 <= open_loop["planned_rate"] <= 260
    assert open_loop["achieved_rate"] == pytest.approx(open_loop["planned_rate"], rel=0.15)
    assert open_loop["late_starts"] <= 20
    assert set(open_loop["start_lag_ms"]) == set(lat)
    assert "open loop       offered 200/s" in out


def test_a_run_with_shipping_and_customers_cancels_ends_every_order_and_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "ship.json"
    code = loadtest.main(
        [
            "--orders",
            "300",
            "--concurrency",
            "40",
            "--ship-share",
            "0.6",
            "--carrier-mix",
            "ship_standard=85,ship_refused=5,ship_timeout=5,ship_error=5",
            "--cancel-share",
            "0.3",
            "--cancel-within",
            "0.03",
            "--step-timeout",
            "0.5",
            "--scarce",
            "20",
            "--seed",
            "17",
            "--json",
            str(report_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["not_terminal"] == 0
    assert report["audit"]["ok"] is True
    assert report["audit"]["in_flight_count"] == 0
    counts = report["status_counts"]  # keeps its meaning: one final status per order
    assert sum(counts.values()) == 300
    assert set(counts) <= {"paid", "shipped", "cancelled", "failed"}
    assert report["shipped"] == counts["shipped"] > 0
    shipping = report["shipping"]
    assert 140 < shipping["orders"] < 220
    assert sum(shipping["status_counts"].values()) == shipping["orders"]
    assert counts["paid"] <= 300 - shipping["orders"]  # paid ends only orders without shipping
    assert sum(shipping["carriers"].values()) == shipping["orders"]
    cancels = report["cancels"]
    assert 60 < cancels["sent"] < 120
    assert sum(cancels["replies"].values()) == cancels["sent"]  # every cancel was answered
    assert "lost" not in cancels["replies"]
    # Cancels race the steps: some win, some come too late (the order paid or shipped first).
    by_customer = report["cancelled_by_customer"]
    assert 0 < by_customer <= counts["cancelled"]
    assert cancels["replies"].get("cancelled", 0) == by_customer
    assert cancels["replies"].get("too_late", 0) > 0
    assert report["scarce"]["ok"] is True
    assert "shipping        " in out
    assert "orders cancelled by the customer" in out


def test_connections_are_spread_evenly_over_the_nodes() -> None:
    assert [spread(4, n) for n in (1, 2, 3, 5)] == [4, 4, 6, 5]
    args = parse_args(["--targets", "127.0.0.1:7300,127.0.0.1:7301,127.0.0.1:7302"])
    assert args.connections == 6
    args = parse_args(["--spawn-nodes", "3", "--connections", "2"])
    assert (args.connections, args.spawn, args.targets) == (3, False, [])


@pytest.mark.usefixtures("pg_server")
def test_spawned_nodes_share_the_orders_and_everything_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--spawn-nodes 2`: a PostgreSQL of its own and two nodes, the orders over both, the
    figures per node, nothing left running at the end (pg_server only proves the binaries)."""
    report_path = tmp_path / "nodes.json"
    before = set(with_cmdline("orders-pg-"))
    argv = ["--spawn-nodes", "2", "--orders", "120", "--concurrency", "20", "--scarce", "10"]
    code = loadtest.main([*argv, "--json", str(report_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    assert report["status_counts"]["paid"] >= 10
    assert report["nodes"]["nodes"] == 2
    assert set(report["nodes"]["cpu_s"]) == {"n1", "n2", "postgres"}
    assert report["audit"]["ok"]
    assert len(report["audit"]["targets"]) == 2
    assert "nodes: 2," in out
    assert set(with_cmdline("orders-pg-")) <= before  # the private server is gone
