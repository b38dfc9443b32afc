"""The Payment actor: a simulated payment provider with Stripe-style test tokens.

It is the one fake of the system, and it fakes a provider's guarantees faithfully: charges are
idempotent per order id, every charge, decline, refund and void is durable in stream
``payment-{order_id}``, and once an order is voided no charge stands for it, even one that
completes late (it is refunded in the same commit).

Tokens (DESIGN.md section 6): ``tok_visa`` approves; ``tok_chargeDeclined`` declines;
``tok_error`` raises while handling; ``tok_timeout`` never answers; ``tok_late`` approves after
1.5 step timeouts; ``tok_crash`` kills this actor's process on the process bases (raises on the
simple base, where killing the process would kill the whole system).
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import Appender, BaseActor, CommitGate, NotConfiguredError, log
from messages.base import new_id, utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    ChargePayment,
    LateCharge,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
    ServiceConfig,
    ServiceReady,
    VoidPayment,
)
from messages.errors import ExpectedFailureError
from messages.events import (
    ChargeDeclined,
    ChargeRefunded,
    ChargeSucceeded,
    Event,
    PaymentVoided,
    payment_stream,
)
from store import CODEC, NO_STREAM, EventStore, open_store

DECLINE_MESSAGE = "Your card was declined."
MAX_CACHED_RECORDS = 50_000


class PaymentProviderError(ExpectedFailureError):
    """What tok_error makes the provider raise."""


@dataclass
class PaymentRecord:
    """The provider's knowledge of one order, replayed from its payment stream."""

    version: int = NO_STREAM
    charge: tuple[str, Decimal] | None = None
    declined: str | None = None
    refunded: bool = False
    voided: bool = False
    void_refund: tuple[str, Decimal] | None = None

    def apply(self, event: Event) -> None:
        """Apply one payment event."""
        self.version += 1
        if isinstance(event, ChargeSucceeded):
            self.charge = (event.payment_id, event.amount)
        elif isinstance(event, ChargeDeclined):
            self.declined = event.reason
        elif isinstance(event, ChargeRefunded):
            self.refunded = True
            if self.voided or self.void_refund is None:
                self.void_refund = (event.payment_id, event.amount)
        elif isinstance(event, PaymentVoided):
            self.voided = True


class PaymentActor(BaseActor):
    """The simulated provider."""

    actor_name = "payment"

    def __init__(self) -> None:
        super().__init__()
        self._config: ServiceConfig | None = None
        self._reader: EventStore | None = None
        # A cache of what the payment streams say, least recently used first; every record is
        # durable, so one evicted is simply read again (only records with nothing uncommitted
        # and no slow charge pending are evicted).
        self._records: OrderedDict[str, PaymentRecord] = OrderedDict()
        self._slow: set[str] = set()  # orders whose charge completes on a timer
        self._appender = Appender(self, "payment")
        self._gate = CommitGate()

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Remember where the store is; payment state loads lazily per order."""
        self._config = msg
        self._appender.store = msg.store
        if self._reader is None:
            self._reader = open_store(msg.store_url, readonly=True)
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid()))

    def _record_of(self, order_id: str) -> PaymentRecord:
        record = self._records.get(order_id)
        if record is not None:
            self._records.move_to_end(order_id)
            return record
        if self._reader is None:
            raise NotConfiguredError("payment: no ServiceConfig yet")
        record = PaymentRecord()
        for stored in self._reader.read_stream(payment_stream(order_id)):
            record.apply(CODEC.decode(stored))
        self._records[order_id] = record
        self._evict()
        return record

    def _evict(self) -> None:
        excess = len(self._records) - MAX_CACHED_RECORDS
        if excess <= 0:
            return
        # The oldest few (busy ones are skipped, so look a little further than needed).
        for order_id in list(itertools.islice(self._records, excess + 32)):
            if excess <= 0:
                return
            if not self._gate.busy(order_id) and order_id not in self._slow:
                del self._records[order_id]
                excess -= 1

    # --- charge -----------------------------------------------------------------------------

    def receiveMsg_ChargePayment(self, msg: ChargePayment, sender: Any) -> None:
        """Charge once per order; a repeated request gets the first answer."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_ChargePayment(msg, sender))
            return
        record = self._record_of(msg.order_id)
        if record.voided:
            self.send(
                sender, PaymentFailedReply(order_id=msg.order_id, reason="payment was voided")
            )
            return
        if record.charge is not None:
            self.send(
                sender,
                PaymentProcessedReply(
                    order_id=msg.order_id, payment_id=record.charge[0], amount=record.charge[1]
                ),
            )
            return
        if record.declined is not None:
            self.send(sender, PaymentFailedReply(order_id=msg.order_id, reason=record.declined))
            return
        if msg.order_id in self._slow:
            return  # the first request's slow charge answers when it completes
        self._dispatch_token(msg, sender)

    def _dispatch_token(self, msg: ChargePayment, sender: Any) -> None:
        if self._config is None:
            raise NotConfiguredError("payment: no ServiceConfig yet")
        token = msg.payment_method
        if token == "tok_visa":
            if self._config.payment_latency > 0:
                self._charge_later(msg, sender, self._config.payment_latency)
            else:
                self._charge_now(msg, sender)
        elif token == "tok_chargeDeclined":
            self._decline(msg, sender, DECLINE_MESSAGE)
        elif token == "tok_error":
            raise PaymentProviderError(f"provider error charging order {msg.order_id}")
        elif token == "tok_timeout":
            log.info("payment: tok_timeout, order %s will never be answered", msg.order_id)
        elif token == "tok_late":
            self._charge_later(msg, sender, self._config.step_timeout * 1.5)
        elif token == "tok_crash":
            if self._config.crash_exits_process:
                log.warning("payment: tok_crash, killing own process %d", os.getpid())
                os.kill(os.getpid(), signal.SIGKILL)
            raise PaymentProviderError(f"provider crashed charging order {msg.order_id}")
        else:
            self._decline(msg, sender, f"No such token: {token!r}")

    def _charge_later(self, msg: ChargePayment, sender: Any, seconds: float) -> None:
        self._slow.add(msg.order_id)
        late = LateCharge(
            order_id=msg.order_id,
            amount=msg.amount,
            payment_method=msg.payment_method,
            reply_to=sender,
        )
        self.wakeupAfter(timedelta(seconds=seconds), payload=late)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A slow charge completes; if the order was voided meanwhile, it is refunded at once."""
        late = msg.payload
        if not isinstance(late, LateCharge):
            return
        self._slow.discard(late.order_id)
        request = ChargePayment(
            order_id=late.order_id, amount=late.amount, payment_method=late.payment_method
        )
        if self._gate.busy(late.order_id):
            self._gate.defer(late.order_id, lambda: self._complete_late(request, late.reply_to))
        else:
            self._complete_late(request, late.reply_to)

    def _complete_late(self, msg: ChargePayment, reply_to: Any) -> None:
        record = self._record_of(msg.order_id)
        if record.charge is not None or record.declined is not None:
            return
        if not record.voided:
            self._charge_now(msg, reply_to)
            return
        payment_id = f"pay-{new_id()}"
        now = utcnow()
        charged = ChargeSucceeded(
            order_id=msg.order_id,
            payment_id=payment_id,
            amount=msg.amount,
            payment_method=msg.payment_method,
            charged_at=now,
        )
        refunded = ChargeRefunded(
            order_id=msg.order_id,
            payment_id=payment_id,
            amount=msg.amount,
            reason="charge completed after the payment was voided",
            refunded_at=now,
        )
        log.info("payment: late charge for voided order %s refunded", msg.order_id)
        self._record(msg.order_id, [charged, refunded], lambda: None)

    def _charge_now(self, msg: ChargePayment, sender: Any) -> None:
        payment_id = f"pay-{new_id()}"
        event = ChargeSucceeded(
            order_id=msg.order_id,
            payment_id=payment_id,
            amount=msg.amount,
            payment_method=msg.payment_method,
            charged_at=utcnow(),
        )
        self._record(
            msg.order_id,
            [event],
            lambda: self.send(
                sender,
                PaymentProcessedReply(
                    order_id=msg.order_id, payment_id=payment_id, amount=msg.amount
                ),
            ),
        )

    def _decline(self, msg: ChargePayment, sender: Any, reason: str) -> None:
        event = ChargeDeclined(
            order_id=msg.order_id,
            amount=msg.amount,
            payment_method=msg.payment_method,
            reason=reason,
            declined_at=utcnow(),
        )
        self._record(
            msg.order_id,
            [event],
            lambda: self.send(sender, PaymentFailedReply(order_id=msg.order_id, reason=reason)),
        )

    # --- void -------------------------------------------------------------------------------

    def receiveMsg_VoidPayment(self, msg: VoidPayment, sender: Any) -> None:
        """Make sure no charge stands for the order: refund one that does, refuse later ones."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_VoidPayment(msg, sender))
            return
        record = self._record_of(msg.order_id)

        def answer() -> None:
            refund = record.void_refund
            self.send(
                sender,
                PaymentVoidedReply(
                    order_id=msg.order_id,
                    refunded_payment_id=refund[0] if refund else None,
                    amount=refund[1] if refund else None,
                ),
            )

        if record.voided:
            answer()
            return
        now = utcnow()
        events: list[Event] = []
        if record.charge is not None and not record.refunded:
            events.append(
                ChargeRefunded(
                    order_id=msg.order_id,
                    payment_id=record.charge[0],
                    amount=record.charge[1],
                    reason=msg.reason,
                    refunded_at=now,
                )
            )
        events.append(PaymentVoided(order_id=msg.order_id, reason=msg.reason, voided_at=now))
        self._record(msg.order_id, events, answer)

    # --- recording --------------------------------------------------------------------------

    def _record(self, order_id: str, events: list[Event], on_commit: Any) -> None:
        record = self._record_of(order_id)
        expected = record.version
        for event in events:
            record.apply(event)
        self._gate.hold(order_id)

        def committed(reply: AppendDone | AppendRejected) -> None:
            if isinstance(reply, AppendRejected):
                log.error(
                    "payment: append for %s rejected (%s); reloading", order_id, reply.message
                )
                self._records.pop(order_id, None)  # re-read what is durable on next use
            else:
                on_commit()
            self._gate.committed(order_id)

        self._appender.append(
            payment_stream(order_id), events, [CODEC.new_id() for _ in events], expected, committed
        )

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """A payment fact is durable."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """A payment fact was refused."""
        self._appender.settle(msg)

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        """Close the read connection on an orderly shutdown."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
