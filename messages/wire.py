"""The client wire protocol (DESIGN.md section 6): 4-byte big-endian length + a msgpack map.

Only msgpack is ever decoded from a client: no pickle, no msgpack extension types.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from messages.errors import ErrorCode, ServiceError

MAX_FRAME = 1 << 20  # 1 MiB: bigger frames are refused with `too_large`
HEADER = struct.Struct(">I")


def _refuse_ext(code: int, _data: bytes) -> Any:
    raise ServiceError(ErrorCode.INVALID, f"msgpack extension type {code} is not accepted")


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: length header and the msgpack body."""
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body into a map, refusing anything but plain msgpack maps."""
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )
    except ServiceError:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ServiceError(
            ErrorCode.INVALID, f"frame is not valid msgpack ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise ServiceError(ErrorCode.INVALID, "frame must be a msgpack map")
    return obj


def error_reply(req_id: Any, code: ErrorCode, message: str) -> dict[str, Any]:
    """An error reply frame body (the code goes out as its plain string)."""
    return {"id": req_id, "ok": False, "error": {"code": code.value, "message": message}}


def ok_reply(req_id: Any, result: Any) -> dict[str, Any]:
    """A success reply frame body."""
    return {"id": req_id, "ok": True, "result": result}
