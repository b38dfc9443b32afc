"""What Payment and Shipping share: a durable record per order in a stream of its own.

Each keeps, per order, a record rebuilt from the order's stream (``payment-{id}``,
``shipment-{id}``), read lazily on first use and cached least recently used first; a change is
applied to the record at once and appended with the stream's expected version, one write per
order at a time (``CommitGate``), answered only after the commit. Every record is durable, so one
evicted from the cache is simply read again.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from actors.base import Appender, BaseActor, CommitGate, NotConfiguredError, log
from messages.commands import AppendDone, AppendRejected, ServiceConfig
from messages.events import Event
from store import CODEC, EventStore, open_store


class Record(Protocol):
    """A per-order record: its stream's head version and how an event changes it."""

    version: int

    def apply(self, event: Event) -> None:
        """Fold one event of the order's stream into the record."""


R = TypeVar("R", bound=Record)


class RecordKeeper(BaseActor, Generic[R]):
    """Base of a service actor that keeps one durable record per order (see the module)."""

    def __init__(self, new_record: Callable[[], R], max_cached: int) -> None:
        super().__init__()
        self._new_record = new_record
        self._max_cached = max_cached
        self._reader: EventStore | None = None
        self._records: OrderedDict[str, R] = OrderedDict()
        self._appender = Appender(self, self.actor_name)
        self._gate = CommitGate()

    def _stream_of(self, order_id: str) -> str:
        """The order's stream of this service's records."""
        raise NotImplementedError

    def _pinned(self, order_id: str) -> bool:
        """Whether the order's record must stay cached (something for it is on a timer)."""
        return False

    def _open_records(self, msg: ServiceConfig) -> None:
        """Where the store is: appends through its actor, reads from the store itself."""
        self._appender.store = msg.store
        if self._reader is None:
            self._reader = open_store(msg.store_url, readonly=True)

    def _record_of(self, order_id: str) -> R:
        record = self._records.get(order_id)
        if record is not None:
            self._records.move_to_end(order_id)
            return record
        if self._reader is None:
            raise NotConfiguredError(f"{self.actor_name}: no ServiceConfig yet")
        record = self._new_record()
        for stored in self._reader.read_stream(self._stream_of(order_id)):
            record.apply(CODEC.decode(stored))
        self._records[order_id] = record
        self._evict()
        return record

    def _evict(self) -> None:
        excess = len(self._records) - self._max_cached
        if excess <= 0:
            return
        # The oldest few (busy ones are skipped, so look a little further than needed).
        for order_id in list(itertools.islice(self._records, excess + 32)):
            if excess <= 0:
                return
            if not self._gate.busy(order_id) and not self._pinned(order_id):
                del self._records[order_id]
                excess -= 1

    def _record(self, order_id: str, events: Sequence[Event], on_commit: Callable[[], Any]) -> None:
        """Apply `events` to the order's record now, append them, `on_commit` once durable."""
        record = self._record_of(order_id)
        expected = record.version
        for event in events:
            record.apply(event)
        self._gate.hold(order_id)

        def committed(reply: AppendDone | AppendRejected) -> None:
            if isinstance(reply, AppendRejected):
                log.error(
                    "%s: append for %s rejected (%s); reloading",
                    self.actor_name,
                    order_id,
                    reply.message,
                    extra={"order_id": order_id},
                )
                self._records.pop(order_id, None)  # re-read what is durable on next use
            else:
                on_commit()
            self._gate.committed(order_id)

        self._appender.append(
            self._stream_of(order_id),
            list(events),
            [CODEC.new_id() for _ in events],
            expected,
            committed,
        )

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """A record's events are durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """A record's events were refused."""
        self._appender.settle(msg)

    def _close_records(self) -> None:
        """Close the read connection (an orderly shutdown)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
