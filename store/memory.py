"""An in-memory event store: the same contract as SQLite, for fast tests and throwaway runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from store.interface import EventStore, check_expected, replayed_version, validate_append
from store.records import (
    NO_STREAM,
    AppendRequest,
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
        self._all: list[StoredEvent] = []
        self._streams: dict[str, list[StoredEvent]] = {}
        self._by_id: dict[str, StoredEvent] = {}
        self._closed = False

    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """See ``EventStore.append``."""
        with self._lock:
            self._check_open()
            return self._append_locked(stream, events, expected_version, self._clock())

    def append_batch(self, requests: Sequence[AppendRequest]) -> list[int | StoreError]:
        """See ``EventStore.append_batch``."""
        results: list[int | StoreError] = []
        with self._lock:
            self._check_open()
            now = self._clock()
            for request in requests:
                try:
                    results.append(
                        self._append_locked(
                            request.stream, request.events, request.expected_version, now
                        )
                    )
                except StoreError as e:
                    results.append(e)
        return results

    def _append_locked(
        self, stream: str, events: Sequence[NewEvent], expected_version: int, now: float
    ) -> int:
        # Every check runs before the first mutation, so a failing request leaves no trace.
        validate_append(stream, events, expected_version)
        found = {
            e.event_id: (s.stream, s.version)
            for e in events
            if (s := self._by_id.get(e.event_id)) is not None
        }
        replayed = replayed_version(stream, events, found)
        if replayed is not None:
            return replayed
        history = self._streams.get(stream, [])
        current = len(history) - 1
        check_expected(stream, expected_version, current)
        if not events:
            return current
        history = self._streams.setdefault(stream, history)
        for offset, event in enumerate(events):
            stored = StoredEvent(
                stream=stream,
                version=current + 1 + offset,
                position=len(self._all) + 1,
                event_id=event.event_id,
                type=event.type,
                payload=event.payload,
                recorded_at=now,
            )
            self._all.append(stored)
            history.append(stored)
            self._by_id[stored.event_id] = stored
        return history[-1].version

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

    def close(self) -> None:
        """See ``EventStore.close``."""
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the event store is closed")
