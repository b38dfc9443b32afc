"""The Shipping actor: a thin shell between the sagas and a carrier.

The carrier (``providers/``: the simulator with its carrier tokens, ``ship_standard``,
``ship_refused``, ``ship_timeout``, ``ship_error``) decides; this actor makes what it says
durable and answers. Shipments are idempotent per order id, every creation, refusal,
cancellation and void is durable in stream ``shipment-{order_id}``, and once an order's
shipping is voided no shipment stands for it, even one the carrier creates late (it is
cancelled in the same commit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from thespian.actors import WakeupMessage

from actors.base import NotConfiguredError, log
from actors.records import RecordKeeper
from messages.base import utcnow
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
from messages.events import (
    Event,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentRefused,
    ShipmentVoided,
    shipment_stream,
)
from providers import (
    CancelRequest,
    Carrier,
    CarrierError,
    CarrierRefusedError,
    CarrierTimeoutError,
    Shipment,
    ShipmentRequest,
    open_carrier,
)
from providers.simulated_carrier import CARRIER_TOKENS, REFUSED_MESSAGE
from store import NO_STREAM

__all__ = [
    "CARRIER_TOKENS",
    "MAX_CACHED_RECORDS",
    "REFUSED_MESSAGE",
    "VOIDED_MESSAGE",
    "CarrierError",
    "ShippingActor",
]

VOIDED_MESSAGE = "shipping was cancelled for this order"
# Records cached (least recently used go first; an evicted one is read again from its stream):
# the orders in flight and the recently ended, whose repeated requests are answered from here.
MAX_CACHED_RECORDS = 10_000


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
    """Records what the carrier says and answers the sagas: one shipment record per order,
    in ``shipment-{order_id}``."""

    actor_name = "shipping"

    def __init__(self) -> None:
        super().__init__(ShipmentRecord, MAX_CACHED_RECORDS)
        self._config: ServiceConfig | None = None
        self._carrier: Carrier | None = None
        self._slow: dict[str, Shipment] = {}  # orders whose shipment is created on a timer

    def _stream_of(self, order_id: str) -> str:
        return shipment_stream(order_id)

    def _pinned(self, order_id: str) -> bool:
        return order_id in self._slow

    def _carrier_or_fail(self) -> Carrier:
        if self._carrier is None:
            raise NotConfiguredError("shipping: no ServiceConfig yet")
        return self._carrier

    def receiveMsg_ServiceConfig(self, msg: ServiceConfig, sender: Any) -> None:
        """Remember where the store is and open the carrier; shipment state loads lazily."""
        self._config = msg
        self._open_records(msg)
        if self._carrier is None:
            self._carrier = open_carrier("simulated", step_timeout=msg.step_timeout)
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
        carrier = self._carrier_or_fail()
        # A CarrierError propagates, so Thespian retries the message and then tells the saga
        # with a PoisonMessage, as for any service that raises.
        try:
            shipment = carrier.create_shipment(ShipmentRequest(msg.order_id, msg.carrier))
        except CarrierRefusedError as refused:
            self._refuse(msg, sender, refused.reason)
            return
        except CarrierTimeoutError as timeout:
            if timeout.late is not None:  # never answered: the saga's step timer decides
                self._slow[msg.order_id] = timeout.late
                later = timedelta(seconds=timeout.late.delay)
                self.wakeupAfter(later, payload=LateShipment(request=msg))
            return
        self._create(msg, shipment, lambda created: self.send(sender, _created_reply(created)))

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """A slow shipment is created now; answered to nobody, and cancelled at once if the
        order's shipping was voided meanwhile."""
        late = msg.payload
        if not isinstance(late, LateShipment):
            return
        order_id = late.request.order_id
        shipment = self._slow.pop(order_id, None)
        if shipment is None:
            return
        if self._gate.busy(order_id):
            self._gate.defer(order_id, lambda: self._complete_late(late.request, shipment))
        else:
            self._complete_late(late.request, shipment)

    def _complete_late(self, msg: CreateShipment, shipment: Shipment) -> None:
        record = self._record_of(msg.order_id)
        if record.created is not None or record.refused is not None:
            return
        created = _created_event(msg, shipment)
        if not record.voided:
            self._record(msg.order_id, [created], lambda: None)
            return
        reason = "shipment created after shipping was cancelled"
        found = (
            self._carrier_or_fail()
            .cancel_shipment(CancelRequest(msg.order_id, reason, shipment))
            .shipment
        )
        cancelled = ShipmentCancelled(
            order_id=msg.order_id,
            shipment_id=(found or shipment).shipment_id,
            reason=reason,
            cancelled_at=created.created_at,
        )
        log.info(
            "shipping: late shipment for voided order %s cancelled",
            msg.order_id,
            extra={"order_id": msg.order_id},
        )
        self._record(msg.order_id, [created, cancelled], lambda: None)

    def _create(self, msg: CreateShipment, shipment: Shipment, answer: Any) -> None:
        created = _created_event(msg, shipment)
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
        standing = None
        if record.created is not None and not record.cancelled:
            created = record.created
            standing = Shipment(created.shipment_id, created.tracking_number)
        found = (
            self._carrier_or_fail()
            .cancel_shipment(CancelRequest(msg.order_id, msg.reason, standing))
            .shipment
        )
        now = utcnow()
        events: list[Event] = []
        if found is not None:
            events.append(
                ShipmentCancelled(
                    order_id=msg.order_id,
                    shipment_id=found.shipment_id,
                    reason=msg.reason,
                    cancelled_at=now,
                )
            )
        events.append(ShipmentVoided(order_id=msg.order_id, reason=msg.reason, voided_at=now))
        self._record(msg.order_id, events, answer)

    # --- recording --------------------------------------------------------------------------

    def receiveMsg_ActorExitRequest(self, msg: Any, sender: Any) -> None:
        """Close the read connection and the carrier on an orderly shutdown."""
        self._close_records()
        if self._carrier is not None:
            self._carrier.close()
            self._carrier = None


def _created_event(msg: CreateShipment, shipment: Shipment) -> ShipmentCreated:
    return ShipmentCreated(
        order_id=msg.order_id,
        shipment_id=shipment.shipment_id,
        carrier=msg.carrier,
        tracking_number=shipment.tracking_number,
        created_at=utcnow(),
    )


def _created_reply(created: ShipmentCreated) -> ShipmentCreatedReply:
    return ShipmentCreatedReply(
        order_id=created.order_id,
        shipment_id=created.shipment_id,
        carrier=created.carrier,
        tracking_number=created.tracking_number,
    )
