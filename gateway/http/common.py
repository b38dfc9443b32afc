"""What the HTTP API's routers share: the node's wiring (a dependency), error documents and
building an op's arguments from path, query and header values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from gateway.server import Gateway
from messages.errors import ErrorCode, ServiceError
from observability.tail import StoreTail

from .guard import problem_body

MAX_FEEDS = 64  # live feeds open at once: each holds a connection and a queue


class FeedLimit:
    """Counts the live feeds open on one app, up to ``MAX_FEEDS``."""

    def __init__(self) -> None:
        self.open = 0

    def acquire(self) -> None:
        if self.open >= MAX_FEEDS:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"at most {MAX_FEEDS} live feeds at once")
        self.open += 1

    def release(self) -> None:
        self.open -= 1


@dataclass(frozen=True)
class Wiring:
    """What the routes run on: `gateway` (ops), `tail` (order index, metrics, live feed) and
    `ready` (whether the node is configured); kept in ``app.state.wiring``."""

    gateway: Gateway
    tail: StoreTail
    ready: Callable[[], bool]
    feeds: FeedLimit = field(default_factory=FeedLimit)


async def _wiring(request: Request) -> Wiring:
    wiring: Wiring = request.app.state.wiring
    return wiring


Wired = Annotated[Wiring, Depends(_wiring)]
"""A route's parameter for the app's ``Wiring`` (not part of the request's schema)."""


class Problem(BaseModel):
    """An error (RFC 9457); ``code`` is the msgpack gateway's error code."""

    type: str
    title: str
    status: int
    detail: str
    code: str


def problem(code: str, detail: str, status: int | None = None) -> JSONResponse:
    body = problem_body(code, detail, status)
    return JSONResponse(body, status_code=body["status"], media_type="application/problem+json")


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], **values: Any) -> M:
    """Build an op's arguments from path and query values; a refusal is ``invalid``."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ServiceError(ErrorCode.INVALID, describe(e.errors())) from None


def describe(errors: Any) -> str:
    parts = []
    for item in list(errors)[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
