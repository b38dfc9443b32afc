"""An in-memory event store: the same contract as SQLite, for fast tests and throwaway runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from store.interface import AppendPart, BatchPlanner, EventStore, as_requests, lease_lost
from store.records import (
    NO_STREAM,
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


@dataclass
class _Lease:
    address: str
    epoch: int
    expires_at: float
    renewed_at: float
    taken_by: str | None = None


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
        self._leases: dict[str, _Lease] = {}
        self._owners: dict[str, str] = {}  # stream -> node
        self._open: set[str] = set()  # the streams whose last append did not close them
        self._snapshots: dict[str, bytes] = {}
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
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
    ) -> list[int | list[int] | StoreError]:
        """See ``EventStore.append_batch``."""
        return self._commit(requests, False, fence)

    def _commit(
        self,
        requests: Sequence[AppendRequest | MultiAppend],
        single: bool,
        fence: Fence | None = None,
    ) -> list[int | list[int] | StoreError]:
        with self._lock:
            self._check_open()
            if fence is not None and not self._holds(fence):
                raise lease_lost(fence)
            # Every request is decided before the first mutation, so a refused one leaves no
            # trace; `single` raises its error as append/append_many do.
            planner = BatchPlanner(self._head, self._stored, self._owners.get, fence)
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
            self._owners.update(planner.owners)
            for stream, closes in planner.closes.items():
                if closes:
                    self._open.discard(stream)
                else:
                    self._open.add(stream)
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

    def last_position(self) -> int:
        """See ``EventStore.last_position``."""
        with self._lock:
            self._check_open()
            return len(self._all)

    def count_streams(self, prefix: str) -> int:
        """See ``EventStore.count_streams``."""
        with self._lock:
            self._check_open()
            return sum(name.startswith(prefix) for name in self._streams)

    def open_heads(self, prefix: str, owner: str | None = None) -> list[StreamHead]:
        """See ``EventStore.open_heads``: sorts the open streams, never visits the closed."""
        with self._lock:
            self._check_open()
            return [
                StreamHead(name, self._streams[name][-1].version, self._streams[name][-1].type)
                for name in sorted(self._open)
                if name.startswith(prefix) and (owner is None or self._owners.get(name) == owner)
            ]

    def closed_among(self, streams: Sequence[str]) -> set[str]:
        """See ``EventStore.closed_among``."""
        with self._lock:
            self._check_open()
            return {s for s in streams if s in self._streams and s not in self._open}

    def close_streams(self, streams: Sequence[str]) -> None:
        """See ``EventStore.close_streams``."""
        with self._lock:
            self._check_open()
            self._open.difference_update(streams)

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

    def save_snapshot(self, name: str, data: bytes) -> None:
        """See ``EventStore.save_snapshot`` (as durable as the rest of this store)."""
        with self._lock:
            self._check_open()
            self._snapshots[name] = bytes(data)

    def load_snapshot(self, name: str) -> bytes | None:
        """See ``EventStore.load_snapshot``."""
        with self._lock:
            self._check_open()
            return self._snapshots.get(name)

    # --- nodes ------------------------------------------------------------------------------

    def _holds(self, fence: Fence) -> bool:
        lease = self._leases.get(fence.node_id)
        return (
            lease is not None
            and lease.epoch == fence.epoch
            and lease.taken_by is None
            and lease.expires_at > self._clock()
        )

    def acquire_lease(self, node_id: str, address: str, ttl: float) -> int:
        """See ``EventStore.acquire_lease``."""
        with self._lock:
            self._check_open()
            now = self._clock()
            lease = self._leases.get(node_id)
            if lease is not None and lease.expires_at > now:
                raise LeaseHeldError(node_id, lease.address, lease.expires_at - now)
            epoch = 1 if lease is None else lease.epoch + 1
            self._leases[node_id] = _Lease(address, epoch, now + ttl, now)
            return epoch

    def renew_lease(self, fence: Fence, address: str, ttl: float) -> bool:
        """See ``EventStore.renew_lease``."""
        with self._lock:
            self._check_open()
            if not self._holds(fence):
                return False
            now = self._clock()
            lease = self._leases[fence.node_id]
            lease.address, lease.expires_at, lease.renewed_at = address, now + ttl, now
            return True

    def release_lease(self, fence: Fence) -> None:
        """See ``EventStore.release_lease``."""
        with self._lock:
            self._check_open()
            if self._holds(fence):
                self._leases[fence.node_id].expires_at = self._clock()

    def take_over(
        self, fence: Fence, prefix: str, finished_types: Collection[str]
    ) -> dict[str, list[str]]:
        """See ``EventStore.take_over``."""
        with self._lock:
            self._check_open()
            if not self._holds(fence):
                raise lease_lost(fence)
            now = self._clock()
            moved: dict[str, list[str]] = {}
            for node_id, lease in sorted(self._leases.items()):
                if node_id == fence.node_id or lease.taken_by is not None:
                    continue
                if lease.expires_at > now:
                    continue
                lease.epoch += 1
                lease.taken_by = fence.node_id
                streams = [
                    s
                    for s, owner in sorted(self._owners.items())
                    if owner == node_id
                    and s.startswith(prefix)
                    and not self._finished(s, finished_types)
                ]
                for stream in streams:
                    self._owners[stream] = fence.node_id
                moved[node_id] = streams
            return moved

    def _finished(self, stream: str, finished_types: Collection[str]) -> bool:
        history = self._streams.get(stream)
        return history is not None and bool(history) and history[-1].type in finished_types

    def adopt_unowned(self, owner: str, prefix: str, finished_types: Collection[str]) -> int:
        """See ``EventStore.adopt_unowned``."""
        with self._lock:
            self._check_open()
            adopted = [
                s
                for s in self._streams
                if s.startswith(prefix)
                and s not in self._owners
                and not self._finished(s, finished_types)
            ]
            for stream in adopted:
                self._owners[stream] = owner
            return len(adopted)

    def owned_heads(self, owner: str, prefix: str) -> list[StreamHead]:
        """See ``EventStore.owned_heads``."""
        with self._lock:
            self._check_open()
            return [
                StreamHead(s, self._streams[s][-1].version, self._streams[s][-1].type)
                for s, node in sorted(self._owners.items())
                if node == owner and s.startswith(prefix) and s in self._streams
            ]

    def stream_owner(self, stream: str) -> str | None:
        """See ``EventStore.stream_owner``."""
        with self._lock:
            self._check_open()
            return self._owners.get(stream)

    def nodes(self, prefix: str, finished_types: Collection[str]) -> list[NodeLease]:
        """See ``EventStore.nodes``."""
        with self._lock:
            self._check_open()
            now = self._clock()
            found = []
            for node_id, lease in sorted(self._leases.items()):
                owned = [
                    s for s, n in self._owners.items() if n == node_id and s.startswith(prefix)
                ]
                found.append(
                    NodeLease(
                        node_id=node_id,
                        address=lease.address,
                        epoch=lease.epoch,
                        age=now - lease.renewed_at,
                        expires_in=lease.expires_at - now,
                        taken_by=lease.taken_by,
                        owned=len(owned),
                        in_flight=sum(not self._finished(s, finished_types) for s in owned),
                    )
                )
            return found

    def close(self) -> None:
        """See ``EventStore.close``."""
        with self._lock:
            self._closed = True
            self._committed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the event store is closed")
