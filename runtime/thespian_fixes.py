"""Four targeted fixes to Thespian 4.0.1 (pinned in pyproject), applied before any system starts.

Call ``apply()`` once before the first ``ActorSystem`` of a process is created (``runtime.bridge``
does, as do the benchmark and the tests); the process bases' actors inherit the fixes through
fork. ``apply()`` refuses a Thespian version the fixes were not written for: each replaces a
private function whose body it copies, so on another version it would silently change behaviour.

1. simple base timers: ``WakeupManager`` keeps pending ``wakeupAfter`` timers in a list and
   scans all of them for every message it delivers. A saga arms a timer per step and timers
   cannot be cancelled, so at 1,000 orders/s with 5 s step timeouts some 25,000 stale timers were
   scanned per message: 75% of the CPU went there and throughput collapsed to ~50 orders/s
   (py-spy profile in docs/performance.md). A heap ordered by expiry makes each operation
   O(log n) with the same semantics (expired timers are returned oldest first). A timer whose
   actor has exited is dropped when it expires instead of becoming a dead letter (unless a
   dead-letter handler is registered): every finished saga leaves three or four of them.
2. queue base mailboxes: each actor's queue holds 10 messages (the admin's 40) and a sender
   blocks up to 20 s on a full one; a burst, or a killed actor nobody drains, then stalls every
   process that routes through it (Thespian issues #76, #91). The depths are module globals read
   when each queue is made, and child processes inherit them through fork.
3. tcp base sockets: every "external" address binds to all interfaces (``bindname = ('', port)``)
   whatever address it advertises, and Thespian unpickles whatever reaches those ports. When the
   advertised address is loopback (run.py sets ``THESPIAN_BASE_IPADDR=127.0.0.1`` unless told
   to join a private network), the socket now binds to that loopback address only.
4. simple base delivery: every message went through a debug ``logging.getLogger`` call, an
   ``ActorAddress.__eq__`` against the system address, a scan for expired timers and a
   ``PendingSend`` retry wrapper; with some 22 messages per order that machinery was a fifth of
   the actor thread's CPU (yappi call counts, docs/performance.md). Plain messages to live actors
   now take a short path with the same semantics (FIFO, retries, then ``PoisonMessage``); the
   rest (exits, status, sources, dead letters, poison) still takes Thespian's own path.
   Actor creation no longer runs ``inspect.signature`` per actor (cached per class), and dead
   actors' registry entries are dropped instead of kept as ``None`` forever (a leak of ~150 bytes
   per order ever run).
"""

from __future__ import annotations

import functools
import heapq
import importlib.metadata
import inspect
import ipaddress
import itertools
import logging
import time
import traceback
from typing import Any

from thespian.actors import (
    ActorAddress,
    ActorExitRequest,
    ChildActorExited,
    ValidatedSource,
    WakeupMessage,
)
from thespian.system import isInternalActorSystemMessage, simpleSystemBase, utilis
from thespian.system.messages.status import Thespian_StatusReq
from thespian.system.timing import (
    ExpirationTimer,
    currentTime,
    timePeriodSeconds,
    toTimeDeltaOrNone,
    unexpired,
)
from thespian.system.transport import IPBase, MultiprocessQueueTransport

from messages.errors import ExpectedFailureError

QUEUE_DEPTH = 2000
_sequence = itertools.count()


# One tuple per timer: (deadline, sequence, actor address string, payload, period). Thespian
# kept an ExpirationTimer object (and its __dict__) per timer, holding the actor's address: with
# a timer per saga step alive for the step timeout, those were most of the young objects the
# garbage collector walked. A tuple of strings and numbers is untracked by the collector after
# its first pass, and an exited saga's address is not kept alive by its stale timer.
Wakeup = tuple[float, int, str, Any, Any]
Due = tuple[Any, Any, Any]  # (actor address, payload, period) of a timer that fired


def _heap(manager: Any) -> list[Wakeup]:
    heap: list[Wakeup] = manager.__dict__.setdefault("_wakeup_heap", [])
    return heap


def _add_wakeup(self: Any, from_actor: Any, time_period: Any, payload: Any) -> None:
    deadline = currentTime() + timePeriodSeconds(time_period)
    entry = (deadline, next(_sequence), from_actor.actorAddressString, payload, time_period)
    heapq.heappush(_heap(self), entry)


def _timer(entry: Wakeup) -> ExpirationTimer:
    """The ExpirationTimer Thespian's callers expect, made when one is asked for."""
    timer = ExpirationTimer(None)
    timer.duration = entry[4]
    timer._time_to_quit = entry[0]
    return timer


def _pop_expired_wakeups(self: Any, ct: float) -> list[Due]:
    heap, due = _heap(self), []
    registry = self.actorRegistry
    dead_letters = registry.get("DeadLetterBox") is not None
    while heap and heap[0][0] <= ct:
        _deadline, _seq, address, payload, period = heapq.heappop(heap)
        target = registry.get(address)
        if target is not None and target._inst is not None:
            due.append((target.address, payload, period))
        elif dead_letters:
            # Someone handles dead letters: deliver it (to nobody), as Thespian does.
            due.append((ActorAddress(address), payload, period))
        # else its actor has exited (a finished saga's stale step timer): dropped
    return due


def _next_wakeup(self: Any) -> ExpirationTimer | None:
    heap = _heap(self)
    return _timer(heap[0]) if heap else None


def _add_wakeups_to_status(self: Any, statusmsg: Any) -> Any:
    statusmsg.addWakeups([(ActorAddress(entry[2]), _timer(entry)) for entry in _heap(self)])
    return statusmsg


# --- 4. the simple base's delivery loop ---------------------------------------------------------

_SystemBase: Any = simpleSystemBase.ActorSystemBase
_thespian_run_single_send = _SystemBase._runSingleSend
_thespian_create = utilis.withPossibleInitArgs.create
# Messages Thespian itself must see on their way (exits, child exits, status, actor sources).
_SPECIAL = (ActorExitRequest, ChildActorExited, Thespian_StatusReq, ValidatedSource)
_init_params: dict[Any, list[str]] = {}


def _realize_wakeups(self: Any) -> None:
    """Queue a WakeupMessage for each due timer; the heap's top says in O(1) if any is due."""
    heap = self.__dict__.get("_wakeup_heap")
    if not heap:
        return
    now = currentTime()
    if heap[0][0] > now:
        return
    for target, payload, period in self._pop_expired_wakeups(now):
        with self._private_lock:
            self._pendingSends.append(
                simpleSystemBase.PendingSend(target, WakeupMessage(period, payload), target)
            )


def _run_single_send(self: Any, ps: Any) -> None:
    """A plain message to a live actor: deliver it; on an exception queue it again, as
    Thespian does (after three attempts Thespian's own path sends the PoisonMessage)."""
    msg = ps.msg
    if ps.attempts <= 2 and not isinstance(msg, _SPECIAL):
        target = self.actorRegistry.get(ps.toActor.actorAddressString)
        if target is not None and target._inst is not None:
            # A request about one order names it in the log record (JSON: a field of its own).
            order_id = getattr(msg, "order_id", None)
            extra = {} if order_id is None else {"order_id": order_id}
            try:
                target._inst.receiveMessage(msg, ps.sender)
            except ExpectedFailureError as e:
                # Built to be survived: the saga's supervision reports it (one warning line);
                # here it is detail, once, without a traceback per retry.
                if ps.attempts == 0:
                    logging.getLogger("Thespian").info(
                        "%s (%s)", e, type(msg).__name__, extra=extra
                    )
                ps.attempts += 1
                ps.fail_details = str(e)
                with self._private_lock:
                    self._pendingSends.append(ps)
            except Exception:
                logging.getLogger("Thespian").warning(
                    "Failure of Actor %s during message processing (attempt %s)",
                    target.address,
                    ps.attempts,
                    exc_info=True,
                    extra=extra,
                )
                ps.attempts += 1
                ps.fail_details = traceback.format_exc()
                with self._private_lock:
                    self._pendingSends.append(ps)
            return
    exiting = None
    if isinstance(msg, ActorExitRequest):
        target = self.actorRegistry.get(ps.toActor.actorAddressString)
        exiting = target._inst if target is not None else None
    _thespian_run_single_send(self, ps)
    if exiting is not None and target._inst is None:
        # Thespian bound `_receive` to the instance (a reference cycle per actor): without it
        # an exited saga is freed by reference counting instead of waiting for the collector.
        exiting.__dict__.pop("_receive", None)
    if isinstance(msg, ChildActorExited):
        dead = msg.childAddress.actorAddressString
        if dead in self.actorRegistry and self.actorRegistry[dead] is None:
            del self.actorRegistry[dead]  # Thespian leaves None behind for every actor ever run


def _run_sends(self: Any, timeout: Any = None, stop_on_available: Any = False) -> None:
    """Thespian's ``_runSends`` with the per-message work hoisted out of the loop."""
    numsends = 0
    pending: list[Any] = self._pendingSends
    lock = self._private_lock
    limit = self.procLimit
    external = stop_on_available.instance if stop_on_available else None
    endtime = ExpirationTimer(toTimeDeltaOrNone(timeout))
    for endt in unexpired(endtime):
        while pending:
            numsends += 1
            if limit and numsends > limit:
                raise RuntimeError("Too many sends")
            self._realizeWakeups()
            with lock:
                nextmsg = pending.pop(0) if pending else None
            if nextmsg is not None:
                self._runSingleSend(nextmsg)
            if external is not None:
                responses = getattr(external, "responses", None)
                if responses and any(not isInternalActorSystemMessage(m) for m in responses):
                    return
        if endt.remaining(forever=-1) == -1:
            return
        next_wakeup = self._next_wakeup()
        if next_wakeup is None or next_wakeup > endt:
            return
        time.sleep(max(0, timePeriodSeconds(next_wakeup.view().remaining())))
        self._realizeWakeups()


def _actor_base_receive(actor: Any, msg: Any, sender: Any) -> None:
    actor.receiveMessage(msg, sender)


def _create(self: Any, klass: Any) -> Any:
    """Thespian's ``withPossibleInitArgs.create`` with the ``__init__`` signature cached."""
    params = _init_params.get(klass)
    if params is None:
        try:
            params = [p.name for p in inspect.signature(klass.__init__).parameters.values()]
        except (ValueError, NameError, AttributeError):
            return _thespian_create(self, klass)
        _init_params[klass] = params
    return klass(**{k: self.kwargs[k] for k in params if k in self.kwargs})


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


FOR_VERSION = "4.0.1"


class UnsupportedThespianError(RuntimeError):
    """The installed Thespian is not the version these fixes were written for."""


def installed_version() -> str:
    """The version of the installed thespian distribution."""
    return importlib.metadata.version("thespian")


def apply(version: str | None = None) -> None:
    """Install the fixes (idempotent); refuse any Thespian but ``FOR_VERSION``."""
    found = installed_version() if version is None else version
    if found != FOR_VERSION:
        raise UnsupportedThespianError(
            f"runtime.thespian_fixes patches Thespian {FOR_VERSION} internals; thespian {found} is "
            f"installed. Pin thespian=={FOR_VERSION} (pyproject.toml) or port the fixes."
        )
    manager = simpleSystemBase.WakeupManager
    manager._add_wakeup = _add_wakeup
    manager._pop_expired_wakeups = _pop_expired_wakeups
    manager._next_wakeup = _next_wakeup
    manager.add_wakeups_to_status = _add_wakeups_to_status
    _SystemBase._realizeWakeups = _realize_wakeups
    _SystemBase._runSingleSend = _run_single_send
    _SystemBase._runSends = _run_sends
    simpleSystemBase.actor_base_receive = _actor_base_receive
    utilis.withPossibleInitArgs.create = _create
    address: Any = IPBase.IPActorAddress
    if not getattr(address.__init__, "__loopback_fix__", False):
        address.__init__ = _bind_loopback_when_advertised(address.__init__)
    transport: Any = MultiprocessQueueTransport
    transport.MAX_ACTOR_QUEUESIZE = max(transport.MAX_ACTOR_QUEUESIZE, QUEUE_DEPTH)
    transport.MAX_ADMIN_QUEUESIZE = max(transport.MAX_ADMIN_QUEUESIZE, QUEUE_DEPTH)
