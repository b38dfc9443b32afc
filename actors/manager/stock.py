"""Stock requests from the gateway, forwarded to Inventory and answered back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from messages.commands import GetStock, ProductsKnown, Refused, SetStock, StockReport
from messages.errors import ErrorCode

INVENTORY = "inventory"


class StockForwarder:
    """Forwards GetStock / SetStock to Inventory and its answer to the asking gateway.

    `inventory()` is Inventory's address, or None while it is not available.
    """

    def __init__(self, inventory: Callable[[], Any], send: Callable[[Any, Any], None]) -> None:
        self._inventory = inventory
        self._send = send
        self._waiting: dict[int, Any] = {}  # req_id -> gateway
        self._products: frozenset[str] = frozenset()

    def products_known(self, msg: ProductsKnown) -> None:
        """Inventory's list of products (products are never removed)."""
        self._products = self._products | frozenset(msg.products)

    def unknown(self, product_ids: Sequence[str]) -> list[str]:
        """Those of `product_ids` Inventory has not named, in order, once each."""
        return [p for p in dict.fromkeys(product_ids) if p not in self._products]

    def forward(self, msg: GetStock | SetStock, sender: Any) -> None:
        """Ask Inventory, or refuse at once while it is restarting."""
        inventory = self._inventory()
        if inventory is None:
            refused = Refused(
                req_id=msg.req_id, code=ErrorCode.UNAVAILABLE, message="inventory is restarting"
            )
            self._send(sender, refused)
            return
        self._waiting[msg.req_id] = sender
        self._send(inventory, msg)

    def answer(self, msg: StockReport | Refused) -> None:
        """Inventory's answer goes back to whoever asked."""
        gateway = self._waiting.pop(msg.req_id, None)
        if gateway is not None:
            self._send(gateway, msg)
