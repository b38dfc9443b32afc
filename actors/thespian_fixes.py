"""Two targeted fixes to Thespian 4.0.1 (pinned in pyproject), applied before any system starts.

1. simple base timers: ``WakeupManager`` keeps pending ``wakeupAfter`` timers in a list and
   scans all of them for every message it delivers. A saga arms a timer per step and timers
   cannot be cancelled, so at 1,000 orders/s with 5 s step timeouts some 25,000 stale timers were
   scanned per message: 75% of the CPU went there and throughput collapsed to ~50 orders/s
   (py-spy profile in docs/performance.md). A heap ordered by expiry makes each operation
   O(log n) with the same semantics (expired timers are returned oldest first).
2. queue base mailboxes: each actor's queue holds 10 messages (the admin's 40) and a sender
   blocks up to 20 s on a full one; a burst, or a killed actor nobody drains, then stalls every
   process that routes through it (Thespian issues #76, #91). The depths are module globals read
   when each queue is made, and child processes inherit them through fork.
3. tcp base sockets: every "external" address binds to all interfaces (``bindname = ('', port)``)
   whatever address it advertises, and Thespian unpickles whatever reaches those ports. When the
   advertised address is loopback (run.py sets ``THESPIAN_BASE_IPADDR=127.0.0.1`` unless told
   to join a private network), the socket now binds to that loopback address only.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
from typing import Any

from thespian.system import simpleSystemBase
from thespian.system.timing import ExpirationTimer
from thespian.system.transport import IPBase, MultiprocessQueueTransport

QUEUE_DEPTH = 2000
_sequence = itertools.count()


def _heap(manager: Any) -> list[tuple[float, int, tuple[Any, ExpirationTimer, Any]]]:
    heap: list[tuple[float, int, tuple[Any, ExpirationTimer, Any]]] = manager.__dict__.setdefault(
        "_wakeup_heap", []
    )
    return heap


def _add_wakeup(self: Any, from_actor: Any, time_period: Any, payload: Any) -> None:
    timer = ExpirationTimer(time_period)
    heapq.heappush(
        _heap(self), (timer._time_to_quit, next(_sequence), (from_actor, timer, payload))
    )


def _pop_expired_wakeups(self: Any, ct: float) -> list[tuple[Any, ExpirationTimer, Any]]:
    heap, expired = _heap(self), []
    while heap and heap[0][0] <= ct:
        expired.append(heapq.heappop(heap)[2])
    return expired


def _next_wakeup(self: Any) -> ExpirationTimer | None:
    heap = _heap(self)
    return heap[0][2][1] if heap else None


def _add_wakeups_to_status(self: Any, statusmsg: Any) -> Any:
    statusmsg.addWakeups([(entry[2][0], entry[2][1]) for entry in _heap(self)])
    return statusmsg


def _bind_loopback_when_advertised(init: Any) -> Any:
    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        host = self.sockname[0] if self.sockname else ""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            self.bindname = self.sockname

    wrapped.__loopback_fix__ = True  # type: ignore[attr-defined]
    return wrapped


def apply() -> None:
    """Install the fixes (idempotent)."""
    manager = simpleSystemBase.WakeupManager
    manager._add_wakeup = _add_wakeup
    manager._pop_expired_wakeups = _pop_expired_wakeups
    manager._next_wakeup = _next_wakeup
    manager.add_wakeups_to_status = _add_wakeups_to_status
    address: Any = IPBase.IPActorAddress
    if not getattr(address.__init__, "__loopback_fix__", False):
        address.__init__ = _bind_loopback_when_advertised(address.__init__)
    transport: Any = MultiprocessQueueTransport
    transport.MAX_ACTOR_QUEUESIZE = max(transport.MAX_ACTOR_QUEUESIZE, QUEUE_DEPTH)
    transport.MAX_ADMIN_QUEUESIZE = max(transport.MAX_ADMIN_QUEUESIZE, QUEUE_DEPTH)
