"""The ops of DESIGN.md section 6: what each request does, and the operator's drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.asking import ManagerClient
from gateway.audit_process import audit_store
from gateway.parsing import OpTable
from gateway.reads import StoreReads
from messages.commands import (
    CancelOrder,
    Drain,
    DrainStatus,
    GetStock,
    Identify,
    Identities,
    OrderReply,
    PlaceOrder,
    SetStock,
    StockReport,
)
from messages.errors import ErrorCode, ServiceError
from messages.events import TERMINAL_TYPE_NAMES, order_stream, payment_stream, shipment_stream
from messages.requests import (
    AddProductArgs,
    AdminArgs,
    CancelOrderArgs,
    GetOrderArgs,
    ListOrdersArgs,
    NoArgs,
    PlaceOrderArgs,
    ReadStreamArgs,
    SetStockArgs,
    StockArgs,
)
from observability.tail import StoreTail
from saga.timeline import timeline
from saga.views import decode_stream, event_view, order_view
from store import NodeLease

DRAIN_ASK_TIMEOUT = 2.0  # seconds a drain waits for the manager's answer before asking again


_Reply = TypeVar("_Reply")


def expect(reply: Any, kind: type[_Reply]) -> _Reply:
    """The manager's reply as the kind the op asked for; anything else is an internal error
    (never an assert: those vanish under ``python -O``)."""
    if not isinstance(reply, kind):
        raise ServiceError(
            ErrorCode.INTERNAL, f"expected {kind.__name__}, got {type(reply).__name__}"
        )
    return reply


@dataclass(frozen=True)
class OpsConfig:
    """What the ops know of the node they serve, beyond its actors and its store."""

    admin_token: str | None = None  # required by the admin ops; None: not required
    orders: StoreTail | None = None  # the order index behind list_orders (observability.tail)
    node_id: str | None = None  # this node's id on a shared store


class Ops:
    """The op handlers, over the OrderManager (`manager`) and the store's reads (`reads`)."""

    def __init__(
        self, manager: ManagerClient, reads: StoreReads, base: str, config: OpsConfig
    ) -> None:
        self._manager = manager
        self._reads = reads
        self._orders = config.orders
        self._base = base
        self._admin_token = config.admin_token
        self._node_id = config.node_id
        self.address = ""  # this gateway's host:port, once it listens
        self.accepting_orders = True

    def table(self) -> OpTable:
        """Every op: its argument model and its handler."""
        return {
            "ping": (NoArgs, self.ping),
            "place_order": (PlaceOrderArgs, self.place_order),
            "get_order": (GetOrderArgs, self.get_order),
            "cancel_order": (CancelOrderArgs, self.cancel_order),
            "list_orders": (ListOrdersArgs, self.list_orders),
            "timeline": (GetOrderArgs, self.timeline),
            "read_stream": (ReadStreamArgs, self.read_stream),
            "stock": (StockArgs, self.stock),
            "set_stock": (SetStockArgs, self.set_stock),
            "add_product": (AddProductArgs, self.add_product),
            "audit": (NoArgs, self.audit),
            "nodes": (NoArgs, self.nodes),
            "system_info": (AdminArgs, self.system_info),
        }

    async def ping(self, args: NoArgs) -> Any:
        """`ping`: the gateway answers, and on which base."""
        return {"pong": True, "base": self._base}

    async def place_order(self, args: PlaceOrderArgs) -> Any:
        """`place_order`: the order's view once it is terminal (or placed, without wait)."""
        if not self.accepting_orders:
            raise ServiceError(ErrorCode.UNAVAILABLE, "the system is shutting down")
        # Once the message is sent (ask lets `make` go) the arguments are not held while the
        # order runs: with 10,000 orders in flight that is 10,000 of them.
        pending = self._manager.ask(functools.partial(_place_order_message, args))
        del args
        reply = expect(await pending, OrderReply)
        return reply.order

    async def cancel_order(self, args: CancelOrderArgs) -> Any:
        """`cancel_order`: the order's view once it is cancelled; `conflict` if it ended
        otherwise (shipped, failed, paid without shipping), `not_found` if there is none."""
        reply = await self._manager.ask(
            lambda req_id: CancelOrder(req_id=req_id, order_id=args.order_id, reason=args.reason)
        )
        return expect(reply, OrderReply).order

    async def get_order(self, args: GetOrderArgs) -> Any:
        """`get_order`: the order's view from its stream."""
        events = await self._reads.read(
            lambda r: decode_stream(r.read_stream(order_stream(args.order_id)))
        )
        if not events:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no order {args.order_id}")
        return order_view(args.order_id, events)

    async def list_orders(self, args: ListOrdersArgs) -> Any:
        """`list_orders`: one page of orders, newest first, from the order index."""
        orders = self._orders
        if orders is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "this node keeps no order index")
        return await self._reads.read(
            lambda _: orders.list_orders(
                status=args.status,
                customer_id=args.customer_id,
                limit=args.limit,
                cursor=args.cursor,
            )
        )

    async def timeline(self, args: GetOrderArgs) -> Any:
        """`timeline`: the order's events, its payment and shipment records merged by time."""
        order_id = args.order_id
        found = await self._reads.read(
            lambda r: (
                r.read_stream(order_stream(order_id)),
                r.read_stream(payment_stream(order_id)),
                r.read_stream(shipment_stream(order_id)),
            )
        )
        if not found[0]:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no order {order_id}")
        return timeline(order_id, *found)

    async def read_stream(self, args: ReadStreamArgs) -> Any:
        """`read_stream`: one page of a stream's events."""
        # Decoded in the read thread: a long stream (`inventory`) can neither block the event
        # loop nor make a reply of tens of megabytes.
        views = await self._reads.read(
            lambda r: [
                event_view(s) for s in r.read_stream(args.stream, args.from_version, args.limit)
            ]
        )
        if not views and args.from_version == 0:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no stream {args.stream}")
        page: dict[str, Any] = {"stream": args.stream, "events": views}
        if len(views) == args.limit:
            page["next_version"] = views[-1]["version"] + 1
        return page

    async def stock(self, args: StockArgs) -> Any:
        """`stock`: some products' levels (all when none is named)."""
        reply = await self._manager.ask(
            lambda req_id: GetStock(req_id=req_id, product_ids=args.product_ids)
        )
        reply = expect(reply, StockReport)
        missing = [p for p in args.product_ids if p not in reply.stock]
        if missing:
            raise ServiceError(ErrorCode.NOT_FOUND, f"unknown products: {', '.join(missing[:20])}")
        return reply.stock

    async def set_stock(self, args: SetStockArgs) -> Any:
        """`set_stock` (admin): a product's units on hand."""
        self._check_admin("set_stock", args.admin_token)
        reply = await self._manager.ask(
            lambda req_id: SetStock(req_id=req_id, product_id=args.product_id, on_hand=args.on_hand)
        )
        reply = expect(reply, StockReport)
        return reply.stock

    async def add_product(self, args: AddProductArgs) -> Any:
        """`add_product` (admin): a new product with its units on hand (`conflict` if it
        exists); `set_stock` only changes products that exist, so a typo never makes one."""
        self._check_admin("add_product", args.admin_token)
        reply = await self._manager.ask(
            lambda req_id: SetStock(
                req_id=req_id, product_id=args.product_id, on_hand=args.on_hand, create=True
            )
        )
        reply = expect(reply, StockReport)
        return reply.stock

    async def audit(self, args: NoArgs) -> Any:
        """`audit`: a full scan of the store, one at a time so audits cannot crowd out the
        other reads, in a child process (gateway/audit_process.py)."""
        url = self._reads.url
        return await self._reads.read(lambda store: audit_store(store, url), exclusive=True)

    async def nodes(self, args: NoArgs) -> Any:
        """`nodes`: every node of the shared store with its lease and the orders it owns and
        has in flight; a store of one node lists this node alone, without a lease."""
        found = await self._reads.read(lambda r: r.nodes(order_stream(""), TERMINAL_TYPE_NAMES))
        if not found:
            single: dict[str, Any] = {
                "node_id": self._node_id,
                "address": self.address,
                "state": "single",
            }
            if self._orders is not None:  # alone on its store, the node owns every order
                tail = self._orders
                owned, in_flight = await self._reads.read(lambda _: tail.counts())
                single.update(orders_owned=owned, orders_in_flight=in_flight)
            return {"self": self._node_id, "nodes": [single]}
        return {"self": self._node_id, "nodes": [node_view(n) for n in found]}

    async def system_info(self, args: AdminArgs) -> Any:
        """`system_info` (admin): the base, the actors' pids and the saturation count."""
        self._check_admin("system_info", args.admin_token)
        return {
            "base": self._base,
            "pids": await self.identities(),
            "gateway_pid": os.getpid(),
            "stalls": self._manager.stalls,
        }

    def _check_admin(self, op: str, token: str | None) -> None:
        if self._admin_token is not None and token != self._admin_token:
            raise ServiceError(ErrorCode.FORBIDDEN, f"{op} needs the admin token")

    async def identities(self) -> dict[str, int]:
        """The OS pids of the manager, services and live sagas."""
        reply = await self._manager.ask(lambda req_id: Identify(req_id=req_id))
        reply = expect(reply, Identities)
        return reply.pids

    async def drain(self, deadline: float, hurry: asyncio.Event | None = None) -> int:
        """Refuse new orders and wait (up to `deadline` seconds, or until `hurry` is set) for
        in-flight ones to end; returns how many were left (they resume on the next start)."""
        self.accepting_orders = False
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        in_flight = -1  # unknown until the manager answers
        while not (hurry is not None and hurry.is_set()):
            left = end - loop.time()
            with contextlib.suppress(ServiceError):  # no answer in time: ask again until the end
                reply = await self._manager.ask(
                    lambda req_id: Drain(req_id=req_id),
                    control=True,
                    timeout=min(max(left, 0.1), DRAIN_ASK_TIMEOUT),
                )
                reply = expect(reply, DrainStatus)
                in_flight = reply.in_flight
            if in_flight == 0 or loop.time() >= end:
                break
            await asyncio.sleep(0.05)
        # Thespian stops the services before the manager; it must not restart them.
        with contextlib.suppress(ServiceError):
            await self._manager.ask(
                lambda req_id: Drain(req_id=req_id, final=True),
                control=True,
                timeout=DRAIN_ASK_TIMEOUT,
            )
        return max(in_flight, 0)


def node_view(node: NodeLease) -> dict[str, Any]:
    """One node as `nodes` shows it: lease age and what it owns."""
    if node.taken_by is not None:
        state = f"taken over by {node.taken_by}"
    else:
        state = "live" if node.expires_in > 0 else "expired"
    return {
        "node_id": node.node_id,
        "address": node.address,
        "state": state,
        "epoch": node.epoch,
        "lease_age_s": round(node.age, 3),
        "lease_expires_in_s": round(node.expires_in, 3),
        "orders_owned": node.owned,
        "orders_in_flight": node.in_flight,
    }


def _place_order_message(args: PlaceOrderArgs, req_id: int) -> PlaceOrder:
    return PlaceOrder(
        req_id=req_id,
        order_id=args.order_id,
        customer_id=args.customer_id,
        lines=args.lines,
        payment_method=args.payment_method,
        wait=args.wait,
        shipping=args.shipping,
    )
