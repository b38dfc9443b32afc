"""The payment provider interface: what the Payment actor needs from whoever moves the money.

Three operations, each keyed by the order id (the idempotency key: asking twice about one order
never moves money twice):

- ``charge``: take the order's amount with a payment token; returns a ``Charge`` or raises
  ``PaymentDeclinedError`` (a final no), ``ProviderError`` (the provider failed; whether it charged
  is unknown) or ``ProviderTimeoutError`` (no answer in time; whether it charged is unknown).
- ``refund``: give a known charge back; returns a ``Refund``.
- ``void``: make sure no charge stands for the order, whatever the Payment actor knows of it:
  a charge it knows of (``VoidRequest.charge``) or one that landed at the provider while its
  answer was lost is refunded; returns ``Voided`` with what it found and gave back.

The actor records what these return as events in ``payment-{order_id}`` and answers the saga;
which provider sits behind it (``providers.simulated``, ``providers.http_payment``) is chosen by
``providers.open_provider`` from ``run.py --payment-provider``, so the sagas never see it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from decimal import Decimal

from messages.errors import ExpectedFailureError


class PaymentError(Exception):
    """Base of what a provider raises instead of returning a result."""


class PaymentDeclinedError(PaymentError):
    """The provider refused the charge for good (card declined, no such token): retrying with
    the same request gives the same answer, and no money moved."""

    def __init__(self, reason: str, code: str = "card_declined") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ProviderError(PaymentError, ExpectedFailureError):
    """The provider failed to handle the request (an HTTP 5xx, a refused connection, a crash);
    whether it moved money is unknown, so the caller must void before giving up on the order.

    An expected failure: raised by an inline provider (``tok_error``) it is one warning line
    in the log, not a traceback per Thespian retry."""


class ProviderTimeoutError(PaymentError, TimeoutError):
    """No answer within the provider's deadline; whether it moved money is unknown."""


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """Charge `amount` (major units, e.g. 24.98) with `payment_method` (a token) for an order."""

    order_id: str
    amount: Decimal
    payment_method: str


@dataclass(frozen=True, slots=True)
class Charge:
    """A charge that stands at the provider.

    `delay` is the seconds until this answer reaches the Payment actor: how the simulator is
    slow (``tok_late``, ``--payment-latency``). Real providers answer when they answer: 0.
    """

    payment_id: str
    amount: Decimal
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class RefundRequest:
    """Give back the charge `payment_id` (of `amount`) of an order."""

    order_id: str
    payment_id: str
    amount: Decimal
    reason: str


@dataclass(frozen=True, slots=True)
class Refund:
    """A refund the provider made (or had already made) of charge `payment_id`."""

    payment_id: str
    amount: Decimal
    refund_id: str = ""


@dataclass(frozen=True, slots=True)
class VoidRequest:
    """Make sure no charge stands for the order; `charge` is the one the caller knows of (None:
    it knows of none, but an unanswered charge may have landed)."""

    order_id: str
    reason: str
    charge: Charge | None = None


@dataclass(frozen=True, slots=True)
class Voided:
    """What a void found and gave back: `charge` stood (or had stood) for the order and
    `refund` returned it; both None when no charge was ever made."""

    charge: Charge | None = None
    refund: Refund | None = None


class PaymentProvider(ABC):
    """Moves money for the Payment actor; every operation is idempotent per order id.

    `remote` says the calls do I/O (a network round trip, up to the provider's timeout): the
    actor then runs them on a worker thread and gets the result back as a message, and a void
    always asks the provider, since a charge whose answer was lost may stand there. A provider
    that is not remote answers at once and is called on the actor's own thread, as the
    simulator is, so the hot path costs no thread hop.
    """

    remote: bool = False

    @abstractmethod
    def charge(self, request: ChargeRequest) -> Charge:
        """Charge once per order id; a repeated request returns the first charge."""

    @abstractmethod
    def refund(self, request: RefundRequest) -> Refund:
        """Refund a charge; refunding it again returns the first refund."""

    @abstractmethod
    def void(self, request: VoidRequest) -> Voided:
        """Leave no charge standing for the order (refunding what stands)."""

    def close(self) -> None:  # noqa: B027 (a hook: most providers hold nothing to close)
        """Release connections and threads; the provider is not used afterwards."""
