"""A node's lease on a shared store (DESIGN.md section 10): acquire it, renew it about once a
second, take over the orders of nodes whose leases expired, and say when it is lost.

The keeper runs in a thread of its own with its own store connection, so neither a busy actor
system nor a slow client delays a renewal. It never decides to stop the node itself: it keeps
``valid_until`` (the monotonic time before which the lease cannot have expired, counted from the
moment the last successful renewal was *sent*), and whoever runs the node checks it
(``NodeLease.lost``) and stops driving orders before that time passes. The store fences every
write besides (``store.Fence``), so a node that is paused past the deadline and wakes up
cannot record anything even before it notices.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from messages.events import FINAL_TYPE_NAMES, order_stream
from store import EventStore, Fence, LeaseHeldError, StoreError

log = logging.getLogger("orders.lease")

DEFAULT_TTL = 5.0
MAX_RENEW_INTERVAL = 1.0  # seconds between renewals ("about once a second")
ORDERS = order_stream("")


def default_node_id(host: str, port: int) -> str:
    """The node id when none is given: this machine's name and the gateway port, the same
    across restarts of the same node."""
    name = socket.gethostname() if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0") else host
    return f"{name}:{port}"


def renew_interval(ttl: float) -> float:
    """How often the holder renews: about once a second, and at least three times per TTL,
    so one late renewal never costs the lease."""
    return min(MAX_RENEW_INTERVAL, ttl / 4)


def acquire(
    store: EventStore, node_id: str, address: str, ttl: float, *, wait: float | None = None
) -> int:
    """Take the node id's lease, waiting up to ``wait`` seconds (default: TTL + 2 s) for a
    previous holder's lease to expire (a node restarted quickly after kill -9 finds its old
    lease still live). Raises ``LeaseHeldError`` if it is still held then: another live
    process runs with this node id."""
    deadline = time.monotonic() + (ttl + 2.0 if wait is None else wait)
    while True:
        try:
            return store.acquire_lease(node_id, address, ttl)
        except LeaseHeldError as e:
            if time.monotonic() + min(max(e.expires_in, 0.05), 0.5) > deadline:
                raise
            log.warning("lease: %s; waiting for it to expire", e)
            time.sleep(min(max(e.expires_in, 0.05), 0.5))


class NodeLease:
    """Keeps one node's lease: renews it, takes over expired nodes, reports losing it.

    ``on_takeover(moved)`` runs in the keeper's thread with claimed node id -> order ids that
    are now this node's; it is called only after ``start_taking_over()`` (once the node can
    drive orders).
    """

    def __init__(
        self,
        store: EventStore,
        fence: Fence,
        address: str,
        ttl: float,
        on_takeover: Callable[[dict[str, list[str]]], None],
    ) -> None:
        self.fence = fence
        self.address = address
        self.ttl = ttl
        self.interval = renew_interval(ttl)
        self._store = store
        self._on_takeover = on_takeover
        self._stop = threading.Event()
        self._taking_over = threading.Event()
        self.valid_until = time.monotonic() + ttl  # acquired just now (sent before this)
        self.lost_reason: str | None = None
        self.takeovers: list[tuple[float, dict[str, list[str]]]] = []
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)

    def start(self) -> None:
        """Start renewing in the background."""
        self._thread.start()

    def start_taking_over(self) -> None:
        """The node can drive orders now: take over expired nodes from the next round on."""
        self._taking_over.set()

    def lost(self) -> str | None:
        """Why the node must stop driving orders now, or None while its lease holds. It says
        so one renewal interval before the lease could expire."""
        if self.lost_reason is not None:
            return self.lost_reason
        left = self.valid_until - time.monotonic()
        if left < self.interval:
            self.lost_reason = (
                f"the lease of node {self.fence.node_id!r} was not renewed in time (it "
                f"expires in {max(left, 0):.1f} s; TTL {self.ttl:g} s)"
            )
        return self.lost_reason

    def stop(self, *, release: bool) -> None:
        """Stop renewing; with ``release`` end the lease at once, so another node takes over
        what is left of this node's orders without waiting for the TTL."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if release and self.lost_reason is None:
            try:
                self._store.release_lease(self.fence)
            except StoreError as e:
                log.warning("lease: could not release: %s", e)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                held = self._store.renew_lease(self.fence, self.address, self.ttl)
            except StoreError as e:
                log.warning("lease: renewal failed: %s", e)  # maybe only this once: go on
            else:
                if not held:
                    self.lost_reason = (
                        f"node {self.fence.node_id!r} lost its lease at epoch "
                        f"{self.fence.epoch} (expired, taken over, or held by a newer process)"
                    )
                    return
                self.valid_until = sent + self.ttl
                if self._taking_over.is_set():
                    self._take_over()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - sent)))

    def _take_over(self) -> None:
        try:
            moved = self._store.take_over(self.fence, ORDERS, FINAL_TYPE_NAMES)
        except StoreError as e:
            log.warning("lease: takeover failed: %s", e)
            return
        if not moved:
            return
        for node_id, streams in moved.items():
            log.warning(
                "lease: node %s took over node %s (lease expired): %d unfinished orders",
                self.fence.node_id,
                node_id,
                len(streams),
            )
        self.takeovers.append((time.time(), moved))
        try:
            self._on_takeover(moved)
        except Exception:
            log.exception("lease: handing the taken-over orders to the manager failed")
