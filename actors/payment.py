"""The Payment actor: a thin shell between the sagas and a payment provider.

The provider (``providers/``: the simulator with its test tokens, or a Stripe-style HTTP API,
chosen by ``run.py --payment-provider``) moves the money; this actor makes what it says durable
and answers. Charges are idempotent per order id, every charge, decline, refund and void is
durable in stream ``payment-{order_id}``, and once an order is voided no charge stands for it,
even one that completes late (it is refunded and both are recorded in one commit).

A provider that is not remote (the simulator) is called inline, on the actor's thread. A remote
one is called on a small worker pool: the result comes back through a queue that the actor
drains on a short timer (a message to itself), and while a call about an order is out every
other request about that order waits, so a void never races the charge it voids.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from thespian.actors import PoisonMessage, WakeupMessage

from actors.base import NotConfiguredError, log
from actors.records import RecordKeeper
from messages.base import utcnow
from messages.commands import (
    ChargePayment,
    LateCharge,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
    ServiceConfig,
    ServiceReady,
    VoidPayment,
)
from messages.events import (
    ChargeDeclined,
    ChargeRefunded,
    ChargeSucceeded,
    Event,
    PaymentVoided,
    payment_stream,
)
from providers import (
    Charge,
    ChargeRequest,
    PaymentDeclinedError,
    PaymentProvider,
    ProviderError,
    ProviderTimeoutError,
    RefundRequest,
    Voided,
    VoidRequest,
    open_provider,
)
from providers.simulated import DECLINE_MESSAGE
from store import NO_STREAM

__all__ = ["DECLINE_MESSAGE", "MAX_CACHED_RECORDS", "PaymentActor", "PaymentProviderError"]

# Records cached (least recently used go first; an evicted one is read again from its stream):
# the orders in flight and the recently ended, whose repeated requests are answered from here.
MAX_CACHED_RECORDS = 10_000
PaymentProviderError = ProviderError  # the name this module raised before providers/
# A remote provider's calls: enough workers for the orders a saga step keeps in flight at a
# provider's latency, few enough to be a small, fixed cost per Payment process.
WORKERS = 16
POLL = "payment:poll"  # wakeup payload: drain the finished provider calls
# How often finished calls are looked for while any is out: the latency it adds, against a
# timer message per interval (only while calls are out).
POLL_SECONDS = 0.002

Outcome = Any  # what a provider call returned, or the exception it raised
Then = Callable[[Outcome], None]


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


class PaymentActor(RecordKeeper[PaymentRecord]):
    """Records what the payment provider says and answers the sagas."""

    actor_name = "payment"

    def __init__(self) -> None:
        super().__init__(PaymentRecord, MAX_CACHED_RECORDS)
        self._config: ServiceConfig | None = None
        self._provider: PaymentProvider | None = None
        self._slow: dict[str, Charge] = {}  # orders whose charge's answer arrives on a timer
        # Remote provider calls: the pool runs them, `_done` brings them back to this thread.
        self._pool: ThreadPoolExecutor | None = None
        self._done: queue.SimpleQueue[tuple[str, Future[Any], Then]] = queue.SimpleQueue()
        self._out = 0  # calls submitted and not yet handled here
        self._polling = False

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Remember where the store is and open the provider; payment state loads lazily."""
        self._config = msg
        self._open_records(msg)
        if self._provider is None:
            self._provider = open_provider(
                msg.payment_provider,
                step_timeout=msg.step_timeout,
                latency=msg.payment_latency,
                crash_exits_process=msg.crash_exits_process,
            )
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid()))

    def _stream_of(self, order_id: str) -> str:
        return payment_stream(order_id)

    def _pinned(self, order_id: str) -> bool:
        return order_id in self._slow

    def _provider_or_fail(self) -> PaymentProvider:
        if self._provider is None:
            raise NotConfiguredError("payment: no ServiceConfig yet")
        return self._provider

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
        provider = self._provider_or_fail()
        request = ChargeRequest(msg.order_id, msg.amount, msg.payment_method)
        if provider.remote:
            self._off_thread(
                msg.order_id, provider.charge, request, lambda out: self._charged(msg, sender, out)
            )
            return
        # Inline: a ProviderError propagates, so Thespian retries the message and then tells
        # the saga with a PoisonMessage, as for any service that raises.
        try:
            charge = provider.charge(request)
        except PaymentDeclinedError as declined:
            self._decline(msg, sender, declined.reason)
            return
        except ProviderTimeoutError:
            return  # never answered: the saga's step timer decides (and voids)
        if charge.delay > 0:
            self._charge_later(msg, sender, charge)
        else:
            self._charge_now(msg, sender, charge)

    def _charged(self, msg: ChargePayment, sender: Any, outcome: Outcome) -> None:
        """A remote charge's outcome, back on the actor's thread."""
        if isinstance(outcome, Charge):
            if self._record_of(msg.order_id).voided:
                self._refund_late(msg, outcome)  # not while the gate held it; kept safe anyway
            else:
                self._charge_now(msg, sender, outcome)
        elif isinstance(outcome, PaymentDeclinedError):
            self._decline(msg, sender, outcome.reason)
        else:
            self._failed(msg, sender, outcome)

    def _failed(self, msg: ChargePayment | VoidPayment, sender: Any, error: Outcome) -> None:
        """A remote call ended without an answer to record: its outcome is unknown."""
        if isinstance(error, ProviderTimeoutError):
            # As if the provider never answered: the saga's step timer fires, and the void it
            # asks for then finds (and refunds) a charge that landed without our knowing.
            log.warning(
                "payment: %s for %s: %s",
                type(msg).__name__,
                msg.order_id,
                error,
                extra={"order_id": msg.order_id},
            )
            return
        # What Thespian sends when a service raises on a request: the saga treats it as the
        # step failing (and voids, or asks again while compensating).
        log.warning(
            "payment: %s for %s failed: %s",
            type(msg).__name__,
            msg.order_id,
            error,
            extra={"order_id": msg.order_id},
        )
        self.send(sender, PoisonMessage(msg, f"{type(error).__name__}: {error}"))

    def _charge_later(self, msg: ChargePayment, sender: Any, charge: Charge) -> None:
        self._slow[msg.order_id] = charge
        late = LateCharge(
            order_id=msg.order_id,
            amount=msg.amount,
            payment_method=msg.payment_method,
            reply_to=sender,
        )
        self.wakeupAfter(timedelta(seconds=charge.delay), payload=late)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """Finished provider calls come back, or a slow charge's answer arrives (if the order
        was voided meanwhile, the charge is refunded at once)."""
        late = msg.payload
        if late == POLL:
            self._drain()
            return
        if not isinstance(late, LateCharge):
            return
        charge = self._slow.pop(late.order_id, None)
        if charge is None:
            return
        request = ChargePayment(
            order_id=late.order_id, amount=late.amount, payment_method=late.payment_method
        )
        if self._gate.busy(late.order_id):
            self._gate.defer(
                late.order_id, lambda: self._complete_late(request, late.reply_to, charge)
            )
        else:
            self._complete_late(request, late.reply_to, charge)

    def _complete_late(self, msg: ChargePayment, reply_to: Any, charge: Charge) -> None:
        record = self._record_of(msg.order_id)
        if record.charge is not None or record.declined is not None:
            return
        if not record.voided:
            self._charge_now(msg, reply_to, charge)
            return
        self._refund_late(msg, charge)

    def _refund_late(self, msg: ChargePayment, charge: Charge) -> None:
        """A charge completed after the order was voided: refund it, record both at once."""
        provider = self._provider_or_fail()
        request = RefundRequest(
            msg.order_id,
            charge.payment_id,
            charge.amount,
            "charge completed after the payment was voided",
        )

        def refunded(outcome: Outcome) -> None:
            if isinstance(outcome, BaseException):
                # Nobody waits for this answer; the refund is asked for again by the next void
                # (the saga's or the supervisor's), which finds the charge at the provider.
                log.error(
                    "payment: refund of late charge for %s failed: %s",
                    msg.order_id,
                    outcome,
                    extra={"order_id": msg.order_id},
                )
                return
            now = utcnow()
            charged = ChargeSucceeded(
                order_id=msg.order_id,
                payment_id=charge.payment_id,
                amount=charge.amount,
                payment_method=msg.payment_method,
                charged_at=now,
            )
            refund = ChargeRefunded(
                order_id=msg.order_id,
                payment_id=charge.payment_id,
                amount=charge.amount,
                reason=request.reason,
                refunded_at=now,
            )
            log.info(
                "payment: late charge for voided order %s refunded",
                msg.order_id,
                extra={"order_id": msg.order_id},
            )
            self._record(msg.order_id, [charged, refund], lambda: None)

        if provider.remote:
            self._off_thread(msg.order_id, provider.refund, request, refunded)
        else:
            refunded(provider.refund(request))

    def _charge_now(self, msg: ChargePayment, sender: Any, charge: Charge) -> None:
        payment_id = charge.payment_id
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
        if record.voided:
            self._answer_void(msg, sender, record)
            return
        provider = self._provider_or_fail()
        standing = None
        if record.charge is not None and not record.refunded:
            standing = Charge(record.charge[0], record.charge[1])
        request = VoidRequest(msg.order_id, msg.reason, standing)
        if provider.remote:
            self._off_thread(
                msg.order_id, provider.void, request, lambda out: self._voided(msg, sender, out)
            )
        else:
            self._voided(msg, sender, provider.void(request))

    def _voided(self, msg: VoidPayment, sender: Any, outcome: Outcome) -> None:
        """Record what the provider's void found and gave back, then answer."""
        if not isinstance(outcome, Voided):
            self._failed(msg, sender, outcome)
            return
        record = self._record_of(msg.order_id)
        if record.voided:
            self._answer_void(msg, sender, record)
            return
        now = utcnow()
        events: list[Event] = []
        found = outcome.charge
        if found is not None and (record.charge is None or record.charge[0] != found.payment_id):
            # A charge whose answer was lost (a timeout, a provider error): it stood at the
            # provider without our knowing, so it is recorded with its refund.
            events.append(
                ChargeSucceeded(
                    order_id=msg.order_id,
                    payment_id=found.payment_id,
                    amount=found.amount,
                    payment_method="unknown",  # the provider found it; the void does not carry it
                    charged_at=now,
                )
            )
        refund = outcome.refund
        if refund is not None and (not record.refunded or events):
            events.append(
                ChargeRefunded(
                    order_id=msg.order_id,
                    payment_id=refund.payment_id,
                    amount=refund.amount,
                    reason=msg.reason,
                    refunded_at=now,
                )
            )
        events.append(PaymentVoided(order_id=msg.order_id, reason=msg.reason, voided_at=now))
        self._record(msg.order_id, events, lambda: self._answer_void(msg, sender, record))

    def _answer_void(self, msg: VoidPayment, sender: Any, record: PaymentRecord) -> None:
        refund = record.void_refund
        self.send(
            sender,
            PaymentVoidedReply(
                order_id=msg.order_id,
                refunded_payment_id=refund[0] if refund else None,
                amount=refund[1] if refund else None,
            ),
        )

    # --- remote calls -----------------------------------------------------------------------

    def _off_thread(self, order_id: str, call: Callable[[Any], Any], arg: Any, then: Then) -> None:
        """Run `call(arg)` on the worker pool; `then(result or exception)` runs on this thread.

        The order's gate is held meanwhile: its other requests wait for the answer (at most
        the provider's timeout, which is below the saga's step timeout)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="payment-provider")
        self._gate.hold(order_id)
        self._out += 1
        done = self._done  # the worker touches only the queue, never the actor
        future = self._pool.submit(call, arg)
        future.add_done_callback(lambda f: done.put((order_id, f, then)))
        if not self._polling:
            self._polling = True
            self.wakeupAfter(timedelta(seconds=POLL_SECONDS), payload=POLL)

    def _drain(self) -> None:
        self._polling = False
        while True:
            try:
                order_id, future, then = self._done.get_nowait()
            except queue.Empty:
                break
            self._out -= 1
            try:
                outcome: Outcome = future.result()
            except Exception as exc:
                outcome = exc
            try:
                then(outcome)
            except Exception:
                # Raising here would poison our own wakeup and lose the rest of the queue; the
                # requester's timer asks again.
                log.exception(
                    "payment: handling a provider answer for %s failed",
                    order_id,
                    extra={"order_id": order_id},
                )
            finally:
                self._gate.committed(order_id)  # the call's hold; deferred requests go on
        if self._out > 0:
            self._polling = True
            self.wakeupAfter(timedelta(seconds=POLL_SECONDS), payload=POLL)

    # --- recording --------------------------------------------------------------------------

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        """Close the read connection, the worker pool and the provider on an orderly shutdown."""
        self._close_records()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._provider is not None:
            self._provider.close()
            self._provider = None
