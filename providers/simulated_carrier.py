"""The simulated carrier: test tokens, no network, answers at once.

Tokens (``carrier``): ``ship_standard`` ships; ``ship_refused`` refuses; ``ship_timeout``
never answers (``CarrierTimeoutError``: it creates the shipment after 1.5 step timeouts and
tells nobody); ``ship_error`` raises ``CarrierError``. Any other token is refused.

It remembers the shipments it created (the most recent ``MAX_REMEMBERED`` orders), so asking
twice about one order returns the first shipment; the Shipping actor's stream is the lasting
memory (a repeated request is answered from the stream and never reaches this class).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from messages.base import new_id
from providers.shipping import (
    Cancelled,
    CancelRequest,
    Carrier,
    CarrierError,
    CarrierRefusedError,
    CarrierTimeoutError,
    Shipment,
    ShipmentRequest,
)

REFUSED_MESSAGE = "The carrier refused the shipment."
CARRIER_TOKENS = ("ship_standard", "ship_refused", "ship_timeout", "ship_error")
MAX_REMEMBERED = 50_000

log = logging.getLogger("orders")


class SimulatedCarrier(Carrier):
    """The carrier tokens' carrier, called on the Shipping actor's own thread."""

    def __init__(self, *, step_timeout: float) -> None:
        self._step_timeout = step_timeout
        # order id -> (its shipment, whether the create was answered)
        self._shipments: OrderedDict[str, tuple[Shipment, bool]] = OrderedDict()

    def create_shipment(self, request: ShipmentRequest) -> Shipment:
        """Answer by token, as the module docstring says; once per order id."""
        known = self._shipments.get(request.order_id)
        if known is None:
            known = self._decide(request)
            self._shipments[request.order_id] = known
            if len(self._shipments) > MAX_REMEMBERED:
                self._shipments.popitem(last=False)
        shipment, answered = known
        if not answered:
            log.info(
                "shipping: ship_timeout, order %s will never be answered",
                request.order_id,
                extra={"order_id": request.order_id},
            )
            raise CarrierTimeoutError(
                f"ship_timeout: order {request.order_id} is never answered", late=shipment
            )
        return shipment

    def _decide(self, request: ShipmentRequest) -> tuple[Shipment, bool]:
        token = request.carrier
        if token == "ship_standard":  # first: the hot path
            return _new_shipment(), True
        if token == "ship_timeout":
            return _new_shipment(self._step_timeout * 1.5), False
        if token == "ship_refused":
            raise CarrierRefusedError(REFUSED_MESSAGE)
        if token == "ship_error":
            raise CarrierError(f"carrier error shipping order {request.order_id}")
        raise CarrierRefusedError(f"No such carrier: {token!r}")

    def cancel_shipment(self, request: CancelRequest) -> Cancelled:
        """Cancel the shipment the actor knows of; nothing else can stand here."""
        return Cancelled(request.shipment)


def _new_shipment(delay: float = 0.0) -> Shipment:
    return Shipment(f"shp-{new_id()}", f"TRK{new_id()[-12:].upper()}", delay)
