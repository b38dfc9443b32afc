"""Stock in one stream per product: reservations across products as one multi-stream append,
conflicts with another writer caught up and retried, and an old database's single
``inventory`` stream migrated on first start."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from thespian.actors import ActorSystem

from actors import inventory as inventory_module
from actors.event_store import EventStoreActor
from actors.inventory import InventoryActor
from messages.base import Item, OrderLine, order_total, utcnow
from messages.commands import (
    GetStock,
    InventoryReleasedReply,
    InventoryReservedReply,
    InventoryUnavailableReply,
    ReleaseStock,
    ReserveStock,
    ServiceConfig,
    ServiceReady,
    StockReport,
)
from messages.events import (
    INVENTORY_STREAM,
    Event,
    OrderCancelled,
    OrderPlaced,
    StockReleased,
    StockReserved,
    StockSet,
    order_stream,
)
from saga.audit import audit
from saga.stock import StockBook
from store import CODEC, NO_STREAM, AppendRequest, open_store

ASK = timedelta(seconds=20)


@pytest.fixture
def system() -> Iterator[Any]:
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    yield asys
    asys.shutdown()


def start_inventory(asys: Any, url: str) -> Any:
    """A store actor and an Inventory on `url`, configured and ready."""
    config = {
        "store_url": url,
        "synchronous": "FULL",
        "step_timeout": 0.5,
        "crash_exits_process": False,
    }
    store = asys.createActor(EventStoreActor)
    assert isinstance(
        asys.ask(store, ServiceConfig(name="store", store=None, **config), ASK), ServiceReady
    )
    inventory = asys.createActor(InventoryActor)
    ready = asys.ask(inventory, ServiceConfig(name="inventory", store=store, **config), ASK)
    assert isinstance(ready, ServiceReady)
    return inventory


def items(*pairs: tuple[str, int]) -> tuple[Item, ...]:
    return tuple(Item(product_id=p, quantity=q) for p, q in pairs)


def test_a_reservation_across_products_is_one_commit_in_each_product_stream(
    system: Any, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    inventory = start_inventory(system, url)
    held = system.ask(
        inventory, ReserveStock(order_id="o-1", items=items(("SKU-001", 2), ("SKU-002", 1))), ASK
    )
    assert isinstance(held, InventoryReservedReply)
    with open_store(url, readonly=True) as reader:
        one, two = reader.read_stream("stock-SKU-001")[-1], reader.read_stream("stock-SKU-002")[-1]
        assert (one.type, two.type) == ("StockReserved", "StockReserved")
        assert one.position + 1 == two.position
        assert one.recorded_at == two.recorded_at
        shares = [CODEC.decode(one), CODEC.decode(two)]
        assert [s.items for s in shares if isinstance(s, StockReserved)] == [
            items(("SKU-001", 2)),
            items(("SKU-002", 1)),
        ]
        assert reader.read_stream(INVENTORY_STREAM) == []


def test_a_conflicting_writer_is_caught_up_on_and_the_reservation_retried(
    system: Any, tmp_path: Path
) -> None:
    """Another writer of SKU-003's stream (an Inventory of another node) takes units this
    Inventory does not know of: its next reservation conflicts, it catches up and decides
    again on the true stock."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    inventory = start_inventory(system, url)
    with open_store(url) as other_node:
        system.ask(inventory, GetStock(req_id=0, product_ids=()), ASK)  # the seed is committed
        head = other_node.stream_version("stock-SKU-003")
        assert head == 0
        taken = StockReserved(
            order_id="elsewhere",
            reservation_id="res-x",
            items=items(("SKU-003", 999)),
            reserved_at=utcnow(),
        )
        other_node.append("stock-SKU-003", [CODEC.encode(taken)], head)
    refused = system.ask(inventory, ReserveStock(order_id="o-2", items=items(("SKU-003", 2))), ASK)
    assert isinstance(refused, InventoryUnavailableReply)
    assert [(u.requested, u.available) for u in refused.unavailable_items] == [(2, 1)]
    held = system.ask(inventory, ReserveStock(order_id="o-3", items=items(("SKU-003", 1))), ASK)
    assert isinstance(held, InventoryReservedReply)
    stock = system.ask(inventory, GetStock(req_id=1, product_ids=("SKU-003",)), ASK)
    assert isinstance(stock, StockReport)
    assert stock.stock["SKU-003"] == {"on_hand": 1000, "reserved": 1000, "available": 0}


def test_a_refused_batch_is_taken_back_and_handled_again_on_the_true_stock(
    system: Any, tmp_path: Path
) -> None:
    """Several changes are lost to one conflict (the refused append and one queued behind it),
    with a release waiting behind one of them: the Inventory takes back what they did to its
    book, reads only what SKU-003's and SKU-001's streams got meanwhile, and decides each
    again; the waiting release then runs on what was really held."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    inventory = start_inventory(system, url)
    with open_store(url) as other_node:
        system.ask(inventory, GetStock(req_id=0, product_ids=()), ASK)
        taken = StockReserved(
            order_id="elsewhere",
            reservation_id="res-x",
            items=items(("SKU-003", 995)),
            reserved_at=utcnow(),
        )
        other_node.append("stock-SKU-003", [CODEC.encode(taken)], 0)
    system.tell(inventory, ReserveStock(order_id="o-a", items=items(("SKU-003", 3))))
    system.tell(
        inventory, ReserveStock(order_id="o-b", items=items(("SKU-003", 3), ("SKU-001", 1)))
    )
    system.tell(inventory, ReleaseStock(order_id="o-a", reason="cancelled"))
    replies: dict[type, list[Any]] = {}
    while sum(len(r) for r in replies.values()) < 3:
        reply = system.listen(ASK)
        assert reply is not None
        replies.setdefault(type(reply), []).append(reply)
    assert [r.order_id for r in replies[InventoryReservedReply]] == ["o-a"]
    (short,) = replies[InventoryUnavailableReply]
    assert short.order_id == "o-b"
    assert [(u.product_id, u.available) for u in short.unavailable_items] == [("SKU-003", 2)]
    assert [r.order_id for r in replies[InventoryReleasedReply]] == ["o-a"]
    stock = system.ask(inventory, GetStock(req_id=1, product_ids=("SKU-001", "SKU-003")), ASK)
    assert stock.stock["SKU-003"] == {"on_hand": 1000, "reserved": 995, "available": 5}
    assert stock.stock["SKU-001"]["reserved"] == 0


def old_inventory_stream() -> list[Event]:
    """What today's code wrote before the stock streams: everything in ``inventory``."""
    now = utcnow()
    return [
        *(StockSet(product_id=f"SKU-00{n}", on_hand=100, set_at=now) for n in (1, 2, 3)),
        StockReserved(
            order_id="paid",
            reservation_id="r-1",
            items=items(("SKU-001", 2), ("SKU-002", 3)),
            reserved_at=now,
        ),
        StockReserved(
            order_id="gone",
            reservation_id="r-2",
            items=items(("SKU-002", 1), ("SKU-003", 4)),
            reserved_at=now,
        ),
        StockReleased(
            order_id="gone",
            reservation_id="r-2",
            items=items(("SKU-002", 1), ("SKU-003", 4)),
            reason="declined",
            released_at=now,
        ),
        StockReleased(
            order_id="fenced", reservation_id="", items=(), reason="gave up", released_at=now
        ),
        StockSet(product_id="SKU-003", on_hand=50, set_at=now),
    ]


def test_an_old_database_is_migrated_on_first_start(system: Any, tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    old = old_inventory_stream()
    with open_store(url) as made_the_old_way:
        made_the_old_way.append(INVENTORY_STREAM, [CODEC.encode(e) for e in old], NO_STREAM)
        before = audit(made_the_old_way)
    book = StockBook()
    for event in old:
        book.apply(event)

    inventory = start_inventory(system, url)
    stock = system.ask(inventory, GetStock(req_id=1, product_ids=()), ASK)
    assert isinstance(stock, StockReport)
    assert (
        stock.stock
        == book.report(())
        == {
            "SKU-001": {"on_hand": 100, "reserved": 2, "available": 98},
            "SKU-002": {"on_hand": 100, "reserved": 3, "available": 97},
            "SKU-003": {"on_hand": 50, "reserved": 0, "available": 50},
        }
    )
    # What the orders hold is still theirs: a repeated reserve answers the old reservation,
    # a release gives back both products, the fence still refuses.
    again = system.ask(inventory, ReserveStock(order_id="paid", items=items(("SKU-001", 2))), ASK)
    assert again == InventoryReservedReply(order_id="paid", reservation_id="r-1")
    fenced = system.ask(
        inventory, ReserveStock(order_id="fenced", items=items(("SKU-001", 1))), ASK
    )
    assert isinstance(fenced, InventoryUnavailableReply)

    with open_store(url, readonly=True) as reader:
        assert reader.read_stream(INVENTORY_STREAM)[-1].type == "InventoryMigrated"
        assert [h.stream for h in reader.stream_heads("stock-")] == [
            "stock-SKU-001",
            "stock-SKU-002",
            "stock-SKU-003",
        ]
        assert [e.type for e in reader.read_stream("stock-SKU-003")] == [
            "StockSet",
            "StockReserved",
            "StockReleased",
            "StockSet",
        ]
        assert [e.type for e in reader.read_stream("inventory-fences")] == ["StockReleased"]
        after = audit(reader)
    # The audit reads the migrated streams and finds exactly what it found in the old one.
    assert after["checks"] == before["checks"]
    assert after["fences"] == before["fences"] == 1

    gave_back = system.ask(inventory, ReleaseStock(order_id="paid", reason="test"), ASK)
    assert gave_back == InventoryReleasedReply(order_id="paid", reservation_id="r-1")
    system.shutdown()

    # A second start finds the stock streams and migrates nothing again.
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    try:
        inventory = start_inventory(asys, url)
        stock = asys.ask(inventory, GetStock(req_id=2, product_ids=("SKU-001", "SKU-002")), ASK)
        assert stock.stock["SKU-001"]["reserved"] == stock.stock["SKU-002"]["reserved"] == 0
        with open_store(url, readonly=True) as reader:
            assert (
                sum(e.type == "InventoryMigrated" for e in reader.read_stream(INVENTORY_STREAM))
                == 1
            )
    finally:
        asys.shutdown()


def test_memory_store_keeps_stock_per_product(system: Any) -> None:
    inventory = start_inventory(system, f"memory:{uuid.uuid4().hex}")
    held = system.ask(inventory, ReserveStock(order_id="m-1", items=items(("SKU-004", 5))), ASK)
    assert isinstance(held, InventoryReservedReply)


def placed(order_id: str) -> OrderPlaced:
    lines = (OrderLine(product_id="SKU-001", quantity=1, unit_price=Decimal("1.00")),)
    return OrderPlaced(
        order_id=order_id,
        customer_id="c",
        lines=lines,
        total_amount=order_total(lines),
        payment_method="tok_visa",
        placed_at=utcnow(),
    )


def test_a_start_reads_the_snapshot_and_only_the_events_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SNAPSHOT_EVERY stock events the book is saved; a start loads it and reads what
    came after. The reservations of orders whose streams are closed are forgotten (their units
    stay counted), those of open orders are kept and still answer their orders."""
    monkeypatch.setattr(inventory_module, "SNAPSHOT_EVERY", 3)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    orders = [f"o-{n}" for n in range(5)]
    with open_store(url) as store:
        for order_id in orders:
            store.append(order_stream(order_id), [CODEC.encode(placed(order_id))], NO_STREAM)
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    try:
        inventory = start_inventory(asys, url)
        for order_id in orders:
            held = asys.ask(
                inventory, ReserveStock(order_id=order_id, items=items(("SKU-001", 2))), ASK
            )
            assert isinstance(held, InventoryReservedReply)
        # o-0 and o-1 end (their last append closes the stream); o-2 is released by its saga.
        with open_store(url) as store:
            for order_id in orders[:2]:
                ended = OrderCancelled(
                    order_id=order_id,
                    cancelled_by="test",
                    reason="x",
                    refund_issued=False,
                    cancelled_at=utcnow(),
                )
                store.append_batch(
                    [AppendRequest(order_stream(order_id), (CODEC.encode(ended),), 0, closes=True)]
                )
        released = asys.ask(inventory, ReleaseStock(order_id="o-2", reason="test"), ASK)
        assert isinstance(released, InventoryReleasedReply)
        before = asys.ask(inventory, GetStock(req_id=1, product_ids=("SKU-001",)), ASK)
    finally:
        asys.shutdown()
    with open_store(url, readonly=True) as reader:
        saved = reader.load_snapshot(inventory_module.SNAPSHOT)
        assert saved is not None
        book, versions = StockBook.from_snapshot(saved)
        # 6 stock events: the snapshot after the 6th covers them all and forgot o-0 and o-1.
        assert versions["stock-SKU-001"] == reader.stream_version("stock-SKU-001")
        assert sorted(book.reservations) == ["o-2", "o-3", "o-4"]
        assert book.report(("SKU-001",)) == before.stock

    # A second start: the same stock, and the open orders' reservations still answer.
    monkeypatch.setattr(
        StockBook, "apply", lambda *_: pytest.fail("a start replayed an event the snapshot holds")
    )
    asys = ActorSystem("simpleSystemBase", transientUnique=True)
    try:
        inventory = start_inventory(asys, url)
        after = asys.ask(inventory, GetStock(req_id=2, product_ids=("SKU-001",)), ASK)
        assert after.stock == before.stock
        assert after.stock["SKU-001"]["reserved"] == 8  # o-0, o-1 (ended, kept), o-3, o-4
        monkeypatch.undo()
        again = asys.ask(inventory, ReserveStock(order_id="o-3", items=items(("SKU-001", 2))), ASK)
        assert isinstance(again, InventoryReservedReply)
        gave_back = asys.ask(inventory, ReleaseStock(order_id="o-4", reason="test"), ASK)
        assert isinstance(gave_back, InventoryReleasedReply)
        stock = asys.ask(inventory, GetStock(req_id=3, product_ids=("SKU-001",)), ASK)
        assert stock.stock["SKU-001"]["reserved"] == 6
    finally:
        asys.shutdown()
