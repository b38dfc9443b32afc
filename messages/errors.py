"""Error codes and the one exception that carries them.

The codes are the wire protocol's (DESIGN.md section 6): a ``StrEnum`` so a code is still the
plain string on the wire and in msgpack, and a typo is an attribute error instead of a code no
client knows.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error code the service answers with, plus the client's own local ones."""

    INVALID = "invalid"  # the request is malformed or its arguments fail validation
    TOO_LARGE = "too_large"  # a frame over the size limit
    UNKNOWN_OP = "unknown_op"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # contradicts what exists (another order with the same id, ...)
    FORBIDDEN = "forbidden"  # an admin op without the admin token
    UNAVAILABLE = "unavailable"  # saturated, shutting down, no answer in time: retry later
    INTERNAL = "internal"
    # Raised by client.py itself, never sent by the server.
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"


class ServiceError(Exception):
    """A request refused with an error code: raised by the wire helpers, the bridge and the
    gateway's handlers alike, and turned into an error reply at one place in the gateway."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServiceError({self.code.value!r}, {self.message!r})"


class ExpectedFailureError(RuntimeError):
    """A failure the system is built to survive (a test token's provider error): the actor
    raises it so that supervision compensates, and the log shows it as one warning line with
    the message (which names the order), not as a traceback per retry."""
