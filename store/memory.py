"""An in-memory event store: the same contract as SQLite, for fast tests and throwaway runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from store.interface import AppendPart, BatchPlanner, EventStore, as_requests
from store.records import (
    NO_STREAM,
    AppendRequest,
    MultiAppend,
    NewEvent,
    StoredEvent,
    StoreError,
    StreamHead,
)


class InMemoryEventStore(EventStore):
    """Keeps every event in process memory; thread-safe through one lock.

    ``clock`` gives ``recorded_at`` (unix seconds); inject one for time-dependent tests.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._committed = threading.Condition(self._lock)
        self._all: list[StoredEvent] = []
        self._streams: dict[str, list[StoredEvent]] = {}
        self._by_id: dict[str, StoredEvent] = {}
        self._checkpoints: dict[str, int] = {}
        self._closed = False

    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """See ``EventStore.append``."""
        (result,) = self._commit([AppendRequest(stream, tuple(events), expected_version)], True)
        assert isinstance(result, int)
        return result

    def append_many(self, parts: Sequence[AppendPart]) -> list[int]:
        """See ``EventStore.append_many``."""
        (result,) = self._commit([MultiAppend(as_requests(parts))], True)
        assert isinstance(result, list)
        return result

    def append_batch(
        self, requests: Sequence[AppendRequest | MultiAppend]
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``."""
        return self._commit(requests, False)

    def _commit(
        self, requests: Sequence[AppendRequest | MultiAppend], single: bool
    ) -> list[int | list[int] | StoreError]:
        with self._lock:
            self._check_open()
            # Every request is decided before the first mutation, so a refused one leaves no
            # trace; `single` raises its error as append/append_many do.
            planner = BatchPlanner(self._head, self._stored)
            results: list[int | list[int] | StoreError] = []
            for request in requests:
                try:
                    results.append(planner.plan(request))
                except StoreError as e:
                    if single:
                        raise
                    results.append(e)
            now = self._clock()
            for stream, version, event in planner.rows:
                stored = StoredEvent(
                    stream=stream,
                    version=version,
                    position=len(self._all) + 1,
                    event_id=event.event_id,
                    type=event.type,
                    payload=event.payload,
                    recorded_at=now,
                )
                self._all.append(stored)
                self._streams.setdefault(stream, []).append(stored)
                self._by_id[stored.event_id] = stored
            if planner.rows:
                self._committed.notify_all()
            return results

    def _head(self, stream: str) -> tuple[int, str] | None:
        history = self._streams.get(stream)
        return (history[-1].version, history[-1].type) if history else None

    def _stored(self, event_id: str) -> tuple[str, int] | None:
        stored = self._by_id.get(event_id)
        return None if stored is None else (stored.stream, stored.version)

    def read_stream(
        self, stream: str, from_version: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """See ``EventStore.read_stream``."""
        with self._lock:
            self._check_open()
            start = max(from_version, 0)
            end = None if limit is None else start + max(limit, 0)
            return list(self._streams.get(stream, [])[start:end])

    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """See ``EventStore.read_all``."""
        with self._lock:
            self._check_open()
            # Positions here are 1 + the list index, without gaps.
            start = max(from_position, 0)
            return self._all[start : start + max(limit, 0)]

    def stream_version(self, stream: str) -> int:
        """See ``EventStore.stream_version``."""
        with self._lock:
            self._check_open()
            history = self._streams.get(stream)
            return history[-1].version if history else NO_STREAM

    def stream_heads(self, prefix: str) -> list[StreamHead]:
        """See ``EventStore.stream_heads``."""
        with self._lock:
            self._check_open()
            return [
                StreamHead(stream=name, version=history[-1].version, last_type=history[-1].type)
                for name, history in sorted(self._streams.items())
                if name.startswith(prefix)
            ]

    def wait_for_commit(self, after_position: int, timeout: float) -> bool:
        """See ``EventStore.wait_for_commit``: woken by the commit itself."""
        with self._lock:
            self._check_open()
            return (
                self._committed.wait_for(
                    lambda: self._closed or len(self._all) > after_position, max(timeout, 0.0)
                )
                and len(self._all) > after_position
            )

    def load_checkpoint(self, subscriber: str) -> int:
        """See ``EventStore.load_checkpoint``."""
        with self._lock:
            self._check_open()
            return self._checkpoints.get(subscriber, 0)

    def save_checkpoint(self, subscriber: str, position: int) -> None:
        """See ``EventStore.save_checkpoint`` (as durable as the rest of this store)."""
        with self._lock:
            self._check_open()
            self._checkpoints[subscriber] = position

    def close(self) -> None:
        """See ``EventStore.close``."""
        with self._lock:
            self._closed = True
            self._committed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the event store is closed")
