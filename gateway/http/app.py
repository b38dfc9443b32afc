"""The HTTP API (FastAPI): the gateway's ops as JSON over HTTP, the metrics, the live feed and
the web console.

Every order, stock and audit route runs the msgpack gateway's own op (``Gateway.call``) with the
same pydantic argument models, so both interfaces answer alike: same validation, same admission
limits, same error codes (here in ``application/problem+json``, with the gateway's ``code``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints, ValidationError
from starlette.exceptions import HTTPException

from gateway.server import Gateway
from messages.base import Frozen, OrderId, OrderStatus, ProductId
from messages.errors import ErrorCode, ServiceError
from messages.events import order_stream
from messages.requests import (
    DEFAULT_CANCEL_REASON,
    MAX_PAGE,
    MAX_VERSION,
    AddProductArgs,
    CancelOrderArgs,
    GetOrderArgs,
    ListOrdersArgs,
    NoArgs,
    PlaceOrderArgs,
    ReadStreamArgs,
    SetStockArgs,
    StockArgs,
)
from observability.metrics import exposition
from observability.tail import StoreTail

from .guard import PROBLEM_STATUS, problem_body

log = logging.getLogger("orders.http")

CONSOLE = Path(__file__).resolve().parent.parent / "console"
MAX_FEEDS = 64  # live feeds open at once: each holds a connection and a queue
KEEPALIVE = 15.0  # seconds between comments on an idle feed, so proxies keep it open


class PlaceOrderBody(PlaceOrderArgs):
    """`POST /orders`: the place_order arguments; over HTTP ``wait`` defaults to false (answer
    once ``OrderPlaced`` is durable), since a request held for a whole saga ties up a
    connection."""

    wait: StrictBool = False


class StockBody(Frozen):
    """`PUT /stock/{product_id}`: the units on hand."""

    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]


class CancelBody(Frozen):
    """`POST /orders/{order_id}/cancel`: why the customer cancels."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=256)] = DEFAULT_CANCEL_REASON


class ProductBody(Frozen):
    """`POST /products`: a new product and its units on hand."""

    product_id: ProductId
    on_hand: Annotated[StrictInt, Field(ge=0, le=1_000_000_000)]


class Problem(BaseModel):
    """An error (RFC 9457); ``code`` is the msgpack gateway's error code."""

    type: str
    title: str
    status: int
    detail: str
    code: str


def _problem(code: str, detail: str, status: int | None = None) -> JSONResponse:
    body = problem_body(code, detail, status)
    return JSONResponse(body, status_code=body["status"], media_type="application/problem+json")


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], **values: Any) -> M:
    """Build an op's arguments from path and query values; a refusal is ``invalid``."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ServiceError(ErrorCode.INVALID, _describe(e.errors())) from None


def _describe(errors: Any) -> str:
    parts = []
    for item in list(errors)[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def create_app(
    gateway: Gateway,
    tail: StoreTail,
    *,
    ready: Callable[[], bool],
) -> FastAPI:
    """The API over `gateway` (ops) and `tail` (order index, metrics, live feed). `ready` says
    whether the node is configured (readyz also waits for recovery and the tail)."""
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": Problem, "description": code} for code, status in PROBLEM_STATUS.items()
    }
    app = FastAPI(
        title="Order saga service",
        version="0.1.0",
        description="Orders, stock and the audit of the order saga service over HTTP; errors "
        "are application/problem+json with the msgpack gateway's error `code`.",
        docs_url=None,  # the interactive docs load scripts from a CDN; /openapi.json stays
        redoc_url=None,
        responses=errors,
    )
    feeds = 0

    @app.exception_handler(ServiceError)
    async def op_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return _problem(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem("invalid", _describe(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "unknown_op"}.get(exc.status_code, "invalid")
        return _problem(code, str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request: Request, _exc: Exception) -> JSONResponse:
        log.exception("http: request failed")
        return _problem("internal", "internal error")

    # --- orders ---------------------------------------------------------------------------

    @app.post("/orders", status_code=201, tags=["orders"])
    async def place_order(body: PlaceOrderBody) -> dict[str, Any]:
        """Place an order (idempotent by ``order_id``); with ``wait`` answer once terminal."""
        result: dict[str, Any] = await gateway.call("place_order", body)
        return result

    @app.get("/orders", tags=["orders"])
    async def list_orders(
        status: OrderStatus | None = None,
        customer_id: Annotated[str | None, Query(max_length=128)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: Annotated[str | None, Query(max_length=18)] = None,
    ) -> dict[str, Any]:
        """Orders newest first, filtered by status and customer; page on with
        ``cursor=next_cursor``."""
        # Query values arrive as text: FastAPI converts them, the op's model then checks them
        # exactly as the gateway does.
        args = _validated(
            ListOrdersArgs, status=status, customer_id=customer_id, limit=limit, cursor=cursor
        )
        result: dict[str, Any] = await gateway.call("list_orders", args)
        return result

    @app.get("/orders/{order_id}", tags=["orders"])
    async def get_order(order_id: OrderId) -> dict[str, Any]:
        """The order's status as its stream tells it."""
        result: dict[str, Any] = await gateway.call(
            "get_order", _validated(GetOrderArgs, order_id=order_id)
        )
        return result

    @app.get("/orders/{order_id}/events", tags=["orders"])
    async def order_events(
        order_id: OrderId,
        from_version: Annotated[int, Query(ge=0, le=MAX_VERSION)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE,
    ) -> dict[str, Any]:
        """The order stream's events (a page; ``next_version`` to go on)."""
        args = _validated(
            ReadStreamArgs, stream=order_stream(order_id), from_version=from_version, limit=limit
        )
        try:
            result: dict[str, Any] = await gateway.call("read_stream", args)
        except ServiceError as e:
            if e.code == ErrorCode.NOT_FOUND:
                raise ServiceError(ErrorCode.NOT_FOUND, f"no order {order_id}") from None
            raise
        return result

    @app.post("/orders/{order_id}/cancel", tags=["orders"])
    async def cancel_order(order_id: OrderId, body: CancelBody) -> dict[str, Any]:
        """The customer's cancellation: the order once cancelled; ``conflict`` if it ended
        otherwise (shipped, failed, paid without shipping)."""
        args = _validated(CancelOrderArgs, order_id=order_id, reason=body.reason)
        result: dict[str, Any] = await gateway.call("cancel_order", args)
        return result

    @app.get("/orders/{order_id}/timeline", tags=["orders"])
    async def order_timeline(order_id: OrderId) -> dict[str, Any]:
        """The order's events and its payment records merged by time, each with its duration
        and whether it compensates."""
        result: dict[str, Any] = await gateway.call(
            "timeline", _validated(GetOrderArgs, order_id=order_id)
        )
        return result

    # --- stock and audit ------------------------------------------------------------------

    @app.get("/stock", tags=["stock"])
    async def stock(
        product_id: Annotated[list[ProductId] | None, Query(max_length=1000)] = None,
    ) -> dict[str, Any]:
        """Stock per product (``?product_id=`` repeated; none: every product)."""
        args = _validated(StockArgs, product_ids=tuple(product_id or ()))
        result: dict[str, Any] = await gateway.call("stock", args)
        return result

    @app.put("/stock/{product_id}", tags=["stock"])
    async def set_stock(
        product_id: ProductId,
        body: StockBody,
        authorization: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Set a product's units on hand (admin: ``Authorization: Bearer <token>``; the
        gateway's op checks it)."""
        args = _validated(
            SetStockArgs,
            product_id=product_id,
            on_hand=body.on_hand,
            admin_token=_bearer(authorization),
        )
        result: dict[str, Any] = await gateway.call("set_stock", args)
        return result

    @app.post("/products", status_code=201, tags=["stock"])
    async def add_product(
        body: ProductBody, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        """Add a product (admin); ``conflict`` if it exists. ``PUT /stock`` only changes
        products that exist, so a typo never makes one."""
        args = _validated(
            AddProductArgs,
            product_id=body.product_id,
            on_hand=body.on_hand,
            admin_token=_bearer(authorization),
        )
        result: dict[str, Any] = await gateway.call("add_product", args)
        return result

    @app.get("/nodes", tags=["nodes"])
    async def nodes() -> Any:
        """The nodes sharing the store: id, address, lease age, orders owned and in flight
        (one node, without a lease, on a store of its own)."""
        return await gateway.call("nodes", NoArgs())

    @app.get("/audit", tags=["audit"])
    async def run_audit() -> dict[str, Any]:
        """The five invariants over the whole store (docs/architecture.md)."""
        result: dict[str, Any] = await gateway.call("audit", NoArgs())
        return result

    # --- operations -----------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], response_model=None)
    async def readyz() -> dict[str, Any] | JSONResponse:
        """200 once the system is configured, the orders found unfinished at start are
        finished and the order index has read the store; 503 before, and while draining."""
        recovering = tail.recovering()
        if not ready():
            return _problem("unavailable", "not accepting orders (starting or draining)")
        if recovering != 0:
            detail = "reading the store" if recovering < 0 else f"recovering {recovering} orders"
            return _problem("unavailable", detail)
        return {"status": "ready"}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus' text format (observability/metrics.py says where each comes from)."""
        await asyncio.to_thread(tail.catch_up)  # counts include what the store just committed
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/feed", tags=["operations"], response_class=StreamingResponse)
    async def feed(order_id: OrderId | None = None) -> StreamingResponse:
        """Server-sent events: ``orders`` (changed orders), ``events`` (with ``order_id``: that
        order's new events), ``stats`` (each second: placed, completed, latency, in flight)."""
        nonlocal feeds
        if feeds >= MAX_FEEDS:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"at most {MAX_FEEDS} live feeds at once")
        feeds += 1
        subscriber = tail.subscribe(order_id)

        async def stream() -> AsyncIterator[str]:
            nonlocal feeds
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
                feeds -= 1
                tail.unsubscribe(subscriber)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # --- the console ----------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=CONSOLE), name="console")
    return app
