"""The run's plan: the payment-token mix, every order to place, and (open loop) when.

Everything is generated from the seed before the clock starts, so the timed loop only submits
and two runs with one seed place the same orders at the same offsets: which orders are placed
with shipping and with which carrier token, and which get a customer's cancel and how long after
their placement it is sent.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PRODUCTS = tuple(f"SKU-{i:03d}" for i in range(1, 11))
SCARCE_SKU = "SKU-SCARCE"
MAX_QUANTITY = 3

# The simulated provider's test tokens (README "Payment test tokens"), for --help.
PAYMENT_TOKENS = {
    "tok_visa": "paid",
    "tok_chargeDeclined": "cancelled (declined)",
    "tok_error": "failed (provider raises)",
    "tok_timeout": "cancelled after the step timeout",
    "tok_late": "cancelled, the late charge refunded",
    "tok_crash": "failed (kills Payment on the process bases)",
}
# The simulated carrier's test tokens (README "Shipping and cancel"), for --help.
CARRIER_TOKENS = {
    "ship_standard": "shipped",
    "ship_refused": "cancelled (refused; refunded, released)",
    "ship_timeout": "cancelled after the step timeout (the late shipment cancelled)",
    "ship_error": "failed (the carrier raises; refunded, released)",
}
# Where the orders placed with shipping go (the server checks the fields, not the place).
ADDRESS = {
    "name": "Load Test",
    "line1": "1 Bench Street",
    "city": "Testville",
    "postal_code": "12345",
    "country": "DE",
}
CANCEL_REASON = "loadtest: the customer changed their mind"


def parse_mix(text: str) -> dict[str, float]:
    """Parse `tok_visa=90,tok_timeout=10` into token weights; raises ValueError when malformed.

    A bare token (`tok_visa`) weighs 1. Weights must be finite and >= 0, and not all 0.
    """
    mix: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, weight_text = item.partition("=")
        name = name.strip()
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"bad token name {name!r} in mix {text!r}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} for {name} in mix {text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight for {name} must be a finite number >= 0, got {weight_text!r}")
        if name in mix:
            raise ValueError(f"token {name} appears twice in mix {text!r}")
        mix[name] = weight
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no token with a positive weight")
    return mix


def format_mix(mix: Mapping[str, float]) -> str:
    """The mix as the command line spells it."""
    return ",".join(f"{token}={weight:g}" for token, weight in mix.items())


def _price(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True, slots=True)
class PlannedOrder:
    """One order of the run: its wire args, whether it competes for the scarce product, and
    how many seconds after its submission the customer cancels it (None: never)."""

    args: dict[str, Any]
    scarce: bool
    cancel_after: float | None = None


@dataclass(frozen=True)
class OrderShape:
    """What the run's orders look like: payment tokens, lines, the scarce share, shipping (the
    share placed with it and the carrier tokens' weights) and customers' cancels (the share
    cancelled, each at a uniformly random moment within `cancel_within` seconds of its
    submission, racing the order's steps)."""

    mix: Mapping[str, float]
    lines: int = 1
    scarce_share: float = 0.0
    ship_share: float = 0.0
    carrier_mix: Mapping[str, float] = field(default_factory=lambda: {"ship_standard": 1.0})
    cancel_share: float = 0.0
    cancel_within: float = 0.05


def plan_orders(
    count: int, *, rng: random.Random, run_id: str, shape: OrderShape
) -> list[PlannedOrder]:
    """Generate the run's orders up front so the timed loop only submits.

    A scarce order's first line is 1 unit of SKU-SCARCE; the other lines use distinct products.
    Shipping and cancels are drawn after the orders, so a seed places the same orders with or
    without them.
    """
    methods = rng.choices(list(shape.mix), weights=list(shape.mix.values()), k=count)
    plan: list[PlannedOrder] = []
    for n in range(count):
        scarce = shape.scarce_share > 0 and rng.random() < shape.scarce_share
        order_lines: list[dict[str, Any]] = []
        if scarce:
            order_lines.append(
                {
                    "product_id": SCARCE_SKU,
                    "quantity": 1,
                    "unit_price": _price(rng.randint(100, 9999)),
                }
            )
        for sku in rng.sample(PRODUCTS, shape.lines - len(order_lines)):
            order_lines.append(
                {
                    "product_id": sku,
                    "quantity": rng.randint(1, MAX_QUANTITY),
                    "unit_price": _price(rng.randint(100, 9999)),
                }
            )
        args = {
            "order_id": f"lt-{run_id}-{n}",
            "customer_id": f"cust-{rng.randrange(1_000_000):06d}",
            "lines": order_lines,
            "payment_method": methods[n],
            "wait": True,
        }
        plan.append(PlannedOrder(args, scarce))
    return [_fulfilment(order, rng, shape) for order in plan]


def _fulfilment(order: PlannedOrder, rng: random.Random, shape: OrderShape) -> PlannedOrder:
    """The order placed with shipping (a carrier token from the mix) and given a customer's
    cancel, each for its share of the orders."""
    (carrier,) = rng.choices(list(shape.carrier_mix), weights=list(shape.carrier_mix.values()))
    ships = rng.random() < shape.ship_share
    cancels = rng.random() < shape.cancel_share
    delay = rng.uniform(0, shape.cancel_within)
    args = order.args
    if ships:
        args = {**args, "shipping": {"address": ADDRESS, "carrier": carrier}}
    return PlannedOrder(args, order.scarce, delay if cancels else None)


def units_needed(plan: Sequence[PlannedOrder]) -> Counter[str]:
    """Units per regular product that the plan could reserve at most."""
    needed: Counter[str] = Counter()
    for order in plan:
        for line in order.args["lines"]:
            if line["product_id"] != SCARCE_SKU:
                needed[line["product_id"]] += line["quantity"]
    return needed


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """Open loop: seconds after the start at which each order is due, a Poisson process.

    Inter-arrival times are exponential with mean 1/rate. They come from a generator of their
    own (derived from the seed) so the orders themselves are the same as in a closed-loop run
    with that seed.
    """
    if rate <= 0:
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    rng = random.Random(f"arrivals-{seed}")
    offsets: list[float] = []
    t = 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        offsets.append(t)
    return offsets
