"""The arguments of every wire op (DESIGN.md section 6), validated strictly with pydantic.

A refusal names the field (``lines.0.quantity: …``) and never costs the connection.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictBool, StrictInt, StringConstraints

from messages.base import Frozen, OrderId, OrderLine, ProductId

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
StreamName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_LINES = 100


class NoArgs(Frozen):
    """`ping` and `audit` take no arguments."""


class AdminArgs(Frozen):
    """`system_info`: operator ops carry the admin token when one is configured."""

    admin_token: Annotated[str, StringConstraints(max_length=256)] | None = None


class PlaceOrderArgs(Frozen):
    """`place_order`: the order, and whether to answer when it is terminal."""

    order_id: OrderId
    customer_id: Name
    lines: Annotated[tuple[OrderLine, ...], Field(min_length=1, max_length=MAX_LINES)]
    payment_method: Token = "tok_visa"
    wait: StrictBool = True


class GetOrderArgs(Frozen):
    """`get_order`."""

    order_id: OrderId


class ReadStreamArgs(Frozen):
    """`read_stream`: a stream's events from a version on."""

    stream: StreamName
    from_version: Annotated[StrictInt, Field(ge=0)] = 0


class StockArgs(Frozen):
    """`stock`: some products, or all when the list is empty."""

    product_ids: Annotated[tuple[ProductId, ...], Field(max_length=1000)] = ()


class SetStockArgs(Frozen):
    """`set_stock`: a product's units on hand (created if new)."""

    product_id: ProductId
    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]
    admin_token: Annotated[str, StringConstraints(max_length=256)] | None = None
