"""What every actor of the system shares: type dispatch, loud logging, identity, appends."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from thespian.actors import ActorTypeDispatcher, PoisonMessage

from messages.commands import AppendDone, AppendRejected, AppendToStream, AppendToStreams
from messages.events import Event

log = logging.getLogger("orders")


def order_extra(message: Any) -> dict[str, Any]:
    """``extra=`` for a log call about `message`: its ``order_id`` when it names one, so the
    JSON log line can be selected by order (runtime/logs.py)."""
    order_id = getattr(message, "order_id", None)
    return {} if order_id is None else {"order_id": order_id}


class NotConfiguredError(RuntimeError):
    """An actor was asked to do something that needs its configuration message first."""


AppendCallback = Callable[[AppendDone | AppendRejected], None]


class BaseActor(ActorTypeDispatcher):
    """Dispatch on message type; unknown messages are logged and dropped, never fatal."""

    actor_name = "actor"

    def receiveMessage(self, message: Any, sender: Any) -> Any:
        """ActorTypeDispatcher's rule (``receiveMsg_<class>`` for the message's class or its
        nearest base), with the answer cached per message type: Thespian walks both class
        hierarchies with ``hasattr`` for every message, which showed in the profile."""
        cls = type(self)
        cache: dict[type, Callable[..., Any] | None] | None = cls.__dict__.get("_dispatch")
        if cache is None:
            cache = {}
            cls._dispatch = cache
        kind = type(message)
        try:
            handler = cache[kind]
        except KeyError:
            handler = next(
                (
                    getattr(cls, f"receiveMsg_{base.__name__}")
                    for base in kind.__mro__
                    if hasattr(cls, f"receiveMsg_{base.__name__}")
                ),
                None,
            )
            cache[kind] = handler
        if handler is None:
            return self.receiveUnrecognizedMessage(message, sender)
        return handler(self, message, sender)

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A message we sent made its receiver raise (Thespian gave up retrying)."""
        log.error(
            "%s: %s poisoned %s: %s",
            self.actor_name,
            type(msg.poisonMessage).__name__,
            sender,
            msg.details,
            extra=order_extra(msg.poisonMessage),
        )

    def receiveUnrecognizedMessage(self, msg: Any, sender: Any) -> None:
        """Unknown messages are dropped, loudly (ActorExitRequest & co are Thespian's own)."""
        if type(msg).__module__.startswith("thespian"):
            return
        log.warning("%s: dropped unknown message %r from %s", self.actor_name, msg, sender)


class Appender:
    """Sends appends to the EventStore actor and routes each reply to its callback by ref."""

    def __init__(self, actor: ActorTypeDispatcher, prefix: str) -> None:
        # Held weakly: an actor owns its Appender, and a cycle between them would leave every
        # finished saga to the garbage collector (whose pauses were the latency tail).
        self._actor: Any = weakref.proxy(actor)
        self._prefix = prefix
        self._counter = itertools.count()
        self._pending: dict[str, tuple[AppendToStream | AppendToStreams, AppendCallback]] = {}
        self.store: Any = None

    def append(  # noqa: PLR0913 - the fields of the AppendToStream it sends, and its callback
        self,
        stream: str,
        events: Sequence[Event],
        event_ids: Sequence[str],
        expected_version: int,
        callback: AppendCallback,
        *,
        owner: str | None = None,
        closes: bool = False,
    ) -> str:
        """Send one append; `callback` runs with the store's reply. `owner`: the node that
        owns the stream from now on, if it has no owner yet; `closes`: the append ends the
        stream's life (an order's last event), so it leaves the store's open heads."""
        ref = f"{self._prefix}:{next(self._counter)}"
        request = AppendToStream(
            ref=ref,
            stream=stream,
            events=tuple(events),
            event_ids=tuple(event_ids),
            expected_version=expected_version,
            owner=owner,
            closes=closes,
        )
        self._pending[ref] = (request, callback)
        self._actor.send(self.store, request)
        return ref

    def append_many(
        self,
        parts: Sequence[tuple[str, Sequence[Event], Sequence[str], int]],
        callback: AppendCallback,
    ) -> str:
        """Send one all-or-nothing append to several streams, each part (stream, events,
        event ids, expected version); `callback` runs with the store's reply."""
        ref = f"{self._prefix}:{next(self._counter)}"
        request = AppendToStreams(
            ref=ref,
            parts=tuple(
                AppendToStream(
                    ref=ref,
                    stream=stream,
                    events=tuple(events),
                    event_ids=tuple(ids),
                    expected_version=expected,
                )
                for stream, events, ids, expected in parts
            ),
        )
        self._pending[ref] = (request, callback)
        self._actor.send(self.store, request)
        return ref

    def resend(self) -> None:
        """Send every unanswered append again (to a restarted store): same ref, same event
        ids, so one that did commit before the crash is a no-op the second time."""
        for request, _ in self._pending.values():
            self._actor.send(self.store, request)

    def settle(self, reply: AppendDone | AppendRejected) -> None:
        """Deliver a store reply to whoever asked; replies nobody waits for are dropped."""
        pending = self._pending.pop(reply.ref, None)
        if pending is None:
            log.info("%s: reply for a forgotten append %s", self._prefix, reply.ref)
            return
        pending[1](reply)

    def forget_all(self) -> None:
        """Drop every pending append (the state they would update was rebuilt)."""
        self._pending.clear()


class CommitGate:
    """Keeps a key's requests in order with its uncommitted changes.

    A service applies a change in memory at once but answers only after it is durable; a request
    about the same key (order id) that arrives meanwhile is deferred and re-handled once every
    change of that key is committed, so nobody is ever told about state that could still vanish.
    """

    def __init__(self) -> None:
        self._uncommitted: dict[str, int] = {}
        self._deferred: dict[str, list[Callable[[], None]]] = {}

    def busy(self, key: str) -> bool:
        """Whether the key has changes not yet committed."""
        return key in self._uncommitted

    def hold(self, key: str) -> None:
        """One more uncommitted change of the key."""
        self._uncommitted[key] = self._uncommitted.get(key, 0) + 1

    def defer(self, key: str, again: Callable[[], None]) -> None:
        """Run `again` once the key's changes are all committed."""
        self._deferred.setdefault(key, []).append(again)

    def committed(self, key: str) -> None:
        """One change of the key is durable; re-handle deferred requests when none is left."""
        self.forget(key)
        self.resume(key)

    def forget(self, key: str) -> None:
        """One change of the key will never commit (it is handled again as a new change): no
        longer wait for it, but leave the requests deferred behind it until `resume`."""
        left = self._uncommitted.get(key, 1) - 1
        if left > 0:
            self._uncommitted[key] = left
        else:
            self._uncommitted.pop(key, None)

    def resume(self, key: str) -> None:
        """Re-handle the key's deferred requests, unless a change of it is still uncommitted."""
        if key in self._uncommitted:
            return
        for again in self._deferred.pop(key, []):
            try:
                again()
            except Exception:
                # Re-handled inside another message's handler: raising here would poison that
                # message's sender and drop the rest of the list. The requester times out and
                # retries (or compensates).
                log.exception("a deferred request for %s failed", key)

    def clear(self) -> None:
        """Forget everything (the owner rebuilt its state; requesters will retry)."""
        self._uncommitted.clear()
        self._deferred.clear()
