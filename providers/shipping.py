"""The carrier interface: what the Shipping actor needs from whoever moves the parcels.

Two operations, each keyed by the order id (the idempotency key: asking twice about one order
never creates two shipments):

- ``create_shipment``: ship the order with a carrier token; returns a ``Shipment`` or raises
  ``CarrierRefusedError`` (a final no), ``CarrierError`` (the carrier failed while handling the
  request) or ``CarrierTimeoutError`` (no answer; its ``late`` is the shipment the carrier
  creates anyway after ``late.delay`` seconds, telling nobody).
- ``cancel_shipment``: make sure no shipment stands for the order; the shipment the Shipping
  actor knows of (``CancelRequest.shipment``) is cancelled; returns ``Cancelled`` with it.

The actor records what these return as events in ``shipment-{order_id}`` and answers the saga;
which carrier sits behind it (``providers.simulated_carrier``) is chosen by
``providers.open_carrier``, so the sagas never see it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from messages.errors import ExpectedFailureError


class ShippingError(Exception):
    """Base of what a carrier raises instead of returning a result."""


class CarrierRefusedError(ShippingError):
    """The carrier refused the shipment for good: asking again gets the same answer, and no
    shipment was created."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CarrierError(ShippingError, ExpectedFailureError):
    """The carrier failed to handle the request (``ship_error``).

    An expected failure: raised inline it is one warning line in the log, not a traceback per
    Thespian retry."""


@dataclass(frozen=True, slots=True)
class Shipment:
    """A shipment that stands at the carrier.

    `delay` is the seconds after the request at which the carrier creates it: 0 when it
    answers at once, more for the late shipment a ``CarrierTimeoutError`` carries."""

    shipment_id: str
    tracking_number: str
    delay: float = 0.0


class CarrierTimeoutError(ShippingError, TimeoutError):
    """No answer to a create: the saga's step timer decides. `late` is the shipment the
    carrier creates anyway after `late.delay` seconds (None: it creates none)."""

    def __init__(self, message: str, late: Shipment | None = None) -> None:
        super().__init__(message)
        self.late = late


@dataclass(frozen=True, slots=True)
class ShipmentRequest:
    """Ship an order with `carrier` (a token)."""

    order_id: str
    carrier: str


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """Make sure no shipment stands for the order; `shipment` is the one the caller knows of
    (None: it knows of none)."""

    order_id: str
    reason: str
    shipment: Shipment | None = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What a cancel found standing and cancelled; None when no shipment stood."""

    shipment: Shipment | None = None


class Carrier(ABC):
    """Ships orders for the Shipping actor; every operation is idempotent per order id.

    Called on the actor's own thread: a carrier answers at once (a remote one would need the
    worker pool the Payment actor has)."""

    @abstractmethod
    def create_shipment(self, request: ShipmentRequest) -> Shipment:
        """Create once per order id; a repeated request returns the first shipment."""

    @abstractmethod
    def cancel_shipment(self, request: CancelRequest) -> Cancelled:
        """Leave no shipment standing for the order (cancelling what stands)."""

    def close(self) -> None:  # noqa: B027 (a hook: most carriers hold nothing to close)
        """Release connections and threads; the carrier is not used afterwards."""
