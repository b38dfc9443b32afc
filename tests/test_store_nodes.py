"""The store's part of several nodes (DESIGN.md section 10), on every backend: leases with
epochs, ownership recorded with a stream's first events, takeover claimed by exactly one node,
and fenced appends refused once a node lost its lease or the stream."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from runtime.pg import PgServer
from store import (
    NO_STREAM,
    AppendRequest,
    EventStore,
    Fence,
    FencedError,
    LeaseHeldError,
    MultiAppend,
    open_store,
)
from tests.test_store_contract import new_events, store, store_url

__all__ = ["store", "store_url"]  # the contract suite's fixtures, used here by name

TTL = 0.3
DONE = ("Done",)


def expire() -> None:
    """Sleep past a lease's TTL."""
    time.sleep(TTL + 0.1)


def place(store: EventStore, stream: str, fence: Fence, owner: str | None = None) -> None:
    """Create ``stream`` as ``fence``'s node, recording ``owner`` (default: that node)."""
    request = AppendRequest(stream, new_events(1), NO_STREAM, owner=owner or fence.node_id)
    (result,) = store.append_batch([request], fence)
    assert result == 0


def test_lease_epochs_grow_and_a_live_lease_is_refused(store: EventStore) -> None:
    assert store.acquire_lease("a", "h:1", TTL) == 1
    with pytest.raises(LeaseHeldError, match="h:1"):
        store.acquire_lease("a", "h:2", TTL)
    assert store.renew_lease(Fence("a", 1), "h:1", TTL)
    expire()
    assert not store.renew_lease(Fence("a", 1), "h:1", TTL)  # too late: it must stop
    assert store.acquire_lease("a", "h:2", TTL) == 2
    assert not store.renew_lease(Fence("a", 1), "h:1", TTL)  # the old process stays fenced
    (node,) = store.nodes("order-", DONE)
    assert (node.node_id, node.address, node.epoch, node.taken_by) == ("a", "h:2", 2, None)
    assert node.expires_in > 0


def test_owner_is_recorded_with_the_first_events_only(store: EventStore) -> None:
    fence = Fence("a", store.acquire_lease("a", "h:1", 5))
    place(store, "order-1", fence)
    store.append_batch([AppendRequest("order-1", new_events(1), 0, owner="b")], fence)
    assert store.stream_owner("order-1") == "a"
    store.append("order-2", new_events(1), NO_STREAM)  # no owner: written before nodes
    assert store.stream_owner("order-2") is None
    assert [h.stream for h in store.owned_heads("a", "order-")] == ["order-1"]
    assert store.adopt_unowned("a", "order-", DONE) == 1
    assert [h.stream for h in store.owned_heads("a", "order-")] == ["order-1", "order-2"]


def test_a_refused_append_records_no_owner(store: EventStore) -> None:
    fence = Fence("a", store.acquire_lease("a", "h:1", 5))
    store.append("order-1", new_events(1), NO_STREAM)
    (result,) = store.append_batch(
        [AppendRequest("order-1", new_events(1), NO_STREAM, owner="a")], fence
    )
    assert isinstance(result, Exception)
    assert store.stream_owner("order-1") is None


def test_takeover_moves_unfinished_streams_and_fences_the_dead_node(store: EventStore) -> None:
    a = Fence("a", store.acquire_lease("a", "h:1", TTL))
    b = Fence("b", store.acquire_lease("b", "h:2", 30))
    place(store, "order-1", a)
    place(store, "order-2", a)
    store.append_batch([AppendRequest("order-2", (new_events(1, "Done")), 0)], a)
    place(store, "order-3", b)
    assert store.take_over(b, "order-", DONE) == {}  # a is alive
    expire()
    assert store.take_over(b, "order-", DONE) == {"a": ["order-1"]}
    assert store.take_over(b, "order-", DONE) == {}  # claimed once
    assert store.stream_owner("order-1") == "b"
    assert store.stream_owner("order-2") == "a"  # finished: stays in a's history
    with pytest.raises(FencedError):
        store.append_batch([AppendRequest("other", new_events(1), NO_STREAM)], a)
    by_id = {n.node_id: n for n in store.nodes("order-", DONE)}
    assert by_id["a"].taken_by == "b"
    assert (by_id["a"].owned, by_id["a"].in_flight) == (1, 0)
    assert (by_id["b"].owned, by_id["b"].in_flight) == (2, 2)
    # a comes back with its old id: a new epoch, and only what is still its own.
    a2 = Fence("a", store.acquire_lease("a", "h:1", 30))
    assert a2.epoch > a.epoch + 1
    assert [h.stream for h in store.owned_heads("a", "order-")] == ["order-2"]
    (refused,) = store.append_batch([AppendRequest("order-1", new_events(1), 0)], a2)
    assert isinstance(refused, FencedError)  # order-1 is b's now
    store.append_batch([AppendRequest("order-1", new_events(1), 0)], b)
    assert store.stream_version("order-1") == 1


def test_fenced_multi_append_to_a_foreign_stream_leaves_nothing(store: EventStore) -> None:
    a = Fence("a", store.acquire_lease("a", "h:1", 30))
    b = Fence("b", store.acquire_lease("b", "h:2", 30))
    place(store, "order-1", a)
    (refused,) = store.append_batch(
        [
            MultiAppend(
                (
                    AppendRequest("stock-x", new_events(1), NO_STREAM),
                    AppendRequest("order-1", new_events(1), 0),
                )
            )
        ],
        b,
    )
    assert isinstance(refused, FencedError)
    assert store.stream_version("stock-x") == NO_STREAM


def test_a_released_lease_is_taken_over_at_once(store: EventStore) -> None:
    a = Fence("a", store.acquire_lease("a", "h:1", 30))
    b = Fence("b", store.acquire_lease("b", "h:2", 30))
    place(store, "order-1", a)
    store.release_lease(a)
    assert store.take_over(b, "order-", DONE) == {"a": ["order-1"]}


def test_a_node_without_its_lease_takes_nothing_over(store: EventStore) -> None:
    a = Fence("a", store.acquire_lease("a", "h:1", TTL))
    Fence("b", store.acquire_lease("b", "h:2", TTL))
    expire()
    with pytest.raises(FencedError):
        store.take_over(a, "order-", DONE)


def test_postgres_exactly_one_of_many_nodes_claims_each_lease(pg_server: PgServer) -> None:
    url = pg_server.create_schema()
    stores = [open_store(url) for _ in range(6)]
    try:
        dead = [
            Fence(f"dead-{n}", stores[0].acquire_lease(f"dead-{n}", "x", TTL)) for n in range(5)
        ]
        for n, fence in enumerate(dead):
            place(stores[0], f"order-{n}", fence)
        fences = [
            Fence(f"live-{n}", s.acquire_lease(f"live-{n}", "y", 30)) for n, s in enumerate(stores)
        ]
        expire()
        claims: list[dict[str, list[str]]] = []
        start = threading.Barrier(len(stores))

        def claim(s: EventStore, fence: Fence) -> None:
            start.wait()
            claims.append(s.take_over(fence, "order-", DONE))

        threads = [
            threading.Thread(target=claim, args=pair) for pair in zip(stores, fences, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        claimed = [node for c in claims for node in c]
        assert sorted(claimed) == [f.node_id for f in dead]  # each exactly once
        owners = {stores[0].stream_owner(f"order-{n}") for n in range(5)}
        assert owners <= {f.node_id for f in fences}
    finally:
        for s in stores:
            s.close()


def test_postgres_events_carry_their_writer(pg_server: PgServer) -> None:
    url = pg_server.create_schema()
    with open_store(url) as s, psycopg.connect(url) as conn:
        a = Fence("a", s.acquire_lease("a", "h:1", 30))
        place(s, "order-1", a)
        s.append("loose", new_events(1), NO_STREAM)
        rows = conn.execute("SELECT stream, writer, writer_epoch FROM events ORDER BY 1").fetchall()
        assert rows == [("loose", None, None), ("order-1", "a", a.epoch)]


def test_postgres_plans_every_statement_for_its_parameters(pg_server: PgServer) -> None:
    """A generic plan cached while the events table was small scanned all of it on every
    commit's idempotency check (`event_id = ANY(...)`) until an autoanalyze replanned it."""
    with open_store(pg_server.create_schema()) as s, s._connection() as conn:  # type: ignore[attr-defined]
        assert conn.execute("SHOW plan_cache_mode").fetchone() == ("force_custom_plan",)
