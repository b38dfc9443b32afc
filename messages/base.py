"""Shared building blocks of every message: frozen models, money, time and order lines."""

from __future__ import annotations

import enum
import itertools
import os
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictInt,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    field_validator,
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
    PAID = "paid"  # terminal for an order placed without shipping; else waiting for shipment
    SHIPPED = "shipped"
    CANCELLED = "cancelled"
    FAILED = "failed"


# The statuses an order can end in (``paid`` ends only an order placed without shipping).
TERMINAL_STATUSES = frozenset(
    {OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.CANCELLED, OrderStatus.FAILED}
)


class Frozen(BaseModel):
    """Base of every message and event: immutable, typed, and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


_FIELD_SETS: dict[frozenset[str], set[str]] = {}  # one set object per distinct set of names

FrozenT = TypeVar("FrozenT", bound=Frozen)


def kept(model: FrozenT) -> FrozenT:
    """`model`, sharing its set of explicitly set field names with every other model kept this
    way. pydantic gives each instance a set of its own (728 bytes from five names on), which a
    model held for an order's whole life (the manager's OrderPlaced) pays once per order in
    flight. Safe for frozen models only: pydantic changes that set on attribute assignment,
    which they refuse, and copies it before a `model_copy` changes it."""
    names = model.__pydantic_fields_set__
    shared = _FIELD_SETS.setdefault(frozenset(names), names)
    object.__setattr__(model, "__pydantic_fields_set__", shared)
    return model


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


# ISO 3166-1 alpha-2: the officially assigned country codes.
COUNTRY_CODES = frozenset(
    # One string, split: a list literal takes a line per code.
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
    DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
    GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
    KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
    MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
    PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
    VN VU WF WS YE YT ZA ZM ZW
    """.split()  # noqa: SIM905
)


def _country_code(code: str) -> str:
    if code not in COUNTRY_CODES:
        raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code")
    return code


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


# Required address text: strictly a string, not blank, bounded in length.
NotBlank = AfterValidator(_not_blank)


CarrierToken = Annotated[
    StrictStr, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")
]
DEFAULT_CARRIER = "ship_standard"


class ShippingAddress(Frozen):
    """Where an order goes; every field required and bounded (country: ISO 3166 alpha-2)."""

    name: Annotated[StrictStr, StringConstraints(min_length=1, max_length=128), NotBlank]
    line1: Annotated[StrictStr, StringConstraints(min_length=1, max_length=200), NotBlank]
    city: Annotated[StrictStr, StringConstraints(min_length=1, max_length=100), NotBlank]
    postal_code: Annotated[StrictStr, StringConstraints(min_length=1, max_length=16), NotBlank]
    country: Annotated[StrictStr, StringConstraints(min_length=2, max_length=2)]

    @field_validator("country")
    @classmethod
    def _iso_country(cls, code: str) -> str:
        return _country_code(code)


class Shipping(Frozen):
    """An order's shipping request: the address and the carrier (a test token, section 9)."""

    address: ShippingAddress
    carrier: CarrierToken = DEFAULT_CARRIER


def order_total(lines: tuple[OrderLine, ...] | list[OrderLine]) -> Decimal:
    """Sum of quantity * unit price over the lines, exact."""
    return sum((line.unit_price * line.quantity for line in lines), Decimal(0))


def items_of(lines: tuple[OrderLine, ...] | list[OrderLine]) -> tuple[Item, ...]:
    """The reservation items of an order's lines, quantities of repeated products summed."""
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.product_id] = totals.get(line.product_id, 0) + line.quantity
    return tuple(Item(product_id=p, quantity=q) for p, q in totals.items())
