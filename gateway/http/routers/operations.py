"""Running the node: its peers, the audit, health and readiness, the metrics, the live feed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.http.common import Wired, problem
from messages.base import OrderId
from messages.requests import NoArgs
from observability.metrics import exposition

router = APIRouter()

KEEPALIVE = 15.0  # seconds between comments on an idle feed, so proxies keep it open


@router.get("/nodes", tags=["nodes"])
async def nodes(wired: Wired) -> Any:
    """The nodes sharing the store: id, address, lease age, orders owned and in flight
    (one node, without a lease, on a store of its own)."""
    return await wired.gateway.call("nodes", NoArgs())


@router.get("/audit", tags=["audit"])
async def run_audit(wired: Wired) -> dict[str, Any]:
    """The five invariants over the whole store (docs/architecture.md)."""
    result: dict[str, Any] = await wired.gateway.call("audit", NoArgs())
    return result


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict[str, str]:
    """The process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], response_model=None)
async def readyz(wired: Wired) -> dict[str, Any] | JSONResponse:
    """200 once the system is configured, the orders found unfinished at start are
    finished and the order index has read the store; 503 before, and while draining."""
    recovering = wired.tail.recovering()
    if not wired.ready():
        return problem("unavailable", "not accepting orders (starting or draining)")
    if recovering != 0:
        detail = "reading the store" if recovering < 0 else f"recovering {recovering} orders"
        return problem("unavailable", detail)
    return {"status": "ready"}


@router.get("/metrics", tags=["operations"], response_class=Response)
async def metrics(wired: Wired) -> Response:
    """Prometheus' text format (observability/metrics.py says where each comes from)."""
    await asyncio.to_thread(wired.tail.catch_up)  # counts include what the store just committed
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/feed", tags=["operations"], response_class=StreamingResponse)
async def feed(wired: Wired, order_id: OrderId | None = None) -> StreamingResponse:
    """Server-sent events: ``orders`` (changed orders), ``events`` (with ``order_id``: that
    order's new events), ``stats`` (each second: placed, completed, latency, in flight)."""
    wired.feeds.acquire()
    tail = wired.tail
    subscriber = tail.subscribe(order_id)

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    message = await asyncio.wait_for(subscriber.queue.get(), KEEPALIVE)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if message is None:
                    return  # the node is stopping
                yield message
        finally:
            wired.feeds.release()
            tail.unsubscribe(subscriber)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
