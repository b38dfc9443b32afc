"""The ShippingSaga actor: one per order placed with shipping, started by its ``OrderPaid``
(DESIGN.md section 9); a thin shell around ``saga.shipping``."""

from __future__ import annotations

from typing import Any

from actors.saga import ENV, WorkflowActor
from messages.base import items_of
from messages.commands import (
    CancelShipment,
    CreateShipment,
    InventoryShippedReply,
    ShipmentCancelledReply,
    ShipmentCreatedReply,
    ShipmentRefusedReply,
    ShipStock,
    StartSaga,
)
from messages.events import OrderPlaced
from saga import machine as sm
from saga import shipping as ship


class ShippingSaga(WorkflowActor):
    """Ships one paid order: the carrier creates the shipment, Inventory consumes the
    reservation, OrderShipped is recorded; compensates (release, cancel at the carrier,
    refund) when shipping fails or the customer cancels in time."""

    def __init__(self) -> None:
        super().__init__()
        self._state: ship.ShippingState | None = None

    @classmethod
    def wants(cls, placed: OrderPlaced) -> bool:
        """Only an order placed with shipping is shipped; without, OrderPaid ends it."""
        return placed.shipping is not None

    def _decide(
        self, state: ship.ShippingState, msg: ship.ShippingInput
    ) -> tuple[ship.ShippingState, list[ship.ShippingCommand]]:
        return ship.decide(state, msg, ENV)

    def _carry_out(self, command: ship.ShippingCommand) -> None:
        state = self._state
        if state is None:
            raise RuntimeError(f"shipping saga: {type(command).__name__} after it ended")
        order = state.order
        order_id = order.order_id
        if isinstance(command, sm.AppendEvents):
            self._append(order_id, command)
        elif isinstance(command, ship.RequestShipment):
            if order.shipping is None:
                raise ValueError(f"order {order_id} was placed without shipping")
            request = CreateShipment(
                order_id=order_id,
                carrier=order.shipping.carrier,
                address=order.shipping.address,
                items=items_of(order.lines),
            )
            self._request(sm.Service.SHIPPING, request)
        elif isinstance(command, ship.RequestShipStock):
            self._request(sm.Service.INVENTORY, ShipStock(order_id=order_id))
        elif isinstance(command, ship.RequestCancelShipment):
            self._request(
                sm.Service.SHIPPING, CancelShipment(order_id=order_id, reason=command.reason)
            )
        else:
            self._carry_out_shared(order_id, command, state.recorded)

    # --- messages -------------------------------------------------------------------------

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        """Start from the order stream (it holds OrderPaid)."""
        if self._state is not None:
            return  # a re-delivered start: we are already running
        self._begin(msg, sender)
        state = ship.recover(msg.events, cancel=msg.cancel)
        if state.phase == ship.Phase.DONE:
            self._finish(msg.order_id, "already terminal", msg.events)
            return
        self._state = state
        self._feed(sm.Start())

    def receiveMsg_ShipmentCreatedReply(self, msg: ShipmentCreatedReply, sender: Any) -> None:
        """The carrier created the shipment."""
        self._feed(msg)

    def receiveMsg_ShipmentRefusedReply(self, msg: ShipmentRefusedReply, sender: Any) -> None:
        """The carrier refused."""
        self._feed(msg)

    def receiveMsg_ShipmentCancelledReply(self, msg: ShipmentCancelledReply, sender: Any) -> None:
        """The carrier made sure no shipment stands."""
        self._feed(msg)

    def receiveMsg_InventoryShippedReply(self, msg: InventoryShippedReply, sender: Any) -> None:
        """Inventory consumed the reservation (or it was consumed before)."""
        self._feed(msg)
