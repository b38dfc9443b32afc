"""Stock on the server before the clock starts, and the scarce product's check after it.

The run must not sell out by accident, so regular stock is raised to what the plan could
reserve; SKU-SCARCE is set so exactly `--scarce` units are left to race for. These are changes
to the server's state, so they are worked out first (`stock_changes`), shown, then applied.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from client import Client, ClientError
from loadgen.plan import SCARCE_SKU, PlannedOrder, units_needed
from messages.base import OrderStatus


@dataclass(frozen=True, slots=True)
class StockChange:
    """One `set_stock` (or, for a product that does not exist yet, `add_product`) of the run."""

    sku: str
    on_hand_before: int
    on_hand_after: int
    new: bool = False

    def __str__(self) -> str:
        return f"{self.sku} {self.on_hand_before}->{self.on_hand_after}"


def _level(client: Client, sku: str) -> Mapping[str, Any]:
    """The stock level of `sku`; empty for a product the server does not know yet."""
    try:
        level: Mapping[str, Any] = client.stock([sku]).get(sku) or {}
    except ClientError as e:
        if e.code == "not_found":
            return {}
        raise
    return level


def reserved(client: Client, sku: str) -> int:
    """Units of `sku` reserved now; 0 for a product the server does not know yet."""
    return int(_level(client, sku).get("reserved", 0))


def stock_changes(
    client: Client, plan: Sequence[PlannedOrder], scarce: int
) -> tuple[list[StockChange], int]:
    """The stock the run needs, as changes to make; with SKU-SCARCE's units reserved before.

    Units already held by earlier runs stay held: SKU-SCARCE gets `scarce` units on top.
    """
    needed = units_needed(plan)
    levels: Mapping[str, Any] = client.stock(sorted(needed)) if needed else {}
    changes: list[StockChange] = []
    for sku in sorted(needed):
        level = levels.get(sku) or {}
        on_hand, held = int(level.get("on_hand", 0)), int(level.get("reserved", 0))
        target = max(on_hand, held + needed[sku])
        if target != on_hand:
            changes.append(StockChange(sku, on_hand, target))
    scarce_before = 0
    if scarce > 0:
        level = _level(client, SCARCE_SKU)
        scarce_before = int(level.get("reserved", 0))
        changes.append(
            StockChange(
                SCARCE_SKU, int(level.get("on_hand", 0)), scarce_before + scarce, new=not level
            )
        )
    return changes, scarce_before


def describe_changes(changes: Sequence[StockChange], plan: Sequence[PlannedOrder]) -> str:
    """What the run is about to change, in one line."""
    regular = [c for c in changes if c.sku != SCARCE_SKU]
    parts = []
    if regular:
        parts.append(f"stock raised so the run cannot run out: {', '.join(map(str, regular))}")
    else:
        parts.append("regular stock already sufficient")
    for c in changes:
        if c.sku == SCARCE_SKU:
            contenders = sum(order.scarce for order in plan)
            parts.append(
                f"{SCARCE_SKU} on_hand {c.on_hand_before}->{c.on_hand_after} "
                f"({contenders} orders want 1 unit each)"
            )
    return "; ".join(parts)


def apply_changes(client: Client, changes: Sequence[StockChange], admin_token: str | None) -> None:
    """Make the `set_stock` / `add_product` calls."""
    for change in changes:
        args: dict[str, Any] = {"product_id": change.sku, "on_hand": change.on_hand_after}
        if admin_token:
            args["admin_token"] = admin_token
        client.call("add_product" if change.new else "set_stock", args)


def check_scarce(
    client: Client,
    units: int,
    plan: Sequence[PlannedOrder],
    statuses: Sequence[str],
    reserved_before: int,
) -> dict[str, Any]:
    """Did exactly the paid contenders keep a unit of SKU-SCARCE (the shipped ones took theirs
    away), and no more than there were?"""
    ends = Counter(status for order, status in zip(plan, statuses, strict=True) if order.scarce)
    paid, shipped = ends[OrderStatus.PAID], ends[OrderStatus.SHIPPED]
    reserved_by_run: int | None
    error = None
    try:
        reserved_by_run = reserved(client, SCARCE_SKU) - reserved_before
    except ClientError as e:
        reserved_by_run, error = None, f"reading {SCARCE_SKU} stock failed: {e}"
    return {
        **({"error": error} if error else {}),
        "units": units,
        "orders": sum(order.scarce for order in plan),
        "paid_orders": paid,
        "shipped_orders": shipped,
        "reserved_by_run": reserved_by_run,
        "ok": paid + shipped <= units and reserved_by_run == paid,
    }
