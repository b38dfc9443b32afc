"""Subscriptions: a named reader of the global order, catching up from its checkpoint and then
following new commits live, with a durable checkpoint per subscriber.

Delivery is at least once: ``commit()`` saves the position of the last event handed out, so a
subscriber that restarts resumes after what it committed and may see again what it had been
given but not committed. Every backend wakes a caught-up subscriber on the commit itself:
PostgreSQL through LISTEN/NOTIFY (polling only as a fallback), the in-memory store through a
condition, SQLite (which cannot notify another connection) by polling every 5 ms.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from store.interface import EventStore
from store.records import StoredEvent


class Subscription:
    """``poll`` hands out the events after ``position`` in commit order: pages of history first
    (catch-up), then, once caught up, whatever commits next, as soon as it does."""

    def __init__(
        self, store: EventStore, name: str, *, page: int = 500, start: int | None = None
    ) -> None:
        self.store = store
        self.name = name
        self.page = page
        self.position = store.load_checkpoint(name) if start is None else start

    def poll(self, timeout: float = 1.0) -> list[StoredEvent]:
        """The next events (at most ``page``); waits up to ``timeout`` seconds for a commit
        when there is nothing new, and returns an empty list if none came."""
        events = self.store.read_all(self.position, self.page)
        if not events and timeout > 0 and self.store.wait_for_commit(self.position, timeout):
            events = self.store.read_all(self.position, self.page)
        if events:
            self.position = events[-1].position
        return events

    def commit(self) -> None:
        """Durably record every event handed out so far as handled."""
        self.store.save_checkpoint(self.name, self.position)

    def run(
        self,
        handle: Callable[[StoredEvent], None],
        stop: threading.Event,
        wait: float = 0.5,
    ) -> None:
        """Hand every event to ``handle`` until ``stop`` is set, committing after each page."""
        while not stop.is_set():
            events = self.poll(wait)
            for event in events:
                handle(event)
            if events:
                self.commit()
