"""A payment provider behind an HTTP API in the style of Stripe's.

- ``POST /v1/charges`` (form-encoded): ``amount`` in minor units (cents), ``currency``,
  ``source`` (the payment token), ``metadata[order_id]``; header ``Idempotency-Key:
  {order_id}:charge``. 200 with a charge object ``{"id", "amount", "currency", "status",
  "refunded", "amount_refunded", "metadata"}``.
- ``POST /v1/refunds``: ``charge`` (its id); header ``Idempotency-Key: {order_id}:refund``.
  200 with a refund object ``{"id", "charge", "amount", "status"}``.
- ``GET /v1/charges/search?query=metadata['order_id']:'{order_id}'``: ``{"data": [charge…]}``,
  how a void finds a charge whose answer was lost.
- Errors: an HTTP status with ``{"error": {"type", "code", "message"}}``. 402 (``card_error``)
  and 400/404 (``invalid_request_error``, e.g. no such token) are final refusals:
  ``PaymentDeclinedError``. Everything else (5xx, 409 concurrent use of a key, 429, 401, a
  connection refused, a body that is no JSON) is ``ProviderError``: the outcome is unknown.
  No answer within the timeout is ``ProviderTimeoutError``.

Retrying any of these with the same idempotency key is safe: the provider answers a key it has
seen with the first answer and never charges or refunds twice. The Payment actor calls this
class on a worker thread (``remote``), never on the actor system's thread.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx

from providers.payment import (
    Charge,
    ChargeRequest,
    PaymentDeclinedError,
    PaymentProvider,
    ProviderError,
    ProviderTimeoutError,
    Refund,
    RefundRequest,
    Voided,
    VoidRequest,
)

MINOR_UNITS = Decimal(100)  # cents per unit of the currency (two-decimal currencies only)
DECLINE_STATUSES = frozenset({400, 402, 404})


def timeout_for(step_timeout: float) -> float:
    """The HTTP deadline for a saga step of `step_timeout` seconds: 60 % of it, at most 10 s.

    Below the step timeout, so a call has ended (answered or given up) before the saga's timer
    fires and it asks for a void: the void then never races the charge it voids."""
    return min(step_timeout * 0.6, 10.0)


def to_minor_units(amount: Decimal) -> int:
    """24.98 -> 2498; an amount with a fraction of a cent is refused, never rounded."""
    minor = amount * MINOR_UNITS
    if minor != minor.to_integral_value():
        raise ValueError(f"amount {amount} has a fraction of a minor unit")
    return int(minor)


def from_minor_units(minor: int) -> Decimal:
    """2498 -> Decimal('24.98')."""
    return (Decimal(minor) / MINOR_UNITS).quantize(Decimal("0.01"))


class HttpPaymentProvider(PaymentProvider):
    """Stripe-style HTTP payment API at `base_url`; thread-safe (one pooled httpx client)."""

    remote = True

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        api_key: str | None = None,
        currency: str = "usd",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One timeout for connect, write, read and pool wait: the whole call stays near it.
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            headers=headers,
            transport=transport,
        )
        self._currency = currency
        self.timeout = timeout

    def charge(self, request: ChargeRequest) -> Charge:
        """POST /v1/charges with the order's idempotency key."""
        body = self._call(
            "POST",
            "/v1/charges",
            key=f"{request.order_id}:charge",
            data={
                "amount": str(to_minor_units(request.amount)),
                "currency": self._currency,
                "source": request.payment_method,
                "metadata[order_id]": request.order_id,
            },
        )
        charge = _charge_of(body)
        if body.get("status", "succeeded") != "succeeded":
            # Stripe answers some declines as a charge with status "failed".
            raise PaymentDeclinedError(str(body.get("failure_message") or "charge failed"))
        return charge

    def refund(self, request: RefundRequest) -> Refund:
        """POST /v1/refunds; a charge refunded already counts as refunded."""
        try:
            body = self._call(
                "POST",
                "/v1/refunds",
                key=f"{request.order_id}:refund",
                data={"charge": request.payment_id},
            )
        except PaymentDeclinedError as refused:
            if refused.code == "charge_already_refunded":
                return Refund(request.payment_id, request.amount)
            # The provider will not refund a charge we hold: that is no customer's decline but
            # a failure to give money back, and the caller must try again.
            raise ProviderError(f"refund of {request.payment_id} refused: {refused}") from None
        return Refund(
            str(body.get("charge", request.payment_id)),
            from_minor_units(int(body["amount"])) if "amount" in body else request.amount,
            str(body.get("id", "")),
        )

    def void(self, request: VoidRequest) -> Voided:
        """Find the order's charges at the provider (the one we know of, or one whose answer
        was lost) and refund each that stands."""
        found = [(_charge_of(c), bool(c.get("refunded"))) for c in self._search(request)]
        known = request.charge
        if known is not None and all(c.payment_id != known.payment_id for c, _ in found):
            found.append((known, False))  # not searchable yet: still ours to give back
        charged: Charge | None = None
        refund: Refund | None = None
        # One charge per order key at most; a loop so that a second one would be refunded too.
        for charge, refunded in found:
            charged = charge
            if refunded:
                refund = Refund(charge.payment_id, charge.amount)
                continue
            refund = self.refund(
                RefundRequest(request.order_id, charge.payment_id, charge.amount, request.reason)
            )
        return Voided(charged, refund)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _search(self, request: VoidRequest) -> list[dict[str, Any]]:
        body = self._call(
            "GET",
            "/v1/charges/search",
            params={"query": f"metadata['order_id']:'{request.order_id}'"},
        )
        data = body.get("data", [])
        if not isinstance(data, list):
            raise ProviderError("charge search answered without a data list")
        return [c for c in data if isinstance(c, dict) and c.get("status") == "succeeded"]

    def _call(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        data: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else None
        try:
            response = self._http.request(method, path, data=data, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise ProviderTimeoutError(
                f"{method} {path}: no answer within {self.timeout:g} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ProviderError(f"{method} {path}: HTTP {response.status_code}, no JSON object")
        if response.is_success:
            return body
        found = body.get("error")
        error: dict[str, Any] = found if isinstance(found, dict) else {}
        kind = str(error.get("type", "api_error"))
        code = str(error.get("code", kind))
        message = str(error.get("message", f"HTTP {response.status_code}"))
        if response.status_code in DECLINE_STATUSES:
            raise PaymentDeclinedError(message, code=code)
        raise ProviderError(
            f"{method} {path}: HTTP {response.status_code} {kind}/{code}: {message}"
        )


def _charge_of(body: dict[str, Any]) -> Charge:
    """A charge object's id and amount (raises ProviderError on a malformed one)."""
    try:
        return Charge(str(body["id"]), from_minor_units(int(body["amount"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProviderError(f"malformed charge object: {exc}") from exc
