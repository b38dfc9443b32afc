"""`/orders`: place, list, read, cancel an order; its events and its timeline."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import StrictBool, StringConstraints

from gateway.http.common import Wired, validated
from messages.base import Frozen, OrderId, OrderStatus
from messages.errors import ErrorCode, ServiceError
from messages.events import order_stream
from messages.requests import (
    DEFAULT_CANCEL_REASON,
    MAX_PAGE,
    MAX_VERSION,
    CancelOrderArgs,
    GetOrderArgs,
    ListOrdersArgs,
    PlaceOrderArgs,
    ReadStreamArgs,
)

router = APIRouter(tags=["orders"])


class PlaceOrderBody(PlaceOrderArgs):
    """`POST /orders`: the place_order arguments; over HTTP ``wait`` defaults to false (answer
    once ``OrderPlaced`` is durable), since a request held for a whole saga ties up a
    connection."""

    wait: StrictBool = False


class CancelBody(Frozen):
    """`POST /orders/{order_id}/cancel`: why the customer cancels."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=256)] = DEFAULT_CANCEL_REASON


@router.post("/orders", status_code=201)
async def place_order(body: PlaceOrderBody, wired: Wired) -> dict[str, Any]:
    """Place an order (idempotent by ``order_id``); with ``wait`` answer once terminal."""
    result: dict[str, Any] = await wired.gateway.call("place_order", body)
    return result


@router.get("/orders")
async def list_orders(
    wired: Wired,
    status: OrderStatus | None = None,
    customer_id: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=18)] = None,
) -> dict[str, Any]:
    """Orders newest first, filtered by status and customer; page on with
    ``cursor=next_cursor``."""
    # Query values arrive as text: FastAPI converts them, the op's model then checks them
    # exactly as the gateway does.
    args = validated(
        ListOrdersArgs, status=status, customer_id=customer_id, limit=limit, cursor=cursor
    )
    result: dict[str, Any] = await wired.gateway.call("list_orders", args)
    return result


@router.get("/orders/{order_id}")
async def get_order(order_id: OrderId, wired: Wired) -> dict[str, Any]:
    """The order's status as its stream tells it."""
    result: dict[str, Any] = await wired.gateway.call(
        "get_order", validated(GetOrderArgs, order_id=order_id)
    )
    return result


@router.get("/orders/{order_id}/events")
async def order_events(
    order_id: OrderId,
    wired: Wired,
    from_version: Annotated[int, Query(ge=0, le=MAX_VERSION)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
) -> dict[str, Any]:
    """The order stream's events (a page; ``next_version`` to go on)."""
    args = validated(
        ReadStreamArgs, stream=order_stream(order_id), from_version=from_version, limit=limit
    )
    try:
        result: dict[str, Any] = await wired.gateway.call("read_stream", args)
    except ServiceError as e:
        if e.code == ErrorCode.NOT_FOUND:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no order {order_id}") from None
        raise
    return result


@router.post("/orders/{order_id}/cancel")
async def cancel_order(order_id: OrderId, body: CancelBody, wired: Wired) -> dict[str, Any]:
    """The customer's cancellation: the order once cancelled; ``conflict`` if it ended
    otherwise (shipped, failed, paid without shipping)."""
    args = validated(CancelOrderArgs, order_id=order_id, reason=body.reason)
    result: dict[str, Any] = await wired.gateway.call("cancel_order", args)
    return result


@router.get("/orders/{order_id}/timeline")
async def order_timeline(order_id: OrderId, wired: Wired) -> dict[str, Any]:
    """The order's events and its payment records merged by time, each with its duration
    and whether it compensates."""
    result: dict[str, Any] = await wired.gateway.call(
        "timeline", validated(GetOrderArgs, order_id=order_id)
    )
    return result
