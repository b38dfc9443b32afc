"""The service actors (store, Inventory, Payment, Shipping): start, restart with back-off,
watchdog."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from typing import Any

from thespian.actors import Actor, ActorExitRequest

from actors.base import log
from actors.event_store import EventStoreActor
from actors.inventory import InventoryActor
from actors.payment import PaymentActor
from actors.shipping import ShippingActor
from messages.commands import Configure, ServiceConfig, ServiceReady
from observability.metrics import SUPERVISION_RESTARTS
from saga.supervision import restart_delay

SERVICES: dict[str, type[Actor]] = {
    "store": EventStoreActor,
    "inventory": InventoryActor,
    "payment": PaymentActor,
    "shipping": ShippingActor,
}
STORE = "store"


def process_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie of ours (reaping it if it is)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child, or already reaped by Thespian
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Ready(enum.Enum):
    """What a ServiceReady means."""

    STALE = "stale"  # from an instance replaced before it got ready
    FIRST = "first"  # the service's first start (the boot goes on)
    RESTARTED = "restarted"  # a restarted instance (the sagas must learn its address)


class Services:
    """The service actors' addresses, pids and restarts.

    `create`, `send` and `wake_after` are the owning actor's; `started(name, address)` runs after
    each start (the manager's appender follows the store). A restart due later comes back as a
    wakeup whose payload is the service's name: the owner calls `restart` with it.
    """

    def __init__(
        self,
        config: Configure,
        create: Callable[[type[Actor]], Any],
        send: Callable[[Any, Any], None],
        wake_after: Callable[[float, Any], None],
        started: Callable[[str, Any], None],
    ) -> None:
        self._config = config
        self._create = create
        self._send = send
        self._wake_after = wake_after
        self._started = started
        self.addresses: dict[str, Any] = {}
        self.pids: dict[str, int] = {}
        self._ready: set[str] = set()
        self._restarting: set[str] = set()  # between a death and the new instance's ready
        self._restarts: dict[str, tuple[float, ...]] = {}

    def start(self, name: str) -> None:
        """Create the service and send it its configuration."""
        address = self._create(SERVICES[name])
        self.addresses[name] = address
        self._started(name, address)
        config = self._config
        self._send(
            address,
            ServiceConfig(
                name=name,
                store_url=config.store_url,
                synchronous=config.synchronous,
                store=self.addresses.get(STORE),
                step_timeout=config.step_timeout,
                crash_exits_process=config.crash_exits_process,
                payment_latency=config.payment_latency,
                payment_provider=config.payment_provider,
                node_id=config.node_id,
                epoch=config.epoch,
            ),
        )

    def ready(self, msg: ServiceReady, sender: Any) -> Ready:
        """A service finished loading; a stale instance is told to exit."""
        if sender != self.addresses.get(msg.name):
            log.warning("manager: ignoring ready from a replaced %s (pid %d)", msg.name, msg.pid)
            self._send(sender, ActorExitRequest())
            return Ready.STALE
        self._restarting.discard(msg.name)
        self.pids[msg.name] = msg.pid
        first = msg.name not in self._ready
        self._ready.add(msg.name)
        if msg.name == STORE:
            # The others read the schema the store creates, and append through it: they start
            # once it is ready, and restart with it.
            for other in (name for name in SERVICES if name != STORE):
                if first:
                    self.start(other)
                else:
                    self.restart(other)
        return Ready.FIRST if first else Ready.RESTARTED

    def all_ready(self) -> bool:
        """Whether every service has been ready once."""
        return self._ready >= set(SERVICES)

    def available(self, name: str) -> bool:
        """Whether the service is up and not being replaced."""
        return name in self.addresses and name in self._ready and name not in self._restarting

    def name_of(self, address: Any) -> str | None:
        """The service at this address, if it is one (compared with ==, see README)."""
        for name, known in self.addresses.items():
            if known == address:
                return name
        return None

    def died(self, name: str) -> None:
        """Restart a dead service, backing off when it keeps dying. Its old address stays in
        place meanwhile (sagas learn the new one from ServiceMoved when it is ready)."""
        if name in self._restarting:
            return  # the watchdog and ChildActorExited both saw the same death
        self._restarting.add(name)
        self.pids.pop(name, None)
        recent, delay = restart_delay(self._restarts.get(name, ()), time.monotonic())
        self._restarts[name] = recent
        log.error("manager: service %s died; restart #%d in %.1fs", name, len(recent), delay)
        SUPERVISION_RESTARTS.labels(name).inc()
        if delay == 0:
            self.restart(name)
        else:
            self._wake_after(delay, name)

    def restart(self, name: str) -> None:
        """Replace a service instance (dead or not) by a new one that loads its durable state."""
        old = self.addresses.get(name)
        if old is not None:
            self._send(old, ActorExitRequest())
        self.pids.pop(name, None)
        self._restarting.add(name)
        self.start(name)

    def check(self) -> None:
        """The watchdog's round over the services: Thespian's queue base can miss a killed
        child (it reaps it without reporting ChildActorExited when a send to it fails first)."""
        for name in SERVICES:
            pid = self.pids.get(name)
            if pid is not None and not process_alive(pid):
                log.error("manager: watchdog found %s (pid %d) dead", name, pid)
                self.died(name)
