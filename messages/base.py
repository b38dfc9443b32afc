"""Shared building blocks of every message: frozen models, money, time and order lines."""

from __future__ import annotations

import enum
import itertools
import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StringConstraints,
    TypeAdapter,
)

# Money travels as a decimal string so no float ever touches an amount; a number is accepted on
# input (pydantic converts ints and floats through their decimal repr).
Money = Annotated[
    Decimal,
    Field(ge=0, max_digits=14, decimal_places=4, allow_inf_nan=False),
    PlainSerializer(str, return_type=str, when_used="json"),
]
ProductId = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
]
OrderId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]
MAX_QUANTITY = 1_000_000
Quantity = Annotated[StrictInt, Field(ge=1, le=MAX_QUANTITY)]


class _IdSource:
    """Unique ids without a system call each: a random 96-bit prefix per process and a counter.

    os.urandom per id (one getrandom call) took 4 % of the CPU under load, uuid4 more. A forked
    child (the process bases) draws a new prefix, so parent and child never share a sequence.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(12).hex()
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


new_id = _IdSource()
"""A fresh unique id (event, reservation and payment ids): 32+ hex digits."""
os.register_at_fork(after_in_child=new_id.reseed)


def utcnow() -> datetime:
    """The current time, timezone-aware (UTC); every event timestamp comes from here."""
    return datetime.now(UTC)


_TIMESTAMP = TypeAdapter(datetime)


def iso_utc(moment: datetime | float) -> str:
    """A timestamp as every reply shows it: ISO 8601 in UTC with a ``Z``, as pydantic writes the
    events' datetimes (a unix time, like a stored event's ``recorded_at``, is converted)."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    text: str = _TIMESTAMP.dump_python(moment.astimezone(UTC), mode="json")
    return text


class OrderStatus(enum.StrEnum):
    """What a client sees of an order: ``pending`` until its terminal event is recorded."""

    PENDING = "pending"
    PAID = "paid"
    CANCELLED = "cancelled"
    FAILED = "failed"


TERMINAL_STATUSES = frozenset({OrderStatus.PAID, OrderStatus.CANCELLED, OrderStatus.FAILED})


class Frozen(BaseModel):
    """Base of every message and event: immutable, typed, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class OrderLine(Frozen):
    """One line of an order: how many units of a product at which unit price."""

    product_id: ProductId
    quantity: Quantity
    unit_price: Money


class Item(Frozen):
    """A product and a number of units (a reservation line)."""

    product_id: ProductId
    quantity: Quantity


class UnavailableItem(Frozen):
    """A line that could not be reserved: what was asked and what was available."""

    product_id: str
    requested: int
    available: int


def order_total(lines: tuple[OrderLine, ...] | list[OrderLine]) -> Decimal:
    """Sum of quantity * unit price over the lines, exact."""
    return sum((line.unit_price * line.quantity for line in lines), Decimal(0))


def items_of(lines: tuple[OrderLine, ...] | list[OrderLine]) -> tuple[Item, ...]:
    """The reservation items of an order's lines, quantities of repeated products summed."""
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.product_id] = totals.get(line.product_id, 0) + line.quantity
    return tuple(Item(product_id=p, quantity=q) for p, q in totals.items())
