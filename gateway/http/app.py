"""The HTTP API (FastAPI): the gateway's ops as JSON over HTTP, the metrics, the live feed and
the web console.

Every order, stock and audit route runs the msgpack gateway's own op (``Gateway.call``) with the
same pydantic argument models, so both interfaces answer alike: same validation, same admission
limits, same error codes (here in ``application/problem+json``, with the gateway's ``code``).

The routes live in one router per resource (``routers/``: orders, stock, operations); this
module assembles them with the error handlers and the console, and keeps the node's wiring in
``app.state`` for them (``common.Wired``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from gateway.server import Gateway
from messages.errors import ServiceError
from observability.tail import StoreTail

from .common import Problem, Wiring, describe, problem
from .guard import PROBLEM_STATUS
from .routers import operations, orders, stock

log = logging.getLogger("orders.http")

CONSOLE = Path(__file__).resolve().parent.parent / "console"


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
    app.state.wiring = Wiring(gateway, tail, ready)
    _handle_errors(app)
    app.include_router(orders.router)
    app.include_router(stock.router)
    app.include_router(operations.router)

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=CONSOLE), name="console")
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every error as a problem document with the gateway's code."""

    @app.exception_handler(ServiceError)
    async def op_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return problem(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem("invalid", describe(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "unknown_op"}.get(exc.status_code, "invalid")
        return problem(code, str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_request: Request, _exc: Exception) -> JSONResponse:
        log.exception("http: request failed")
        return problem("internal", "internal error")
