"""run.py as an operator sees it: its log lines and what it says when it stops."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.conftest import Server, new_id

LINES = [{"product_id": "SKU-005", "quantity": 1, "unit_price": "3.50"}]


def test_json_logs_are_one_object_per_line_and_stopping_is_announced(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(extra=("--log-format", "json", "--log-level", "INFO"))
    with server.client() as client:
        assert client.place_order(new_id(), "c", LINES, "tok_error")["status"] == "failed"
    assert server.stop() == 0
    lines = server.log().splitlines()
    said = [line for line in lines if line.startswith("run.py: ")]
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    # Everything else on stderr is a JSON object per line: no bare traceback lines.
    assert len(said) + len(logged) == len(lines), lines
    assert logged, "an order failing on tok_error is worth a log line"
    for record in logged:
        assert {"time", "level", "logger", "pid", "message"} <= set(record)
        assert record["time"].endswith("Z")
    assert said[0].startswith("run.py: stopping: no new orders")
    assert said[-1] == "run.py: stopped"


def test_an_expected_failure_is_one_warning_line_naming_the_order(
    start_server: Callable[..., Server],
) -> None:
    server = start_server()  # the default log level: warnings
    order = new_id("err")
    with server.client() as client:
        assert client.place_order(order, "c", LINES, "tok_error")["status"] == "failed"
    assert server.stop() == 0
    logged = [line for line in server.log().splitlines() if not line.startswith("run.py: ")]
    assert "Traceback" not in server.log()
    assert len(logged) == 1, logged
    assert " WARNING " in logged[0]
    assert order in logged[0]


def test_json_log_records_about_an_order_carry_its_order_id(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(extra=("--log-format", "json", "--log-level", "INFO"))
    order = new_id("jsonerr")
    with server.client() as client:
        assert client.place_order(order, "c", LINES, "tok_error")["status"] == "failed"
    assert server.stop() == 0
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    mine = [record for record in logged if order in record["message"]]
    assert mine, logged
    # Every line about the order names it in a field of its own: `jq 'select(.order_id == …)'`.
    assert all(record.get("order_id") == order for record in mine), mine
    levels = {record["level"] for record in mine}
    assert "WARNING" in levels, mine  # the failed step
    assert "INFO" in levels, mine  # where the order ended
