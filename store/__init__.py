"""The event store: append-only streams of events, in SQLite or in memory (DESIGN.md 5)."""

from store.codec import CODEC, EventCodec
from store.factory import describe, is_store_url, open_store, sqlite_path, store_url
from store.interface import EventStore
from store.memory import InMemoryEventStore
from store.postgres import PostgresOptions
from store.records import (
    NO_STREAM,
    AppendRequest,
    ConcurrencyError,
    DuplicateEventError,
    Fence,
    FencedError,
    LeaseHeldError,
    MultiAppend,
    NewEvent,
    NodeLease,
    StoredEvent,
    StoreError,
    StreamHead,
)
from store.sqlite import SqliteEventStore
from store.subscription import Subscription

__all__ = [
    "CODEC",
    "NO_STREAM",
    "AppendRequest",
    "ConcurrencyError",
    "DuplicateEventError",
    "EventCodec",
    "EventStore",
    "Fence",
    "FencedError",
    "InMemoryEventStore",
    "LeaseHeldError",
    "MultiAppend",
    "NewEvent",
    "NodeLease",
    "PostgresOptions",
    "SqliteEventStore",
    "StoreError",
    "StoredEvent",
    "StreamHead",
    "Subscription",
    "describe",
    "is_store_url",
    "open_store",
    "sqlite_path",
    "store_url",
]
