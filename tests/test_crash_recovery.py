"""Nothing lost: kill -9 an actor process, or the whole system, in the middle of orders.

Every acknowledged order must end in exactly one terminal state, compensated as DESIGN.md says,
and the audit must stay clean. The single-actor kills need a process base (queue); the
whole-system kill runs on both bases.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from client import Client, ClientError
from runtime.pg import PgServer
from runtime.proc_tree import descendants, marked, parent, with_cmdline
from store import open_store
from tests.conftest import Server, new_id, wait_until
from tests.test_nodes import SCARCE, SCARCE_UNITS, Cluster, SteadyLoad, audit_clean, taken_over

LINE = [{"product_id": "SKU-001", "quantity": 1, "unit_price": "4.00"}]


def pids(client: Client) -> dict[str, int]:
    """name -> pid of the manager, services and live sagas."""
    info: dict[str, Any] = client.call("system_info")
    return info["pids"]


def kill9(pid: int) -> None:
    """SIGKILL, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def processes_of(db: Path) -> list[int]:
    """Every process whose command line names the database: run.py and all its actors
    (Thespian's actor processes keep run.py's command line; the queue base's admin detaches)."""
    return with_cmdline(str(db))


def kill_everything(db: Path) -> int:
    """kill -9 every process of the system until none is left; returns how many were killed."""
    killed: set[int] = set()

    def none_left() -> bool:
        alive = processes_of(db)
        for pid in alive:
            kill9(pid)
            killed.add(pid)
        return not alive

    wait_until(none_left, timeout=30, interval=0.05)
    return len(killed)


def stream_types(client: Client, stream: str) -> list[str]:
    """Event types of a stream (empty if it does not exist yet)."""
    try:
        return [e["type"] for e in client.read_stream(stream)["events"]]
    except ClientError as e:
        if e.code == "not_found":
            return []
        raise


def terminal(client: Client, order_id: str, timeout: float = 60) -> dict[str, Any]:
    """Wait for the order's terminal status."""
    order: dict[str, Any] = wait_until(
        lambda: (o := client.get_order(order_id))["status"] != "pending" and o, timeout=timeout
    )
    return order


def assert_audit_clean(client: Client) -> dict[str, Any]:
    """Wait until nothing is in flight, then require every invariant."""
    report: dict[str, Any] = wait_until(
        lambda: (r := client.audit())["in_flight_count"] == 0 and r, timeout=120, interval=0.2
    )
    failing = {k: v["violations"] for k, v in report["checks"].items() if not v["ok"]}
    assert report["ok"], failing
    return report


# --- one actor process at a time (queue base) ------------------------------------------------


@pytest.mark.process
def test_kill_saga_process_mid_order_compensates(start_server: Callable[..., Server]) -> None:
    server = start_server(base="queue", step_timeout=30.0)
    client = server.client()
    before = client.stock(["SKU-001"])
    order_id = new_id("saga")
    client.place_order(order_id, "c", LINE, payment_method="tok_timeout", wait=False)
    wait_until(lambda: "InventoryReserved" in stream_types(client, f"order-{order_id}"))
    saga_pid = wait_until(lambda: pids(client).get(f"saga:{order_id}"))
    kill9(saga_pid)
    order = terminal(client, order_id, timeout=20)  # long before the 30 s step timeout
    assert order["status"] == "failed"
    # Recovered mid-charge: PaymentFailed fences out anything the dead saga left in flight.
    assert stream_types(client, f"order-{order_id}") == [
        "OrderPlaced",
        "InventoryReserved",
        "PaymentFailed",
        "InventoryReleased",
        "OrderFulfillmentFailed",
    ]
    assert "PaymentVoided" in stream_types(client, f"payment-{order_id}")
    assert client.stock(["SKU-001"]) == before
    assert client.place_order(new_id("next"), "c", LINE)["status"] == "paid"
    assert_audit_clean(client)


@pytest.mark.process
def test_kill_payment_process_mid_order(start_server: Callable[..., Server]) -> None:
    server = start_server(base="queue", step_timeout=30.0)
    client = server.client()
    before = client.stock(["SKU-001"])
    old = pids(client)["payment"]
    order_id = new_id("pay")
    client.place_order(order_id, "c", LINE, payment_method="tok_timeout", wait=False)
    wait_until(lambda: "InventoryReserved" in stream_types(client, f"order-{order_id}"))
    kill9(old)
    order = terminal(client, order_id, timeout=20)
    assert order["status"] == "failed", order
    assert stream_types(client, f"order-{order_id}")[-2:] == [
        "InventoryReleased",
        "OrderFulfillmentFailed",
    ]
    assert client.stock(["SKU-001"]) == before
    assert pids(client)["payment"] != old  # restarted
    assert client.place_order(new_id("next"), "c", LINE)["status"] == "paid"
    assert_audit_clean(client)


@pytest.mark.process
def test_kill_inventory_process_mid_order(start_server: Callable[..., Server]) -> None:
    server = start_server(base="queue", step_timeout=2.0)
    client = server.client()
    before = client.stock(["SKU-001"])
    old = pids(client)["inventory"]
    order_id = new_id("inv")
    client.place_order(order_id, "c", LINE, payment_method="tok_timeout", wait=False)
    wait_until(lambda: "InventoryReserved" in stream_types(client, f"order-{order_id}"))
    kill9(old)
    wait_until(lambda: pids(client).get("inventory", old) != old, timeout=20)
    # The restarted Inventory rebuilt the reservation from its stream, so the compensation after
    # the payment timeout releases exactly what was held.
    order = terminal(client, order_id, timeout=20)
    assert order["status"] == "cancelled"
    assert stream_types(client, f"order-{order_id}")[-2:] == ["InventoryReleased", "OrderCancelled"]
    assert client.stock(["SKU-001"]) == before
    assert client.place_order(new_id("next"), "c", LINE)["status"] == "paid"
    assert_audit_clean(client)


def acknowledged_at_least(futures: dict[str, Future[Any]], count: int) -> bool:
    """Whether at least `count` placements have been answered."""
    return sum(f.done() for f in futures.values()) >= count


def recovering(server: Server) -> int:
    """How many unfinished orders run.py found on start (from its ready line)."""
    return int(server.ready_line.split("recovering=")[1].split()[0])


@pytest.mark.process
def test_kill_store_process_while_orders_flow(start_server: Callable[..., Server]) -> None:
    server = start_server(base="queue", step_timeout=2.0)
    client = server.client()
    old = pids(client)["store"]
    futures = {
        order_id: client.submit(
            "place_order",
            {"order_id": order_id, "customer_id": "c", "lines": LINE, "wait": False},
        )
        for order_id in (new_id("store") for _ in range(40))
    }
    wait_until(functools.partial(acknowledged_at_least, futures, 5))
    kill9(old)
    # Placements the dead store never answered are sent again to its successor (same event
    # ids): every one is acknowledged, none waits for the gateway's request timeout.
    acked = [order_id for order_id, future in futures.items() if future.result(20)]
    assert len(acked) == len(futures)
    assert pids(client)["store"] != old
    for order_id in acked:  # every acknowledged order ends, one way or the other
        assert terminal(client, order_id, timeout=60)["status"] in {"paid", "cancelled", "failed"}
    assert client.place_order(new_id("next"), "c", LINE)["status"] == "paid"
    assert_audit_clean(client)


# --- the whole system ---------------------------------------------------------------------------

MIX = ["tok_visa"] * 8 + ["tok_chargeDeclined", "tok_timeout"]
# The soak's mixed orders: half placed with shipping, mostly shipped; 15 % cancelled by their
# customer within 0.1 s of the acknowledgement (pending, waiting for the carrier, or too late).
SHIP_MIX = ["ship_standard"] * 8 + ["ship_refused", "ship_timeout"]
SHIP_SHARE, CANCEL_SHARE, CANCEL_WITHIN = 0.5, 0.15, 0.1
PRODUCTS = ["SKU-SCARCE", *(f"SKU-00{i}" for i in range(1, 10))]


def cancel_later(client: Client, order_id: str, delay: float) -> Callable[[Future[Any]], None]:
    """A placement's done-callback: once acknowledged, cancel the order `delay` s later (an
    answer, `conflict` included, is ignored; a cancel lost in the kill is fine)."""

    def send() -> None:
        with contextlib.suppress(ClientError):
            client.submit("cancel_order", {"order_id": order_id, "reason": "soak"})

    def on_ack(future: Future[Any]) -> None:
        if future.exception() is None:
            threading.Timer(delay, send).start()

    return on_ack


def order_args(order_id: str, n: int, rng: random.Random, *, mixed: bool) -> dict[str, Any]:
    """The n-th placement of a cycle: every fifth on the scarce product; `mixed` adds shipping
    to a share."""
    product = "SKU-SCARCE" if n % 5 == 0 else f"SKU-00{1 + n % 9}"
    args: dict[str, Any] = {
        "order_id": order_id,
        "customer_id": f"c{n % 17}",
        "lines": [{"product_id": product, "quantity": 1, "unit_price": "3.25"}],
        "payment_method": rng.choice(MIX),
        "wait": False,
    }
    if mixed and rng.random() < SHIP_SHARE:
        args["shipping"] = {"address": ADDRESS, "carrier": rng.choice(SHIP_MIX)}
    return args


def ended(view: dict[str, Any]) -> bool:
    """Whether an order stands at its end (`paid` is not the end of one placed with shipping)."""
    return view["status"] != "pending" and not (view["status"] == "paid" and view.get("shipping"))


def crash_cycles(  # noqa: PLR0913 - the fixtures, then each soak's knobs by keyword
    start_server: Callable[..., Server],
    tmp_path: Path,
    *,
    base: str,
    cycles: int,
    orders: int,
    rng: random.Random,
    mixed: bool = False,
) -> dict[str, int]:
    """Place orders without waiting, kill -9 everything mid-flight, restart on the same file,
    check every acknowledged order ends terminal and the audit is clean; `cycles` times.
    `mixed`: a share of the orders with shipping, a share cancelled shortly after placement."""
    db = tmp_path / "crash.db"
    acked: set[str] = set()
    totals = {"acknowledged": 0, "killed_processes": 0, "cycles": 0, "recovered_on_start": 0}
    stock_before: dict[str, Any] = {}
    for cycle in range(cycles):
        server = start_server(
            base=base, db=db, step_timeout=1.0, extra=("--payment-latency", "0.3")
        )
        totals["recovered_on_start"] += recovering(server)
        clients = [server.client() for _ in range(4)]
        if cycle == 0:
            clients[0].add_product("SKU-SCARCE", 15)
            stock_before = clients[0].stock(PRODUCTS)
        futures: dict[str, Future[Any]] = {}
        for n in range(orders):
            order_id = f"crash-{cycle}-{n}-{new_id()}"
            args = order_args(order_id, n, rng, mixed=mixed)
            futures[order_id] = clients[n % 4].submit("place_order", args)
            if mixed and rng.random() < CANCEL_SHARE:
                delay = rng.uniform(0, CANCEL_WITHIN)
                futures[order_id].add_done_callback(cancel_later(clients[n % 4], order_id, delay))
        # Kill at a random point once at least a third of the orders are acknowledged.
        kill_after = rng.randint(orders // 3, orders - 1)
        wait_until(functools.partial(acknowledged_at_least, futures, kill_after), timeout=120)
        totals["killed_processes"] += kill_everything(db)
        server.kill()
        for order_id, future in futures.items():
            try:
                if future.result(30)["status"] in (
                    "pending",
                    "paid",
                    "shipped",
                    "cancelled",
                    "failed",
                ):
                    acked.add(order_id)
            except ClientError:
                pass  # not acknowledged: it may or may not exist, and either is fine
        totals["cycles"] += 1

    server = start_server(base=base, db=db, step_timeout=1.0)
    totals["recovered_on_start"] += recovering(server)
    client = server.client()
    report = assert_audit_clean(client)
    lost = [o for o in acked if not stream_types(client, f"order-{o}")]
    views = {o: client.get_order(o) for o in acked if o not in lost}
    stuck = [o for o, view in views.items() if not ended(view)]
    assert not lost
    assert not stuck
    stock = client.stock(PRODUCTS)
    scarce = stock["SKU-SCARCE"]
    assert 0 <= scarce["reserved"] <= scarce["on_hand"] <= 15
    # Shipped units consumed exactly once, acknowledged or not: on_hand fell by the audit's units.
    consumed = sum(stock_before[p]["on_hand"] - stock[p]["on_hand"] for p in PRODUCTS)
    assert consumed == report["units_shipped"] == report["status_counts"].get("shipped", 0)
    totals["acknowledged"] = len(acked)
    totals["orders_in_store"] = report["orders"]
    totals["lost"], totals["stuck"] = len(lost), len(stuck)
    totals["shipped"] = sum(v["status"] == "shipped" for v in views.values())
    totals["cancelled_by_customer"] = sum(
        v["status"] == "cancelled" and v.get("cancelled_by") == "Customer" for v in views.values()
    )
    assert server.stop() == 0
    return totals


@pytest.mark.parametrize(
    ("base", "orders"),
    [
        pytest.param("simple", 300, id="simple"),
        pytest.param("queue", 60, id="queue", marks=pytest.mark.process),
    ],
)
def test_kill_whole_system_repeatedly_loses_nothing(
    start_server: Callable[..., Server], tmp_path: Path, base: str, orders: int
) -> None:
    totals = crash_cycles(
        start_server, tmp_path, base=base, cycles=3, orders=orders, rng=random.Random(7)
    )
    assert totals["acknowledged"] >= orders  # at least a third per cycle, over 3 cycles
    assert totals["recovered_on_start"] > 0  # the kills did catch orders mid-saga
    assert totals["lost"] == totals["stuck"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("base", ["simple", pytest.param("queue", marks=pytest.mark.process)])
def test_soak_random_kills(
    start_server: Callable[..., Server],
    tmp_path: Path,
    base: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cycles = int(os.environ.get("SOAK_CYCLES", "10"))
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1 << 30))))
    totals = crash_cycles(
        start_server,
        tmp_path,
        base=base,
        cycles=cycles,
        orders=400 if base == "simple" else 120,
        rng=random.Random(seed),
        mixed=True,
    )
    with capsys.disabled():
        print(f"\nsoak base={base} seed={seed} (half with shipping, 15 % cancelled)")
        print("| " + " | ".join(totals) + " | audit |\n|" + "---:|" * (len(totals) + 1))
        print("| " + " | ".join(str(v) for v in totals.values()) + " | ok |")


@pytest.mark.process
def test_no_process_of_a_run_outlives_it(start_server: Callable[..., Server]) -> None:
    """The queue base's Thespian admin runs in a session of its own, no child of run.py; with
    it killed, run.py's stop used to wait minutes and leave the actors running for ever."""
    server = start_server(base="queue", extra=("--drain-timeout", "2"))
    run_id = server.run_id  # the marker run.py inherits and keeps
    with server.client() as client:
        line = {"product_id": "SKU-001", "quantity": 1, "unit_price": "1.00"}
        assert client.place_order(new_id(), "c", [line])["status"] == "paid"
    processes = set(marked(run_id))
    admin_side = processes - {server.proc.pid} - set(descendants(server.proc.pid))
    assert admin_side, "expected actor processes outside run.py's own tree"
    for pid in admin_side:
        if parent(pid) == 1:  # the admin: reparented to init
            os.kill(pid, signal.SIGKILL)
    # run.py's own cleanup is under test: the fixture must not kill what it left behind.
    assert server.stop(timeout=60, kill_leftovers=False) == 0
    wait_until(lambda: not marked(run_id), timeout=10)  # every process of the run ended


# --- shipping (DESIGN.md section 9) -------------------------------------------------------------

ADDRESS = {
    "name": "Ann",
    "line1": "1 Main St",
    "city": "Berlin",
    "postal_code": "1",
    "country": "DE",
}


def shipping_outcome(client: Client, order_id: str) -> dict[str, Any]:
    """Wait for the end of an order placed with shipping (`paid` is not its end)."""
    order: dict[str, Any] = wait_until(
        lambda: (o := client.get_order(order_id))["status"] not in ("pending", "paid") and o,
        timeout=60,
    )
    return order


@pytest.mark.parametrize("base", ["simple", pytest.param("queue", marks=pytest.mark.process)])
def test_kill_whole_system_between_order_paid_and_shipping_and_mid_shipping(
    start_server: Callable[..., Server], tmp_path: Path, base: str
) -> None:
    """Orders stand at OrderPaid with their shipping workflow waiting on the carrier (a stream
    whose last event is OrderPaid: what a death between that commit and the workflow's start
    leaves too), and others flow, when everything is killed; the restart finds them by their
    OrderPaid head and drives each to its end: stock consumed exactly once, audit clean."""
    db = tmp_path / "ship.db"
    server = start_server(base=base, db=db, step_timeout=30.0)
    client = server.client()
    client.add_product("SKU-SHIP", 100)
    line = [{"product_id": "SKU-SHIP", "quantity": 1, "unit_price": "2.00"}]
    waiting = [new_id("wait") for _ in range(3)]
    for order_id in waiting:
        shipping = {"address": ADDRESS, "carrier": "ship_timeout"}
        client.place_order(order_id, "c", line, wait=False, shipping=shipping)
    wait_until(lambda: all(client.get_order(o)["status"] == "paid" for o in waiting))
    flowing = {
        order_id: client.submit(
            "place_order",
            {
                "order_id": order_id,
                "customer_id": "c",
                "lines": line,
                "wait": False,
                "shipping": {"address": ADDRESS, "carrier": "ship_standard"},
            },
        )
        for order_id in (new_id("flow") for _ in range(30))
    }
    wait_until(functools.partial(acknowledged_at_least, flowing, 10))
    kill_everything(db)
    server.kill()
    acked = list(waiting)
    for order_id, future in flowing.items():
        with contextlib.suppress(ClientError):
            if future.result(30):
                acked.append(order_id)

    # The carrier's timeout must pass for the waiting orders, but a step of a recovering order
    # must not: on a busy 2-core machine a queue-base step can take longer than 0.5 s, and a
    # reservation that times out rightly ends its order `failed`.
    server = start_server(base=base, db=db, step_timeout=2.0)
    assert recovering(server) >= len(waiting)  # found by their OrderPaid heads
    client = server.client()
    ends = {o: shipping_outcome(client, o) for o in acked}
    for order_id in waiting:  # the carrier never answers: cancelled, refunded, released
        assert ends[order_id]["status"] == "cancelled"
        assert stream_types(client, f"order-{order_id}")[-3:] == [
            "PaymentRefunded",
            "InventoryReleased",
            "OrderCancelled",
        ]
    shipped = sum(end["status"] == "shipped" for end in ends.values())
    assert shipped > 0
    assert {end["status"] for end in ends.values()} <= {"shipped", "cancelled"}
    report = assert_audit_clean(client)
    stock = client.stock(["SKU-SHIP"])["SKU-SHIP"]
    # Consumed exactly once: on_hand fell by the orders that shipped (the audit's units too).
    assert stock["on_hand"] == 100 - report["units_shipped"]
    assert report["units_shipped"] == report["status_counts"]["shipped"] >= shipped
    assert stock["reserved"] == 0
    assert server.stop() == 0


# --- several nodes on one PostgreSQL (DESIGN.md section 10) ------------------------------------

NODE_IDS = ("a", "b", "c")


def kill_nodes_in_turn(cluster: Cluster, load: SteadyLoad, cycles: int, rng: random.Random) -> int:
    """`cycles` times: let some orders through, kill -9 a random node, wait until a live node
    took it over, start it again under its id. Returns the takeovers seen."""
    takeovers = 0
    for _ in range(cycles):
        load.wait_for_more(rng.randint(20, 80))
        victim = rng.choice(NODE_IDS)
        cluster.nodes[victim].kill()
        witness = next(cluster.nodes[n] for n in NODE_IDS if n != victim).client()
        wait_until(functools.partial(taken_over, witness, victim), timeout=30, interval=0.05)
        takeovers += 1
        cluster.start(victim)
    return takeovers


def outcome_of(client: Client, order_id: str) -> str:
    """The order's status once it ends (`pending` if it does not within 60 s; `lost` if no
    node knows it)."""
    try:
        order = terminal(client, order_id, timeout=60)
    except ClientError as e:
        if e.code == "not_found":
            return "lost"
        raise
    except AssertionError:
        return "pending"
    return str(order["status"])


@pytest.mark.slow
def test_soak_kill_random_nodes(pg_server: PgServer, tmp_path: Path) -> None:
    """Three nodes on one database under steady load; SOAK_CYCLES times a random one is killed
    (kill -9), taken over by another and started again under its id. Every acknowledged order
    ends, none is lost, the audit is clean."""
    cycles = int(os.environ.get("SOAK_CYCLES", "10"))
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    cluster = Cluster(tmp_path, pg_server.create_database())
    try:
        for node_id in NODE_IDS:
            cluster.start(node_id)
        cluster.nodes["a"].client().add_product(SCARCE, SCARCE_UNITS)
        load = SteadyLoad(cluster)
        takeovers = kill_nodes_in_turn(cluster, load, cycles, rng)
        load.wait_for_more(25)
        load.stop()
        client = cluster.nodes[NODE_IDS[0]].client()
        ends = Counter(outcome_of(client, order["order_id"]) for order in load.orders)
        report = audit_clean(client)
    finally:
        cluster.stop()
    totals = {
        "cycles": cycles,
        "acknowledged": len(load.orders),
        "lost": ends["lost"],
        "stuck": ends["pending"],
        "takeovers": takeovers,
        "audit": "ok" if report["ok"] else "FAILED",
    }
    print(f"\nsoak nodes=3 seed={seed} ends={dict(ends)}")
    print("| " + " | ".join(totals) + " |\n|" + "---:|" * len(totals))
    print("| " + " | ".join(str(v) for v in totals.values()) + " |")
    assert ends["lost"] == ends["pending"] == 0
    assert report["orders"] == len(load.orders)


# --- start-up reads the open orders only -----------------------------------------------------


def open_order_streams(db: Path) -> list[str]:
    with open_store(f"sqlite:///{db}", readonly=True) as reader:
        return [head.stream for head in reader.open_heads("order-")]


def test_ended_orders_close_their_streams_and_a_restart_reads_only_the_open_ones(
    start_server: Callable[..., Server],
) -> None:
    """Every way an order ends closes its stream with its last append (the store's open heads
    are what start-up reads); a database from before that lists every order as open, and its
    first start closes the ended ones once; an order cut off by a kill -9 stays open and is
    recovered."""
    server = start_server()
    client = server.client()
    address = {"name": "A", "line1": "1 Street", "city": "C", "postal_code": "1", "country": "DE"}
    ended: dict[str, str] = {}
    for method in ("tok_visa", "tok_chargeDeclined", "tok_error"):
        order_id = new_id(method)
        ended[order_id] = client.place_order(order_id, "c", LINE, method)["status"]
    shipped = new_id("ship")
    ended[shipped] = client.place_order(
        shipped, "c", LINE, shipping={"address": address, "carrier": "ship_standard"}
    )["status"]
    ended[shipped] = terminal(client, shipped)["status"]
    cancelled = new_id("cancel")
    client.place_order(cancelled, "c", LINE, "tok_timeout", wait=False)
    client.cancel_order(cancelled, "changed my mind")
    ended[cancelled] = terminal(client, cancelled)["status"]
    assert set(ended.values()) >= {"paid", "cancelled", "failed", "shipped"}
    assert_audit_clean(client)
    assert open_order_streams(server.db) == []
    server.stop()

    # A database from before streams were closed: every order stream is open. Its first start
    # closes the ended ones and recovers none; the next start finds nothing to close.
    with sqlite3.connect(server.db) as raw:
        raw.execute("UPDATE streams SET closed = 0")
    first = start_server(db=server.db, step_timeout=30)
    assert wait_until(lambda: "closing 5 ended order streams" in first.log(), timeout=10)
    assert "recovering" not in first.log()
    assert open_order_streams(server.db) == []
    statuses = {order_id: first.client().get_order(order_id)["status"] for order_id in ended}
    assert statuses == ended
    # An order cut off by a kill -9 of the whole system stays open and is driven on.
    cut = new_id("cut")
    first.client().place_order(cut, "c", LINE, "tok_timeout", wait=False)
    wait_until(lambda: open_order_streams(server.db) == [f"order-{cut}"], timeout=10)
    kill_everything(server.db)
    second = start_server(db=server.db)
    assert terminal(second.client(), cut)["status"] == "cancelled"
    assert "closing" not in second.log()
    assert "recovering 1 unfinished orders" in second.log()
    assert open_order_streams(server.db) == []
    assert_audit_clean(second.client())
