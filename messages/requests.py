"""The arguments of every wire op (DESIGN.md section 6), validated strictly with pydantic.

A refusal names the field (``lines.0.quantity: …``) and never costs the connection.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field, StrictBool, StrictInt, StringConstraints, field_validator

from messages.base import (
    MAX_QUANTITY,
    Frozen,
    OrderId,
    OrderLine,
    OrderStatus,
    ProductId,
    Shipping,
    items_of,
    order_total,
)

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
StreamName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MAX_LINES = 100
MAX_TOTAL = Decimal("9999999999.9999")  # what an amount field (14 digits, 4 decimals) holds
MINOR_UNIT_PLACES = 2  # the one currency's minor unit: prices are whole cents
CENT = Decimal(1).scaleb(-MINOR_UNIT_PLACES)
MAX_VERSION = 2**62
MAX_PAGE = 1000  # events per read_stream reply; page on with from_version = next_version


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
    # {address: {name, line1, city, postal_code, country}, carrier}: DESIGN.md section 9.
    shipping: Shipping | None = None

    @field_validator("lines", mode="before")
    @classmethod
    def _few_enough_lines(cls, lines: Any) -> Any:
        # Checked before the lines themselves: a 1 MiB frame of half a million lines would
        # otherwise be validated line by line on the event loop before the length check.
        if isinstance(lines, list | tuple) and len(lines) > MAX_LINES:
            raise ValueError(f"at most {MAX_LINES} lines per order, got {len(lines)}")
        return lines

    @field_validator("lines")
    @classmethod
    def _order_fits_its_fields(cls, lines: tuple[OrderLine, ...]) -> tuple[OrderLine, ...]:
        # Prices are in the currency's minor unit: 0.001 cannot be charged. Normalised to
        # exactly that many places, so every amount goes back out alike ("5.00", not "5").
        lines = tuple(_in_minor_units(line) for line in lines)
        # Lines of the same product are reserved together, and the total is an amount field:
        # both must stay within what the events can hold.
        for item in items_of(lines):
            if item.quantity > MAX_QUANTITY:
                raise ValueError(
                    f"{item.product_id}: {item.quantity} units in all, at most {MAX_QUANTITY}"
                )
        if order_total(lines) > MAX_TOTAL:
            raise ValueError(f"order total {order_total(lines)} exceeds {MAX_TOTAL}")
        return lines


def _in_minor_units(line: OrderLine) -> OrderLine:
    price = line.unit_price
    if price != price.quantize(CENT):
        raise ValueError(
            f"{line.product_id}: unit_price {price} has more than {MINOR_UNIT_PLACES} decimal "
            "places (the currency's minor unit)"
        )
    return line.model_copy(update={"unit_price": price.quantize(CENT)})


DEFAULT_CANCEL_REASON = "Cancelled by the customer"


class CancelOrderArgs(Frozen):
    """`cancel_order`: the customer's cancellation, with why."""

    order_id: OrderId
    reason: Annotated[str, StringConstraints(min_length=1, max_length=256)] = DEFAULT_CANCEL_REASON


class GetOrderArgs(Frozen):
    """`get_order`."""

    order_id: OrderId


class ReadStreamArgs(Frozen):
    """`read_stream`: a stream's events from a version on."""

    stream: StreamName
    from_version: Annotated[StrictInt, Field(ge=0, le=MAX_VERSION)] = 0
    limit: Annotated[StrictInt, Field(ge=1, le=MAX_PAGE)] = MAX_PAGE


class StockArgs(Frozen):
    """`stock`: some products, or all when the list is empty."""

    product_ids: Annotated[tuple[ProductId, ...], Field(max_length=1000)] = ()


class SetStockArgs(Frozen):
    """`set_stock`: an existing product's units on hand (``add_product`` makes a new one)."""

    product_id: ProductId
    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]
    admin_token: Annotated[str, StringConstraints(max_length=256)] | None = None


class AddProductArgs(Frozen):
    """`add_product` (admin): a new product with its units on hand."""

    product_id: ProductId
    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]
    admin_token: Annotated[str, StringConstraints(max_length=256)] | None = None


class ListOrdersArgs(Frozen):
    """`list_orders`: one page of orders, newest first; `cursor` is a `next_cursor` returned by
    the previous page."""

    status: OrderStatus | None = None
    customer_id: Name | None = None
    limit: Annotated[StrictInt, Field(ge=1, le=MAX_PAGE)] = 100
    cursor: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}$")] | None = None
