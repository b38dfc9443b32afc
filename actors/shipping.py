"""The Shipping actor: a simulated carrier with test tokens (DESIGN.md section 9).

Like the Payment actor it fakes a provider's guarantees faithfully: shipments are idempotent
per order id, every creation, refusal, cancellation and void is durable in stream
``shipment-{order_id}``, and once an order's shipping is voided no shipment stands for it, even
one the carrier creates late (it is cancelled in the same commit).

Carrier tokens (``carrier``): ``ship_standard`` ships; ``ship_refused`` refuses;
``ship_timeout`` never answers (it creates the shipment after 1.5 step timeouts and tells
nobody); ``ship_error`` raises while handling. Any other token is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import NotConfiguredError, log
from actors.records import RecordKeeper
from messages.base import new_id, utcnow
from messages.commands import (
    CancelShipment,
    CreateShipment,
    LateShipment,
    ServiceConfig,
    ServiceReady,
    ShipmentCancelledReply,
    ShipmentCreatedReply,
    ShipmentRefusedReply,
)
from messages.errors import ExpectedFailureError
from messages.events import (
    Event,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentRefused,
    ShipmentVoided,
    shipment_stream,
)
from store import NO_STREAM

REFUSED_MESSAGE = "The carrier refused the shipment."
VOIDED_MESSAGE = "shipping was cancelled for this order"
MAX_CACHED_RECORDS = 50_000
CARRIER_TOKENS = ("ship_standard", "ship_refused", "ship_timeout", "ship_error")


class CarrierError(ExpectedFailureError):
    """What ship_error makes the carrier raise (expected: one warning line, no traceback)."""


@dataclass
class ShipmentRecord:
    """The carrier's knowledge of one order, replayed from its shipment stream."""

    version: int = NO_STREAM
    created: ShipmentCreated | None = None
    refused: str | None = None
    cancelled: bool = False
    voided: bool = False
    void_cancelled: str | None = None  # the shipment cancelled because of the void

    def apply(self, event: Event) -> None:
        """Apply one shipment event."""
        self.version += 1
        if isinstance(event, ShipmentCreated):
            self.created = event
        elif isinstance(event, ShipmentRefused):
            self.refused = event.reason
        elif isinstance(event, ShipmentCancelled):
            self.cancelled = True
            self.void_cancelled = event.shipment_id
        elif isinstance(event, ShipmentVoided):
            self.voided = True


class ShippingActor(RecordKeeper[ShipmentRecord]):
    """The simulated carrier: one shipment record per order, in ``shipment-{order_id}``."""

    actor_name = "shipping"

    def __init__(self) -> None:
        super().__init__(ShipmentRecord, MAX_CACHED_RECORDS)
        self._config: ServiceConfig | None = None
        self._slow: set[str] = set()  # orders whose shipment is created on a timer

    def _stream_of(self, order_id: str) -> str:
        return shipment_stream(order_id)

    def _pinned(self, order_id: str) -> bool:
        return order_id in self._slow

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Remember where the store is; shipment state loads lazily per order."""
        self._config = msg
        self._open_records(msg)
        self.send(sender, ServiceReady(name=self.actor_name, pid=os.getpid()))

    # --- create ---------------------------------------------------------------------------

    def receiveMsg_CreateShipment(self, msg: CreateShipment, sender: Any) -> None:
        """Create the order's shipment once; a repeated request gets the first answer."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_CreateShipment(msg, sender))
            return
        record = self._record_of(msg.order_id)
        if record.voided:
            self.send(sender, ShipmentRefusedReply(order_id=msg.order_id, reason=VOIDED_MESSAGE))
            return
        if record.created is not None:
            self.send(sender, _created_reply(record.created))
            return
        if record.refused is not None:
            self.send(sender, ShipmentRefusedReply(order_id=msg.order_id, reason=record.refused))
            return
        if msg.order_id in self._slow:
            return  # the first request's slow shipment is on its way
        self._dispatch_token(msg, sender)

    def _dispatch_token(self, msg: CreateShipment, sender: Any) -> None:
        if self._config is None:
            raise NotConfiguredError("shipping: no ServiceConfig yet")
        token = msg.carrier
        if token == "ship_standard":
            self._create(msg, lambda created: self.send(sender, _created_reply(created)))
        elif token == "ship_refused":
            self._refuse(msg, sender, REFUSED_MESSAGE)
        elif token == "ship_timeout":
            log.info(
                "shipping: ship_timeout, order %s will never be answered",
                msg.order_id,
                extra={"order_id": msg.order_id},
            )
            self._slow.add(msg.order_id)
            later = timedelta(seconds=self._config.step_timeout * 1.5)
            self.wakeupAfter(later, payload=LateShipment(request=msg))
        elif token == "ship_error":
            raise CarrierError(f"carrier error shipping order {msg.order_id}")
        else:
            self._refuse(msg, sender, f"No such carrier: {token!r}")

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A slow shipment is created now; answered to nobody, and cancelled at once if the
        order's shipping was voided meanwhile."""
        late = msg.payload
        if not isinstance(late, LateShipment):
            return
        order_id = late.request.order_id
        self._slow.discard(order_id)
        if self._gate.busy(order_id):
            self._gate.defer(order_id, lambda: self._complete_late(late.request))
        else:
            self._complete_late(late.request)

    def _complete_late(self, msg: CreateShipment) -> None:
        record = self._record_of(msg.order_id)
        if record.created is not None or record.refused is not None:
            return
        created = _new_shipment(msg)
        if not record.voided:
            self._record(msg.order_id, [created], lambda: None)
            return
        cancelled = ShipmentCancelled(
            order_id=msg.order_id,
            shipment_id=created.shipment_id,
            reason="shipment created after shipping was cancelled",
            cancelled_at=created.created_at,
        )
        log.info(
            "shipping: late shipment for voided order %s cancelled",
            msg.order_id,
            extra={"order_id": msg.order_id},
        )
        self._record(msg.order_id, [created, cancelled], lambda: None)

    def _create(self, msg: CreateShipment, answer: Any) -> None:
        created = _new_shipment(msg)
        self._record(msg.order_id, [created], lambda: answer(created))

    def _refuse(self, msg: CreateShipment, sender: Any, reason: str) -> None:
        event = ShipmentRefused(
            order_id=msg.order_id, carrier=msg.carrier, reason=reason, refused_at=utcnow()
        )
        reply = ShipmentRefusedReply(order_id=msg.order_id, reason=reason)
        self._record(msg.order_id, [event], lambda: self.send(sender, reply))

    # --- cancel -----------------------------------------------------------------------------

    def receiveMsg_CancelShipment(self, msg: CancelShipment, sender: Any) -> None:
        """Make sure no shipment stands for the order: cancel one that does, refuse later
        ones; idempotent."""
        if self._gate.busy(msg.order_id):
            self._gate.defer(msg.order_id, lambda: self.receiveMsg_CancelShipment(msg, sender))
            return
        record = self._record_of(msg.order_id)

        def answer() -> None:
            reply = ShipmentCancelledReply(order_id=msg.order_id, shipment_id=record.void_cancelled)
            self.send(sender, reply)

        if record.voided:
            answer()
            return
        now = utcnow()
        events: list[Event] = []
        if record.created is not None and not record.cancelled:
            events.append(
                ShipmentCancelled(
                    order_id=msg.order_id,
                    shipment_id=record.created.shipment_id,
                    reason=msg.reason,
                    cancelled_at=now,
                )
            )
        events.append(ShipmentVoided(order_id=msg.order_id, reason=msg.reason, voided_at=now))
        self._record(msg.order_id, events, answer)

    # --- recording --------------------------------------------------------------------------

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        """Close the read connection on an orderly shutdown."""
        self._close_records()


def _new_shipment(msg: CreateShipment) -> ShipmentCreated:
    return ShipmentCreated(
        order_id=msg.order_id,
        shipment_id=f"shp-{new_id()}",
        carrier=msg.carrier,
        tracking_number=f"TRK{new_id()[-12:].upper()}",
        created_at=utcnow(),
    )


def _created_reply(created: ShipmentCreated) -> ShipmentCreatedReply:
    return ShipmentCreatedReply(
        order_id=created.order_id,
        shipment_id=created.shipment_id,
        carrier=created.carrier,
        tracking_number=created.tracking_number,
    )
