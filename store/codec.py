"""Turns pydantic domain events into stored records (msgpack payloads) and back.

The store never sees a domain class and the domain never sees bytes (STYLE.md point 2). The
payload is the event's JSON-mode dump, so money travels as decimal strings and timestamps as
ISO 8601 text: both come back exactly, and no float ever touches an amount.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgpack
from pydantic import ValidationError

from messages.base import new_id
from messages.events import EVENT_TYPES, Event
from store.records import NewEvent, StoredEvent, StoreError


class EventCodec:
    """Encodes events by class name, decodes them through a registry of event classes.

    ``types`` defaults to every domain event (``messages.events.EVENT_TYPES``); ``new_id``
    makes event ids when the caller gives none (a random UUID). Callers that must be
    idempotent pass an id derived from the command that caused the event instead.
    """

    def __init__(
        self,
        types: Mapping[str, type[Event]] = EVENT_TYPES,
        new_id: Callable[[], str] = new_id,
    ) -> None:
        self._types = dict(types)
        self._make_id = new_id

    def new_id(self) -> str:
        """A fresh event id, as ``encode`` uses when given none."""
        return self._make_id()

    def encode(self, event: Event, event_id: str | None = None) -> NewEvent:
        """The record to append for ``event``; raises ``StoreError`` for an unregistered class
        (it could be written but never read back)."""
        name = type(event).__name__
        if self._types.get(name) is not type(event):
            raise StoreError(f"cannot encode {name}: not a registered event type")
        payload = msgpack.packb(event.model_dump(mode="json"), use_bin_type=True)
        return NewEvent(
            event_id=self.new_id() if event_id is None else event_id,
            type=name,
            payload=payload,
        )

    def decode(self, stored: StoredEvent | NewEvent) -> Event:
        """The domain event a record holds; raises ``StoreError`` for an unknown type or a
        payload that does not fit its class."""
        cls = self._types.get(stored.type)
        if cls is None:
            raise StoreError(f"event {stored.event_id}: unknown event type {stored.type!r}")
        try:
            data = msgpack.unpackb(stored.payload, raw=False)
            return cls.model_validate(data)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            # pydantic's ValidationError is a ValueError, so it is caught here too.
            kind = "invalid" if isinstance(e, ValidationError) else "undecodable"
            raise StoreError(f"event {stored.event_id} ({stored.type}): {kind} payload") from e


CODEC = EventCodec()
"""The codec for every domain event, with random event ids."""
