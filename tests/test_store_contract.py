"""One contract suite for every EventStore implementation (STYLE.md point 3), plus the
SQLite-only promises: durability across reopen, WAL/FULL pragmas and read-only readers."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest

from messages.base import OrderLine
from messages.events import OrderPlaced, PaymentFailed
from runtime.pg import PgServer
from store import (
    CODEC,
    NO_STREAM,
    AppendRequest,
    ConcurrencyError,
    DuplicateEventError,
    EventCodec,
    EventStore,
    MultiAppend,
    NewEvent,
    PostgresOptions,
    SqliteEventStore,
    StoredEvent,
    StoreError,
    StreamHead,
    Subscription,
    open_store,
    postgres,
)
from store import store_url as store_url_of
from tests.conftest import wait_until


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store of each backend in turn: SQLite on a real file,
    PostgreSQL in a schema of its own on the session's real server."""
    if request.param == "memory":
        return f"memory:{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_schema()


@pytest.fixture
def store(store_url: str) -> Iterator[EventStore]:
    """A writer on each backend in turn."""
    with open_store(store_url) as backend:
        yield backend


def new_events(n: int, type_: str = "Happened") -> tuple[NewEvent, ...]:
    """``n`` events with ids unique across the whole test run."""
    return tuple(
        NewEvent(event_id=uuid.uuid4().hex, type=type_, payload=f"p{i}".encode()) for i in range(n)
    )


def versions(events: list[StoredEvent]) -> list[int]:
    """The versions of ``events``, in order."""
    return [e.version for e in events]


# --- append and optimistic concurrency -------------------------------------------------------


def test_append_to_new_stream_with_no_stream(store: EventStore) -> None:
    events = new_events(2)
    assert store.append("order-1", events, NO_STREAM) == 1
    stored = store.read_stream("order-1")
    assert versions(stored) == [0, 1]
    assert [e.event_id for e in stored] == [e.event_id for e in events]
    assert [e.payload for e in stored] == [b"p0", b"p1"]
    assert all(e.stream == "order-1" and e.type == "Happened" for e in stored)
    assert store.stream_version("order-1") == 1


def test_append_with_right_expected_version(store: EventStore) -> None:
    store.append("order-1", new_events(1), NO_STREAM)
    assert store.append("order-1", new_events(3), 0) == 3
    assert versions(store.read_stream("order-1")) == [0, 1, 2, 3]


@pytest.mark.parametrize("expected", [NO_STREAM, 0, 2])
def test_wrong_expected_version_raises_and_leaves_stream_unchanged(
    store: EventStore, expected: int
) -> None:
    store.append("order-1", new_events(2), NO_STREAM)
    before = store.read_stream("order-1")
    with pytest.raises(ConcurrencyError) as caught:
        store.append("order-1", new_events(1), expected)
    assert (caught.value.stream, caught.value.expected, caught.value.actual) == (
        "order-1",
        expected,
        1,
    )
    assert store.read_stream("order-1") == before
    assert store.read_all() == before


def test_expected_version_of_missing_stream_raises(store: EventStore) -> None:
    with pytest.raises(ConcurrencyError):
        store.append("order-1", new_events(1), 0)
    assert store.stream_version("order-1") == NO_STREAM


def test_empty_append_checks_expected_and_returns_current(store: EventStore) -> None:
    assert store.append("order-1", (), NO_STREAM) == NO_STREAM
    store.append("order-1", new_events(2), NO_STREAM)
    assert store.append("order-1", [], 1) == 1
    with pytest.raises(ConcurrencyError):
        store.append("order-1", [], 0)
    assert len(store.read_all()) == 2


# --- idempotency -----------------------------------------------------------------------------


def test_reappending_same_ids_is_a_no_op(store: EventStore) -> None:
    first = new_events(2)
    store.append("order-1", first, NO_STREAM)
    second = new_events(1)
    store.append("order-1", second, 1)
    # A redelivered command repeats its append with a now stale expected version.
    assert store.append("order-1", first, NO_STREAM) == 1
    assert store.append("order-1", second, 1) == 2
    assert store.append("order-1", second, 2) == 2
    assert len(store.read_all()) == 3
    assert store.stream_version("order-1") == 2


def test_partially_overlapping_ids_raise_duplicate(store: EventStore) -> None:
    first = new_events(2)
    store.append("order-1", first, NO_STREAM)
    with pytest.raises(DuplicateEventError):
        store.append("order-1", (first[1], *new_events(1)), 1)
    assert store.stream_version("order-1") == 1


def test_ids_stored_in_another_stream_raise_duplicate(store: EventStore) -> None:
    events = new_events(1)
    store.append("order-1", events, NO_STREAM)
    with pytest.raises(DuplicateEventError):
        store.append("order-2", events, NO_STREAM)
    assert store.stream_version("order-2") == NO_STREAM


def test_same_ids_in_another_order_raise_duplicate(store: EventStore) -> None:
    events = new_events(2)
    store.append("order-1", events, NO_STREAM)
    with pytest.raises(DuplicateEventError):
        store.append("order-1", events[::-1], 1)


def test_id_repeated_within_one_append_raises_duplicate(store: EventStore) -> None:
    (event,) = new_events(1)
    with pytest.raises(DuplicateEventError):
        store.append("order-1", (event, event), NO_STREAM)
    assert store.read_all() == []


# --- reading ---------------------------------------------------------------------------------


def test_read_stream_from_version(store: EventStore) -> None:
    store.append("order-1", new_events(4), NO_STREAM)
    assert versions(store.read_stream("order-1", from_version=2)) == [2, 3]
    assert store.read_stream("order-1", from_version=4) == []
    assert store.read_stream("unknown") == []


def test_read_stream_pages_with_a_limit(store: EventStore) -> None:
    store.append("order-1", new_events(5), NO_STREAM)
    assert versions(store.read_stream("order-1", limit=2)) == [0, 1]
    assert versions(store.read_stream("order-1", from_version=2, limit=2)) == [2, 3]
    assert versions(store.read_stream("order-1", from_version=4, limit=2)) == [4]


def test_read_all_in_commit_order_across_streams_with_paging(store: EventStore) -> None:
    store.append("b", new_events(2), NO_STREAM)
    store.append("a", new_events(1), NO_STREAM)
    store.append("b", new_events(1), 1)
    everything = store.read_all()
    assert [(e.stream, e.version) for e in everything] == [("b", 0), ("b", 1), ("a", 0), ("b", 2)]
    positions = [e.position for e in everything]
    assert positions[0] >= 1
    assert all(p < q for p, q in pairwise(positions))

    pages: list[StoredEvent] = []
    page = store.read_all(0, limit=3)
    while page:
        assert len(page) <= 3
        pages.extend(page)
        page = store.read_all(page[-1].position, limit=3)
    assert pages == everything
    assert store.read_all(everything[1].position, limit=1) == [everything[2]]
    assert store.read_all(everything[-1].position) == []


def test_stream_heads_with_prefix(store: EventStore) -> None:
    store.append("order-1", new_events(2, "OrderPlaced"), NO_STREAM)
    store.append("order-2", new_events(1, "OrderPaid"), NO_STREAM)
    store.append("orders", new_events(1), NO_STREAM)
    store.append("order_%", new_events(1), NO_STREAM)
    store.append("payment-1", new_events(1), NO_STREAM)
    store.append("order-2", new_events(1, "InventoryReserved"), 0)
    assert store.stream_heads("order-") == [
        StreamHead("order-1", 1, "OrderPlaced"),
        StreamHead("order-2", 1, "InventoryReserved"),
    ]
    # Neither '_' nor '%' is a wildcard.
    assert store.stream_heads("order_") == [StreamHead("order_%", 0, "Happened")]
    assert [h.stream for h in store.stream_heads("")] == [
        "order-1",
        "order-2",
        "order_%",
        "orders",
        "payment-1",
    ]
    assert store.stream_heads("nothing") == []


# --- open streams and snapshots --------------------------------------------------------------


def closing_append(stream: str, expected: int, closes: bool = True) -> AppendRequest:
    """One event appended to ``stream``, closing it (or reopening it with ``closes=False``)."""
    return AppendRequest(stream, new_events(1, "Ended"), expected, closes=closes)


def open_names(store: EventStore, prefix: str = "", owner: str | None = None) -> list[str]:
    """The names of the open streams under ``prefix``, in the order ``open_heads`` gives."""
    return [h.stream for h in store.open_heads(prefix, owner)]


def test_open_heads_until_an_append_closes_the_stream(store: EventStore) -> None:
    store.append("order-1", new_events(2, "OrderPlaced"), NO_STREAM)
    store.append("order-2", new_events(1, "OrderPlaced"), NO_STREAM)
    assert store.open_heads("order-") == [
        StreamHead("order-1", 1, "OrderPlaced"),
        StreamHead("order-2", 0, "OrderPlaced"),
    ]
    assert store.append_batch([closing_append("order-1", 1)]) == [2]
    assert open_names(store, "order-") == ["order-2"]
    assert [h.stream for h in store.stream_heads("order-")] == ["order-1", "order-2"]
    # An empty append and a replay of the closing append write nothing: it stays closed.
    closed_again = store.read_stream("order-1")[-1]
    replay = NewEvent(closed_again.event_id, closed_again.type, closed_again.payload)
    assert store.append_batch(
        [AppendRequest("order-1", (), 2), AppendRequest("order-1", (replay,), 1)]
    ) == [2, 2]
    assert open_names(store, "order-") == ["order-2"]
    # A later append that does not close reopens it, and its head is the new one.
    assert store.append_batch([closing_append("order-1", 2, closes=False)]) == [3]
    assert store.open_heads("order-")[0] == StreamHead("order-1", 3, "Ended")
    assert store.append_many([closing_append("order-2", 0)]) == [1]
    assert open_names(store, "order-") == ["order-1"]


def test_open_heads_filters_by_prefix_in_name_order(store: EventStore) -> None:
    for name in ("order-b", "order-a", "orders", "order_%", "stock-a", "order-c"):
        store.append(name, new_events(1), NO_STREAM)
    store.append_batch([closing_append("order-c", 0)])
    assert open_names(store, "order-") == ["order-a", "order-b"]
    assert open_names(store, "order_") == ["order_%"]  # neither '_' nor '%' is a wildcard
    assert open_names(store) == ["order-a", "order-b", "order_%", "orders", "stock-a"]
    assert open_names(store, "nothing") == []


def test_open_heads_of_one_owner(store: EventStore) -> None:
    store.append_batch(
        [
            AppendRequest("order-1", new_events(1), NO_STREAM, owner="a"),
            AppendRequest("order-2", new_events(1), NO_STREAM, owner="b"),
            AppendRequest("order-3", new_events(1), NO_STREAM, owner="a"),
            AppendRequest("order-4", new_events(1), NO_STREAM),  # no owner
            AppendRequest("order-5", new_events(1), NO_STREAM, owner="a", closes=True),
        ]
    )
    assert open_names(store, "order-", owner="a") == ["order-1", "order-3"]
    assert open_names(store, "order-", owner="b") == ["order-2"]
    assert open_names(store, "order-", owner="c") == []
    assert open_names(store, "order-") == ["order-1", "order-2", "order-3", "order-4"]
    assert [h.stream for h in store.owned_heads("a", "order-")] == ["order-1", "order-3", "order-5"]


def test_last_position_and_count_streams(store: EventStore) -> None:
    assert store.last_position() == 0
    assert store.count_streams("order-") == 0
    for name in ("order-b", "order-a", "orders", "order_%", "stock-a"):
        store.append(name, new_events(2), NO_STREAM)
    assert store.last_position() == 10 == store.read_all(0, 100)[-1].position
    assert store.count_streams("order-") == 2
    assert store.count_streams("order_") == 1  # no wildcard
    assert store.count_streams("") == 5
    assert store.count_streams("nothing") == 0
    # A refused append uses no position.
    assert isinstance(store.append_batch([closing_append("order-a", 0)])[0], ConcurrencyError)
    assert store.last_position() == 10


def test_close_streams_without_appending(store: EventStore) -> None:
    for name in ("order-1", "order-2", "order-3"):
        store.append(name, new_events(1), NO_STREAM)
    before = store.read_all()
    store.close_streams(["order-1", "order-3", "unknown"])
    store.close_streams([])
    assert open_names(store) == ["order-2"]
    assert store.read_all() == before
    assert store.stream_version("order-1") == 0
    # More names than one SQL statement takes, the known one last.
    store.close_streams([*(f"x-{n}" for n in range(1200)), "order-2"])
    assert open_names(store) == []
    assert store.append_batch([closing_append("order-1", 0, closes=False)]) == [1]
    assert open_names(store) == ["order-1"]


def test_closed_among_names_the_existing_closed_streams(store: EventStore) -> None:
    store.append("order-1", new_events(1), NO_STREAM)
    store.append_batch([closing_append("order-2", NO_STREAM)])
    store.append("order-3", new_events(1), NO_STREAM)
    store.close_streams(["order-3"])
    assert store.closed_among(["order-1", "order-2", "order-3", "unknown"]) == {
        "order-2",
        "order-3",
    }
    assert store.closed_among([]) == set()
    # More names than one SQL statement takes, the closed ones last.
    names = [*(f"x-{n}" for n in range(1200)), "order-3", "order-2"]
    assert store.closed_among(names) == {"order-2", "order-3"}


def test_closes_in_a_group_commit(store: EventStore) -> None:
    """Each part of a MultiAppend closes its own stream or not, and a refused request (or a
    MultiAppend with a refused part) closes nothing."""
    for name in ("order-1", "order-2", "stock-a", "order-3"):
        store.append(name, new_events(1), NO_STREAM)
    results = store.append_batch(
        [
            MultiAppend((closing_append("order-1", 0), closing_append("stock-a", 0, False))),
            closing_append("order-2", NO_STREAM),  # stale: refused
            MultiAppend((closing_append("order-3", 0), closing_append("stock-a", 0))),  # stale
        ]
    )
    assert results[0] == [1, 1]
    assert isinstance(results[1], ConcurrencyError)
    assert isinstance(results[2], ConcurrencyError)
    assert open_names(store) == ["order-2", "order-3", "stock-a"]
    assert store.stream_version("order-3") == 0


def test_snapshots_are_kept_by_name_and_replaced(store: EventStore) -> None:
    assert store.load_snapshot("inventory") is None
    store.save_snapshot("inventory", b"\x00state-1")
    store.save_snapshot("other", b"")
    assert store.load_snapshot("inventory") == b"\x00state-1"
    store.save_snapshot("inventory", b"state-2" * 100_000)
    assert store.load_snapshot("inventory") == b"state-2" * 100_000
    assert store.load_snapshot("other") == b""
    assert store.load_snapshot("unknown") is None
    assert store.read_all() == []  # not events


def test_snapshots_and_closed_streams_are_durable(store_url: str) -> None:
    with open_store(store_url) as store:
        store.append("order-1", new_events(1), NO_STREAM)
        store.append_batch([AppendRequest("order-2", new_events(1), NO_STREAM, closes=True)])
        store.save_snapshot("inventory", b"state")
        if store_url.startswith("memory:"):
            return
    with open_store(store_url) as reopened, open_store(store_url, readonly=True) as reader:
        for backend in (reopened, reader):
            assert open_names(backend) == ["order-1"]
            assert backend.load_snapshot("inventory") == b"state"
        with pytest.raises(StoreError, match="read-only"):
            reader.save_snapshot("inventory", b"other")
        with pytest.raises(StoreError, match="read-only"):
            reader.close_streams(["order-1"])


# --- group commit ----------------------------------------------------------------------------


def test_append_batch_failing_request_leaves_the_others_committed(store: EventStore) -> None:
    store.append("b", new_events(1), NO_STREAM)
    requests = [
        AppendRequest("a", new_events(2), NO_STREAM),
        AppendRequest("b", new_events(3), NO_STREAM),  # stale: b is at 0
        AppendRequest("c", new_events(1), NO_STREAM),
    ]
    results = store.append_batch(requests)
    assert results[0] == 1
    assert isinstance(results[1], ConcurrencyError)
    assert results[2] == 0
    assert store.stream_version("b") == 0
    assert [(e.stream, e.version) for e in store.read_all()] == [
        ("b", 0),
        ("a", 0),
        ("a", 1),
        ("c", 0),
    ]


def test_append_batch_requests_to_one_stream_apply_in_order(store: EventStore) -> None:
    first, second = new_events(2), new_events(1)
    results = store.append_batch(
        [
            AppendRequest("a", first, NO_STREAM),
            AppendRequest("a", second, 1),
            AppendRequest("a", first, NO_STREAM),  # a replay within the same batch
        ]
    )
    assert results == [1, 2, 1]
    assert [e.event_id for e in store.read_stream("a")] == [e.event_id for e in (*first, *second)]


def test_append_batch_reports_duplicates_per_request(store: EventStore) -> None:
    taken = new_events(1)
    store.append("a", taken, NO_STREAM)
    results = store.append_batch(
        [AppendRequest("b", taken, NO_STREAM), AppendRequest("c", new_events(1), NO_STREAM)]
    )
    assert isinstance(results[0], DuplicateEventError)
    assert results[1] == 0
    assert store.append_batch([]) == []


def test_closed_store_raises_store_error(store: EventStore) -> None:
    store.close()
    with pytest.raises(StoreError):
        store.read_all()
    with pytest.raises(StoreError):
        store.append("a", new_events(1), NO_STREAM)
    store.close()


# --- append_many: several streams, all or nothing --------------------------------------------


def test_append_many_commits_every_stream_together(store: EventStore) -> None:
    store.append("stock-a", new_events(2), NO_STREAM)
    versions_ = store.append_many(
        [("stock-a", 1, new_events(1)), AppendRequest("stock-b", new_events(2), NO_STREAM)]
    )
    assert versions_ == [2, 1]
    everything = store.read_all()
    assert [(e.stream, e.version) for e in everything] == [
        ("stock-a", 0),
        ("stock-a", 1),
        ("stock-a", 2),
        ("stock-b", 0),
        ("stock-b", 1),
    ]
    assert len({e.recorded_at for e in everything[2:]}) == 1  # one commit


@pytest.mark.parametrize("failing", ["first", "last"])
def test_append_many_refused_part_leaves_nothing(store: EventStore, failing: str) -> None:
    store.append("stock-a", new_events(1), NO_STREAM)
    before = store.read_all()
    stale = ("stock-a", NO_STREAM, new_events(1))
    fine = [("stock-b", NO_STREAM, new_events(2)), ("stock-c", NO_STREAM, new_events(1))]
    parts = [stale, *fine] if failing == "first" else [*fine, stale]
    with pytest.raises(ConcurrencyError) as caught:
        store.append_many(parts)
    assert caught.value.stream == "stock-a"
    assert store.read_all() == before
    assert store.stream_version("stock-b") == NO_STREAM
    store.append("d", new_events(1), NO_STREAM)
    assert store.read_all()[-1].position == before[-1].position + 1  # no gap either


def test_append_many_is_idempotent_and_refuses_duplicates(store: EventStore) -> None:
    a, b = new_events(2), new_events(1)
    parts = [("x", NO_STREAM, a), ("y", NO_STREAM, b)]
    assert store.append_many(parts) == [1, 0]
    assert store.append_many(parts) == [1, 0]  # a re-delivered request: no-op
    with pytest.raises(DuplicateEventError):
        store.append_many([("z", NO_STREAM, new_events(1)), ("w", NO_STREAM, b)])
    assert store.stream_version("z") == NO_STREAM
    assert len(store.read_all()) == 3
    assert store.append_many([]) == []


def test_append_batch_mixes_single_and_multi_stream_requests(store: EventStore) -> None:
    store.append("a", new_events(1), NO_STREAM)
    results = store.append_batch(
        [
            MultiAppend(
                (AppendRequest("a", new_events(1), 0), AppendRequest("b", new_events(1), NO_STREAM))
            ),
            MultiAppend(
                (AppendRequest("c", new_events(1), NO_STREAM), AppendRequest("a", new_events(1), 0))
            ),
            AppendRequest("a", new_events(1), 1),
        ]
    )
    assert results[0] == [1, 0]
    assert isinstance(results[1], ConcurrencyError)  # a is at 1 by then: c is not written
    assert results[2] == 2
    assert store.stream_version("c") == NO_STREAM
    assert [e.position for e in store.read_all()] == list(range(1, 5))


# --- read_all never skips, with writers in parallel ------------------------------------------


WRITERS = 6
APPENDS_PER_WRITER = 120


def _whole_log(reader: EventStore) -> list[StoredEvent]:
    """Every event in the store, read page by page."""
    everything: list[StoredEvent] = []
    page = reader.read_all(0, 1000)
    while page:
        everything.extend(page)
        page = reader.read_all(page[-1].position, 1000)
    return everything


def test_read_all_never_skips_with_concurrent_writers(store_url: str) -> None:
    """Writers on separate connections (separate pools: as separate nodes would) commit
    while a reader follows read_all; every event the reader ever sees must come after
    everything it saw before, so at the end it has seen exactly the whole log, in order."""
    writers = [open_store(store_url) for _ in range(WRITERS)]
    reader = open_store(store_url, readonly=True) if store_url.startswith("sqlite") else writers[0]
    done = threading.Event()
    seen: list[StoredEvent] = []
    errors: list[BaseException] = []

    def write(n: int, store: EventStore) -> None:
        rng = random.Random(n)
        try:
            for i in range(APPENDS_PER_WRITER):
                stream = f"w{n}-{i % 7}"
                parts = [AppendRequest(stream, new_events(rng.randint(1, 3)), NO_STREAM)]
                if i % 7 != 0 or i < 7:
                    head = store.stream_version(stream)
                    parts = [AppendRequest(stream, parts[0].events, head)]
                store.append_batch(
                    [*parts, AppendRequest(f"shared-{n}-{i}", new_events(1), NO_STREAM)]
                )
        except BaseException as e:
            errors.append(e)

    def follow() -> None:
        position = 0
        while True:
            finished = done.is_set()
            page = reader.read_all(position, 50)
            seen.extend(page)
            if page:
                position = page[-1].position
            elif finished:
                return

    threads = [threading.Thread(target=write, args=(n, w)) for n, w in enumerate(writers)]
    tail = threading.Thread(target=follow)
    tail.start()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    done.set()
    tail.join()
    try:
        assert not errors, errors
        everything = _whole_log(reader)
        assert len(everything) >= WRITERS * APPENDS_PER_WRITER * 2
        assert [e.position for e in seen] == [e.position for e in everything]
        assert seen == everything
        print(f"{len(everything)} events by {WRITERS} writers in {elapsed:.2f}s")
    finally:
        for w in writers:
            w.close()
        if reader not in writers:
            reader.close()


# --- subscriptions ---------------------------------------------------------------------------


def test_subscription_catches_up_then_follows_live(store: EventStore) -> None:
    store.append("a", new_events(3), NO_STREAM)
    sub = Subscription(store, "projector", page=2)
    assert sub.position == 0
    assert versions(sub.poll(0)) == [0, 1]
    assert versions(sub.poll(0)) == [2]
    assert sub.poll(0.01) == []
    got: list[StoredEvent] = []
    waiting = threading.Thread(target=lambda: got.extend(sub.poll(5.0)))
    waiting.start()
    time.sleep(0.05)
    store.append("b", new_events(1), NO_STREAM)
    waiting.join(5.0)
    assert [(e.stream, e.version) for e in got] == [("b", 0)]


def test_subscription_checkpoint_is_durable_per_subscriber(store_url: str) -> None:
    with open_store(store_url) as store:
        store.append("a", new_events(4), NO_STREAM)
        first = Subscription(store, "first")
        assert len(first.poll(0)) == 4
        first.position = store.read_all()[1].position  # handled two of them, then...
        first.commit()
        other = Subscription(store, "other")
        assert len(other.poll(0)) == 4  # ...which is nobody else's business
        if store_url.startswith("memory:"):
            again = Subscription(store, "first")
            assert versions(again.poll(0)) == [2, 3]
            return
    with open_store(store_url) as reopened:  # durable across a restart
        again = Subscription(reopened, "first")
        assert versions(again.poll(0)) == [2, 3]
        again.commit()
        assert Subscription(reopened, "first").poll(0) == []


def test_subscription_run_hands_every_event_once_in_order(store: EventStore) -> None:
    handled: list[StoredEvent] = []
    stop = threading.Event()
    sub = Subscription(store, "runner", page=3)
    runner = threading.Thread(target=sub.run, args=(handled.append, stop, 0.05))
    runner.start()
    for n in range(5):
        store.append(f"s{n}", new_events(2), NO_STREAM)
    wait_until(lambda: len(handled) >= 10, timeout=10)
    stop.set()
    runner.join(5)
    assert handled == store.read_all()
    assert store.load_checkpoint("runner") == handled[-1].position


def test_subscriber_hears_of_a_commit_within_milliseconds(store_url: str) -> None:
    """Commit-to-delivery latency of a caught-up subscriber on another connection."""
    if store_url.startswith("sqlite"):
        pytest.skip("SQLite cannot notify other connections: its subscribers poll every 5 ms")
    latencies: list[float] = []
    with open_store(store_url) as writer, open_store(store_url, readonly=True) as follower:
        sub = Subscription(follower, "latency")
        received = threading.Event()
        stop = threading.Event()

        def listen() -> None:
            while not stop.is_set():
                if sub.poll(1.0):
                    received.set()

        thread = threading.Thread(target=listen)
        thread.start()
        try:
            for _ in range(40):
                received.clear()
                time.sleep(0.01)  # let the subscriber block in its wait
                writer.append(f"l-{uuid.uuid4().hex}", new_events(1), NO_STREAM)
                committed = time.perf_counter()
                assert received.wait(5.0)
                latencies.append(time.perf_counter() - committed)
        finally:
            stop.set()
            thread.join(5)
    latencies.sort()
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    print(f"commit-to-delivery: median {median * 1000:.2f} ms, max {worst * 1000:.2f} ms")
    assert median < 0.05


# --- codec -----------------------------------------------------------------------------------


def order_placed() -> OrderPlaced:
    """A real event with exact decimal amounts and an aware, non-UTC timestamp."""
    lines = (
        OrderLine(product_id="sku-1", quantity=3, unit_price=Decimal("0.3333")),
        OrderLine(product_id="sku-2", quantity=1, unit_price=Decimal("10.50")),
    )
    return OrderPlaced(
        order_id="o-1",
        customer_id="c-1",
        lines=lines,
        total_amount=Decimal("11.4999"),
        payment_method="card",
        placed_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
    )


def test_codec_round_trip_through_the_store(store: EventStore) -> None:
    event = order_placed()
    record = CODEC.encode(event, event_id="order-o-1-placed")
    assert (record.event_id, record.type) == ("order-o-1-placed", "OrderPlaced")
    store.append("order-o-1", [record], NO_STREAM)
    (stored,) = store.read_stream("order-o-1")
    decoded = CODEC.decode(stored)
    assert decoded == event
    assert isinstance(decoded, OrderPlaced)
    # Exact amounts: the same digits, not merely an equal value.
    assert str(decoded.total_amount) == "11.4999"
    assert [str(line.unit_price) for line in decoded.lines] == ["0.3333", "10.50"]
    assert decoded.placed_at == event.placed_at
    assert decoded.placed_at.utcoffset() == timedelta(hours=2)


def test_codec_default_ids_are_unique() -> None:
    event = PaymentFailed(order_id="o-1", reason="declined", failed_at=datetime.now(UTC))
    assert CODEC.encode(event).event_id != CODEC.encode(event).event_id
    assert len({CODEC.new_id() for _ in range(10)}) == 10
    counter = iter(range(100))
    numbered = EventCodec(new_id=lambda: f"e{next(counter)}")
    assert [numbered.encode(event).event_id, numbered.new_id()] == ["e0", "e1"]
    assert CODEC.decode(CODEC.encode(event)) == event


def test_codec_rejects_unknown_types_and_bad_payloads() -> None:
    with pytest.raises(StoreError):
        CODEC.decode(NewEvent(event_id="x", type="NoSuchEvent", payload=b"\x80"))
    with pytest.raises(StoreError):
        CODEC.decode(NewEvent(event_id="x", type="OrderPlaced", payload=b"\xc1"))
    with pytest.raises(StoreError):
        CODEC.decode(NewEvent(event_id="x", type="PaymentFailed", payload=b"\x80"))
    narrow = EventCodec(types={"OrderPlaced": OrderPlaced})
    with pytest.raises(StoreError):
        narrow.encode(PaymentFailed(order_id="o", reason="r", failed_at=datetime.now(UTC)))


# --- SQLite only -----------------------------------------------------------------------------


def test_sqlite_reopen_finds_everything(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as writer:
        writer.append("a", new_events(2), NO_STREAM)
        writer.append("b", new_events(1), NO_STREAM)
        before = writer.read_all()
    with SqliteEventStore(path) as reopened:
        assert reopened.read_all() == before
        assert reopened.stream_version("a") == 1
        assert reopened.stream_heads("") == [
            StreamHead("a", 1, "Happened"),
            StreamHead("b", 0, "Happened"),
        ]
        assert reopened.append("a", new_events(1), 1) == 2
        assert reopened.read_all()[-1].position > before[-1].position


def test_sqlite_defaults_to_wal_and_synchronous_full(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as writer:
        # synchronous is per connection, so ask the store's own connection.
        conn = writer._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with SqliteEventStore(path, synchronous="NORMAL") as writer:
        conn = writer._conn
        assert conn is not None
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        SqliteEventStore(path, synchronous="OFF; DROP TABLE events")


def test_sqlite_readonly_store_sees_writer_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as writer, SqliteEventStore(path, readonly=True) as reader:
        assert reader.read_all() == []
        writer.append("a", new_events(2), NO_STREAM)
        assert reader.read_all() == writer.read_all()
        assert reader.stream_version("a") == 1
        writer.append_batch([AppendRequest("a", new_events(1), 1)])
        assert versions(reader.read_stream("a")) == [0, 1, 2]
        with pytest.raises(StoreError, match="read-only"):
            reader.append("a", new_events(1), 2)
    # And after the writer has gone.
    with SqliteEventStore(path, readonly=True) as reader:
        assert reader.stream_version("a") == 2


def test_sqlite_readonly_on_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no event store"):
        SqliteEventStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_sqlite_stale_second_writer_gets_concurrency_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as first, SqliteEventStore(path) as second:
        first.append("a", new_events(1), NO_STREAM)
        seen = second.stream_version("a")
        first.append("a", new_events(1), 0)
        with pytest.raises(ConcurrencyError):
            second.append("a", new_events(1), seen)
        assert second.stream_version("a") == 1


def test_sqlite_unique_key_is_the_last_word_on_versions(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with SqliteEventStore(path) as writer:
        writer.append("a", new_events(2), NO_STREAM)
        # Make the streams table lie, as a writer going around the store could: the
        # (stream, version) key must still refuse the colliding rows.
        with closing(sqlite3.connect(path, isolation_level=None)) as raw:
            raw.execute("UPDATE streams SET version = 0 WHERE stream = 'a'")
        with pytest.raises(ConcurrencyError) as caught:
            writer.append("a", new_events(2), 0)
        assert caught.value.actual == 1
        results = writer.append_batch(
            [AppendRequest("a", new_events(2), 0), AppendRequest("b", new_events(1), NO_STREAM)]
        )
        assert isinstance(results[0], ConcurrencyError)
        assert results[1] == 0
        assert versions(writer.read_stream("a")) == [0, 1]


# The schema of a SQLite file written before streams could be closed, and before checkpoints,
# leases, owners and snapshots (the first release's).
_OLD_SQLITE_SCHEMA = (
    """
    CREATE TABLE events (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        stream TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        payload BLOB NOT NULL,
        recorded_at REAL NOT NULL,
        UNIQUE (stream, version)
    )
    """,
    """
    CREATE TABLE streams (
        stream TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        last_type TEXT NOT NULL
    ) WITHOUT ROWID
    """,
)


def test_sqlite_file_from_before_closed_streams(tmp_path: Path) -> None:
    """An old file: read-only, every stream counts as open and no snapshot exists; its first
    writer adds the column (every stream open) and the index, after which closing works."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute("PRAGMA journal_mode = WAL")
        for statement in _OLD_SQLITE_SCHEMA:
            raw.execute(statement)
        for n, stream in enumerate(("order-1", "order-2", "stock-a")):
            raw.execute(
                "INSERT INTO events (stream, version, event_id, type, payload, recorded_at)"
                " VALUES (?, 0, ?, 'OrderPlaced', x'', 0)",
                (stream, f"e{n}"),
            )
            raw.execute("INSERT INTO streams VALUES (?, 0, 'OrderPlaced')", (stream,))
    with SqliteEventStore(path, readonly=True) as reader:
        assert open_names(reader, "order-") == ["order-1", "order-2"]
        assert open_names(reader, "order-", owner="a") == []
        assert reader.load_snapshot("inventory") is None
    with SqliteEventStore(path) as writer:
        assert writer.open_heads("order-") == [
            StreamHead("order-1", 0, "OrderPlaced"),
            StreamHead("order-2", 0, "OrderPlaced"),
        ]
        writer.close_streams(["order-1"])
        assert writer.append_batch([closing_append("order-2", 0)]) == [1]
        assert open_names(writer) == ["stock-a"]
        writer.save_snapshot("inventory", b"state")
    with SqliteEventStore(path) as again, SqliteEventStore(path, readonly=True) as reader:
        assert open_names(again) == open_names(reader) == ["stock-a"]
        assert reader.load_snapshot("inventory") == b"state"


def test_sqlite_open_heads_reads_only_the_open_streams(tmp_path: Path) -> None:
    """20,000 closed streams and 3 open: the query walks the partial index of open streams
    (its plan names ``streams_open``), with or without an owner, on the writer and a reader."""
    path = tmp_path / "events.db"
    closed = [
        AppendRequest(f"order-{n:05d}", new_events(1), NO_STREAM, owner="a", closes=True)
        for n in range(20_000)
    ]
    still_open = [
        AppendRequest(f"order-x{n}", new_events(1), NO_STREAM, owner="a") for n in range(3)
    ]
    with SqliteEventStore(path, synchronous="NORMAL") as writer:
        writer.append_batch([*closed, *still_open])
    with SqliteEventStore(path) as writer, SqliteEventStore(path, readonly=True) as reader:
        for backend in (writer, reader):
            assert backend._conn is not None
            conn = backend._conn
            for owner in (None, "a"):
                queries: list[str] = []
                conn.set_trace_callback(queries.append)
                assert open_names(backend, "order-", owner) == ["order-x0", "order-x1", "order-x2"]
                conn.set_trace_callback(None)
                (query,) = [q for q in queries if q.startswith("SELECT s.stream")]
                plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query))
                assert "USING INDEX streams_open" in plan, plan
                assert "stream_owners_node" not in plan, plan


def test_refused_request_in_a_group_commit_leaves_no_gap_in_positions(store: EventStore) -> None:
    """A request refused half-way through its insert (its second id is taken) is rolled back
    entirely: the positions after it are those the store gives had it never been sent."""
    taken = new_events(1)
    store.append("a", taken, NO_STREAM)
    results = store.append_batch(
        [
            AppendRequest("b", (*new_events(2), *taken), NO_STREAM),
            AppendRequest("c", new_events(2), NO_STREAM),
        ]
    )
    assert isinstance(results[0], DuplicateEventError)
    assert results[1] == 1
    assert store.stream_version("b") == NO_STREAM
    everything = store.read_all()
    assert [(e.stream, e.version) for e in everything] == [("a", 0), ("c", 0), ("c", 1)]
    first = everything[0].position
    assert [e.position for e in everything] == [first, first + 1, first + 2]
    store.append("d", new_events(1), NO_STREAM)
    assert store.read_all(everything[-1].position)[0].position == first + 3


def test_many_repeated_ids_are_refused_quickly(store: EventStore) -> None:
    events = new_events(10_000)
    started = time.perf_counter()
    with pytest.raises(DuplicateEventError) as caught:
        store.append("a", (*events, events[17], events[4]), NO_STREAM)
    assert time.perf_counter() - started < 0.5  # was 2 s: ids.count per id
    assert caught.value.event_ids == tuple(sorted((events[17].event_id, events[4].event_id)))
    assert store.read_all() == []


# --- open_store ------------------------------------------------------------------------------


def test_open_store_chooses_the_backend_by_url(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with open_store(f"sqlite:///{path}") as writer:
        assert isinstance(writer, SqliteEventStore)
        writer.append("a", new_events(1), NO_STREAM)
    with open_store(str(path), readonly=True) as reader:  # a bare path is a SQLite file
        assert reader.stream_version("a") == 0
    assert store_url_of(str(path)) == f"sqlite:///{path}"
    assert store_url_of("memory:x") == "memory:x"
    with pytest.raises(StoreError, match="unknown event store URL"):
        open_store("mysql://localhost/orders")


def test_memory_store_is_shared_by_name_until_the_last_close() -> None:
    name = f"memory:{uuid.uuid4().hex}"
    first, second = open_store(name), open_store(name, readonly=True)
    other = open_store(f"memory:{uuid.uuid4().hex}")
    first.append("a", new_events(2), NO_STREAM)
    assert second.stream_version("a") == 1
    assert other.stream_version("a") == NO_STREAM
    with pytest.raises(StoreError, match="read-only"):
        second.append("b", new_events(1), NO_STREAM)
    first.close()
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.read_all()
    assert len(second.read_all()) == 2  # still open through the other handle
    second.close()
    other.close()
    with open_store(name) as again:  # the last close dropped it: nothing is durable
        assert again.read_all() == []


def test_memory_store_refuses_another_process() -> None:
    """A forked process (a process base's actor) inherits the registry: it must not use its
    private copy of the store as if it were shared."""
    name = f"memory:{uuid.uuid4().hex}"
    with open_store(name) as parent:
        parent.append("a", new_events(1), NO_STREAM)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            message = pool.apply(_open_in_child, (name,))
    assert "lives in process" in message


def _open_in_child(name: str) -> str:
    try:
        open_store(name)
    except StoreError as e:
        return str(e)
    return "opened"


# --- PostgreSQL only -------------------------------------------------------------------------


def test_postgres_schema_is_created_versioned_and_never_downgraded(pg_server: PgServer) -> None:
    url = pg_server.create_schema()
    with pytest.raises(StoreError, match="start the writer first"):
        open_store(url, readonly=True)
    with open_store(url) as writer:
        writer.append("a", new_events(2), NO_STREAM)
    with open_store(url) as again, psycopg.connect(url) as conn:  # a second start: no-op
        assert again.stream_version("a") == 1
        rows = conn.execute("SELECT version, description FROM schema_version").fetchall()
        assert [v for v, _ in rows] == [m[0] for m in postgres.MIGRATIONS]
        conn.execute("INSERT INTO schema_version (version, description) VALUES (999, 'future')")
        conn.commit()
    with pytest.raises(StoreError, match="newer than this code"):
        open_store(url)


def test_postgres_schema_from_before_closed_streams(pg_server: PgServer) -> None:
    """Migration 4 adds ``closed`` with every existing stream open, the partial index that
    ``open_heads`` walks, and the snapshots."""
    url = pg_server.create_schema()
    with psycopg.connect(url, autocommit=True) as conn:
        postgres.migrate(conn, upto=3)
        conn.execute("INSERT INTO streams VALUES ('order-1', 0, 'OrderPlaced')")
        conn.execute("INSERT INTO stream_owners VALUES ('order-1', 'a')")
    with open_store(url) as writer, psycopg.connect(url, autocommit=True) as conn:
        assert writer.open_heads("order-", owner="a") == [StreamHead("order-1", 0, "OrderPlaced")]
        writer.close_streams(["order-1"])
        assert writer.open_heads("order-") == []
        writer.save_snapshot("inventory", b"state")
        assert writer.load_snapshot("inventory") == b"state"
        conn.execute("SET enable_seqscan = off")  # a tiny table: make the planner choose
        plan = conn.execute(
            "EXPLAIN SELECT s.stream FROM streams s WHERE s.stream >= 'order-'"
            " AND s.stream < 'order.' AND NOT s.closed ORDER BY s.stream"
        ).fetchall()
        assert "streams_open" in " ".join(row[0] for row in plan)


def test_postgres_readonly_store_reads_and_refuses_writes(pg_server: PgServer) -> None:
    url = pg_server.create_schema()
    with open_store(url) as writer, open_store(url, readonly=True) as reader:
        writer.append("a", new_events(2), NO_STREAM)
        assert reader.read_all() == writer.read_all()
        with pytest.raises(StoreError, match="read-only"):
            reader.append("a", new_events(1), 1)
        assert reader.stream_heads("") == [StreamHead("a", 1, "Happened")]


def test_postgres_stale_second_node_gets_concurrency_error(pg_server: PgServer) -> None:
    url = pg_server.create_schema()
    with open_store(url) as first, open_store(url) as second:
        first.append("a", new_events(1), NO_STREAM)
        seen = second.stream_version("a")
        first.append("a", new_events(1), 0)
        with pytest.raises(ConcurrencyError):
            second.append("a", new_events(1), seen)
        positions = [e.position for e in second.read_all()]
        assert positions == list(range(1, 3))  # the refused append took no position


def test_postgres_unreachable_server_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        open_store(
            f"postgresql://nobody@/x?host={tmp_path}&port=1",
            postgres=PostgresOptions(connect_timeout=1.0),
        )
