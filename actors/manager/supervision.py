"""Carrying out the supervision policy (``saga.supervision``) for the manager's orders.

The policy decides; this part turns its commands into messages, timers, reads and appends, and
feeds back what came of them. It keeps no rule of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from actors.base import AppendCallback, log
from actors.manager.orders import LiveOrder
from messages.base import utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    InventoryReleasedReply,
    PaymentVoidedReply,
    ReleaseStock,
    VoidPayment,
)
from messages.events import Event, order_stream
from saga import supervision as sp
from saga.machine import AppendEvents, Env, RequestRelease, RequestVoid
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

    def send_to_service(self, name: str, msg: Any) -> None:
        """Send to a service actor by name."""

    def wake_after(self, seconds: float, payload: Any) -> None:
        """A WakeupMessage with `payload` after `seconds`."""

    def append_with_ids(
        self,
        stream: str,
        events: Sequence[Event],
        event_ids: Sequence[str],
        expected_version: int,
        done: AppendCallback,
    ) -> None:
        """Append to the store through the manager's appender."""

    def end(self, live: LiveOrder, view: dict[str, Any]) -> None:
        """The order is terminal: answer everyone waiting for it."""


class Supervisor:
    """Feeds an order's supervision events to the policy and carries out its decisions."""

    def __init__(self, policy: sp.SupervisionPolicy, host: SupervisorHost) -> None:
        self._policy = policy
        self._host = host

    def saga_failed(self, live: LiveOrder, reason: str) -> None:
        """A saga of the order raised, aborted or died (its actor is already forgotten)."""
        self.feed(live, sp.SagaFailed(reason=reason))

    def feed(self, live: LiveOrder, msg: sp.SupervisionInput) -> None:
        """One input for the order's supervision; its commands are carried out at once."""
        before = live.supervision or sp.supervise(live.placed)
        state, commands = self._policy.decide(before, msg, ENV)
        live.supervision = state
        if state.giving_up is not None and before.giving_up is None:
            log.error(
                "manager: order %s: %s; ending it without a saga",
                live.placed.order_id,
                state.giving_up,
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
        elif isinstance(command, AppendEvents):
            self._host.append_with_ids(
                order_stream(order_id),
                command.events,
                command.event_ids,
                command.expected_version,
                self._appended(live),
            )
        elif isinstance(command, sp.End):
            self._host.end(live, command.view)

    def _read(self, order_id: str) -> sp.StreamRead:
        """The stream, or None if it does not read back (maybe what failed the sagas)."""
        try:
            events = self._host.read_order(order_id)
        except Exception:
            log.exception("manager: cannot read the stream of %s back", order_id)
        else:
            return sp.StreamRead(events=tuple(events), version=len(events) - 1)
        try:
            return sp.StreamRead(events=None, version=self._host.order_version(order_id))
        except Exception:
            log.exception("manager: cannot read the head of %s", order_id)
            return sp.StreamRead(events=None, version=None)

    def _appended(self, live: LiveOrder) -> AppendCallback:
        def appended(reply: AppendDone | AppendRejected) -> None:
            self.feed(live, reply)

        return appended

    def answer(self, live: LiveOrder, msg: InventoryReleasedReply | PaymentVoidedReply) -> None:
        """Inventory or Payment answered the last resort's request."""
        if live.supervision is not None:
            self.feed(live, msg)
