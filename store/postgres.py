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

**Nodes.** ``leases`` holds one row per node id, renewed by its holder and compared with the
server's clock (``clock_timestamp()``); ``epoch`` grows on every acquisition and takeover.
``stream_owners`` says which node drives which order, written in the transaction of the
stream's first events. A fenced batch reads its node's lease row ``FOR SHARE`` under the
position lock: a takeover's ``UPDATE`` of that row waits for the batch to commit, so every event
a node wrote precedes the takeover of its orders, and a batch of a node whose lease expired or
was taken over is refused whole. ``events.writer``/``writer_epoch`` say who wrote each event
(operators and the tests check a fenced node wrote nothing after losing its lease).

**Open streams and snapshots.** ``streams.closed`` says whether a stream's last append closed
it (``AppendRequest.closes``), written with the head; the partial index ``streams_open`` holds
only the open streams, so ``open_heads`` at start-up costs what the open streams cost, not what
history does. Migration 4 adds the column with every existing stream open. ``snapshots`` keeps
named blobs (checkpointed projections), each saved in its own transaction.

**Live delivery.** Every commit sends ``NOTIFY orders_events`` with its last position; a
subscriber ``LISTEN``s on a connection of its own and polls only as a fallback (every
``poll_interval`` seconds, and while its listening connection is being re-established).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from store.interface import AppendPart, BatchPlanner, EventStore, as_requests, lease_lost
from store.records import (
    AppendRequest,
    Fence,
    LeaseHeldError,
    MultiAppend,
    NewEvent,
    NodeLease,
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
MIGRATIONS += (
    (
        3,
        "node leases, stream owners, each event's writer",
        (
            """
            CREATE TABLE leases (
                node_id text PRIMARY KEY,
                address text NOT NULL,
                epoch bigint NOT NULL,
                expires_at timestamptz NOT NULL,
                renewed_at timestamptz NOT NULL,
                taken_by text,
                taken_at timestamptz
            )
            """,
            """
            CREATE TABLE stream_owners (
                stream text COLLATE "C" PRIMARY KEY,
                node_id text NOT NULL
            )
            """,
            "CREATE INDEX stream_owners_node ON stream_owners (node_id, stream)",
            "ALTER TABLE events ADD COLUMN writer text, ADD COLUMN writer_epoch bigint",
        ),
    ),
)
MIGRATIONS += (
    (
        4,
        "open streams (a partial index) and snapshots",
        (
            # Every stream of an existing database counts as open: recovery looks at each once
            # and closes the finished ones (EventStore.close_streams).
            "ALTER TABLE streams ADD COLUMN IF NOT EXISTS closed boolean NOT NULL DEFAULT false",
            "CREATE INDEX IF NOT EXISTS streams_open ON streams (stream) WHERE NOT closed",
            """
            CREATE TABLE snapshots (
                name text PRIMARY KEY,
                data bytea NOT NULL,
                saved_at timestamptz NOT NULL DEFAULT now()
            )
            """,
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

# The fence of a write: the node holds its lease at this epoch, unexpired, not taken over.
_HOLDS = (
    "SELECT 1 FROM leases WHERE node_id = %s AND epoch = %s AND taken_by IS NULL"
    " AND expires_at > clock_timestamp()"
)
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


@dataclass(frozen=True)
class PostgresOptions:
    """How a PostgreSQL store uses its server: ``pool_size`` connections at most,
    ``connect_timeout`` seconds to get the first one on open, and a subscriber's fallback poll
    every ``poll_interval`` seconds (module docstring, live delivery)."""

    pool_size: int = 4
    connect_timeout: float = 30.0
    poll_interval: float = 1.0


class PostgresEventStore(EventStore):
    """An ``EventStore`` in a PostgreSQL database (see the module docstring).

    Thread-safe: every call takes a connection from a pool of ``postgres.pool_size``. A
    ``readonly`` store neither migrates nor writes (its sessions are read-only) and needs the
    schema its writer made; a writer creates or upgrades it on open.
    """

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        postgres: PostgresOptions = PostgresOptions(),
        clock: Callable[[], float] = time.time,
        synchronous: str | None = None,
    ) -> None:
        del synchronous  # SQLite's knob; PostgreSQL's durability is the server's setting
        self._url = url
        self._readonly = readonly
        self._clock = clock
        self._poll_interval = postgres.poll_interval
        self._closed = False
        self._listen_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None

        def configure(conn: psycopg.Connection[Any]) -> None:
            conn.read_only = readonly
            # Plan every statement for its parameters. psycopg prepares a statement run five
            # times, and after five more PostgreSQL caches a generic plan: made while the
            # events table was small, the one for `event_id = ANY(...)` (every commit's
            # idempotency check) scanned the whole table until an autoanalyze replanned it,
            # 186 ms a commit at 38,000 events against 0.5 ms with the index.
            conn.execute("SET plan_cache_mode = force_custom_plan")

        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(postgres.pool_size, 1),
            kwargs={"autocommit": True},
            configure=configure,
            open=False,
            name="orders-store",
        )
        try:
            self._pool.open(wait=True, timeout=postgres.connect_timeout)
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
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``: one transaction under the position lock."""
        return self._commit(requests, fence)

    def _commit(
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
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
                owners_cur = conn.execute(
                    "SELECT stream, node_id FROM stream_owners WHERE stream = ANY(%s)",
                    (sorted(streams),),
                )
                lease_cur = None
                if fence is not None:
                    lease_cur = conn.execute(_HOLDS + " FOR SHARE", (fence.node_id, fence.epoch))
            row = lock.fetchone()
            assert row is not None
            last = int(row[0])
            if fence is not None and (lease_cur is None or lease_cur.fetchone() is None):
                raise lease_lost(fence)
            heads = {s: (int(v), t) for s, v, t in heads_cur.fetchall()}
            stored = {i: (s, int(v)) for i, s, v in ids_cur.fetchall()}
            owners = dict(owners_cur.fetchall())
            planner = BatchPlanner(heads.get, stored.get, owners.get, fence)
            results: list[int | list[int] | StoreError] = []
            for request in requests:
                try:
                    results.append(planner.plan(request))
                except StoreError as e:
                    results.append(e)
            if planner.rows:
                self._write(conn, planner, last, fence)
        return results

    def _write(
        self,
        conn: psycopg.Connection[Any],
        planner: BatchPlanner,
        last: int,
        fence: Fence | None,
    ) -> None:
        now = self._clock()
        rows = planner.rows
        positions = list(range(last + 1, last + 1 + len(rows)))
        heads = sorted(planner.heads.items())
        closes = [planner.closes[s] for s, _ in heads]
        owners = sorted(planner.owners.items())
        with conn.pipeline():
            conn.execute(
                "INSERT INTO events (position, stream, version, event_id, type, payload,"
                " recorded_at, writer, writer_epoch) SELECT p, s, v, i, t, b, %s, %s, %s"
                " FROM unnest(%s::bigint[], %s::text[], %s::integer[], %s::text[], %s::text[],"
                " %s::bytea[]) AS u(p, s, v, i, t, b)",
                (
                    now,
                    None if fence is None else fence.node_id,
                    None if fence is None else fence.epoch,
                    positions,
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2].event_id for r in rows],
                    [r[2].type for r in rows],
                    [bytes(r[2].payload) for r in rows],
                ),
            )
            conn.execute(
                "INSERT INTO streams (stream, version, last_type, closed)"
                " SELECT * FROM unnest(%s::text[], %s::integer[], %s::text[], %s::boolean[])"
                " ON CONFLICT (stream) DO UPDATE SET version = excluded.version,"
                " last_type = excluded.last_type, closed = excluded.closed",
                (
                    [s for s, _ in heads],
                    [h[0] for _, h in heads],
                    [h[1] for _, h in heads],
                    closes,
                ),
            )
            if owners:
                conn.execute(
                    "INSERT INTO stream_owners (stream, node_id)"
                    " SELECT * FROM unnest(%s::text[], %s::text[]) ON CONFLICT DO NOTHING",
                    ([s for s, _ in owners], [o for _, o in owners]),
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

    def last_position(self) -> int:
        """See ``EventStore.last_position``: the primary key's last entry (``event_position``
        also counts positions of batches that were rolled back)."""
        with self._connection() as conn:
            row = conn.execute("SELECT MAX(position) FROM events").fetchone()
        return int(row[0] or 0) if row is not None else 0

    def count_streams(self, prefix: str) -> int:
        """See ``EventStore.count_streams``."""
        upper = prefix_successor(prefix)
        with self._connection() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM streams WHERE stream >= %s AND (%s::text IS NULL"
                " OR stream < %s)",
                (prefix, upper, upper),
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def open_heads(self, prefix: str, owner: str | None = None) -> list[StreamHead]:
        """See ``EventStore.open_heads``: a range scan of the partial index ``streams_open``
        (``NOT closed`` in the query is what lets the planner use it), joined to each open
        stream's owner when ``owner`` is given."""
        upper = prefix_successor(prefix)
        query = (
            "SELECT s.stream, s.version, s.last_type FROM streams s"
            " WHERE s.stream >= %s AND (%s::text IS NULL OR s.stream < %s) AND NOT s.closed"
        )
        params: tuple[str | None, ...] = (prefix, upper, upper)
        if owner is not None:
            query += (
                " AND EXISTS (SELECT 1 FROM stream_owners o WHERE o.stream = s.stream"
                " AND o.node_id = %s)"
            )
            params = (*params, owner)
        with self._connection() as conn:
            rows = conn.execute(query + " ORDER BY s.stream", params).fetchall()
        return [StreamHead(s, int(v), t) for s, v, t in rows if s.startswith(prefix)]

    def closed_among(self, streams: Sequence[str]) -> set[str]:
        """See ``EventStore.closed_among``."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT stream FROM streams WHERE stream = ANY(%s) AND closed", (list(streams),)
            ).fetchall()
        return {stream for (stream,) in rows}

    def close_streams(self, streams: Sequence[str]) -> None:
        """See ``EventStore.close_streams``: under the position lock, so it takes the rows'
        locks in no order that could deadlock with a group commit's upsert of them."""
        self._writable()
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT last FROM event_position FOR UPDATE")
            conn.execute(
                "UPDATE streams SET closed = true WHERE stream = ANY(%s) AND NOT closed",
                (list(streams),),
            )

    def save_snapshot(self, name: str, data: bytes) -> None:
        """See ``EventStore.save_snapshot``."""
        self._writable()
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO snapshots (name, data) VALUES (%s, %s) ON CONFLICT (name)"
                " DO UPDATE SET data = excluded.data, saved_at = now()",
                (name, bytes(data)),
            )

    def load_snapshot(self, name: str) -> bytes | None:
        """See ``EventStore.load_snapshot``."""
        with self._connection() as conn:
            row = conn.execute("SELECT data FROM snapshots WHERE name = %s", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    # --- nodes: leases and ownership ----------------------------------------------------------

    def _writable(self) -> None:
        if self._readonly:
            raise StoreError(f"event store {safe_url(self._url)} is open read-only")

    def acquire_lease(self, node_id: str, address: str, ttl: float) -> int:
        """See ``EventStore.acquire_lease``: one statement, so two processes starting with one
        id cannot both get it."""
        self._writable()
        with self._connection() as conn:
            row = conn.execute(
                "INSERT INTO leases (node_id, address, epoch, expires_at, renewed_at)"
                " VALUES (%(node)s, %(address)s, 1,"
                " clock_timestamp() + make_interval(secs => %(ttl)s), clock_timestamp())"
                " ON CONFLICT (node_id) DO UPDATE SET address = excluded.address,"
                " epoch = leases.epoch + 1, expires_at = excluded.expires_at,"
                " renewed_at = excluded.renewed_at, taken_by = NULL, taken_at = NULL"
                " WHERE leases.expires_at <= clock_timestamp() RETURNING epoch",
                {"node": node_id, "address": address, "ttl": ttl},
            ).fetchone()
            if row is not None:
                return int(row[0])
            held = conn.execute(
                "SELECT address, extract(epoch FROM expires_at - clock_timestamp())"
                " FROM leases WHERE node_id = %s",
                (node_id,),
            ).fetchone()
        address, left = held if held is not None else ("?", 0.0)
        raise LeaseHeldError(node_id, str(address), float(left))

    def renew_lease(self, fence: Fence, address: str, ttl: float) -> bool:
        """See ``EventStore.renew_lease``."""
        self._writable()
        with self._connection() as conn:
            row = conn.execute(
                "UPDATE leases SET address = %s,"
                " expires_at = clock_timestamp() + make_interval(secs => %s),"
                " renewed_at = clock_timestamp()"
                " WHERE node_id = %s AND epoch = %s AND taken_by IS NULL"
                " AND expires_at > clock_timestamp() RETURNING 1",
                (address, ttl, fence.node_id, fence.epoch),
            ).fetchone()
        return row is not None

    def release_lease(self, fence: Fence) -> None:
        """See ``EventStore.release_lease``."""
        self._writable()
        with self._connection() as conn:
            conn.execute(
                "UPDATE leases SET expires_at = clock_timestamp() WHERE node_id = %s"
                " AND epoch = %s AND taken_by IS NULL AND expires_at > clock_timestamp()",
                (fence.node_id, fence.epoch),
            )

    def take_over(
        self, fence: Fence, prefix: str, finished_types: Collection[str]
    ) -> dict[str, list[str]]:
        """See ``EventStore.take_over``: the claim is one ``UPDATE ... WHERE expires_at <=
        clock_timestamp() AND taken_by IS NULL``; a rival's claim of the same row waits for ours
        to commit, then finds ``taken_by`` set and claims nothing."""
        self._writable()
        moved: dict[str, list[str]] = {}
        with self._connection() as conn, conn.transaction():
            if conn.execute(_HOLDS + " FOR SHARE", (fence.node_id, fence.epoch)).fetchone() is None:
                raise lease_lost(fence)
            dead = conn.execute(
                "UPDATE leases SET epoch = epoch + 1, taken_by = %s, taken_at = clock_timestamp()"
                " WHERE node_id <> %s AND taken_by IS NULL AND expires_at <= clock_timestamp()"
                " RETURNING node_id",
                (fence.node_id, fence.node_id),
            ).fetchall()
            upper = prefix_successor(prefix)
            for (node_id,) in sorted(dead):
                rows = conn.execute(
                    "UPDATE stream_owners o SET node_id = %s FROM streams s"
                    " WHERE o.node_id = %s AND s.stream = o.stream AND o.stream >= %s"
                    " AND (%s::text IS NULL OR o.stream < %s) AND s.last_type <> ALL(%s)"
                    " RETURNING o.stream",
                    (fence.node_id, node_id, prefix, upper, upper, sorted(finished_types)),
                ).fetchall()
                moved[str(node_id)] = sorted(str(r[0]) for r in rows)
        return moved

    def adopt_unowned(self, owner: str, prefix: str, finished_types: Collection[str]) -> int:
        """See ``EventStore.adopt_unowned``."""
        self._writable()
        upper = prefix_successor(prefix)
        with self._connection() as conn:
            done = conn.execute(
                "INSERT INTO stream_owners (stream, node_id) SELECT s.stream, %s FROM streams s"
                " WHERE s.stream >= %s AND (%s::text IS NULL OR s.stream < %s)"
                " AND s.last_type <> ALL(%s) ON CONFLICT DO NOTHING",
                (owner, prefix, upper, upper, sorted(finished_types)),
            )
            return max(done.rowcount, 0)

    def owned_heads(self, owner: str, prefix: str) -> list[StreamHead]:
        """See ``EventStore.owned_heads``."""
        upper = prefix_successor(prefix)
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT s.stream, s.version, s.last_type FROM stream_owners o"
                " JOIN streams s ON s.stream = o.stream WHERE o.node_id = %s"
                " AND o.stream >= %s AND (%s::text IS NULL OR o.stream < %s) ORDER BY o.stream",
                (owner, prefix, upper, upper),
            ).fetchall()
        return [StreamHead(s, int(v), t) for s, v, t in rows if s.startswith(prefix)]

    def stream_owner(self, stream: str) -> str | None:
        """See ``EventStore.stream_owner``."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT node_id FROM stream_owners WHERE stream = %s", (stream,)
            ).fetchone()
        return None if row is None else str(row[0])

    def nodes(self, prefix: str, finished_types: Collection[str]) -> list[NodeLease]:
        """See ``EventStore.nodes``."""
        upper = prefix_successor(prefix)
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT l.node_id, l.address, l.epoch,"
                " extract(epoch FROM clock_timestamp() - l.renewed_at),"
                " extract(epoch FROM l.expires_at - clock_timestamp()), l.taken_by,"
                " count(o.stream), count(o.stream) FILTER (WHERE s.last_type <> ALL(%s))"
                " FROM leases l LEFT JOIN stream_owners o ON o.node_id = l.node_id"
                " AND o.stream >= %s AND (%s::text IS NULL OR o.stream < %s)"
                " LEFT JOIN streams s ON s.stream = o.stream"
                " GROUP BY l.node_id ORDER BY l.node_id",
                (sorted(finished_types), prefix, upper, upper),
            ).fetchall()
        return [
            NodeLease(n, a, int(e), float(age), float(left), t, int(o), int(f))
            for n, a, e, age, left, t, o, f in rows
        ]

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
