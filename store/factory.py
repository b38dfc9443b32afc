"""``open_store(url)``: the one way a component gets its event store, whatever the backend.

URLs (DESIGN.md section 5):

- ``sqlite:///orders.db`` (a relative path) or ``sqlite:////var/lib/orders.db`` (absolute,
  the SQLAlchemy spelling): one file, one node.
- ``postgresql://user@host:port/db`` (also ``postgres://``): a store shared by several nodes;
  any libpq URL works, e.g. ``postgresql:///orders?host=/run/postgresql``.
- ``memory:`` or ``memory:NAME``: everything in this process's memory, nothing durable. Every
  ``open_store`` of the same name in one process gets the same store (so every actor of a
  simple-base system sees the same events); it is dropped when its last opener closes it. A
  process base runs actors in other processes, which cannot share it: opening it there is an
  error, never a silently empty copy.

A plain path (no scheme) is taken as the path of a SQLite file (``store_url`` spells it out).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from store.interface import AppendPart, EventStore
from store.memory import InMemoryEventStore
from store.postgres import PostgresEventStore, safe_url
from store.records import (
    AppendRequest,
    Fence,
    MultiAppend,
    NewEvent,
    NodeLease,
    StoredEvent,
    StoreError,
    StreamHead,
)
from store.sqlite import SqliteEventStore

SQLITE_PREFIX = "sqlite:///"
MEMORY_PREFIX = "memory:"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def store_url(path_or_url: str) -> str:
    """``path_or_url`` as a store URL: a URL stays as it is, a SQLite file path becomes the
    ``sqlite:///`` URL of its absolute path (``--db PATH`` is short for that)."""
    if is_store_url(path_or_url):
        return path_or_url
    return SQLITE_PREFIX + str(Path(path_or_url).resolve())


def is_store_url(text: str) -> bool:
    """Whether ``text`` names a backend (rather than being a bare file path)."""
    return text.startswith((SQLITE_PREFIX, MEMORY_PREFIX, *POSTGRES_PREFIXES))


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for another backend)."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url[len(SQLITE_PREFIX) :]
    if not path:
        raise StoreError(f"store URL {url!r}: no file path after {SQLITE_PREFIX}")
    return Path(path)


def describe(url: str) -> str:
    """The URL without a password, for logs and the ready line."""
    return safe_url(url) if url.startswith(POSTGRES_PREFIXES) else url


def open_store(
    url: str,
    *,
    readonly: bool = False,
    synchronous: str = "FULL",
    **options: Any,
) -> EventStore:
    """Open the event store ``url`` names (see the module docstring).

    ``readonly`` stores refuse appends (SQLite opens the file read-only, so it must exist);
    ``synchronous`` is SQLite's durability mode; other ``options`` go to the backend's
    constructor (e.g. ``postgres=PostgresOptions(pool_size=2)`` for PostgreSQL).
    """
    if url.startswith(MEMORY_PREFIX):
        return _open_memory(url[len(MEMORY_PREFIX) :], readonly=readonly)
    if url.startswith(POSTGRES_PREFIXES):
        return PostgresEventStore(url, readonly=readonly, **options)
    path = sqlite_path(url) if url.startswith(SQLITE_PREFIX) else None
    if path is None:
        if "://" in url or url.startswith("memory"):
            raise StoreError(
                f"unknown event store URL {describe(url)!r}: use sqlite:///PATH, "
                "postgresql://USER@HOST:PORT/DB or memory:[NAME]"
            )
        path = Path(url)
    return SqliteEventStore(path, synchronous=synchronous, readonly=readonly, **options)


# --- memory: one shared instance per name, per process ----------------------------------------

_memory_lock = threading.Lock()
_memory: dict[str, tuple[int, InMemoryEventStore, list[int]]] = {}  # name -> (pid, store, opens)


def _open_memory(name: str, *, readonly: bool) -> EventStore:
    with _memory_lock:
        entry = _memory.get(name)
        if entry is not None and entry[0] != os.getpid():
            # A forked child inherited the parent's dict: its copy would silently diverge.
            raise StoreError(
                f"the memory:{name} store lives in process {entry[0]}, not in this one "
                f"({os.getpid()}): an in-memory store serves one process, so run it on the "
                "simple base or use sqlite:/// or postgresql://"
            )
        if entry is None:
            entry = (os.getpid(), InMemoryEventStore(), [0])
            _memory[name] = entry
        entry[2][0] += 1
        return _MemoryHandle(name, entry[1], readonly=readonly)


def _release_memory(name: str, store: InMemoryEventStore) -> None:
    with _memory_lock:
        entry = _memory.get(name)
        if entry is None or entry[1] is not store:
            return
        entry[2][0] -= 1
        if entry[2][0] <= 0:
            del _memory[name]
            store.close()


class _MemoryHandle(EventStore):
    """One opener's view of a shared in-memory store: closing it closes only this handle
    (the store goes when its last handle does); a ``readonly`` handle refuses appends."""

    def __init__(self, name: str, store: InMemoryEventStore, *, readonly: bool) -> None:
        self._name = name
        self._store: InMemoryEventStore | None = store
        self._readonly = readonly

    def _open(self, writing: bool = False) -> InMemoryEventStore:
        if self._store is None:
            raise StoreError("the event store is closed")
        if writing and self._readonly:
            raise StoreError(f"event store memory:{self._name} is open read-only")
        return self._store

    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """See ``EventStore.append``."""
        return self._open(True).append(stream, events, expected_version)

    def append_many(self, parts: Sequence[AppendPart]) -> list[int]:
        """See ``EventStore.append_many``."""
        return self._open(True).append_many(parts)

    def append_batch(
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``."""
        return self._open(True).append_batch(requests, fence)

    def acquire_lease(self, node_id: str, address: str, ttl: float) -> int:
        """See ``EventStore.acquire_lease``."""
        return self._open(True).acquire_lease(node_id, address, ttl)

    def renew_lease(self, fence: Fence, address: str, ttl: float) -> bool:
        """See ``EventStore.renew_lease``."""
        return self._open(True).renew_lease(fence, address, ttl)

    def release_lease(self, fence: Fence) -> None:
        """See ``EventStore.release_lease``."""
        self._open(True).release_lease(fence)

    def take_over(
        self, fence: Fence, prefix: str, finished_types: Collection[str]
    ) -> dict[str, list[str]]:
        """See ``EventStore.take_over``."""
        return self._open(True).take_over(fence, prefix, finished_types)

    def adopt_unowned(self, owner: str, prefix: str, finished_types: Collection[str]) -> int:
        """See ``EventStore.adopt_unowned``."""
        return self._open(True).adopt_unowned(owner, prefix, finished_types)

    def owned_heads(self, owner: str, prefix: str) -> list[StreamHead]:
        """See ``EventStore.owned_heads``."""
        return self._open().owned_heads(owner, prefix)

    def stream_owner(self, stream: str) -> str | None:
        """See ``EventStore.stream_owner``."""
        return self._open().stream_owner(stream)

    def nodes(self, prefix: str, finished_types: Collection[str]) -> list[NodeLease]:
        """See ``EventStore.nodes``."""
        return self._open().nodes(prefix, finished_types)

    def read_stream(
        self, stream: str, from_version: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """See ``EventStore.read_stream``."""
        return self._open().read_stream(stream, from_version, limit)

    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """See ``EventStore.read_all``."""
        return self._open().read_all(from_position, limit)

    def stream_version(self, stream: str) -> int:
        """See ``EventStore.stream_version``."""
        return self._open().stream_version(stream)

    def stream_heads(self, prefix: str) -> list[StreamHead]:
        """See ``EventStore.stream_heads``."""
        return self._open().stream_heads(prefix)

    def last_position(self) -> int:
        """See ``EventStore.last_position``."""
        return self._open().last_position()

    def count_streams(self, prefix: str) -> int:
        """See ``EventStore.count_streams``."""
        return self._open().count_streams(prefix)

    def open_heads(self, prefix: str, owner: str | None = None) -> list[StreamHead]:
        """See ``EventStore.open_heads``."""
        return self._open().open_heads(prefix, owner)

    def closed_among(self, streams: Sequence[str]) -> set[str]:
        """See ``EventStore.closed_among``."""
        return self._open().closed_among(streams)

    def close_streams(self, streams: Sequence[str]) -> None:
        """See ``EventStore.close_streams``."""
        self._open(True).close_streams(streams)

    def wait_for_commit(self, after_position: int, timeout: float) -> bool:
        """See ``EventStore.wait_for_commit``."""
        return self._open().wait_for_commit(after_position, timeout)

    def load_checkpoint(self, subscriber: str) -> int:
        """See ``EventStore.load_checkpoint``."""
        return self._open().load_checkpoint(subscriber)

    def save_checkpoint(self, subscriber: str, position: int) -> None:
        """See ``EventStore.save_checkpoint``."""
        self._open(True).save_checkpoint(subscriber, position)

    def save_snapshot(self, name: str, data: bytes) -> None:
        """See ``EventStore.save_snapshot``."""
        self._open(True).save_snapshot(name, data)

    def load_snapshot(self, name: str) -> bytes | None:
        """See ``EventStore.load_snapshot``."""
        return self._open().load_snapshot(name)

    def close(self) -> None:
        """Close this handle; the shared store goes with its last handle."""
        store, self._store = self._store, None
        if store is not None:
            _release_memory(self._name, store)
