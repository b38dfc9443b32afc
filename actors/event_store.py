"""The EventStore actor: the single writer of the database, with group commit."""

from __future__ import annotations

import os
from typing import Any

from actors.base import BaseActor, NotConfiguredError, log
from messages.commands import (
    AppendDone,
    AppendRejected,
    AppendToStream,
    AppendToStreams,
    FlushAppends,
    ServiceConfig,
    ServiceReady,
)
from observability.metrics import store_commit
from store import (
    CODEC,
    AppendRequest,
    ConcurrencyError,
    EventStore,
    Fence,
    FencedError,
    MultiAppend,
    StoreError,
    open_store,
)


class EventStoreActor(BaseActor):
    """Buffers the appends that arrive together and commits them in one transaction.

    The first append of a batch sends ``FlushAppends`` to this actor itself; mailboxes are FIFO,
    so every append already queued behind it is buffered before the flush runs, and one commit
    (one fsync) serves them all. Replies go out only after the commit.
    """

    actor_name = "store"

    def __init__(self) -> None:
        super().__init__()
        self._store: EventStore | None = None
        self._buffer: list[tuple[AppendToStream | AppendToStreams, Any]] = []
        self._flush_sent = False
        self._fence: Fence | None = None  # a node on a shared store writes under its lease

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Open (creating if needed) the database as its only writer."""
        if self._store is None:
            self._store = open_store(msg.store_url, synchronous=msg.synchronous)
        if msg.node_id is not None:
            self._fence = Fence(msg.node_id, msg.epoch)
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid()))

    def receiveMsg_AppendToStream(self, msg: AppendToStream, sender: Any) -> None:
        """Buffer the append; the flush that commits it is already queued or sent now."""
        self._buffer.append((msg, sender))
        if not self._flush_sent:
            self._flush_sent = True
            self.send(self.myAddress, FlushAppends())

    def receiveMsg_AppendToStreams(self, msg: AppendToStreams, sender: Any) -> None:
        """A multi-stream append joins the group commit like any other (all or nothing)."""
        self._buffer.append((msg, sender))
        if not self._flush_sent:
            self._flush_sent = True
            self.send(self.myAddress, FlushAppends())

    def receiveMsg_FlushAppends(self, msg: FlushAppends, sender: Any) -> None:
        """Commit everything buffered in one transaction and answer each requester."""
        batch, self._buffer, self._flush_sent = self._buffer, [], False
        if not batch:
            return
        if self._store is None:
            for request, requester in batch:
                self.send(
                    requester,
                    AppendRejected(
                        ref=request.ref, error="unavailable", message="store not configured"
                    ),
                )
            return
        try:
            results = self._commit(batch)
        except FencedError as e:
            # The node lost its lease: nothing of this batch is written, nor will anything be.
            log.error("store: %d appends refused: %s", len(batch), e)
            results = [e for _ in batch]
        except Exception as e:
            # Whatever failed (encoding, I/O), nobody's events are durable: tell each requester,
            # so none waits for an answer that would never come.
            log.exception("store: group commit of %d appends failed", len(batch))
            results = [StoreError(f"{type(e).__name__}: {e}") for _ in batch]
        self._answer(batch, results)

    def _commit(
        self, batch: list[tuple[AppendToStream | AppendToStreams, Any]]
    ) -> list[int | list[int] | StoreError]:
        if self._store is None:
            raise NotConfiguredError("store: no ServiceConfig yet")
        requests = [
            MultiAppend(tuple(_request(part) for part in request.parts))
            if isinstance(request, AppendToStreams)
            else _request(request)
            for request, _ in batch
        ]
        with store_commit(len(requests)):
            return self._store.append_batch(requests, self._fence)

    def _answer(
        self,
        batch: list[tuple[AppendToStream | AppendToStreams, Any]],
        results: list[int | list[int] | StoreError] | list[StoreError],
    ) -> None:
        for (request, requester), result in zip(batch, results, strict=True):
            if isinstance(result, int):
                self.send(requester, AppendDone(ref=request.ref, version=result))
            elif isinstance(result, list):
                version = result[-1] if result else -1
                self.send(
                    requester,
                    AppendDone(ref=request.ref, version=version, versions=tuple(result)),
                )
            else:
                error = "conflict" if isinstance(result, ConcurrencyError) else "store_error"
                if isinstance(result, FencedError):
                    error = "fenced"  # logged once for the batch, or it is the owner check
                elif error != "conflict":
                    log.error("store: append %s failed: %s", request.ref, result)
                self.send(
                    requester, AppendRejected(ref=request.ref, error=error, message=str(result))
                )

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        """Close the database cleanly on an orderly shutdown."""
        if self._store is not None:
            self._store.close()
            self._store = None


def _request(request: AppendToStream) -> AppendRequest:
    return AppendRequest(
        stream=request.stream,
        events=tuple(
            CODEC.encode(event, event_id)
            for event, event_id in zip(request.events, request.event_ids, strict=True)
        ),
        expected_version=request.expected_version,
        owner=request.owner,
        closes=request.closes,
    )
