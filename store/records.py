"""What the store keeps, what it is asked to keep, and the ways a request can fail.

The stored record is deliberately apart from the domain event (STYLE.md point 2): the store only
knows streams, versions, positions, a type name and opaque payload bytes; ``store.codec`` turns
domain events into these records and back.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as recorded.

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
    """One ``append`` of a group commit (``EventStore.append_batch``)."""

    stream: str
    events: tuple[NewEvent, ...]
    expected_version: int


@dataclass(frozen=True)
class MultiAppend:
    """One all-or-nothing append to several streams (``EventStore.append_many``), as one
    request of a group commit."""

    parts: tuple[AppendRequest, ...]


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
