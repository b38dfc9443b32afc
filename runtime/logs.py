"""Logging for every process of a node: one line per event worth knowing, plain or JSON.

``log_config`` is a ``logging.config.dictConfig`` dictionary: run.py applies it to its own
process and hands it to Thespian, which applies it in every actor process of the process bases
(so the formatter must live in an importable module, here). Log calls that concern one order pass
``extra={"order_id": ...}``; the JSON lines carry it as a field of its own, so
``jq 'select(.order_id == "o-1")'`` follows one order.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

FORMATS = ("plain", "json")
PLAIN = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601 UTC), level, logger, pid, message, the fields
    passed with ``extra=`` (``order_id`` …), and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def log_config(level: str, fmt: str = "plain") -> dict[str, Any]:
    """The logging configuration of a node's processes: to stderr, at `level`, as `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    formatter: dict[str, Any] = (
        {"()": "runtime.logs.JsonFormatter"} if fmt == "json" else {"format": PLAIN}
    )
    return {
        "version": 1,
        "formatters": {"main": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
                "level": level,
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "disable_existing_loggers": False,
    }
