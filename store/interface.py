"""The event store contract (DESIGN.md section 5) and the rules every implementation shares.

Both implementations decide idempotency, validation and optimistic concurrency through the
helpers here, so the in-memory store cannot drift from the SQLite one in what it accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Self

from store.records import (
    NO_STREAM,
    AppendRequest,
    ConcurrencyError,
    DuplicateEventError,
    Fence,
    FencedError,
    MultiAppend,
    NewEvent,
    NodeLease,
    StoredEvent,
    StoreError,
    StreamHead,
)

AppendPart = AppendRequest | tuple[str, int, Sequence[NewEvent]]
"""One stream's share of ``append_many``: a request, or (stream, expected_version, events)."""


class EventStore(ABC):
    """Append-only streams of events with per-stream versions and a global commit order.

    Versions count 0, 1, 2, ... within a stream without gaps. Positions are global, start at 1
    and strictly increase in commit order. Use as a context manager to close it.
    """

    @abstractmethod
    def append(self, stream: str, events: Sequence[NewEvent], expected_version: int) -> int:
        """Append ``events`` to ``stream`` if its last version is ``expected_version``
        (``NO_STREAM`` for a stream that must not exist yet); return the new last version.

        Raises ``ConcurrencyError`` if the stream is at another version. Re-appending exactly
        the events of an earlier committed append (same ids, same stream, consecutive versions
        in the same order) is a no-op that returns the version of the last of them, even though
        ``expected_version`` is stale by then: a re-delivered command must not double an event.
        If only some of the ids are stored, or they are stored elsewhere, raises
        ``DuplicateEventError``. An empty ``events`` checks ``expected_version`` and returns the
        current version.
        """

    @abstractmethod
    def append_many(self, parts: Sequence[AppendPart]) -> list[int]:
        """Append to several streams atomically: every part (``AppendRequest`` or a
        ``(stream, expected_version, events)`` tuple) is checked and applied as ``append``
        would, in order, and either all of them commit or none does (the first part's error is
        raised). Returns each part's new version."""

    @abstractmethod
    def append_batch(
        self, requests: Sequence[AppendRequest | MultiAppend], fence: Fence | None = None
    ) -> list[int | list[int] | StoreError]:
        """Group commit: apply every request in one transaction (one durable write).

        With a ``fence`` the whole batch raises ``FencedError`` (nothing committed) unless
        ``fence.node_id`` holds its lease at ``fence.epoch``, unexpired and not taken over, when
        the transaction commits; a request to a stream owned by another node fails alone with
        ``FencedError``. A request's ``owner`` is recorded as its stream's owner if the stream
        has none.

        Each request succeeds or fails on its own; the result list holds, in request order, the
        new version (as ``append`` returns it; a list of them, as ``append_many`` does, for a
        ``MultiAppend``) or the ``StoreError`` that request raised. Requests to the same stream
        apply in order, so the second sees the first's events. A refused request leaves no
        trace, not even a gap in positions: the batch commits as if each accepted request had
        committed alone. An error that is not about one request (I/O, a closed store) raises
        for the whole batch, and then nothing of the batch is committed.
        """

    @abstractmethod
    def wait_for_commit(self, after_position: int, timeout: float) -> bool:
        """Block until an event with a position above ``after_position`` is committed (True
        at once if one is) or ``timeout`` seconds pass (False). Subscriptions
        (``store.subscription``) wait here once they have caught up."""

    @abstractmethod
    def load_checkpoint(self, subscriber: str) -> int:
        """The last position ``subscriber`` saved as handled (0 if it never did)."""

    @abstractmethod
    def save_checkpoint(self, subscriber: str, position: int) -> None:
        """Durably record that ``subscriber`` has handled every event up to ``position``."""

    @abstractmethod
    def read_stream(
        self, stream: str, from_version: int = 0, limit: int | None = None
    ) -> list[StoredEvent]:
        """The events of ``stream`` with version >= ``from_version``, ordered by version
        (empty for an unknown stream); at most ``limit`` of them when it is given."""

    @abstractmethod
    def read_all(self, from_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """At most ``limit`` events with position > ``from_position``, in commit order.

        Positions start at 1, so the default reads from the beginning, and the next page
        starts after the last event seen: ``read_all(page[-1].position)``.
        """

    @abstractmethod
    def stream_version(self, stream: str) -> int:
        """The version of the stream's last event, or ``NO_STREAM`` if it has none."""

    @abstractmethod
    def stream_heads(self, prefix: str) -> list[StreamHead]:
        """The head of every stream whose name starts with ``prefix``, ordered by name.

        Used at start-up to find unfinished sagas without reading every event.
        """

    @abstractmethod
    def last_position(self) -> int:
        """The position of the last event committed (0 if none): where a reader that wants
        only the recent history starts ``read_all`` from, less what it wants."""

    @abstractmethod
    def count_streams(self, prefix: str) -> int:
        """How many streams' names start with ``prefix`` (one index range count, nothing read)."""

    @abstractmethod
    def open_heads(self, prefix: str, owner: str | None = None) -> list[StreamHead]:
        """The heads of the open streams whose name starts with ``prefix`` (their last append
        did not close them: ``AppendRequest.closes``), ordered by name; with ``owner``, only
        those that node owns (as ``owned_heads``).

        Start-up recovery reads this instead of ``stream_heads``: its cost grows with the
        number of open streams, not with every stream ever written.
        """

    @abstractmethod
    def closed_among(self, streams: Sequence[str]) -> set[str]:
        """Those of ``streams`` that exist and are closed (one query, whatever their number:
        the Inventory asks it for every reservation it holds at a checkpoint)."""

    @abstractmethod
    def close_streams(self, streams: Sequence[str]) -> None:
        """Mark ``streams`` closed without appending (unknown names are ignored).

        For a store written before appends could close streams: there every stream starts
        open, and recovery closes the finished ones it finds once, so later starts skip them.
        """

    @abstractmethod
    def save_snapshot(self, name: str, data: bytes) -> None:
        """Durably keep ``data`` under ``name``, replacing what was there (a checkpointed
        projection: a state and the position it covers, encoded by its owner). Its own
        transaction, like ``save_checkpoint``; not fenced."""

    @abstractmethod
    def load_snapshot(self, name: str) -> bytes | None:
        """The data last saved under ``name`` (None if none was)."""

    # --- nodes: leases and ownership (DESIGN.md section 10) -----------------------------------
    #
    # A lease is one row per node id, renewed by its holder, compared with the store's own
    # clock. Its epoch grows on every acquisition and takeover, so a write fenced with an older
    # epoch (a paused process, a previous incarnation) is refused.

    @abstractmethod
    def acquire_lease(self, node_id: str, address: str, ttl: float) -> int:
        """Take the lease of ``node_id`` for ``ttl`` seconds and return its new epoch.

        Succeeds when the id has no lease yet, or its lease expired (whether or not another
        node took its streams over); raises ``LeaseHeldError`` while a live holder has it.
        """

    @abstractmethod
    def renew_lease(self, fence: Fence, address: str, ttl: float) -> bool:
        """Extend the lease to ``ttl`` seconds from now; False (nothing changed) when it is no
        longer held at ``fence.epoch`` or has expired: the holder must stop writing."""

    @abstractmethod
    def release_lease(self, fence: Fence) -> None:
        """End the lease now (an orderly stop), so another node takes its streams over at once."""

    @abstractmethod
    def take_over(
        self, fence: Fence, prefix: str, finished_types: Collection[str]
    ) -> dict[str, list[str]]:
        """Claim every expired lease that nobody took over yet, for ``fence.node_id`` (which
        must hold its own lease), and make it the owner of each claimed node's streams under
        ``prefix`` whose last event type is not in ``finished_types``; all in one transaction,
        so of several nodes trying at once exactly one wins each lease. Returns claimed node
        id -> the streams moved (possibly none)."""

    @abstractmethod
    def adopt_unowned(self, owner: str, prefix: str, finished_types: Collection[str]) -> int:
        """Make ``owner`` the owner of every unfinished stream under ``prefix`` that has no
        owner (written before ownership existed); returns how many it adopted."""

    @abstractmethod
    def owned_heads(self, owner: str, prefix: str) -> list[StreamHead]:
        """The heads of the streams under ``prefix`` that ``owner`` owns, ordered by name."""

    @abstractmethod
    def stream_owner(self, stream: str) -> str | None:
        """The node that owns ``stream`` (None: nobody, or no such stream)."""

    @abstractmethod
    def nodes(self, prefix: str, finished_types: Collection[str]) -> list[NodeLease]:
        """Every node that ever held a lease, ordered by id, with what it owns under
        ``prefix`` (unfinished: last event type not in ``finished_types``)."""

    @abstractmethod
    def close(self) -> None:
        """Release the store's resources; closing twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def validate_append(stream: str, events: Sequence[NewEvent], expected_version: int) -> None:
    """Reject appends that are wrong whatever the store holds."""
    if not stream:
        raise StoreError("stream name must not be empty")
    if expected_version < NO_STREAM:
        raise StoreError(f"stream {stream!r}: expected_version {expected_version} < NO_STREAM")
    ids = [e.event_id for e in events]
    if not all(ids):
        raise StoreError(f"stream {stream!r}: event ids must not be empty")
    if len(set(ids)) != len(ids):
        # One pass (ids.count per id was quadratic: 2 s for 10,000 ids).
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise DuplicateEventError(stream, tuple(repeated), "event id repeated within one append")


def replayed_version(
    stream: str, events: Sequence[NewEvent], found: Mapping[str, tuple[str, int]]
) -> int | None:
    """Decide what already-stored ids mean for an append.

    ``found`` maps each id of ``events`` that is already stored to its (stream, version).
    Returns None when none is stored (a fresh append), the last version when the append was
    committed before exactly like this (an idempotent replay), and raises
    ``DuplicateEventError`` otherwise.
    """
    if not found:
        return None
    ids = tuple(e.event_id for e in events)
    if len(found) < len(ids):
        present = tuple(i for i in ids if i in found)
        raise DuplicateEventError(stream, present, "some of the appended event ids are stored")
    places = [found[i] for i in ids]
    first = places[0][1]
    if any(s != stream for s, _ in places) or [v for _, v in places] != list(
        range(first, first + len(ids))
    ):
        raise DuplicateEventError(stream, ids, "event ids are stored elsewhere")
    return places[-1][1]


class BatchPlanner:
    """Decides appends against what a store holds, writing nothing: the rows to insert, each
    request's result, the streams' new heads and whether each is closed by its last append.

    ``head(stream)`` gives a stream's stored (version, last type) or None, ``stored(event_id)``
    an id's stored (stream, version) or None; what earlier requests of the same batch planned
    overlays both, so requests to one stream apply in order. A request that fails plans
    nothing (a ``MultiAppend`` neither, whichever of its parts failed), so the batch commits as
    if each accepted request had committed alone. The in-memory and PostgreSQL stores decide
    through this one class.
    """

    def __init__(
        self,
        head: Callable[[str], tuple[int, str] | None],
        stored: Callable[[str], tuple[str, int] | None],
        owner: Callable[[str], str | None] = lambda _stream: None,
        fence: Fence | None = None,
    ) -> None:
        self._head = head
        self._stored = stored
        self._owner = owner
        self._fence = fence
        self.heads: dict[str, tuple[int, str]] = {}  # stream -> (version, last type) planned
        self.ids: dict[str, tuple[str, int]] = {}  # event id -> (stream, version) planned
        self.rows: list[tuple[str, int, NewEvent]] = []  # (stream, version, event) to insert
        self.owners: dict[str, str] = {}  # stream -> owner to record (it has none yet)
        self.closes: dict[str, bool] = {}  # stream -> whether its last planned append closes it

    def plan(self, request: AppendRequest | MultiAppend) -> int | list[int]:
        """Plan one request; returns what ``append`` (or ``append_many``) would return, or
        raises the ``StoreError`` it would raise."""
        if isinstance(request, AppendRequest):
            return self._plan((request,))[0]
        return self._plan(request.parts)

    def _plan(self, parts: Sequence[AppendRequest]) -> list[int]:
        heads: dict[str, tuple[int, str]] = {}
        ids: dict[str, tuple[str, int]] = {}
        rows: list[tuple[str, int, NewEvent]] = []
        owners: dict[str, str] = {}
        closes: dict[str, bool] = {}
        results: list[int] = []
        for part in parts:
            stream, events = part.stream, part.events
            validate_append(stream, events, part.expected_version)
            found: dict[str, tuple[str, int]] = {}
            for event in events:
                place = ids.get(event.event_id) or self.ids.get(event.event_id)
                if place is None:
                    place = self._stored(event.event_id)
                if place is not None:
                    found[event.event_id] = place
            replayed = replayed_version(stream, events, found)
            if replayed is not None:
                results.append(replayed)
                continue
            head = heads.get(stream) or self.heads.get(stream) or self._head(stream)
            current = NO_STREAM if head is None else head[0]
            check_expected(stream, part.expected_version, current)
            # Owners last: a replay or a stale expected version writes nothing anyway, and a
            # placement must learn that the order exists (ConcurrencyError), whoever owns it.
            owner = owners.get(stream) or self.owners.get(stream) or self._owner(stream)
            check_owner(stream, owner, self._fence)
            if part.owner is not None and owner is None and events:
                owners[stream] = part.owner
            for offset, event in enumerate(events):
                rows.append((stream, current + 1 + offset, event))
                ids[event.event_id] = (stream, current + 1 + offset)
            if events:
                heads[stream] = (current + len(events), events[-1].type)
                closes[stream] = part.closes
            results.append(current + len(events))
        self.heads.update(heads)
        self.ids.update(ids)
        self.rows.extend(rows)
        self.owners.update(owners)
        self.closes.update(closes)
        return results


def as_requests(parts: Sequence[AppendPart]) -> tuple[AppendRequest, ...]:
    """``append_many``'s parts as requests: ``(stream, expected_version, events)`` tuples are
    accepted as well as ``AppendRequest``s."""
    return tuple(
        part
        if isinstance(part, AppendRequest)
        else AppendRequest(stream=part[0], events=tuple(part[2]), expected_version=part[1])
        for part in parts
    )


def check_expected(stream: str, expected_version: int, actual_version: int) -> None:
    """Raise ``ConcurrencyError`` unless the stream is at the version the writer expected."""
    if expected_version != actual_version:
        raise ConcurrencyError(stream, expected_version, actual_version)


def check_owner(stream: str, owner: str | None, fence: Fence | None) -> None:
    """Raise ``FencedError`` if a fenced writer appends to a stream another node owns."""
    if fence is not None and owner is not None and owner != fence.node_id:
        raise FencedError(
            f"stream {stream!r} belongs to node {owner!r}, not to {fence.node_id!r}: it was "
            "taken over"
        )


def lease_lost(fence: Fence) -> FencedError:
    """The error of a fenced batch whose node no longer holds its lease at its epoch."""
    return FencedError(
        f"node {fence.node_id!r} no longer holds its lease at epoch {fence.epoch} (expired, "
        "taken over, or held by a newer process of the same id): nothing was written"
    )
