"""The PostgreSQL event store: one database shared by the nodes of a deployment.

**Schema.** Created on first start and upgraded by later versions of this code, never by hand:
``schema_version`` records every migration applied; on start the store takes an advisory lock
(so two nodes starting together do not both migrate), applies the migrations the database has
not seen, in order, in one transaction, and refuses a database made by a newer version.

**Positions and ``read_all`` never skipping.** With a sequence, positions are handed out in
insert order but become visible in commit order: a reader at position 12 can miss an 11 that
commits a moment later, and never look back. This store does what the ``eventsourcing``
library does (serialise the writers) rather than Marten's high-water mark (readers hold back
behind gaps until they are filled or time out): every write transaction first locks the one
row of ``event_position`` (``SELECT ... FOR UPDATE``), then decides, inserts and advances the
counter, and commits. Two writers never overlap, so commit order is position order; positions
are also gapless, because a refused request never takes one (it is refused before any row is
written: see ``BatchPlanner``). Readers take no lock. A writer holds the lock for the few
statements of its group commit (two round trips, pipelined) plus its commit: the measured
figures are in docs/performance.md and tests/test_store_contract.py proves the no-skip rule
with concurrent writers on separate pools.

**Live delivery.** Every commit sends ``NOTIFY orders_events`` with its last position; a
subscriber ``LISTEN``s on a connection of its own and polls only as a fallback (every
``poll_interval`` seconds, and while its listening connection is being re-established).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from store.interface import AppendPart, BatchPlanner, EventStore, as_requests
from store.records import (
    AppendRequest,
    MultiAppend,
    NewEvent,
    StoredEvent,
    StoreError,
    StreamHead,
)
from store.sqlite import prefix_successor

CHANNEL = "orders_events"
_LOCK_ID = 0x6F72646572735F31  # pg_advisory_xact_lock key of the migrations ("orders_1")

# (version, what it does, statements). Append only: a released migration is never edited.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "events, stream heads and the position counter",
        (
            """
            CREATE TABLE events (
                position bigint PRIMARY KEY,
                stream text COLLATE "C" NOT NULL,
                version integer NOT NULL,
                event_id text NOT NULL,
                type text NOT NULL,
                payload bytea NOT NULL,
                recorded_at double precision NOT NULL,
                CONSTRAINT events_stream_version UNIQUE (stream, version),
                CONSTRAINT events_event_id UNIQUE (event_id)
            )
            """,
            """
            CREATE TABLE streams (
                stream text COLLATE "C" PRIMARY KEY,
                version integer NOT NULL,
                last_type text NOT NULL
            )
            """,
            """
            CREATE TABLE event_position (
                only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                last bigint NOT NULL
            )
            """,
            "INSERT INTO event_position (only_row, last) VALUES (true, 0)",
        ),
    ),
    (
        2,
        "subscribers' checkpoints",
        (
            """
            CREATE TABLE checkpoints (
                subscriber text PRIMARY KEY,
                position bigint NOT NULL,
                saved_at timestamptz NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COLUMNS = "stream, version, position, event_id, type, payload, recorded_at"


def migrate(conn: psycopg.Connection[Any], upto: int = SCHEMA_VERSION) -> int:
    """Bring the schema to version ``upto`` (default: the newest) in one transaction; returns
    the version the database had before. ``conn`` must be in autocommit mode."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_version (
                version integer PRIMARY KEY,
                description text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = 0 if row is None or row[0] is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"the event store's schema is at version {found}, newer than this code's "
                f"{SCHEMA_VERSION}: run the newer version (schemas are never downgraded)"
            )
        for version, description, statements in MIGRATIONS:
            if found < version <= upto:
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                    (version, description),
                )
    return found


class PostgresEventStore(EventStore):
    """An ``EventStore`` in a PostgreSQL database (see the module docstring).

    Thread-safe: every call takes a connection from a pool of ``pool_size``. A ``readonly``
    store neither migrates nor writes (its sessions are read-only) and needs the schema its
    writer made; a writer creates or upgrades it on open.
    """

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        pool_size: int = 4,
        connect_timeout: float = 30.0,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        synchronous: str | None = None,
    ) -> None:
        del synchronous  # SQLite's knob; PostgreSQL's durability is the server's setting
        self._url = url
        self._readonly = readonly
        self._clock = clock
        self._poll_interval = poll_interval
        self._closed = False
        self._listen_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.read_only = readonly

        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(pool_size, 1),
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name="orders-store",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            self._pool.close()
            raise StoreError(f"cannot connect to the event store {safe_url(url)}: {e}") from e
        try:
            with self._connection() as conn:
                if readonly:
                    found = _schema_version(conn)
                    if found == 0:
                        raise StoreError(
                            f"{safe_url(url)} has no event store yet: a read-only store opens "
                            "the schema its writer created; start the writer first"
                        )
                else:
                    migrate(conn)
        except BaseException:
            self._pool.close()
            raise

    # --- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection, with driver errors translated at this boundary."""
        if self._closed:
            raise StoreError("the event store is closed")
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as e:
            raise StoreError(f"event store {safe_url(self._url)}: {e}") from e
        except PoolTimeout as e:
            raise StoreError(f"event store {safe_url(self._url)}: no connection: {e}") from e

    # --- writing ------------------------------------------------------------------------------

    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """See ``EventStore.append``."""
        (result,) = self._commit([AppendRequest(stream, tuple(events), expected_version)])
        if isinstance(result, StoreError):
            raise result
        assert isinstance(result, int)
        return result

    def append_many(self, parts: Sequence[AppendPart]) -> list[int]:
        """See ``EventStore.append_many``."""
        (result,) = self._commit([MultiAppend(as_requests(parts))])
        if isinstance(result, StoreError):
            raise result
        assert isinstance(result, list)
        return result

    def append_batch(
        self, requests: Sequence[AppendRequest | MultiAppend]
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``: one transaction under the position lock."""
        return self._commit(requests)

    def _commit(
        self, requests: Sequence[AppendRequest | MultiAppend]
    ) -> list[int | list[int] | StoreError]:
        if self._readonly:
            raise StoreError(f"event store {safe_url(self._url)} is open read-only")
        if not requests:
            return []
        ids: list[str] = []
        streams: set[str] = set()
        for request in requests:
            for part in request.parts if isinstance(request, MultiAppend) else (request,):
                streams.add(part.stream)
                ids.extend(e.event_id for e in part.events)
        with self._connection() as conn, conn.transaction():
            # The lock first: once it is ours, no other writer is between its reads and its
            # commit, so what we read below stays true until we commit.
            with conn.pipeline():
                lock = conn.execute("SELECT last FROM event_position FOR UPDATE")
                heads_cur = conn.execute(
                    "SELECT stream, version, last_type FROM streams WHERE stream = ANY(%s)",
                    (sorted(streams),),
                )
                ids_cur = conn.execute(
                    "SELECT event_id, stream, version FROM events WHERE event_id = ANY(%s)",
                    (ids,),
                )
            row = lock.fetchone()
            assert row is not None
            last = int(row[0])
            heads = {s: (int(v), t) for s, v, t in heads_cur.fetchall()}
            stored = {i: (s, int(v)) for i, s, v in ids_cur.fetchall()}
            planner = BatchPlanner(heads.get, stored.get)
            results: list[int | list[int] | StoreError] = []
            for request in requests:
                try:
                    results.append(planner.plan(request))
                except StoreError as e:
                    results.append(e)
            if planner.rows:
                self._write(conn, planner, last)
        return results

    def _write(self, conn: psycopg.Connection[Any], planner: BatchPlanner, last: int) -> None:
        now = self._clock()
        rows = planner.rows
        positions = list(range(last + 1, last + 1 + len(rows)))
        heads = sorted(planner.heads.items())
        with conn.pipeline():
            conn.execute(
                "INSERT INTO events (position, stream, version, event_id, type, payload,"
                " recorded_at) SELECT p, s, v, i, t, b, %s FROM unnest(%s::bigint[],"
                " %s::text[], %s::integer[], %s::text[], %s::text[], %s::bytea[])"
                " AS u(p, s, v, i, t, b)",
                (
                    now,
                    positions,
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2].event_id for r in rows],
                    [r[2].type for r in rows],
                    [bytes(r[2].payload) for r in rows],
                ),
            )
            conn.execute(
                "INSERT INTO streams (stream, version, last_type)"
                " SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[])"
                " ON CONFLICT (stream) DO UPDATE SET version = excluded.version,"
                " last_type = excluded.last_type",
                ([s for s, _ in heads], [h[0] for _, h in heads], [h[1] for _, h in heads]),
            )
            conn.execute("UPDATE event_position SET last = %s", (positions[-1],))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(positions[-1])))

    # --- reading ------------------------------------------------------------------------------

    def read_stream(
        self, stream: str, from_version: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """See ``EventStore.read_stream``."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE stream = %s AND version >= %s"
                " ORDER BY version LIMIT %s",
                (stream, from_version, None if limit is None else max(limit, 0)),
            ).fetchall()
        return [StoredEvent(*row) for row in rows]

    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """See ``EventStore.read_all``."""
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM events WHERE position > %s ORDER BY position LIMIT %s",
                (from_position, max(limit, 0)),
            ).fetchall()
        return [StoredEvent(*row) for row in rows]

    def stream_version(self, stream: str) -> int:
        """See ``EventStore.stream_version``."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT version FROM streams WHERE stream = %s", (stream,)
            ).fetchone()
        return -1 if row is None else int(row[0])

    def stream_heads(self, prefix: str) -> list[StreamHead]:
        """See ``EventStore.stream_heads``: a range scan of the streams' primary key (the
        column's "C" collation orders by code point, like Python)."""
        upper = prefix_successor(prefix)
        query = "SELECT stream, version, last_type FROM streams WHERE stream >= %s"
        params: tuple[str, ...] = (prefix,)
        if upper is not None:
            query += " AND stream < %s"
            params = (prefix, upper)
        with self._connection() as conn:
            rows = conn.execute(query + " ORDER BY stream", params).fetchall()
        return [StreamHead(s, int(v), t) for s, v, t in rows if s.startswith(prefix)]

    # --- subscriptions ------------------------------------------------------------------------

    def wait_for_commit(self, after_position: int, timeout: float) -> bool:
        """See ``EventStore.wait_for_commit``: wakes on the commit's NOTIFY; polls the position
        counter every ``poll_interval`` seconds only in case a notification went missing, and
        every 50 ms while it has no listening connection (it reconnects on each round)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._listen_lock:
            while True:
                listener = self._listening()  # LISTEN before looking: nothing slips between
                if self._last_position() > after_position:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if listener is None:
                    time.sleep(min(left, 0.05))
                    continue
                try:
                    for note in listener.notifies(timeout=min(left, self._poll_interval)):
                        if _position_of(note.payload) > after_position:
                            return True
                except psycopg.Error:
                    self._drop_listener()

    def _listening(self) -> psycopg.Connection[Any] | None:
        if self._closed:
            raise StoreError("the event store is closed")
        if self._listener is not None and not self._listener.closed:
            return self._listener
        try:
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=5)
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error:
            return None
        self._listener = conn
        return conn

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

    def _last_position(self) -> int:
        with self._connection() as conn:
            row = conn.execute("SELECT last FROM event_position").fetchone()
        return 0 if row is None else int(row[0])

    def load_checkpoint(self, subscriber: str) -> int:
        """See ``EventStore.load_checkpoint``."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT position FROM checkpoints WHERE subscriber = %s", (subscriber,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def save_checkpoint(self, subscriber: str, position: int) -> None:
        """See ``EventStore.save_checkpoint``."""
        if self._readonly:
            raise StoreError(f"event store {safe_url(self._url)} is open read-only")
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO checkpoints (subscriber, position) VALUES (%s, %s)"
                " ON CONFLICT (subscriber) DO UPDATE SET position = excluded.position,"
                " saved_at = now()",
                (subscriber, position),
            )

    def close(self) -> None:
        """See ``EventStore.close``."""
        if self._closed:
            return
        self._closed = True
        with self._listen_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._pool.close()


def _position_of(payload: str) -> int:
    try:
        return int(payload)
    except ValueError:
        return 0


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    found = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return 0 if found is None or found[0] is None else int(found[0])


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"
