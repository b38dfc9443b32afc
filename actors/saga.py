"""The OrderSaga actor: one per order, a thin shell around ``saga.machine``; and the plumbing
every workflow actor shares (``WorkflowActor``: the step timer, appends, failure reports).

It feeds the services' replies to the machine as they are and turns the machine's commands into
messages. Anything that raises inside it is reported to the supervising OrderManager (which
recovers the order from its stream and compensates) instead of being left to Thespian's retries,
which would re-run a half-applied step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, PoisonMessage, WakeupMessage

from actors.base import Appender, BaseActor, log
from messages.base import utcnow
from messages.commands import (
    AppendDone,
    AppendRejected,
    CancelSaga,
    CancelShipment,
    ChargePayment,
    CreateShipment,
    IAm,
    InventoryReleasedReply,
    InventoryReservedReply,
    InventoryUnavailableReply,
    PaymentFailedReply,
    PaymentProcessedReply,
    PaymentVoidedReply,
    ReleaseStock,
    ReserveStock,
    SagaAborted,
    SagaFinished,
    ServiceMoved,
    ShipStock,
    StartSaga,
    VoidPayment,
)
from messages.events import Event, OrderPlaced, order_stream
from saga import machine as sm
from saga.views import order_view

ENV = sm.Env(now=utcnow)
STEP_TIMER = "step"  # the payload of the saga's one pending wakeup

# Which service a request went to: a PoisonMessage for it is that service's failed step.
SERVICE_OF_REQUEST: dict[type, sm.Service] = {
    ReserveStock: sm.Service.INVENTORY,
    ReleaseStock: sm.Service.INVENTORY,
    ShipStock: sm.Service.INVENTORY,
    ChargePayment: sm.Service.PAYMENT,
    VoidPayment: sm.Service.PAYMENT,
    CreateShipment: sm.Service.SHIPPING,
    CancelShipment: sm.Service.SHIPPING,
}


class WorkflowActor(BaseActor):
    """What a workflow actor (one per order and workflow) shares, whatever its machine:
    failures reported to the manager instead of retried, the step deadline on one pending
    Thespian timer, appends through the EventStore actor, service addresses that move, and the
    end of the actor once its order's part is over. A subclass keeps its machine's state in
    ``_state`` (None before the start and after the end) and implements ``_decide`` and
    ``_carry_out``."""

    actor_name = "saga"

    def __init__(self) -> None:
        super().__init__()
        self._manager: Any = None
        self._services: dict[sm.Service, Any] = {}
        self._step_timeout = 5.0
        self._appender = Appender(self, "saga")
        self._deadline: tuple[int, float] | None = None  # (token, monotonic time) of the step
        self._timer_pending = False
        self._state: Any = None  # the machine's state while the workflow runs
        self._ends_on: frozenset[str] = frozenset()  # event types whose append ends the order

    @classmethod
    def wants(cls, placed: OrderPlaced) -> bool:  # noqa: ARG003 -- overridden by some
        """Whether the workflow runs for this order when its trigger event is committed."""
        return True

    # --- what a subclass provides ---------------------------------------------------------

    def _decide(self, state: Any, msg: Any) -> tuple[Any, list[Any]]:
        """The workflow's machine: (state, input) -> (new state, commands)."""
        raise NotImplementedError

    def _carry_out(self, command: Any) -> None:
        """Carry out one of the machine's commands."""
        raise NotImplementedError

    # --- driving the machine ----------------------------------------------------------------

    def _feed(self, msg: Any) -> None:
        """Feed one input to the machine and carry out its commands."""
        if self._state is None:
            return  # finished or aborted: late replies are dropped
        self._state, commands = self._decide(self._state, msg)
        for command in commands:
            self._carry_out(command)

    def _running_order(self) -> str | None:
        """The order id while the workflow runs, None once it ended (or before it started)."""
        return self._state.order.order_id if self._state is not None else None

    def _drop_state(self) -> None:
        """Forget the machine's state: late replies are dropped from now on."""
        self._state = None

    # --- plumbing -------------------------------------------------------------------------

    def receiveMessage(self, message: Any, sender: Any) -> Any:
        """Dispatch by type; an exception becomes the supervisor's problem, not a retry."""
        try:
            return super().receiveMessage(message, sender)
        except Exception as e:
            log.exception(
                "saga %s failed handling %s",
                self._order_id,
                type(message).__name__,
                extra={"order_id": self._order_id},
            )
            order_id = message.order_id if isinstance(message, StartSaga) else self._order_id
            manager = sender if isinstance(message, StartSaga) else self._manager
            running = self._running_order() is not None
            if manager is not None and (running or isinstance(message, StartSaga)):
                self.send(
                    manager, SagaAborted(order_id=order_id, reason=f"{type(e).__name__}: {e}")
                )
                self._drop_state()
                self.send(self.myAddress, ActorExitRequest())
            return None

    @property
    def _order_id(self) -> str:
        return self._running_order() or "?"

    def _begin(self, msg: StartSaga, sender: Any) -> None:
        """Take the start's addresses and settings (the manager is `sender`)."""
        self._manager = sender
        self._services = {
            sm.Service.INVENTORY: msg.inventory,
            sm.Service.PAYMENT: msg.payment,
            sm.Service.SHIPPING: msg.shipping,
        }
        self._appender.store = msg.store
        self._step_timeout = msg.step_timeout
        self._ends_on = msg.ends_on
        if msg.report_pid:
            self.send(sender, IAm(name=f"saga:{msg.order_id}", pid=os.getpid()))

    def _carry_out_shared(self, order_id: str, command: Any, recorded: Any) -> None:
        """The commands both workflows' machines give: compensation requests, the step timer,
        the end and the abort (`recorded`: the events recorded so far, for the end)."""
        if isinstance(command, sm.RequestRelease):
            self._request(
                sm.Service.INVENTORY, ReleaseStock(order_id=order_id, reason=command.reason)
            )
        elif isinstance(command, sm.RequestVoid):
            self._request(sm.Service.PAYMENT, VoidPayment(order_id=order_id, reason=command.reason))
        elif isinstance(command, sm.StartTimer):
            self._arm(command.token)
        elif isinstance(command, sm.Finish):
            self._finish(order_id, command.reason, recorded)
        elif isinstance(command, sm.Abort):
            self._abort(order_id, command.reason)
        else:
            raise TypeError(f"{self.actor_name}: no way to carry out {type(command).__name__}")

    def _append(self, order_id: str, command: sm.AppendEvents) -> None:
        self._appender.append(
            order_stream(order_id),
            command.events,
            command.event_ids,
            command.expected_version,
            self._on_appended,
            closes=bool(command.events) and type(command.events[-1]).__name__ in self._ends_on,
        )

    def _request(self, service: sm.Service, msg: Any) -> None:
        self.send(self._services[service], msg)

    def _finish(self, order_id: str, reason: str, recorded: Sequence[Event]) -> None:
        """The workflow's part of the order is over (its last event is committed)."""
        view = order_view(order_id, recorded)
        # One line per order and workflow at INFO: where each order ended, for `jq` by order_id.
        log.info(
            "%s %s: %s (%s)",
            self.actor_name,
            order_id,
            view["status"],
            reason,
            extra={"order_id": order_id},
        )
        self.send(
            self._manager,
            SagaFinished(
                order_id=order_id,
                reason=reason,
                order=view,
                saga_key=str(self.myAddress),
            ),
        )
        self._drop_state()
        self.send(self.myAddress, ActorExitRequest())

    def _abort(self, order_id: str, reason: str) -> None:
        self.send(self._manager, SagaAborted(order_id=order_id, reason=reason))
        self._drop_state()
        self.send(self.myAddress, ActorExitRequest())

    def _on_appended(self, reply: AppendDone | AppendRejected) -> None:
        if isinstance(reply, AppendDone):
            self._feed(sm.Appended(version=reply.version))
        elif reply.error == "conflict":
            self._feed(sm.AppendFailed(reason=reply.message))
        else:
            # The store failed to commit: nothing of ours is durable, so treat it as a failed
            # step of the store; the machine re-sends the same events when the timer fires.
            log.error(
                "saga %s: append failed: %s",
                self._order_id,
                reply.message,
                extra={"order_id": self._order_id},
            )

    # --- messages every workflow takes ------------------------------------------------------

    def receiveMsg_ServiceMoved(self, msg: ServiceMoved, sender: Any) -> None:
        """A service restarted elsewhere: what we asked the old one is lost."""
        service = sm.Service(msg.service)
        if service == sm.Service.STORE:
            self._appender.store = msg.address  # appends go through the appender only
        else:
            self._services[service] = msg.address
        self._feed(sm.ServiceRestarted(service=service))

    def receiveMsg_CancelSaga(self, msg: CancelSaga, sender: Any) -> None:
        """The customer wants the order cancelled: the machine decides what that means now."""
        self._feed(sm.CancelRequested(reason=msg.reason))

    def receiveMsg_InventoryReleasedReply(self, msg: InventoryReleasedReply, sender: Any) -> None:
        """Inventory released the order."""
        self._feed(msg)

    def receiveMsg_InventoryUnavailableReply(
        self, msg: InventoryUnavailableReply, sender: Any
    ) -> None:
        """Inventory could not hold (or ship) the order."""
        self._feed(msg)

    def receiveMsg_PaymentVoidedReply(self, msg: PaymentVoidedReply, sender: Any) -> None:
        """The provider voided (refunding a charge that stood)."""
        self._feed(msg)

    def receiveMsg_AppendDone(self, msg: AppendDone, sender: Any) -> None:
        """An append of ours committed."""
        self._appender.settle(msg)

    def receiveMsg_AppendRejected(self, msg: AppendRejected, sender: Any) -> None:
        """An append of ours was refused."""
        self._appender.settle(msg)

    def _arm(self, token: int) -> None:
        """The step deadline for `token`, on at most one pending Thespian timer per saga.

        Thespian timers cannot be cancelled, and each step arms a new deadline: one timer per
        step left four per order alive for the step timeout (heap work, and young objects for
        the garbage collector to walk). A new deadline is always later than the pending
        timer's, so that timer fires first and is moved on to the latest deadline."""
        self._deadline = (token, time.monotonic() + self._step_timeout)
        if not self._timer_pending:
            self._timer_pending = True
            self.wakeupAfter(timedelta(seconds=self._step_timeout), payload=STEP_TIMER)

    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        """The step timer fired: the latest step's deadline passed, or it moved on."""
        if msg.payload != STEP_TIMER:
            return
        self._timer_pending = False
        if self._deadline is None or self._running_order() is None:
            return
        token, due = self._deadline
        left = due - time.monotonic()
        if left > 0.001:
            self._timer_pending = True
            self.wakeupAfter(timedelta(seconds=left), payload=STEP_TIMER)
            return
        self._feed(sm.TimedOut(token=token))

    def receiveMsg_PoisonMessage(self, msg: PoisonMessage, sender: Any) -> None:
        """A service raised on our request: that step failed."""
        request = msg.poisonMessage
        service = SERVICE_OF_REQUEST.get(type(request), sm.Service.STORE)
        reason = (msg.details or "").strip().splitlines()[-1:] or ["raised"]
        log.warning(
            "saga %s: %s raised on %s",
            self._order_id,
            service,
            type(request).__name__,
            extra={"order_id": self._order_id},
        )
        self._feed(sm.StepFailed(service=service, reason=reason[0]))


class OrderSaga(WorkflowActor):
    """Drives one order to a terminal state: reserve, charge, record; compensate on failure."""

    def __init__(self) -> None:
        super().__init__()
        self._state: sm.SagaState | None = None

    def _decide(
        self, state: sm.SagaState, msg: sm.SagaInput
    ) -> tuple[sm.SagaState, list[sm.Command]]:
        return sm.decide(state, msg, ENV)

    def _carry_out(self, command: sm.Command) -> None:
        state = self._state
        if state is None:
            raise RuntimeError(f"saga: {type(command).__name__} after the saga ended")
        order_id = state.order.order_id
        if isinstance(command, sm.AppendEvents):
            self._append(order_id, command)
        elif isinstance(command, sm.RequestReserve):
            self._request(
                sm.Service.INVENTORY, ReserveStock(order_id=order_id, items=command.items)
            )
        elif isinstance(command, sm.RequestCharge):
            charge = ChargePayment(
                order_id=order_id, amount=command.amount, payment_method=command.payment_method
            )
            self._request(sm.Service.PAYMENT, charge)
        else:
            self._carry_out_shared(order_id, command, state.recorded)

    # --- messages -------------------------------------------------------------------------

    def receiveMsg_StartSaga(self, msg: StartSaga, sender: Any) -> None:
        """Start from OrderPlaced, or from a recovered stream."""
        if self._state is not None:
            return  # a re-delivered start: we are already running
        self._begin(msg, sender)
        state = sm.recover(msg.events, compensate=msg.compensate, cancel=msg.cancel)
        if state.phase == sm.Phase.DONE:
            self._finish(msg.order_id, "already terminal", msg.events)
            return
        self._state = state
        self._feed(sm.Start())

    def receiveMsg_InventoryReservedReply(self, msg: InventoryReservedReply, sender: Any) -> None:
        """Inventory held the order."""
        self._feed(msg)

    def receiveMsg_PaymentProcessedReply(self, msg: PaymentProcessedReply, sender: Any) -> None:
        """The provider charged."""
        self._feed(msg)

    def receiveMsg_PaymentFailedReply(self, msg: PaymentFailedReply, sender: Any) -> None:
        """The provider declined."""
        self._feed(msg)
