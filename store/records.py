"""What the store keeps, what it is asked to keep, and the ways a request can fail.

The stored record is deliberately apart from the domain event (STYLE.md point 2): the store only
knows streams, versions, positions, a type name and opaque payload bytes; ``store.codec`` turns
domain events into these records and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

NO_STREAM = -1
"""``expected_version`` for a stream that must not exist yet (it has no event, so no version)."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its globally unique id, its type name and its encoded payload.

    The id is what makes a re-delivered append harmless: appending the same ids to the same
    stream again is a no-op, not a second copy.
    """

    event_id: str
    type: str
    payload: bytes


class StoredEvent(NamedTuple):
    """An event as recorded (a named tuple: every read of the store makes one per row, and a
    tuple is built four times faster than a frozen dataclass).

    ``version`` counts 0, 1, 2, ... within its stream without gaps; ``position`` is the global
    commit order across all streams (starting at 1, strictly increasing, possibly with gaps);
    ``recorded_at`` is the commit time in unix seconds.
    """

    stream: str
    version: int
    position: int
    event_id: str
    type: str
    payload: bytes
    recorded_at: float


@dataclass(frozen=True)
class AppendRequest:
    """One ``append`` of a group commit (``EventStore.append_batch``).

    ``owner``: the node that owns the stream from this append on, if it has no owner yet
    (recorded in the same transaction as the events: an order belongs to the node that placed
    it, DESIGN.md section 10).

    ``closes``: this append ends the stream's life (an order that reached its end): the stream
    leaves ``EventStore.open_heads``, so start-up recovery never looks at it again. A later
    append without it reopens the stream. Only an append that writes events sets or clears it
    (an empty append or an idempotent replay changes nothing).
    """

    stream: str
    events: tuple[NewEvent, ...]
    expected_version: int
    owner: str | None = None
    closes: bool = False


@dataclass(frozen=True)
class MultiAppend:
    """One all-or-nothing append to several streams (``EventStore.append_many``), as one
    request of a group commit."""

    parts: tuple[AppendRequest, ...]


@dataclass(frozen=True)
class Fence:
    """Who writes: a node and the epoch of its lease. A store refuses a fenced write unless
    that node still holds its lease at that epoch (unexpired, not taken over), and refuses its
    appends to streams another node owns."""

    node_id: str
    epoch: int


@dataclass(frozen=True)
class NodeLease:
    """One node's lease as the store sees it (``EventStore.nodes``).

    ``age`` is the seconds since its last renewal and ``expires_in`` the seconds left (negative:
    expired), both by the store's clock; ``taken_by`` names the node that took its orders over
    (None while it is live or was never taken over); ``owned`` and ``in_flight`` count the
    streams it owns and those of them not finished.
    """

    node_id: str
    address: str
    epoch: int
    age: float
    expires_in: float
    taken_by: str | None
    owned: int
    in_flight: int


@dataclass(frozen=True)
class StreamHead:
    """A stream's last version and the type name of its last event."""

    stream: str
    version: int
    last_type: str


class StoreError(Exception):
    """Base of every error the event store raises; driver errors are translated into it."""


class ConcurrencyError(StoreError):
    """The stream's version was not the one the writer expected: someone appended first."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream!r}: expected version {expected}, but the stream is at {actual}"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[ConcurrencyError], tuple[str, int, int]]:
        # Exceptions cross process boundaries (Thespian pickles replies); the default reduce
        # would call __init__ with the message alone.
        return (type(self), (self.stream, self.expected, self.actual))


class DuplicateEventError(StoreError):
    """An event id is already stored somewhere else than this exact append would put it
    (another stream, other versions, or only some of the ids of the append)."""

    def __init__(self, stream: str, event_ids: tuple[str, ...], detail: str) -> None:
        super().__init__(f"stream {stream!r}: {detail}: {', '.join(event_ids)}")
        self.stream = stream
        self.event_ids = event_ids
        self.detail = detail

    def __reduce__(self) -> tuple[type[DuplicateEventError], tuple[str, tuple[str, ...], str]]:
        # See ConcurrencyError.__reduce__.
        return (type(self), (self.stream, self.event_ids, self.detail))


class FencedError(StoreError):
    """A fenced write was refused: the node's lease is lost (expired, taken over or renewed
    at a newer epoch by a newer process of the same node id), or the stream belongs to
    another node."""


class LeaseHeldError(StoreError):
    """The node id's lease is held by a live holder (another process with the same id, or a
    previous incarnation whose lease has not expired yet)."""

    def __init__(self, node_id: str, address: str, expires_in: float) -> None:
        super().__init__(
            f"node id {node_id!r} is held by a live node at {address} (its lease expires in "
            f"{expires_in:.1f} s unless renewed)"
        )
        self.node_id = node_id
        self.address = address
        self.expires_in = expires_in

    def __reduce__(self) -> tuple[type[LeaseHeldError], tuple[str, str, float]]:
        # See ConcurrencyError.__reduce__.
        return (type(self), (self.node_id, self.address, self.expires_in))
