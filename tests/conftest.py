"""Shared fixtures: a real `run.py` process on a real SQLite file, reached through a real socket."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadgen.spawn import ROOT, SpawnedServer
from runtime import thespian_fixes
from runtime.pg import PgServer, find_bin_dir

__all__ = ["ROOT", "Server", "new_id", "wait_until"]


@pytest.fixture(autouse=True, scope="session")
def _thespian_fixes() -> None:
    """Tests that start an actor system themselves get the same patched Thespian as run.py."""
    thespian_fixes.apply()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A real PostgreSQL server for the whole session, in a temp dir, stopped at the end
    (whatever happened); tests that need it are skipped only if its binaries are absent."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        why = (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
            "/usr/lib/postgresql/*/bin or on PATH (Debian: apt-get install postgresql)"
        )
        if os.environ.get("ORDER_REQUIRE_POSTGRES"):  # CI: a missing server is a failure
            pytest.fail(why)
        pytest.skip(why)
    server = PgServer(bin_dir)
    try:
        yield server
    finally:
        server.stop()


class Server(SpawnedServer):
    """run.py for a test, in the test's directory; a 0.5 s step timeout unless told otherwise,
    so the orders a test sends into timeouts end quickly."""

    def __init__(self, tmp: Path, *, step_timeout: float = 0.5, **kwargs: Any) -> None:
        super().__init__(tmp, step_timeout=step_timeout, **kwargs)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The HTTP API's address, when run.py serves one (`http=HOST:PORT` in the ready line)."""
        words = [word[5:] for word in self.ready_line.split() if word.startswith("http=")]
        if not words:
            return None
        host, _, port = words[0].rpartition(":")
        return host, int(port)

    @property
    def http_url(self) -> str | None:
        """The HTTP API's base URL, or None."""
        address = self.http_address
        return None if address is None else f"http://{address[0]}:{address[1]}"


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start real run.py processes; all are stopped at the end of the test."""
    servers: list[Server] = []

    def start(**kwargs: Any) -> Server:
        server = Server(tmp_path, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def new_id(prefix: str = "o") -> str:
    """A unique order id per test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
