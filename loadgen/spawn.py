"""A private `run.py` child process: start it, wait for its `ready` line, measure it, stop it.

The one copy of this code: the load generator (`--spawn`, the default) and the tests'
`start_server` fixture both use `SpawnedServer`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from client import Client
from runtime.proc_tree import RUN_MARKER, cpu_seconds, descendants, marked, status_kib

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 45.0  # run.py drains for up to 30 s (--drain-timeout), then stops its actors


class SpawnError(Exception):
    """run.py could not be started, or exited or stalled before it was ready."""


class SpawnedServer:
    """`run.py --port 0` on its own database, in `workdir` (a temporary directory if None).

    It runs in a session of its own so a Ctrl-C at the terminal reaches only its parent, which
    stops it with `stop()`. A run marker in its environment finds every process of the run,
    also the process bases' actors that are no children of run.py.
    """

    def __init__(  # noqa: PLR0913 - keyword-only, each one of run.py's options, all defaulted
        self,
        workdir: Path | None = None,
        *,
        base: str = "simple",
        db: Path | None = None,
        store: str | None = None,
        step_timeout: float | None = None,
        extra: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
        entry: Sequence[str] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="run-") if workdir is None else None
        self.dir = Path(self._tmp.name) if self._tmp is not None else workdir
        assert self.dir is not None
        tag = uuid.uuid4().hex[:8]
        self.db = db or self.dir / f"orders-{tag}.db"
        self.base = base
        self.log_path = self.dir / f"run-{tag}.log"
        self.run_id = uuid.uuid4().hex
        # `store` (a URL: memory:, postgresql://...) instead of the SQLite file `db`.
        where = ["--store", store] if store is not None else ["--db", str(self.db)]
        # `entry`: what runs run.py, if not the interpreter itself (a wrapper that measures it).
        program = [sys.executable, str(ROOT / "run.py")] if entry is None else list(entry)
        cmd = [*program, "--base", base, *where]
        cmd += ["--port", "0"]
        if step_timeout is not None:
            cmd += ["--step-timeout", str(step_timeout)]
        cmd += list(extra)
        env = {
            **os.environ,
            "THESPLOG_FILE": str(self.dir / "thespian.log"),
            "PYTHONUNBUFFERED": "1",
            RUN_MARKER: self.run_id,
        }
        self._log: IO[bytes] = self.log_path.open("wb")
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._clients: list[Client] = []
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self._log.close()
            self.remove()
            raise SpawnError(f"cannot start run.py: {e}") from e
        # A thread drains stdout to EOF so run.py can never block on a full pipe.
        self._stdout_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._stdout_reader.start()
        self.peak_tree_kib = 0
        self.peak_tree_procs = 0
        try:
            self.ready_line = self._wait_ready(ready_timeout)
        except SpawnError:
            self.remove()
            raise
        host, _, port = self.ready_line.split()[1].rpartition(":")
        self.host, self.port = host, int(port)

    def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for raw in stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
                problem = f"no 'ready' line within {timeout:.0f}s"
            else:
                problem = "run.py exited before it was ready"
            if line is None:
                tail = self.log_tail()
                self.kill()
                raise SpawnError(f"{problem}; its log:\n{tail}")
            words = line.split()
            if len(words) >= 2 and words[0] == "ready":
                return line.strip()

    def client(self, timeout: float = 30.0) -> Client:
        """A new client connected to this server (closed when the server stops)."""
        c = Client(self.host, self.port, timeout=timeout)
        self._clients.append(c)
        return c

    def log(self) -> str:
        """What run.py wrote on stderr so far."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of run.py's stderr, for error messages."""
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty log)"

    def _tree(self) -> list[int]:
        return sorted({self.proc.pid, *descendants(self.proc.pid), *marked(self.run_id)})

    def tree_rss_kib(self) -> int:
        """The process tree's total resident memory now (every process of the run)."""
        return sum(status_kib(pid, "VmRSS") or 0 for pid in self._tree())

    def sample_rss(self) -> None:
        """Record the process tree's current total RSS if it is a new peak."""
        pids = self._tree()
        total = sum(status_kib(pid, "VmRSS") or 0 for pid in pids)
        if total > self.peak_tree_kib:
            self.peak_tree_kib = total
            self.peak_tree_procs = len(pids)

    def rss_kib(self) -> int | None:
        """run.py's own resident memory now."""
        return status_kib(self.proc.pid, "VmRSS")

    def own_peak_kib(self) -> int | None:
        """run.py's own peak RSS (VmHWM) while it is alive."""
        return status_kib(self.proc.pid, "VmHWM")

    def cpu_seconds(self) -> float | None:
        """CPU time run.py itself has used (without its child processes)."""
        return cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = STOP_TIMEOUT, *, kill_leftovers: bool = True) -> int:
        """SIGTERM: run.py drains and exits (SIGKILL after `timeout`); returns its exit status.

        `kill_leftovers` then kills any process of the run still alive (actors run.py could not
        stop would keep its stdout open); a test of run.py's own cleanup turns it off.
        """
        self._close_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"run.py did not exit within {timeout:.0f}s; killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()
        if kill_leftovers:
            for pid in marked(self.run_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._finish(join_timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL run.py alone (what happens to its actor processes is the caller's business)."""
        self._close_clients()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._finish(join_timeout=1)

    def _close_clients(self) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()

    def _finish(self, join_timeout: float) -> None:
        # The reader sees EOF only once run.py and every process that inherited its stdout are
        # gone; closing the pipe under a blocked reader could block too, so it is left to it.
        self._stdout_reader.join(join_timeout)
        if self.proc.stdout is not None and not self._stdout_reader.is_alive():
            self.proc.stdout.close()
        if not self._log.closed:
            self._log.close()

    def remove(self) -> None:
        """Delete the temporary directory this server created (nothing if given a workdir)."""
        if self._tmp is not None:
            self._tmp.cleanup()
