"""From a frame body to a request ready to run: decoding, the request's shape, its op, and the
admission limits checked before any validation (id length, number of argument values)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from messages.errors import ErrorCode, ServiceError
from messages.wire import decode_body, error_reply, ok_reply

log = logging.getLogger("orders.gateway")

MAX_ID_LENGTH = 256  # characters of a string request id
MAX_ARG_VALUES = 10_000  # values (map keys included) in a request's args; an order needs ~500

Handler = Callable[[Any], Awaitable[Any]]
OpTable = Mapping[str, tuple[type[BaseModel], Handler]]  # op name -> (its args, its handler)


@dataclass(slots=True)
class ParsedRequest:
    """A decoded, validated request waiting to run (once)."""

    req_id: Any
    handler: Handler
    args: BaseModel | None  # handed to the handler when it runs, not kept

    async def run(self) -> dict[str, Any]:
        """Carry it out: its reply map; nothing a handler raises gets past here. The arguments
        go to the handler and are not held here while it waits: a handler that has made its
        message lets them go (with 10,000 orders in flight, 10,000 of them)."""
        args, self.args = self.args, None
        if args is None:
            raise RuntimeError("a request runs once")
        try:
            pending = self.handler(args)
            del args
            return ok_reply(self.req_id, await pending)
        except ServiceError as e:
            return error_reply(self.req_id, e.code, e.message)
        except Exception:
            log.exception("gateway: request failed")
            return error_reply(self.req_id, ErrorCode.INTERNAL, "internal error")


class Parser:
    """Parses frames for the ops of an op table."""

    def __init__(self, ops: OpTable) -> None:
        self._ops = ops
        self._known = ", ".join(sorted(ops))

    def parse(self, body: bytes) -> ParsedRequest | dict[str, Any]:
        """Decode and validate a frame: the request to run, or the error reply to send.

        Runs before the request waits for anything, so a pending request holds only its small
        validated arguments, never the (up to 1 MiB) frame: that is what bounds the memory a
        connection with many requests in flight can pin.
        """
        req_id: Any = None
        try:
            request = decode_body(body)
            req_id = request.get("id")
            if not isinstance(req_id, int | str | None) or isinstance(req_id, bool):
                req_id = None
                raise ServiceError(ErrorCode.INVALID, "id must be an integer or a string")
            if isinstance(req_id, str) and len(req_id) > MAX_ID_LENGTH:
                # A pending request keeps its id, and every reply echoes it: bounded, so
                # 2,048 pending requests cannot pin gigabytes.
                req_id = None
                raise ServiceError(ErrorCode.INVALID, f"id longer than {MAX_ID_LENGTH} characters")
            return self._validated(req_id, request)
        except ServiceError as e:
            return error_reply(req_id, e.code, e.message)
        except Exception:
            log.exception("gateway: request failed")
            return error_reply(req_id, ErrorCode.INTERNAL, "internal error")

    def _validated(self, req_id: Any, request: dict[str, Any]) -> ParsedRequest:
        extra = set(request) - {"id", "op", "args"}
        if extra:
            keys = sorted(map(str, extra))[:5]
            raise ServiceError(ErrorCode.INVALID, f"unknown request keys: {keys}")
        op, args = request.get("op"), request.get("args", {})
        if not isinstance(op, str):
            raise ServiceError(ErrorCode.INVALID, "op must be a string")
        if op not in self._ops:
            raise ServiceError(
                ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}; known: {self._known}"
            )
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise ServiceError(ErrorCode.INVALID, "args must be a map")
        if not _within(args, MAX_ARG_VALUES):
            # Checked before validation: a frame of a million values would otherwise be
            # validated (and every error described) on the event loop, stalling everyone.
            raise ServiceError(ErrorCode.INVALID, f"args hold more than {MAX_ARG_VALUES} values")
        model, handler = self._ops[op]
        try:
            return ParsedRequest(req_id, handler, model.model_validate(args))
        except ValidationError as e:
            raise ServiceError(ErrorCode.INVALID, _describe(e)) from None


def _within(value: Any, budget: int) -> bool:
    """Whether `value` (decoded msgpack) holds at most `budget` values, counted without
    recursion and stopping as soon as the budget is spent."""
    stack, left = [value], budget
    while stack:
        item = stack.pop()
        left -= 1
        if left < 0:
            return False
        if isinstance(item, dict):
            left -= len(item)  # keys
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return left >= 0


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "args"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
