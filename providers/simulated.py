"""The simulated payment provider: Stripe-style test tokens, no network, answers at once.

Tokens (docs/design.md section 6): ``tok_visa`` approves (after ``--payment-latency`` seconds,
if set); ``tok_chargeDeclined`` declines; ``tok_error`` raises ``ProviderError``;
``tok_timeout`` never answers (``ProviderTimeoutError``: the saga's step timer decides);
``tok_late`` approves after 1.5 step timeouts, so the answer arrives after the saga gave up;
``tok_crash`` kills the calling process on the process bases (raises on the simple base,
where killing the process would kill the whole system). Any other token is declined.

It keeps no state of its own: the Payment actor's stream is the simulated provider's memory,
so its idempotency is the actor's (a repeated charge is answered from the stream and never
reaches this class).
"""

from __future__ import annotations

import logging
import os
import signal

from messages.base import new_id
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

DECLINE_MESSAGE = "Your card was declined."

log = logging.getLogger("orders")


class SimulatedProvider(PaymentProvider):
    """The test tokens' provider, called on the Payment actor's own thread."""

    remote = False

    def __init__(
        self, *, step_timeout: float, latency: float = 0.0, crash_exits_process: bool = False
    ) -> None:
        self._step_timeout = step_timeout
        self._latency = latency
        self._crash_exits_process = crash_exits_process

    def charge(self, request: ChargeRequest) -> Charge:
        """Answer by token, as the module docstring says."""
        token = request.payment_method
        if token == "tok_visa":  # first: the hot path
            return Charge(f"pay-{new_id()}", request.amount, self._latency)
        if token == "tok_chargeDeclined":
            raise PaymentDeclinedError(DECLINE_MESSAGE)
        if token == "tok_error":
            raise ProviderError(f"provider error charging order {request.order_id}")
        if token == "tok_timeout":
            log.info("payment: tok_timeout, order %s will never be answered", request.order_id)
            raise ProviderTimeoutError(f"tok_timeout: order {request.order_id} is never answered")
        if token == "tok_late":
            return Charge(f"pay-{new_id()}", request.amount, self._step_timeout * 1.5)
        if token == "tok_crash":
            if self._crash_exits_process:
                log.warning("payment: tok_crash, killing own process %d", os.getpid())
                os.kill(os.getpid(), signal.SIGKILL)
            raise ProviderError(f"provider crashed charging order {request.order_id}")
        raise PaymentDeclinedError(f"No such token: {token!r}", code="resource_missing")

    def refund(self, request: RefundRequest) -> Refund:
        """Always succeeds: the money only ever existed in the payment stream."""
        return Refund(request.payment_id, request.amount, f"re-{new_id()}")

    def void(self, request: VoidRequest) -> Voided:
        """Refund the charge the actor knows of; nothing else can stand here."""
        if request.charge is None:
            return Voided()
        charge = request.charge
        refund = self.refund(
            RefundRequest(request.order_id, charge.payment_id, charge.amount, request.reason)
        )
        return Voided(charge, refund)
