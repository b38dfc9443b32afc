"""Providers behind interfaces: the services' way out of the system (docs/architecture.md).

``payment.py`` is the payment provider interface (charge / refund / void, typed results, the
failure hierarchy); ``simulated.py`` the test tokens' provider; ``http_payment.py`` a
Stripe-style HTTP API. ``open_provider`` picks one by name or URL. ``shipping.py`` is the
carrier interface (create / cancel shipment, typed results, the failure hierarchy);
``simulated_carrier.py`` the carrier tokens' carrier, which ``open_carrier`` opens.
"""

from __future__ import annotations

from providers.payment import (
    Charge,
    ChargeRequest,
    PaymentDeclinedError,
    PaymentError,
    PaymentProvider,
    ProviderError,
    ProviderTimeoutError,
    Refund,
    RefundRequest,
    Voided,
    VoidRequest,
)
from providers.shipping import (
    Cancelled,
    CancelRequest,
    Carrier,
    CarrierError,
    CarrierRefusedError,
    CarrierTimeoutError,
    Shipment,
    ShipmentRequest,
    ShippingError,
)

__all__ = [
    "CancelRequest",
    "Cancelled",
    "Carrier",
    "CarrierError",
    "CarrierRefusedError",
    "CarrierTimeoutError",
    "Charge",
    "ChargeRequest",
    "PaymentDeclinedError",
    "PaymentError",
    "PaymentProvider",
    "ProviderError",
    "ProviderTimeoutError",
    "Refund",
    "RefundRequest",
    "Shipment",
    "ShipmentRequest",
    "ShippingError",
    "VoidRequest",
    "Voided",
    "open_carrier",
    "open_provider",
]


def open_provider(
    spec: str,
    *,
    step_timeout: float,
    latency: float = 0.0,
    crash_exits_process: bool = False,
) -> PaymentProvider:
    """The provider `spec` names: ``simulated`` (the test tokens) or ``http://HOST:PORT`` /
    ``https://...`` (a Stripe-style HTTP API, ``providers.http_payment``). `step_timeout` is
    the saga's: a remote provider's deadline stays below it."""
    # Imported here: the simulator must not pay for httpx, and neither imports the other.
    if spec == "simulated":
        from providers.simulated import SimulatedProvider  # noqa: PLC0415

        return SimulatedProvider(
            step_timeout=step_timeout, latency=latency, crash_exits_process=crash_exits_process
        )
    if spec.startswith(("http://", "https://")):
        from providers.http_payment import HttpPaymentProvider, timeout_for  # noqa: PLC0415

        return HttpPaymentProvider(spec, timeout=timeout_for(step_timeout))
    raise ValueError(f"unknown payment provider {spec!r}: use simulated or http://HOST:PORT")


def open_carrier(spec: str, *, step_timeout: float) -> Carrier:
    """The carrier `spec` names: ``simulated`` (the carrier tokens) is the only one so far.
    `step_timeout` is the saga's: ``ship_timeout``'s late shipment comes 1.5 of them later."""
    if spec == "simulated":
        from providers.simulated_carrier import SimulatedCarrier  # noqa: PLC0415

        return SimulatedCarrier(step_timeout=step_timeout)
    raise ValueError(f"unknown carrier {spec!r}: use simulated")
