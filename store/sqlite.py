"""The SQLite event store: one file in WAL mode, one writer process, any number of readers.

Optimistic concurrency rests on the ``UNIQUE (stream, version)`` key (STYLE.md point 4): a
stale writer's insert collides with the row its rival wrote and becomes ``ConcurrencyError``.
A ``streams`` table, updated in the same transaction as the events, gives each stream's head
in one primary-key lookup: the version check of an append and ``stream_heads`` at start-up
never scan events. Its ``closed`` column says whether the stream's last append closed it
(``AppendRequest.closes``); the partial index ``streams_open`` holds only the open streams, so
``open_heads`` costs what the open streams cost, however many closed ones there are. A file
made before that column existed gets it when a writer opens it, with every stream open.
``snapshots`` keeps named blobs (checkpointed projections) apart from the events.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from store.interface import (
    AppendPart,
    EventStore,
    as_requests,
    check_expected,
    check_owner,
    lease_lost,
    replayed_version,
    validate_append,
)
from store.records import (
    NO_STREAM,
    AppendRequest,
    ConcurrencyError,
    DuplicateEventError,
    Fence,
    LeaseHeldError,
    MultiAppend,
    NewEvent,
    NodeLease,
    StoredEvent,
    StoreError,
    StreamHead,
)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS events (
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
    CREATE TABLE IF NOT EXISTS streams (
        stream TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        last_type TEXT NOT NULL,
        closed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS checkpoints (
        subscriber TEXT PRIMARY KEY,
        position INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Leases and owners: a SQLite file serves one node, but the store contract is the same on
    # every backend (times are unix seconds of this machine's clock).
    """
    CREATE TABLE IF NOT EXISTS leases (
        node_id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        renewed_at REAL NOT NULL,
        taken_by TEXT
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS stream_owners (
        stream TEXT PRIMARY KEY,
        node_id TEXT NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX IF NOT EXISTS stream_owners_node ON stream_owners (node_id, stream)",
    # A rowid table: WITHOUT ROWID suits small rows, and a snapshot may be megabytes.
    """
    CREATE TABLE IF NOT EXISTS snapshots (
        name TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        saved_at REAL NOT NULL
    )
    """,
)
# After _SCHEMA and the `closed` column (a file from before it gets the column first).
_OPEN_INDEX = "CREATE INDEX IF NOT EXISTS streams_open ON streams (stream) WHERE closed = 0"

_COLUMNS = "stream, version, position, event_id, type, payload, recorded_at"
_INSERT_EVENT = (
    "INSERT INTO events (stream, version, event_id, type, payload, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_STREAM = (
    "INSERT INTO streams (stream, version, last_type, closed) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (stream) DO UPDATE SET version = excluded.version,"
    " last_type = excluded.last_type, closed = excluded.closed"
)
_SELECT_OWNER = "SELECT node_id FROM stream_owners WHERE stream = ?"
_INSERT_OWNER = "INSERT OR IGNORE INTO stream_owners (stream, node_id) VALUES (?, ?)"
_UNFINISHED = (
    "SELECT s.stream FROM streams s WHERE s.stream >= ? AND s.stream < ?"
    " AND s.last_type NOT IN (SELECT value FROM json_each(?))"
)
_SYNCHRONOUS_MODES = frozenset({"FULL", "NORMAL", "EXTRA"})
# SQLite's default limit on bound parameters is 32766 since 3.32 but 999 before; stay below both.
_MAX_IDS_PER_QUERY = 500
_BUSY_TIMEOUT_S = 10.0
_POLL_S = 0.005  # wait_for_commit's polling period (SQLite cannot notify other connections)


class SqliteEventStore(EventStore):
    """An ``EventStore`` in one SQLite file.

    The writer (``readonly=False``) creates the schema and switches the file to WAL;
    ``synchronous="FULL"`` makes each commit durable on return, ``"NORMAL"`` trades the last
    commits before a power cut for speed. A ``readonly`` store opens an existing file with
    ``mode=ro`` and reads while the writer appends. One thread uses the object at a time (an
    internal lock makes overlapping calls wait rather than corrupt the connection's state).
    """

    def __init__(
        self,
        path: str | Path,
        synchronous: str = "FULL",
        readonly: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS_MODES:
            # PRAGMA values cannot be bound parameters, so only known words reach the SQL.
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS_MODES)}")
        self._path = Path(path)
        self._readonly = readonly
        self._clock = clock
        self._lock = threading.RLock()
        self._committed = threading.Condition()  # notified after each write commits
        self._conn: sqlite3.Connection | None = None
        conn = self._open_reader() if readonly else self._open_writer(synchronous.upper())
        self._conn = conn

    # --- opening ------------------------------------------------------------------------------

    def _open_writer(self, synchronous: str) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open event store {self._path}: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"event store {self._path}: cannot use WAL (journal mode {mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            if not _has_closed_column(conn):
                # A file from before `closed`: every stream counts as open (the safe side:
                # recovery looks at each once and closes the finished ones).
                conn.execute("ALTER TABLE streams ADD COLUMN closed INTEGER NOT NULL DEFAULT 0")
            conn.execute(_OPEN_INDEX)
            conn.execute("COMMIT")
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot prepare event store {self._path}: {e}") from e
            raise
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        if not self._path.is_file():
            raise StoreError(
                f"no event store at {self._path}: a read-only store opens the file its writer "
                "created; start the writer first"
            )
        uri = f"{self._path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open event store {self._path} read-only: {e}") from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name IN ('events', 'streams')"
                )
            }
            if tables != {"events", "streams"}:
                raise StoreError(f"{self._path} is not an event store (its tables are missing)")
        except BaseException as e:
            conn.close()
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot read event store {self._path}: {e}") from e
            raise
        return conn

    # --- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with driver errors translated at this boundary."""
        with self._lock:
            if self._conn is None:
                raise StoreError("the event store is closed")
            try:
                yield self._conn
            except sqlite3.Error as e:
                raise StoreError(f"event store {self._path}: {e}") from e

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT``: one fsync, rolled back on any error."""
        if self._readonly:
            raise StoreError(f"event store {self._path} is open read-only")
        with self._connection() as conn:
            # IMMEDIATE takes the write lock up front, so a busy database waits here (up to the
            # busy timeout) instead of failing half-way through the batch.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        with self._committed:
            self._committed.notify_all()

    # --- writing ------------------------------------------------------------------------------

    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """See ``EventStore.append``."""
        with self._write_transaction() as conn:
            request = AppendRequest(stream, tuple(events), expected_version)
            return self._append_in_transaction(conn, request, self._clock())

    def append_many(self, parts: Sequence[AppendPart]) -> list[int]:
        """See ``EventStore.append_many``."""
        requests = as_requests(parts)
        with self._write_transaction() as conn:
            return self._append_many_in_transaction(conn, requests, self._clock())

    def append_batch(
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``: one transaction, one savepoint per request."""
        results: list[int | list[int] | StoreError] = []
        if not requests:
            return results
        with self._write_transaction() as conn:
            now = self._clock()
            if fence is not None and not self._holds(conn, fence, now):
                raise lease_lost(fence)
            for request in requests:
                try:
                    if isinstance(request, MultiAppend):
                        results.append(
                            self._append_many_in_transaction(conn, request.parts, now, fence)
                        )
                    else:
                        results.append(self._append_in_transaction(conn, request, now, fence))
                except StoreError as e:
                    results.append(e)
        return results

    def _append_many_in_transaction(
        self,
        conn: sqlite3.Connection,
        parts: Sequence[AppendRequest],
        now: float,
        fence: Fence | None = None,
    ) -> list[int]:
        """Every part or none: the parts' own savepoints nest in this one."""
        conn.execute("SAVEPOINT many")
        try:
            versions = [self._append_in_transaction(conn, part, now, fence) for part in parts]
        except BaseException:
            conn.execute("ROLLBACK TO many")
            conn.execute("RELEASE many")
            raise
        conn.execute("RELEASE many")
        return versions

    def _append_in_transaction(
        self,
        conn: sqlite3.Connection,
        request: AppendRequest,
        now: float,
        fence: Fence | None = None,
    ) -> int:
        """One append inside the open transaction, under a savepoint: a refused append is
        rolled back to it and leaves no trace, not even a used AUTOINCREMENT value (so the
        positions of a group commit are those of its appends committed one by one)."""
        stream, events, expected_version = request.stream, request.events, request.expected_version
        owner = request.owner
        validate_append(stream, events, expected_version)
        current = self._head_version(conn, stream)
        if expected_version != current:
            # Only a stale writer can be re-sending an append that already committed (a
            # committed append moved the stream past its expected version): look for that
            # replay only here, keeping the common path to one lookup and one insert.
            found = self._find_event_ids(conn, [e.event_id for e in events])
            replayed = replayed_version(stream, events, found)
            if replayed is not None:
                return replayed
            check_expected(stream, expected_version, current)
        if not events:
            return current
        # Owners last, as in BatchPlanner: what is refused above writes nothing anyway. Only a
        # fenced writer (a node of several) can be refused by one; a lone node skips the read.
        if fence is not None:
            row = conn.execute(_SELECT_OWNER, (stream,)).fetchone()
            check_owner(stream, None if row is None else row[0], fence)
        conn.execute("SAVEPOINT append")
        try:
            conn.executemany(
                _INSERT_EVENT,
                [
                    (stream, current + 1 + i, e.event_id, e.type, bytes(e.payload), now)
                    for i, e in enumerate(events)
                ],
            )
            last = current + len(events)
            conn.execute(_UPSERT_STREAM, (stream, last, events[-1].type, int(request.closes)))
            if owner is not None:  # INSERT OR IGNORE: the first owner stays
                conn.execute(_INSERT_OWNER, (stream, owner))
        except sqlite3.IntegrityError as e:
            conn.execute("ROLLBACK TO append")
            conn.execute("RELEASE append")
            if "event_id" in str(e):
                # Ids already stored: maybe this very append, committed before (a replay).
                found = self._find_event_ids(conn, [ev.event_id for ev in events])
                replayed = replayed_version(stream, events, found)
                if replayed is not None:
                    return replayed
                raise DuplicateEventError(
                    stream, tuple(ev.event_id for ev in events), "event id already stored"
                ) from e
            # The unique keys are the final word: this only happens if the streams table lied
            # or someone wrote around this store.
            actual = conn.execute(
                "SELECT MAX(version) FROM events WHERE stream = ?", (stream,)
            ).fetchone()[0]
            raise ConcurrencyError(
                stream, expected_version, NO_STREAM if actual is None else actual
            ) from e
        except BaseException:
            conn.execute("ROLLBACK TO append")
            conn.execute("RELEASE append")
            raise
        conn.execute("RELEASE append")
        return last

    @staticmethod
    def _find_event_ids(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        for start in range(0, len(ids), _MAX_IDS_PER_QUERY):
            chunk = ids[start : start + _MAX_IDS_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            for event_id, stream, version in conn.execute(
                f"SELECT event_id, stream, version FROM events WHERE event_id IN ({marks})",
                chunk,
            ):
                found[event_id] = (stream, version)
        return found

    @staticmethod
    def _head_version(conn: sqlite3.Connection, stream: str) -> int:
        row = conn.execute("SELECT version FROM streams WHERE stream = ?", (stream,)).fetchone()
        return NO_STREAM if row is None else int(row[0])

    # --- reading ------------------------------------------------------------------------------

    def read_stream(
        self, stream: str, from_version: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """See ``EventStore.read_stream``."""
        with self._connection() as conn:
            return _stored(
                conn.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE stream = ? AND version >= ?"
                    " ORDER BY version LIMIT ?",
                    (stream, from_version, -1 if limit is None else max(limit, 0)),
                )
            )

    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """See ``EventStore.read_all``."""
        with self._connection() as conn:
            return _stored(
                conn.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?",
                    (from_position, max(limit, 0)),
                )
            )

    def stream_version(self, stream: str) -> int:
        """See ``EventStore.stream_version``."""
        with self._connection() as conn:
            return self._head_version(conn, stream)

    def stream_heads(self, prefix: str) -> list[StreamHead]:
        """See ``EventStore.stream_heads``: a range scan of the streams table's primary key."""
        where, params = _prefix_range("stream", prefix)
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT stream, version, last_type FROM streams WHERE {where} ORDER BY stream",
                params,
            ).fetchall()
        return [StreamHead(s, v, t) for s, v, t in rows if s.startswith(prefix)]

    def last_position(self) -> int:
        """See ``EventStore.last_position``: the rowid key's last entry."""
        with self._connection() as conn:
            row = conn.execute("SELECT MAX(position) FROM events").fetchone()
        return int(row[0] or 0)

    def count_streams(self, prefix: str) -> int:
        """See ``EventStore.count_streams``: a range count of the streams table's key."""
        where, params = _prefix_range("stream", prefix)
        with self._connection() as conn:
            row = conn.execute(f"SELECT COUNT(*) FROM streams WHERE {where}", params).fetchone()
        return int(row[0])

    def open_heads(self, prefix: str, owner: str | None = None) -> list[StreamHead]:
        """See ``EventStore.open_heads``: a range scan of the partial index ``streams_open``
        (the literal ``closed = 0`` is what lets SQLite use it), then each open stream's owner
        by primary key: CROSS JOIN keeps ``streams`` the outer loop, where the planner would
        otherwise walk every stream the node ever owned. A read-only store of a file from
        before ``closed`` existed counts every stream as open."""
        where, params = _prefix_range("s.stream", prefix)
        with self._connection() as conn:
            if _has_closed_column(conn):
                where += " AND s.closed = 0"
            if owner is not None:
                if not self._has_table(conn, "stream_owners"):
                    return []
                where += " AND o.node_id = ?"
                params = (*params, owner)
            rows = conn.execute(
                "SELECT s.stream, s.version, s.last_type FROM streams s"
                f"{'' if owner is None else ' CROSS JOIN stream_owners o ON o.stream = s.stream'}"
                f" WHERE {where} ORDER BY s.stream",
                params,
            ).fetchall()
        return [StreamHead(s, v, t) for s, v, t in rows if s.startswith(prefix)]

    def wait_for_commit(self, after_position: int, timeout: float) -> bool:
        """See ``EventStore.wait_for_commit``. SQLite tells no other connection of a commit:
        this polls the last position every ``_POLL_S`` (an indexed lookup of the largest
        rowid), and a commit through this very object ends the wait at once."""
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._connection() as conn:
                row = conn.execute("SELECT MAX(position) FROM events").fetchone()
            if row[0] is not None and row[0] > after_position:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._committed:
                self._committed.wait(min(left, _POLL_S))

    def load_checkpoint(self, subscriber: str) -> int:
        """See ``EventStore.load_checkpoint``."""
        with self._connection() as conn:
            if self._readonly and not self._has_table(conn, "checkpoints"):
                return 0  # a file from before checkpoints, opened read-only
            row = conn.execute(
                "SELECT position FROM checkpoints WHERE subscriber = ?", (subscriber,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def save_checkpoint(self, subscriber: str, position: int) -> None:
        """See ``EventStore.save_checkpoint``."""
        with self._write_transaction() as conn:
            conn.execute(
                "INSERT INTO checkpoints (subscriber, position) VALUES (?, ?)"
                " ON CONFLICT (subscriber) DO UPDATE SET position = excluded.position",
                (subscriber, position),
            )

    def closed_among(self, streams: Sequence[str]) -> set[str]:
        """See ``EventStore.closed_among``: the streams table's key, the names in chunks."""
        names = list(streams)
        closed: set[str] = set()
        with self._connection() as conn:
            for start in range(0, len(names), _MAX_IDS_PER_QUERY):
                chunk = names[start : start + _MAX_IDS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT stream FROM streams WHERE stream IN ({marks}) AND closed = 1", chunk
                )
                closed.update(stream for (stream,) in rows)
        return closed

    def close_streams(self, streams: Sequence[str]) -> None:
        """See ``EventStore.close_streams``: one transaction, the names in chunks."""
        names = list(streams)
        with self._write_transaction() as conn:
            for start in range(0, len(names), _MAX_IDS_PER_QUERY):
                chunk = names[start : start + _MAX_IDS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                conn.execute(
                    f"UPDATE streams SET closed = 1 WHERE stream IN ({marks}) AND closed = 0",
                    chunk,
                )

    def save_snapshot(self, name: str, data: bytes) -> None:
        """See ``EventStore.save_snapshot``."""
        with self._write_transaction() as conn:
            conn.execute(
                "INSERT INTO snapshots (name, data, saved_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET data = excluded.data,"
                " saved_at = excluded.saved_at",
                (name, bytes(data), self._clock()),
            )

    def load_snapshot(self, name: str) -> bytes | None:
        """See ``EventStore.load_snapshot``."""
        with self._connection() as conn:
            if self._readonly and not self._has_table(conn, "snapshots"):
                return None  # a file from before snapshots, opened read-only
            row = conn.execute("SELECT data FROM snapshots WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    # --- nodes ------------------------------------------------------------------------------

    @staticmethod
    def _holds(conn: sqlite3.Connection, fence: Fence, now: float) -> bool:
        row = conn.execute(
            "SELECT 1 FROM leases WHERE node_id = ? AND epoch = ? AND taken_by IS NULL"
            " AND expires_at > ?",
            (fence.node_id, fence.epoch, now),
        ).fetchone()
        return row is not None

    def acquire_lease(self, node_id: str, address: str, ttl: float) -> int:
        """See ``EventStore.acquire_lease``."""
        with self._write_transaction() as conn:
            now = self._clock()
            row = conn.execute(
                "SELECT address, epoch, expires_at FROM leases WHERE node_id = ?", (node_id,)
            ).fetchone()
            if row is not None and row[2] > now:
                raise LeaseHeldError(node_id, row[0], row[2] - now)
            epoch = 1 if row is None else int(row[1]) + 1
            conn.execute(
                "INSERT INTO leases (node_id, address, epoch, expires_at, renewed_at, taken_by)"
                " VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (node_id) DO UPDATE SET"
                " address = excluded.address, epoch = excluded.epoch,"
                " expires_at = excluded.expires_at, renewed_at = excluded.renewed_at,"
                " taken_by = NULL",
                (node_id, address, epoch, now + ttl, now),
            )
            return epoch

    def renew_lease(self, fence: Fence, address: str, ttl: float) -> bool:
        """See ``EventStore.renew_lease``."""
        with self._write_transaction() as conn:
            now = self._clock()
            done = conn.execute(
                "UPDATE leases SET address = ?, expires_at = ?, renewed_at = ?"
                " WHERE node_id = ? AND epoch = ? AND taken_by IS NULL AND expires_at > ?",
                (address, now + ttl, now, fence.node_id, fence.epoch, now),
            )
            return done.rowcount == 1

    def release_lease(self, fence: Fence) -> None:
        """See ``EventStore.release_lease``."""
        with self._write_transaction() as conn:
            now = self._clock()
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE node_id = ? AND epoch = ?"
                " AND taken_by IS NULL AND expires_at > ?",
                (now, fence.node_id, fence.epoch, now),
            )

    def take_over(
        self, fence: Fence, prefix: str, finished_types: Collection[str]
    ) -> dict[str, list[str]]:
        """See ``EventStore.take_over``."""
        moved: dict[str, list[str]] = {}
        with self._write_transaction() as conn:
            now = self._clock()
            if not self._holds(conn, fence, now):
                raise lease_lost(fence)
            dead = [
                row[0]
                for row in conn.execute(
                    "UPDATE leases SET epoch = epoch + 1, taken_by = ? WHERE node_id <> ?"
                    " AND taken_by IS NULL AND expires_at <= ? RETURNING node_id",
                    (fence.node_id, fence.node_id, now),
                ).fetchall()
            ]
            lo, hi = prefix, prefix_successor(prefix) or "\U0010ffff"
            finished = json.dumps(sorted(finished_types))
            for node_id in sorted(dead):
                moved[node_id] = [
                    row[0]
                    for row in conn.execute(
                        "UPDATE stream_owners SET node_id = ? WHERE node_id = ?"
                        f" AND stream IN ({_UNFINISHED}) RETURNING stream",
                        (fence.node_id, node_id, lo, hi, finished),
                    ).fetchall()
                ]
                moved[node_id].sort()
        return moved

    def adopt_unowned(self, owner: str, prefix: str, finished_types: Collection[str]) -> int:
        """See ``EventStore.adopt_unowned``."""
        lo, hi = prefix, prefix_successor(prefix) or "\U0010ffff"
        with self._write_transaction() as conn:
            done = conn.execute(
                f"INSERT OR IGNORE INTO stream_owners (stream, node_id) SELECT stream, ?"
                f" FROM ({_UNFINISHED})",
                (owner, lo, hi, json.dumps(sorted(finished_types))),
            )
            return done.rowcount

    def owned_heads(self, owner: str, prefix: str) -> list[StreamHead]:
        """See ``EventStore.owned_heads``."""
        lo, hi = prefix, prefix_successor(prefix) or "\U0010ffff"
        with self._connection() as conn:
            if not self._has_table(conn, "stream_owners"):
                return []
            rows = conn.execute(
                "SELECT s.stream, s.version, s.last_type FROM stream_owners o"
                " JOIN streams s ON s.stream = o.stream WHERE o.node_id = ?"
                " AND o.stream >= ? AND o.stream < ? ORDER BY o.stream",
                (owner, lo, hi),
            ).fetchall()
        return [StreamHead(s, v, t) for s, v, t in rows if s.startswith(prefix)]

    def stream_owner(self, stream: str) -> str | None:
        """See ``EventStore.stream_owner``."""
        with self._connection() as conn:
            if not self._has_table(conn, "stream_owners"):
                return None
            row = conn.execute(_SELECT_OWNER, (stream,)).fetchone()
        return None if row is None else str(row[0])

    def nodes(self, prefix: str, finished_types: Collection[str]) -> list[NodeLease]:
        """See ``EventStore.nodes``."""
        lo, hi = prefix, prefix_successor(prefix) or "\U0010ffff"
        with self._connection() as conn:
            if not self._has_table(conn, "leases"):
                return []
            now = self._clock()
            rows = conn.execute(
                "SELECT l.node_id, l.address, l.epoch, l.renewed_at, l.expires_at, l.taken_by,"
                " (SELECT count(*) FROM stream_owners o WHERE o.node_id = l.node_id"
                "  AND o.stream >= ? AND o.stream < ?),"
                " (SELECT count(*) FROM stream_owners o WHERE o.node_id = l.node_id"
                f"  AND o.stream IN ({_UNFINISHED}))"
                " FROM leases l ORDER BY l.node_id",
                (lo, hi, lo, hi, json.dumps(sorted(finished_types))),
            ).fetchall()
        return [
            NodeLease(n, a, int(e), now - r, x - now, t, int(o), int(f))
            for n, a, e, r, x, t, o, f in rows
        ]

    @staticmethod
    def _has_table(conn: sqlite3.Connection, name: str) -> bool:
        """A read-only store may open a file from before this table existed."""
        return (
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
            is not None
        )

    def close(self) -> None:
        """See ``EventStore.close``; the writer's close checkpoints the WAL into the file."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as e:
                    raise StoreError(f"event store {self._path}: {e}") from e


def _stored(rows: Iterable[tuple[str, int, int, str, str, bytes, float]]) -> list[StoredEvent]:
    return [StoredEvent(*row) for row in rows]


def _has_closed_column(conn: sqlite3.Connection) -> bool:
    """Whether ``streams`` has ``closed`` (a file from before it has not)."""
    return any(row[1] == "closed" for row in conn.execute("PRAGMA table_info(streams)"))


def _prefix_range(column: str, prefix: str) -> tuple[str, tuple[str, ...]]:
    """The condition ``column`` starts with ``prefix``, as an indexable half-open range
    [prefix, successor), and its parameters.

    LIKE would not use the index (it is case-insensitive by default) and treats % and _ as
    wildcards; the range does and treats no character specially. TEXT compares as UTF-8 bytes,
    i.e. in code point order, like Python str.
    """
    upper = prefix_successor(prefix)
    if upper is None:
        return f"{column} >= ?", (prefix,)
    return f"{column} >= ? AND {column} < ?", (prefix, upper)


def prefix_successor(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None if none,
    i.e. for the empty prefix or one made only of the largest code point)."""
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if 0xD800 <= code <= 0xDFFF:
            # Surrogates cannot be encoded in UTF-8; the next encodable code point follows them.
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None
