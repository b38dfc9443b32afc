"""End to end on the other backends: a real run.py with ``--store memory:`` (and, when the
PostgreSQL binaries are installed, ``--store postgresql://`` on a server of the tests' own)
places an order of every payment token, and the audit is clean."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from runtime.pg import PgServer
from tests.conftest import ROOT, Server, new_id, wait_until
from tests.test_end_to_end import LINES, PATHS


def place_every_token(server: Server) -> None:
    """Every token's order ends as designed; stock comes back unless paid; audit clean."""
    client = server.client()
    for token, (status, types) in PATHS.items():
        order_id = new_id(token)
        result = client.place_order(order_id, "cust-1", LINES, payment_method=token)
        assert result["status"] == status, (token, result)
        events = client.read_stream(f"order-{order_id}")["events"]
        assert [e["type"] for e in events] == types
        assert client.get_order(order_id)["status"] == status

    def settled() -> dict[str, Any] | None:
        report: dict[str, Any] = client.audit()
        return report if report["in_flight_count"] == 0 else None

    report = wait_until(settled, timeout=30)
    assert report["ok"], json.dumps(report["checks"], indent=1)
    assert report["orders"] == len(PATHS)
    stock = client.stock(("SKU-001", "SKU-002"))
    paid = sum(1 for status, _ in PATHS.values() if status == "paid")
    assert stock["SKU-001"]["reserved"] == 2 * paid
    assert stock["SKU-002"]["reserved"] == paid


def test_memory_store_runs_the_whole_system(start_server: Callable[..., Server]) -> None:
    server = start_server(store="memory:")
    assert "store=memory:" in server.ready_line
    place_every_token(server)
    assert server.stop() == 0, server.log()[-3000:]
    # Nothing durable: a new run starts from the seed again.
    again = start_server(store="memory:")
    assert again.client().audit()["orders"] == 0


@pytest.mark.parametrize("base", ["queue", "tcp"])
def test_memory_store_is_refused_on_a_process_base(base: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--base", base, "--store", "memory:"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "one process's memory" in done.stderr


@pytest.mark.parametrize("base", ["simple", pytest.param("queue", marks=pytest.mark.process)])
def test_postgres_store_runs_the_whole_system(
    start_server: Callable[..., Server], pg_server: PgServer, base: str
) -> None:
    url = pg_server.create_database()
    server = start_server(store=url, base=base, step_timeout=0.5 if base == "simple" else 1.0)
    assert "store=postgresql://" in server.ready_line
    place_every_token(server)
    assert server.stop() == 0, server.log()[-3000:]
    # Durable: a second run on the same database finds every order and the same stock.
    again = start_server(store=url, base=base)
    report = again.client().audit()
    assert report["ok"], report["checks"]
    assert report["orders"] == len(PATHS)
