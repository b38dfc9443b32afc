"""`make soak-memory` in small: a real run.py takes the orders, is restarted on its database and
compared with a fresh one, and the table, the CSV, the summary and the PNG say what happened."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks import soak_memory
from loadgen.spawn import READY_TIMEOUT
from runtime.proc_tree import with_cmdline


def test_a_small_soak_writes_its_table_samples_and_restart_figures(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    args = ["--orders", "400", "--concurrency", "20", "--warm", "50", "--settle", "0.5"]
    args += ["--audit", "--out", str(out)]
    assert soak_memory.main(args) == 0

    summary = json.loads((out / "soak-memory.json").read_text())
    assert summary["statuses"] == {"paid": 400}
    assert summary["audit_ok"] is True
    for start in ("restart", "fresh"):
        assert 0 < summary[start]["ready_s"] < READY_TIMEOUT
        assert summary[start]["rss_ready_mib"] > 10
        assert summary[start]["rss_loaded_mib"] >= summary[start]["rss_ready_mib"] * 0.5
        assert summary[start]["warm_orders"] == 50
    assert summary["restart"]["db"].endswith("soak.db")
    assert summary["fresh"]["db"].endswith("fresh.db")
    assert set(summary["summary"]) >= {"growth", "restart_ready_s", "restart_vs_fresh_loaded"}

    with (out / "soak-memory.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["orders_finished"] == "0"
    assert rows[-1]["orders_finished"] == "400"  # the last sample is taken when the load ends
    assert all(float(row["rss_mib"]) > 10 for row in rows)
    finished = [int(row["orders_finished"]) for row in rows]
    assert finished == sorted(finished)

    table = (out / "soak-memory.md").read_text()
    assert "| 400 |" in table
    assert "restart on the soak's database" in table
    assert (out / "soak-memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert with_cmdline(str(out)) == []  # every server it started is gone
