"""Shared fixtures: a real `run.py` process on a real SQLite file, reached through a real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from client import Client
from runtime import thespian_fixes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _thespian_fixes() -> None:
    """Tests that start an actor system themselves get the same patched Thespian as run.py."""
    thespian_fixes.apply()


class Server:
    """A `run.py` child process; `stop()` sends SIGTERM and returns its exit status."""

    def __init__(
        self,
        tmp: Path,
        *,
        base: str = "simple",
        db: Path | None = None,
        step_timeout: float = 0.5,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.db = db or tmp / f"orders-{uuid.uuid4().hex[:8]}.db"
        self.base = base
        self.stderr_path = tmp / f"run-{uuid.uuid4().hex[:8]}.log"
        self._stderr: IO[bytes] = self.stderr_path.open("wb")
        env = {**os.environ, "THESPLOG_FILE": str(tmp / "thespian.log"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run.py"),
                "--base",
                base,
                "--db",
                str(self.db),
                "--port",
                "0",
                "--step-timeout",
                str(step_timeout),
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.ready_line = self._wait_ready(timeout=60)
        address = self.ready_line.split()[1]
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._clients: list[Client] = []

    def _wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                lines.append(raw.decode())
                if "ready" in lines[-1]:
                    break
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout) or not lines or "ready" not in lines[-1]:
            self.kill()
            raise RuntimeError(f"run.py did not get ready: {lines} {self.log()[-3000:]}")
        return lines[-1].strip()

    def client(self, timeout: float = 30.0) -> Client:
        """A new client connected to this server (closed with the server)."""
        c = Client(self.host, self.port, timeout=timeout)
        self._clients.append(c)
        return c

    def log(self) -> str:
        """What run.py wrote on stderr so far."""
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def _close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: drain and exit; returns the exit status."""
        self._close_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._finish()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the run.py process (its actor processes are the caller's business)."""
        self._close_clients()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._finish()

    def _finish(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._stderr.closed:
            self._stderr.close()


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
