"""Driving the plan: the clients, the orders in flight, and what each order did.

Closed loop (the default): exactly `concurrency` orders in flight; an order starts when a slot
frees, and its latency runs from its submission. Open loop (`arrivals`): each order is due at
its planned offset whatever the server is doing, and its latency runs from that *intended*
start, so a stall that delays submissions shows in the latencies instead of being hidden by it
(coordinated omission); `concurrency` is then only a safety cap, and starts it delays count as
late.

An order planned with a customer's cancel gets a `cancel_order` its `cancel_after` seconds after
its submission, from a thread of its own (`Cancels`), whatever state the order is in by then.
"""

from __future__ import annotations

import concurrent.futures
import functools
import heapq
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from client import FOLLOW_INTERVAL, Client, ClientError, ConnectionFailed
from loadgen.plan import CANCEL_REASON, PlannedOrder
from loadgen.progress import Progress
from messages.base import TERMINAL_STATUSES

MONITOR_INTERVAL = 0.2
CANCEL_REPLY_WAIT = 30.0  # seconds the end of a run waits for the last cancels' answers
CUSTOMER = "Customer"  # an OrderCancelled's cancelled_by when the customer cancelled
TICK_INTERVAL = 1.0  # how often `on_tick` (the server's RSS sample) runs
LATE_AFTER = 0.010  # an open-loop order submitted this much after it was due started late


@dataclass
class RunResult:
    """What the driven orders did."""

    statuses: list[str]
    # (status, seconds), one per order that reached a terminal status and one per order given
    # up on (counted at the moment it was given up, so a run's tail is never hidden); error
    # replies are not latencies (they count as not terminal)
    samples: list[tuple[str, float]]
    finished_at: list[float]  # seconds since the start, one per reply
    wall_s: float
    client_cpu_s: float
    # open loop only: seconds each submission came after its intended start, and the time from
    # the start to the last submission
    start_lags: list[float] = field(default_factory=list)
    submit_span_s: float = 0.0
    planned_span_s: float = 0.0  # when the last arrival was due
    # orders that ended cancelled by their customer (their final view says so), and what the
    # cancels sent were answered: "cancelled", "too_late" (conflict), "error:<code>", "lost"
    cancelled_by_customer: int = 0
    cancel_replies: dict[str, int] = field(default_factory=dict)

    @property
    def latencies(self) -> list[float]:
        """The latencies in seconds, unsorted."""
        return [latency for _, latency in self.samples]


@dataclass
class _RunState:
    """Shared between the submitting thread, the client reader threads and the monitor."""

    total: int
    statuses: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: dict[int, float] = field(default_factory=dict)  # order index -> start time
    samples: list[tuple[str, float]] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    completed: int = 0
    by_customer: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class LoadRun:
    """Submits every planned order over the clients and collects the outcomes.

    The submitting thread takes a semaphore slot per order; the slot is given back by the
    future's callback (on a client's reader thread) or by the monitor when the order's deadline
    passes, so a lost reply can neither hang the run nor shrink the concurrency.
    """

    def __init__(  # noqa: PLR0913 - keyword-only settings of one run, each optional but two
        self,
        clients: Sequence[Client],
        plan: Sequence[PlannedOrder],
        *,
        concurrency: int,
        order_timeout: float,
        progress: Progress | None = None,
        on_tick: Callable[[], None] | None = None,
        arrivals: Sequence[float] | None = None,
    ) -> None:
        if arrivals is not None and len(arrivals) != len(plan):
            raise ValueError("one arrival offset per planned order")
        self._clients = clients
        self._plan = plan
        self._slots = threading.Semaphore(concurrency)
        self._order_timeout = order_timeout
        self._progress = progress
        self._on_tick = on_tick
        self._arrivals = arrivals
        self._state = _RunState(total=len(plan), statuses=["not_submitted"] * len(plan))
        self._t0 = 0.0
        # Orders whose node died before answering, carried on by another node (several
        # targets only); each waits in a thread of its own, so a few dozen at once.
        self._rescuers = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="follow")
        self._cancels = Cancels(clients)

    @property
    def finished(self) -> int:
        """How many orders have finished so far (a terminal status, an error or given up)."""
        return len(self._state.finished)

    def run(self) -> RunResult:
        """Submit every planned order and wait for all of them to finish or time out."""
        st = self._state
        stop_monitor = threading.Event()
        monitor = threading.Thread(target=self._monitor, args=(stop_monitor,), daemon=True)
        lags: list[float] = []
        cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        monitor.start()
        try:
            self._submit_all(lags)
            submit_span = time.perf_counter() - self._t0
            while not st.done.wait(0.5):
                pass
            wall = time.perf_counter() - self._t0
        finally:
            stop_monitor.set()
            monitor.join()
            self._rescuers.shutdown(wait=False, cancel_futures=True)
            cancel_replies = self._cancels.finish(CANCEL_REPLY_WAIT)
        return RunResult(
            statuses=st.statuses,
            samples=st.samples,
            finished_at=st.finished,
            wall_s=wall,
            client_cpu_s=time.process_time() - cpu0,
            start_lags=lags,
            submit_span_s=submit_span,
            planned_span_s=self._arrivals[-1] if self._arrivals else 0.0,
            cancelled_by_customer=st.by_customer,
            cancel_replies=cancel_replies,
        )

    def _submit_all(self, lags: list[float]) -> None:
        st = self._state
        for n, order in enumerate(self._plan):
            due = None
            if self._arrivals is not None:
                due = self._t0 + self._arrivals[n]
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # pacing the arrivals, not waiting for a result
            self._slots.acquire()
            start = time.perf_counter()
            if due is not None:
                lags.append(start - due)
                start = due
            with st.lock:
                st.in_flight[n] = start
            try:
                future = self._submit(n, order.args)
            except ClientError as e:
                self._finish(n, time.perf_counter(), f"error:{e.code}")
                continue
            if order.cancel_after is not None:
                self._cancels.schedule(time.perf_counter() + order.cancel_after, n, order.args)
            future.add_done_callback(functools.partial(self._on_reply, n))

    def _submit(self, n: int, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Send the order on its client, or on the next live one if its node is gone."""
        clients = self._clients
        failure: ConnectionFailed | None = None
        for k in range(len(clients)):
            try:
                return clients[(n + k) % len(clients)].submit("place_order", args)
            except ConnectionFailed as e:
                failure = e
        assert failure is not None
        raise failure

    def _rescue(self, n: int) -> None:
        """The order's node died before answering: place it again on the other clients in turn
        (idempotent by order id) and follow it with get_order until it ends there."""
        order = self._plan[n]
        deadline = time.perf_counter() + self._order_timeout
        clients = self._clients
        status = "error:unavailable"
        result: Any = None
        for k in range(1, len(clients)):
            client = clients[(n + k) % len(clients)]
            try:
                result = client.call("place_order", order.args, timeout=self._order_timeout)
                status = str(result.get("status"))
                while status not in TERMINAL_STATUSES and time.perf_counter() < deadline:
                    time.sleep(FOLLOW_INTERVAL)
                    result = client.get_order(order.args["order_id"])
                    status = str(result.get("status"))
                break
            except ConnectionFailed:
                continue
            except ClientError as e:
                status = f"error:{e.code}"
                break
        self._finish(n, time.perf_counter(), status, by_customer=_by_customer(result))

    def _on_reply(self, n: int, future: concurrent.futures.Future[Any]) -> None:
        end = time.perf_counter()
        exc = future.exception()
        if isinstance(exc, ConnectionFailed) and len(self._clients) > 1:
            self._rescuers.submit(self._rescue, n)
            return
        result = None
        if exc is None:
            result = future.result()
            status = result.get("status") if isinstance(result, dict) else None
            status = status if isinstance(status, str) else "malformed_reply"
        elif isinstance(exc, ClientError):
            status = f"error:{exc.code}"
        else:
            status = f"error:{type(exc).__name__}"
        self._finish(n, end, status, by_customer=_by_customer(result))

    def _finish(self, n: int, end: float, status: str, *, by_customer: bool = False) -> None:
        st = self._state
        with st.lock:
            start = st.in_flight.pop(n, None)
            if start is None:  # the monitor already gave up on it and freed its slot
                return
            st.statuses[n] = status
            st.by_customer += by_customer
            if status in TERMINAL_STATUSES:
                st.samples.append((status, end - start))
            st.finished.append(end - self._t0)
            st.completed += 1
            if st.completed == st.total:
                st.done.set()
        self._slots.release()

    def _expire(self, now: float) -> None:
        """Give up on orders past their deadline; in_flight is in start order."""
        st = self._state
        expired = 0
        with st.lock:
            deadline = now - self._order_timeout
            for n, start in list(st.in_flight.items()):
                if start > deadline:
                    break
                del st.in_flight[n]
                st.statuses[n] = "error:timeout"
                st.samples.append(("error:timeout", now - start))  # at least the order timeout
                st.completed += 1
                expired += 1
            if st.completed == st.total:
                st.done.set()
        for _ in range(expired):
            self._slots.release()

    def _monitor(self, stop: threading.Event) -> None:
        next_tick = 0.0
        while True:
            stopping = stop.wait(MONITOR_INTERVAL)
            now = time.perf_counter()
            self._expire(now)
            if self._on_tick is not None and now >= next_tick:
                self._on_tick()
                next_tick = now + TICK_INTERVAL
            if self._progress is not None:
                with self._state.lock:
                    done, in_flight = self._state.completed, len(self._state.in_flight)
                self._progress.update(
                    done=done,
                    total=self._state.total,
                    in_flight=in_flight,
                    elapsed=now - self._t0,
                    final=stopping,
                )
            if stopping:
                return


def _by_customer(view: Any) -> bool:
    """Whether an order's final view says its customer cancelled it."""
    return (
        isinstance(view, dict)
        and view.get("status") == "cancelled"
        and view.get("cancelled_by") == CUSTOMER
    )


class Cancels:
    """Sends each planned `cancel_order` at its moment, from one thread and one heap, on the
    client its order was placed on, and counts how the cancels were answered.

    A cancel of an order still running is answered once the order ends: `cancelled` if the
    cancel won, `too_late` (conflict) if the order shipped, failed or was paid without shipping
    first, `already_cancelled` if it ended cancelled for another reason (declined, refused);
    a cancel that reaches the node before the placement does is `error:not_found`.
    """

    def __init__(self, clients: Sequence[Client]) -> None:
        self._clients = clients
        self._due: list[tuple[float, int, str]] = []  # (when, order index, order id), a heap
        self._cv = threading.Condition()
        self._closing = False
        self._outstanding = 0
        self._replies: Counter[str] = Counter()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, n: int, args: dict[str, Any]) -> None:
        """Cancel order number `n` (placed with `args`) at `when` (perf_counter seconds)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_due, daemon=True, name="cancels")
                self._thread.start()
            heapq.heappush(self._due, (when, n, args["order_id"]))
            self._outstanding += 1
            self._cv.notify()

    def finish(self, timeout: float) -> dict[str, int]:
        """Send what is still due at once, wait (at most `timeout` s) for every answer, and
        return the answers' counts (answers that never came count as "lost")."""
        deadline = time.perf_counter() + timeout
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while self._outstanding > 0 and time.perf_counter() < deadline:
                self._cv.wait(max(0.0, deadline - time.perf_counter()))
            replies = Counter(self._replies)
            if self._outstanding:
                replies["lost"] += self._outstanding
        return dict(sorted(replies.items()))

    def _send_due(self) -> None:
        while True:
            with self._cv:
                while not self._due and not self._closing:
                    self._cv.wait()
                if not self._due:
                    return
                when, n, order_id = self._due[0]
                wait = when - time.perf_counter()
                if wait > 0 and not self._closing:
                    self._cv.wait(wait)
                    continue
                heapq.heappop(self._due)
            self._send(n, order_id)

    def _send(self, n: int, order_id: str) -> None:
        args = {"order_id": order_id, "reason": CANCEL_REASON}
        try:
            future = self._clients[n % len(self._clients)].submit("cancel_order", args)
        except ClientError as e:
            self._answered(f"error:{e.code}")
            return
        future.add_done_callback(self._on_reply)

    def _on_reply(self, future: concurrent.futures.Future[Any]) -> None:
        exc = future.exception()
        if exc is None:
            # The order's view: cancelled by this cancel, or it had ended cancelled before.
            result = future.result()
            status = result.get("status") if isinstance(result, dict) else None
            self._answered("cancelled" if _by_customer(result) else f"already_{status}")
        elif isinstance(exc, ClientError):
            self._answered("too_late" if exc.code == "conflict" else f"error:{exc.code}")
        else:
            self._answered(f"error:{type(exc).__name__}")

    def _answered(self, outcome: str) -> None:
        with self._cv:
            self._replies[outcome] += 1
            self._outstanding -= 1
            self._cv.notify_all()
