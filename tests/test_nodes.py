"""Several nodes on one PostgreSQL (DESIGN.md section 10), as real run.py processes on the
tests' own server: any node takes orders, a dead node's orders are taken over within about the
lease TTL, a paused node records nothing once it lost its lease, a node restarted with its old
id leaves the orders it lost alone, and nothing is lost, doubled or oversold."""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from client import Client, ClientError, place_on_any
from runtime.pg import PgServer
from tests.conftest import Server, new_id, wait_until

TTL = 1.5  # --lease-ttl of every node here: takeovers within about 1.5-2 s
TOKENS = ("tok_visa",) * 6 + ("tok_chargeDeclined", "tok_error", "tok_timeout", "tok_late")
SCARCE = "SKU-SCARCE"
SCARCE_UNITS = 12


class Cluster:
    """Nodes of one database, started and stopped by the test."""

    def __init__(self, tmp: Path, url: str) -> None:
        self.tmp = tmp
        self.url = url
        self.nodes: dict[str, Server] = {}
        self._all: list[Server] = []

    def start(self, node_id: str, *, step_timeout: float = 1.0) -> Server:
        """run.py as node `node_id` (a new process: also a restart under an old id)."""
        server = Server(
            self.tmp,
            store=self.url,
            step_timeout=step_timeout,
            extra=["--node-id", node_id, "--lease-ttl", str(TTL)],
        )
        self.nodes[node_id] = server
        self._all.append(server)
        return server

    def servers(self) -> list[tuple[str, int]]:
        """Every started node's gateway."""
        return [(s.host, s.port) for s in self.nodes.values()]

    def stop(self) -> None:
        """Stop whatever still runs (a stopped node resumes first: it cannot take SIGTERM)."""
        for server in self._all:
            if server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.stop(timeout=20)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the shared database (constant SQL, bound parameters)."""
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture
def cluster(pg_server: PgServer, tmp_path: Path) -> Iterator[Cluster]:
    """A fresh database for a cluster of nodes; every node is stopped at the end."""
    nodes = Cluster(tmp_path, pg_server.create_database())
    try:
        yield nodes
    finally:
        nodes.stop()


def node_state(client: Client, node_id: str) -> dict[str, Any]:
    """`node_id` as the `nodes` op lists it."""
    found: list[dict[str, Any]] = client.nodes()["nodes"]
    return next(n for n in found if n["node_id"] == node_id)


def taken_over(client: Client, node_id: str) -> str | None:
    """The node that took `node_id` over, once one did."""
    state = node_state(client, node_id)["state"]
    return state.removeprefix("taken over by ") if state.startswith("taken over") else None


def ended(client: Client, order_id: str) -> dict[str, Any]:
    """Wait for the order to end, on whichever node drives it."""
    order: dict[str, Any] = wait_until(
        lambda: (r := client.get_order(order_id))["status"] != "pending" and r
    )
    return order


def audit_clean(client: Client) -> dict[str, Any]:
    """Wait until no order is in flight, then require every invariant."""
    report: dict[str, Any] = wait_until(
        lambda: (r := client.audit())["in_flight_count"] == 0 and r, timeout=60, interval=0.2
    )
    failing = {k: v["violations"] for k, v in report["checks"].items() if not v["ok"]}
    assert report["ok"], failing
    return report


def charges(cluster: Cluster) -> dict[str, int]:
    """Order id -> charges recorded in its payment stream."""
    rows = cluster.sql(
        "SELECT stream, count(*) FROM events WHERE type = 'ChargeSucceeded' GROUP BY stream"
    )
    return {stream.removeprefix("payment-"): int(n) for stream, n in rows}


def order_of(n: int, rng: random.Random) -> dict[str, Any]:
    """One order of the mixed load: any token, a third of them racing for the scarce product."""
    lines = [{"product_id": f"SKU-00{1 + n % 5}", "quantity": 1, "unit_price": "3.50"}]
    if n % 3 == 0:
        lines.append({"product_id": SCARCE, "quantity": 1, "unit_price": "9.00"})
    return {
        "order_id": new_id(f"n{n}"),
        "customer_id": f"c{n % 7}",
        "lines": lines,
        "payment_method": rng.choice(TOKENS),
    }


def test_kill_one_of_three_nodes_mid_load(cluster: Cluster) -> None:
    for node_id in ("a", "b", "c"):
        cluster.start(node_id)
    a = cluster.nodes["a"].client()
    a.add_product(SCARCE, SCARCE_UNITS)
    servers = cluster.servers()
    rng = random.Random(11)
    orders = [order_of(n, rng) for n in range(180)]
    acknowledged: list[int] = []

    def place(n: int) -> dict[str, Any]:
        # Spread over the nodes: each order starts at another one, the others are its spares.
        first = n % len(servers)
        result: dict[str, Any] = place_on_any(
            servers[first:] + servers[:first], orders[n], timeout=60
        )
        acknowledged.append(n)
        return result

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(place, n) for n in range(len(orders))]
        wait_until(lambda: len(acknowledged) >= 40, timeout=60)
        victim = cluster.nodes["b"]
        owned = node_state(a, "b")["orders_in_flight"]
        killed_at = time.monotonic()
        victim.kill()  # kill -9: the whole node (simple base: one process)
        heir = wait_until(lambda: taken_over(a, "b"), timeout=TTL + 10, interval=0.02)
        takeover_s = time.monotonic() - killed_at
        results = [f.result(timeout=120) for f in futures]

    print(
        f"\ntakeover of b by {heir} {takeover_s:.2f} s after kill -9 "
        f"(TTL {TTL} s, {owned} in flight)"
    )
    assert takeover_s < TTL + 2.0
    statuses = [r["status"] for r in results]
    assert all(s in ("paid", "cancelled", "failed") for s in statuses), statuses
    report = audit_clean(a)
    assert report["orders"] == len(orders)
    scarce_paid = sum(
        1 for o, s in zip(orders, statuses, strict=True) if len(o["lines"]) == 2 and s == "paid"
    )
    assert 0 < scarce_paid <= SCARCE_UNITS
    stock = a.stock([SCARCE])[SCARCE]
    assert stock["reserved"] == scarce_paid <= stock["on_hand"] == SCARCE_UNITS
    assert all(n == 1 for n in charges(cluster).values())
    assert node_state(a, "b")["orders_in_flight"] == 0


def test_a_paused_node_records_nothing_after_its_orders_are_taken_over(cluster: Cluster) -> None:
    paused = cluster.start("a", step_timeout=30.0)  # its orders stay pending while it sleeps
    survivor = cluster.start("b")
    c = survivor.client()
    line = [{"product_id": "SKU-001", "quantity": 1, "unit_price": "5.00"}]
    on_a = paused.client()
    lost = [new_id("lost") for _ in range(6)]
    for n, order_id in enumerate(lost):
        token = ("tok_timeout", "tok_late")[n % 2]  # pending on a until it is taken over
        on_a.place_order(order_id, "c", line, payment_method=token, wait=False)
    os.kill(paused.proc.pid, signal.SIGSTOP)
    wait_until(lambda: taken_over(c, "a") == "b", timeout=TTL + 10)
    (before,) = cluster.sql("SELECT last FROM event_position")
    os.kill(paused.proc.pid, signal.SIGCONT)
    code = paused.proc.wait(30)
    assert code == 4, paused.log_tail()
    assert "lost its lease" in paused.log() or "not renewed in time" in paused.log()
    for order_id in lost:
        assert ended(c, order_id)["status"] in ("paid", "cancelled", "failed")
    audit_clean(c)
    late = cluster.sql(
        "SELECT stream, type FROM events WHERE writer = 'a' AND position > %s", before[0]
    )
    assert late == []
    owners = cluster.sql(
        "SELECT DISTINCT node_id FROM stream_owners WHERE stream LIKE 'order-lost%%'"
    )
    assert owners == [("b",)]
    assert all(n == 1 for n in charges(cluster).values())


def test_a_node_restarted_with_its_old_id_leaves_the_orders_it_lost(cluster: Cluster) -> None:
    first = cluster.start("a", step_timeout=30.0)
    survivor = cluster.start("b")
    c = survivor.client()
    line = [{"product_id": "SKU-002", "quantity": 2, "unit_price": "1.25"}]
    lost = [new_id("gone") for _ in range(4)]
    for order_id in lost:
        first.client().place_order(order_id, "c", line, payment_method="tok_timeout", wait=False)
    first.kill()
    wait_until(lambda: taken_over(c, "a") == "b", timeout=TTL + 10)
    again = cluster.start("a")
    assert "recovering=0" in again.ready_line
    (epoch,) = cluster.sql("SELECT epoch FROM leases WHERE node_id = 'a'")
    for order_id in lost:
        assert ended(c, order_id)["status"] == "cancelled"
    mine = new_id("mine")
    assert again.client().place_order(mine, "c", line)["status"] == "paid"
    # The lost orders' streams got nothing from the restarted a (nor from the dead one after
    # the takeover): their compensation is b's.
    writers = cluster.sql(
        "SELECT DISTINCT writer, writer_epoch FROM events WHERE stream = ANY(%s)",
        [f"order-{o}" for o in lost],
    )
    assert ("a", epoch[0]) not in writers
    audit_clean(again.client())
    assert node_state(c, "a")["state"] == "live"
    nodes_cli: Callable[[], Any] = again.client().nodes
    assert {n["node_id"] for n in nodes_cli()["nodes"]} == {"a", "b"}


class SteadyLoad:
    """Orders placed without a pause on whichever nodes are up, each until some node
    acknowledges it (a draining node refuses it, a stopped one cannot be reached: the same
    order id goes to the next), in a thread of its own until `stop`."""

    def __init__(self, cluster: Cluster, workers: int = 12) -> None:
        self.cluster = cluster
        self.orders: list[dict[str, Any]] = []
        self.results: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._submit, daemon=True)
        self._thread.start()

    def acknowledged(self) -> int:
        """How many orders some node has answered."""
        return sum(f.done() and f.exception() is None for f in self.results)

    def wait_for_more(self, count: int) -> None:
        """Wait until `count` more orders are acknowledged than now."""
        target = self.acknowledged() + count
        wait_until(lambda: self.acknowledged() >= target, timeout=60)

    def _submit(self) -> None:
        rng = random.Random(5)
        while not self._stop.is_set():
            n = len(self.orders)
            self.orders.append(order_of(n, rng))
            self.results.append(self._pool.submit(self._place, n))
            self._stop.wait(0.01)  # about 100 orders/s, and a stop is seen at once

    def _place(self, n: int) -> dict[str, Any]:
        deadline = time.monotonic() + 90
        while True:
            servers = self.cluster.servers()
            first = n % len(servers)
            try:
                return place_on_any(servers[first:] + servers[:first], self.orders[n], timeout=60)
            except ClientError as e:
                if e.code != "unavailable" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # that node is draining or gone: the next try sees its heir

    def stop(self) -> list[dict[str, Any]]:
        """Stop placing; every order's answer."""
        self._stop.set()
        self._thread.join()
        try:
            return [f.result(timeout=120) for f in self.results]
        finally:
            self._pool.shutdown()


@pytest.mark.slow  # about 15 s: `make soak` runs it, `make test` stays quick
def test_rolling_restart_of_every_node_under_load_loses_nothing(cluster: Cluster) -> None:
    """SIGTERM each node in turn while orders flow (it drains, releases its lease and exits
    0), start it again under its id, go on to the next: every order placed is acknowledged and
    ends, nothing is doubled or oversold, the audit is clean."""
    for node_id in ("a", "b", "c"):
        cluster.start(node_id)
    cluster.nodes["a"].client().add_product(SCARCE, SCARCE_UNITS)
    (epochs_before,) = zip(*cluster.sql("SELECT epoch FROM leases ORDER BY node_id"), strict=True)
    load = SteadyLoad(cluster)
    for node_id in ("a", "b", "c"):
        load.wait_for_more(25)
        assert cluster.nodes[node_id].stop() == 0, cluster.nodes[node_id].log_tail()
        cluster.start(node_id)
    load.wait_for_more(25)
    results = load.stop()

    statuses = [r["status"] for r in results]
    assert all(s in ("paid", "cancelled", "failed") for s in statuses), statuses
    client = cluster.nodes["a"].client()
    for order in load.orders:  # as every node sees it now
        assert client.get_order(order["order_id"])["status"] in ("paid", "cancelled", "failed")
    report = audit_clean(client)
    assert report["orders"] == len(load.orders)
    scarce_paid = sum(
        1
        for o, s in zip(load.orders, statuses, strict=True)
        if len(o["lines"]) == 2 and s == "paid"
    )
    stock = client.stock([SCARCE])[SCARCE]
    assert stock["reserved"] == scarce_paid <= stock["on_hand"] == SCARCE_UNITS
    assert all(n == 1 for n in charges(cluster).values())
    (epochs_after,) = zip(*cluster.sql("SELECT epoch FROM leases ORDER BY node_id"), strict=True)
    assert all(b > a for a, b in zip(epochs_before, epochs_after, strict=True))
    print(f"\nrolling restart of 3 nodes: {len(results)} orders, {dict(Counter(statuses))}")
