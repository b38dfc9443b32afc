"""The node's Prometheus metrics: one registry, served by the HTTP API at ``/metrics``.

Where each family comes from, and what a process base sees of it:

- ``orders_total{outcome}``, ``order_step_seconds{step}``, ``order_seconds``,
  ``compensations_total{kind}``, ``orders_in_flight``: derived from the store's events by the
  tail (``observability.tail``), so they hold on every base (the store is shared) and cost the
  actors nothing. Step durations are between the commit times of the events that end them.
- ``store_commit_seconds``, ``store_batch_size``: observed by the EventStore actor around each
  group commit; ``supervision_restarts_total{actor}``: counted by the OrderManager. Both live in
  the actor's process, so only the simple base (every actor in the node's process) exports them;
  on the process bases they stay at zero here (their registries are in the actor processes).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from messages.base import OrderStatus

# The `_created` series double every counter and histogram for a value nobody here graphs.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

# Seconds: the saga's steps take from a millisecond (group commit) to the step timeout.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COMMIT_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

SUPERVISION_RESTARTS = Counter(
    "supervision_restarts",
    "Actors replaced by supervision: a service restarted, or a saga rebuilt to compensate",
    ["actor"],
    registry=REGISTRY,
)
STORE_COMMIT_SECONDS = Histogram(
    "store_commit_seconds",
    "Duration of one group commit of the EventStore actor",
    buckets=_COMMIT_BUCKETS,
    registry=REGISTRY,
)
STORE_BATCH_SIZE = Histogram(
    "store_batch_size",
    "Appends committed together in one group commit",
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)

# Steps named by the event that ends them; the first is measured from OrderPlaced.
STEP_OF_EVENT: dict[str, str] = {
    "InventoryReserved": "reserve",
    "InventoryUnavailable": "reserve",
    "PaymentProcessed": "charge",
    "PaymentFailed": "charge",
    "InventoryReleased": "release",
    "PaymentRefunded": "refund",
    "OrderPaid": "record",
    "OrderCancelled": "record",
    "OrderFulfillmentFailed": "record",
}
# Compensating records, in the order stream and the payment stream.
COMPENSATION_KIND: dict[str, str] = {
    "InventoryReleased": "inventory_released",
    "PaymentRefunded": "payment_refunded",
    "PaymentVoided": "payment_voided",
    "ChargeRefunded": "charge_refunded",
}


@contextmanager
def store_commit(batch_size: int) -> Iterator[None]:
    """Time one group commit of `batch_size` appends (two observations per batch, not per
    append: the cost stays out of the per-order path)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STORE_COMMIT_SECONDS.observe(time.perf_counter() - start)
        STORE_BATCH_SIZE.observe(batch_size)


class _Histogram:
    """Bucket counts and a sum, as plain numbers (see DerivedMetrics)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are `le`: the first bound >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


class DerivedMetrics(Collector):
    """The families derived from the store's events, kept as plain numbers by the tail and
    turned into Prometheus samples only when scraped. The tail counts ~10 events per order;
    through prometheus_client each inc/observe takes a lock and costs a few microseconds (60 us
    of CPU per order in all, measured), here an add. The tail holds ``lock`` once per batch of
    events it applies, a scrape once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.orders = {str(status): 0 for status in OrderStatus if status != "pending"}
        self.compensations = dict.fromkeys(COMPENSATION_KIND.values(), 0)
        self.steps = {step: _Histogram(_STEP_BUCKETS) for step in set(STEP_OF_EVENT.values())}
        self.order_seconds = _Histogram(_STEP_BUCKETS)
        self.in_flight = 0

    def collect(self) -> Iterable[Metric]:
        """The samples, from one consistent snapshot."""
        with self.lock:
            orders = CounterMetricFamily(
                "orders", "Orders that reached a terminal state, by outcome", labels=["outcome"]
            )
            for outcome, count in self.orders.items():
                orders.add_metric([outcome], count)
            steps = HistogramMetricFamily(
                "order_step_seconds",
                "Time from the previous recorded step of an order to the event that ends this "
                "step (commit times; record: the terminal event)",
                labels=["step"],
            )
            for step in sorted(self.steps):
                histogram = self.steps[step]
                steps.add_metric([step], histogram.buckets(), histogram.total)
            whole = HistogramMetricFamily(
                "order_seconds", "Time from OrderPlaced to the order's terminal event"
            )
            whole.add_metric([], self.order_seconds.buckets(), self.order_seconds.total)
            compensations = CounterMetricFamily(
                "compensations",
                "Compensating records, by kind: order stream (inventory_released, "
                "payment_refunded) and payment stream (payment_voided, charge_refunded)",
                labels=["kind"],
            )
            for kind, count in self.compensations.items():
                compensations.add_metric([kind], count)
            in_flight = GaugeMetricFamily(
                "orders_in_flight", "Orders placed and not yet terminal", value=self.in_flight
            )
        return [orders, steps, whole, compensations, in_flight]


DERIVED = DerivedMetrics()
REGISTRY.register(DERIVED)


def exposition() -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(REGISTRY)
