"""The simulated carrier alone: each carrier token's outcome, idempotency per order id."""

from __future__ import annotations

import pytest

from messages.errors import ExpectedFailureError
from providers import (
    Cancelled,
    CancelRequest,
    CarrierError,
    CarrierRefusedError,
    CarrierTimeoutError,
    ShipmentRequest,
    open_carrier,
)
from providers.simulated_carrier import REFUSED_MESSAGE, SimulatedCarrier

STEP_TIMEOUT = 2.0


@pytest.fixture
def carrier() -> SimulatedCarrier:
    return SimulatedCarrier(step_timeout=STEP_TIMEOUT)


def test_ship_standard_creates_a_shipment_at_once(carrier: SimulatedCarrier) -> None:
    shipment = carrier.create_shipment(ShipmentRequest("o-1", "ship_standard"))
    assert shipment.shipment_id.startswith("shp-")
    assert shipment.tracking_number.startswith("TRK")
    assert shipment.delay == 0.0


def test_ship_refused_refuses(carrier: SimulatedCarrier) -> None:
    with pytest.raises(CarrierRefusedError) as refused:
        carrier.create_shipment(ShipmentRequest("o-1", "ship_refused"))
    assert refused.value.reason == REFUSED_MESSAGE


def test_an_unknown_token_is_refused(carrier: SimulatedCarrier) -> None:
    with pytest.raises(CarrierRefusedError) as refused:
        carrier.create_shipment(ShipmentRequest("o-1", "ship_pigeon"))
    assert refused.value.reason == "No such carrier: 'ship_pigeon'"


def test_ship_error_is_an_expected_carrier_failure(carrier: SimulatedCarrier) -> None:
    with pytest.raises(CarrierError) as failed:
        carrier.create_shipment(ShipmentRequest("o-1", "ship_error"))
    assert isinstance(failed.value, ExpectedFailureError)


def test_ship_timeout_never_answers_and_ships_late(carrier: SimulatedCarrier) -> None:
    with pytest.raises(CarrierTimeoutError) as timeout:
        carrier.create_shipment(ShipmentRequest("o-1", "ship_timeout"))
    late = timeout.value.late
    assert late is not None
    assert late.delay == pytest.approx(STEP_TIMEOUT * 1.5)


def test_a_repeated_create_returns_the_first_shipment(carrier: SimulatedCarrier) -> None:
    first = carrier.create_shipment(ShipmentRequest("o-1", "ship_standard"))
    assert carrier.create_shipment(ShipmentRequest("o-1", "ship_standard")) == first
    other = carrier.create_shipment(ShipmentRequest("o-2", "ship_standard"))
    assert other.shipment_id != first.shipment_id


def test_a_repeated_timeout_carries_the_same_late_shipment(carrier: SimulatedCarrier) -> None:
    lates = []
    for _ in range(2):
        with pytest.raises(CarrierTimeoutError) as timeout:
            carrier.create_shipment(ShipmentRequest("o-1", "ship_timeout"))
        lates.append(timeout.value.late)
    assert lates[0] is not None
    assert lates[0] == lates[1]


def test_cancel_cancels_the_known_shipment_idempotently(carrier: SimulatedCarrier) -> None:
    shipment = carrier.create_shipment(ShipmentRequest("o-1", "ship_standard"))
    request = CancelRequest("o-1", "customer cancelled", shipment)
    assert carrier.cancel_shipment(request) == Cancelled(shipment)
    assert carrier.cancel_shipment(request) == Cancelled(shipment)


def test_cancel_with_no_shipment_finds_none(carrier: SimulatedCarrier) -> None:
    assert carrier.cancel_shipment(CancelRequest("o-1", "saga gave up")) == Cancelled()


def test_open_carrier() -> None:
    assert isinstance(open_carrier("simulated", step_timeout=1.0), SimulatedCarrier)
    with pytest.raises(ValueError, match="unknown carrier"):
        open_carrier("ups", step_timeout=1.0)
