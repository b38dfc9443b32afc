"""Carrying out the supervision policy (``saga.supervision``) for the manager's orders.

The policy decides; this part turns its commands into messages, timers, reads and appends, and
feeds back what came of them. It keeps no rule of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from thespian.actors import ActorExitRequest, PoisonMessage

from actors.base import AppendCallback, log
from actors.manager.orders import LiveOrder, LiveOrders
from actors.manager.registry import ends_order
from actors.manager.services import process_alive
from messages.base import items_of, utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    CancelShipment,
    CreateShipment,
    ReleaseStock,
    SagaAborted,
    VoidPayment,
)
from messages.events import Event, order_stream
from saga import supervision as sp
from saga.machine import AppendEvents, Env, RequestRelease, RequestVoid
from saga.shipping import RequestCancelShipment, RequestShipment
from store import CODEC

ENV = Env(now=utcnow, new_id=CODEC.new_id)


@dataclass(frozen=True)
class RetryOrder:
    """Wakeup payload: the back-off of an order's next saga passed."""

    order_id: str


@dataclass(frozen=True)
class RetryGiveUp:
    """Wakeup payload: the last resort for an order is not done yet; look again."""

    order_id: str


class SupervisorHost(Protocol):
    """What carrying out the policy needs from the manager actor."""

    def respawn(self, live: LiveOrder) -> None:
        """Start a compensating saga for the order, rebuilt from its stream."""

    def read_order(self, order_id: str) -> list[Event]:
        """The order's stream, decoded (raises if it does not read back)."""

    def order_version(self, order_id: str) -> int:
        """The order stream's head version."""

    def send(self, target: Any, msg: Any) -> None:
        """Send a message (Thespian's send)."""

    def send_to_service(self, name: str, msg: Any) -> None:
        """Send to a service actor by name."""

    def wake_after(self, seconds: float, payload: Any) -> None:
        """A WakeupMessage with `payload` after `seconds`."""

    def append(  # noqa: PLR0913 - the manager's append, as the protocol of its host
        self,
        stream: str,
        events: Sequence[Event],
        expected_version: int,
        done: AppendCallback,
        event_ids: Sequence[str] | None = None,
        *,
        closes: bool = False,
    ) -> None:
        """Append to the store through the manager's appender (`closes`: it ends the order)."""

    def stopping(self) -> bool:
        """Whether the system is shutting down (nothing is recovered any more)."""

    def end(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """The order is terminal: answer everyone waiting for it."""


class Supervisor:
    """Feeds an order's supervision events to the policy and carries out its decisions."""

    def __init__(
        self, policy: sp.SupervisionPolicy, orders: LiveOrders, host: SupervisorHost
    ) -> None:
        self._policy = policy
        self._orders = orders
        self._host = host

    def aborted(self, msg: SagaAborted, sender: Any) -> None:
        """The saga gave up (it raised, or its stream moved)."""
        log.error(
            "manager: saga for %s aborted: %s",
            msg.order_id,
            msg.reason,
            extra={"order_id": msg.order_id},
        )
        live = self._orders.get(msg.order_id)
        # A late abort of a saga already replaced (its exit overtook it) changes nothing.
        if live is not None and live.saga is not None and live.saga == sender:
            self.saga_failed(live, msg.reason)

    def poisoned(self, msg: PoisonMessage, sender: Any) -> None:
        """A saga raised on its start."""
        log.error("manager: %s poisoned by %s", sender, type(msg.poisonMessage).__name__)
        live = self._orders.by_saga(sender)
        if live is not None:
            self.saga_failed(live, f"raised on {type(msg.poisonMessage).__name__}")

    def exited(self, child: Any) -> None:
        """A child actor that is no service ended: if it drove an order, that saga died."""
        live = self._orders.by_saga(child)
        if live is not None:
            log.error(
                "manager: saga for %s died; compensating",
                live.placed.order_id,
                extra={"order_id": live.placed.order_id},
            )
            self.saga_failed(live, "its process died")

    def check_sagas(self) -> None:
        """The watchdog's round over the sagas that told their pid (process bases)."""
        for live in self._orders:
            if live.pid is not None and not process_alive(live.pid):
                log.error(
                    "manager: watchdog found the saga of %s (pid %d) dead",
                    live.placed.order_id,
                    live.pid,
                    extra={"order_id": live.placed.order_id},
                )
                self.saga_failed(live, "its process died")

    def saga_failed(self, live: LiveOrder, reason: str) -> None:
        """Stop the order's saga (if it still runs) and let the policy say what comes next."""
        if self._host.stopping():
            return
        if live.saga is not None:
            self._host.send(live.saga, ActorExitRequest())
            self._orders.detach(live)
        self.feed(live, sp.SagaFailed(reason=reason))

    def wakeup(self, payload: Any) -> bool:
        """A timer of ours fired (False: the payload is not ours)."""
        if isinstance(payload, RetryOrder):
            live = self._orders.get(payload.order_id)
            if live is not None and live.saga is None:
                self.feed(live, sp.RetryDue())
            return True
        if isinstance(payload, RetryGiveUp):
            live = self._orders.get(payload.order_id)
            if live is not None:
                self.feed(live, sp.RecheckDue())
            return True
        return False

    def feed(self, live: LiveOrder, msg: sp.SupervisionInput) -> None:
        """One input for the order's supervision; its commands are carried out at once."""
        before = live.supervision or sp.supervise(live.placed)
        if live.cancel is not None and before.cancel is None:
            # The customer cancelled (the manager keeps it for every saga): the policy too.
            before, _ = self._policy.decide(before, sp.CustomerCancelled(live.cancel), ENV)
        state, commands = self._policy.decide(before, msg, ENV)
        live.supervision = state
        if state.giving_up is not None and before.giving_up is None:
            log.error(
                "manager: order %s: %s; ending it without a saga",
                live.placed.order_id,
                state.giving_up,
                extra={"order_id": live.placed.order_id},
            )
        for command in commands:
            self._carry_out(live, command)

    def _carry_out(self, live: LiveOrder, command: sp.SupervisionCommand) -> None:
        order_id = live.placed.order_id
        if isinstance(command, sp.Respawn):
            self._host.respawn(live)
        elif isinstance(command, sp.RetryAfter):
            log.error(
                "manager: order %s failed %d times; next attempt in %.1fs",
                order_id,
                command.failures,
                command.delay,
                extra={"order_id": order_id},
            )
            self._host.wake_after(command.delay, RetryOrder(order_id))
        elif isinstance(command, sp.RecheckAfter):
            self._host.wake_after(command.delay, RetryGiveUp(order_id))
        elif isinstance(command, sp.ReadStream):
            self.feed(live, self._read(order_id))
        elif isinstance(command, RequestRelease):
            self._host.send_to_service(
                "inventory", ReleaseStock(order_id=order_id, reason=command.reason)
            )
        elif isinstance(command, RequestVoid):
            self._host.send_to_service(
                "payment", VoidPayment(order_id=order_id, reason=command.reason)
            )
        elif isinstance(command, RequestShipment):
            self._host.send_to_service("shipping", _shipment_request(live))
        elif isinstance(command, RequestCancelShipment):
            self._host.send_to_service(
                "shipping", CancelShipment(order_id=order_id, reason=command.reason)
            )
        elif isinstance(command, AppendEvents):
            self._host.append(
                order_stream(order_id),
                command.events,
                command.expected_version,
                self._appended(live),
                command.event_ids,
                closes=ends_order(live.placed, command.events),
            )
        elif isinstance(command, sp.End):
            self._host.end(live, command.view)

    def _read(self, order_id: str) -> sp.StreamRead:
        """The stream, or None if it does not read back (maybe what failed the sagas)."""
        try:
            events = self._host.read_order(order_id)
        except Exception:
            log.exception(
                "manager: cannot read the stream of %s back", order_id, extra={"order_id": order_id}
            )
        else:
            return sp.StreamRead(events=tuple(events), version=len(events) - 1)
        try:
            return sp.StreamRead(events=None, version=self._host.order_version(order_id))
        except Exception:
            log.exception(
                "manager: cannot read the head of %s", order_id, extra={"order_id": order_id}
            )
            return sp.StreamRead(events=None, version=None)

    def _appended(self, live: LiveOrder) -> AppendCallback:
        def appended(reply: AppendDone | AppendRejected) -> None:
            self.feed(live, reply)

        return appended

    def answer(self, msg: sp.ServiceAnswer) -> None:
        """Inventory, Payment or the carrier answered the last resort's request."""
        live = self._orders.get(msg.order_id)
        if live is not None and live.supervision is not None:
            self.feed(live, msg)


def _shipment_request(live: LiveOrder) -> CreateShipment:
    """The order's shipment, asked again of the carrier (idempotent: it answers with the one it
    made)."""
    placed = live.placed
    if placed.shipping is None:
        raise ValueError(f"order {placed.order_id} was placed without shipping")
    return CreateShipment(
        order_id=placed.order_id,
        carrier=placed.shipping.carrier,
        address=placed.shipping.address,
        items=items_of(placed.lines),
    )
