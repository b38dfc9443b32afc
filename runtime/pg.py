"""A throwaway PostgreSQL server: its own data directory and unix socket in a temp dir.

The tests' server (tests/conftest.py) and the load generator's (``loadtest.py --spawn-nodes``,
bench.py's node rows). Started with the binaries of the machine (``initdb``, ``pg_ctl``; as
root through the ``postgres`` system user, which may not run them as root), reachable only
through its socket (no TCP port, so parallel runs cannot collide), with ``fsync=off`` unless
asked (nothing it holds outlives it), and always stopped and removed at the end: by ``stop()``,
or at exit if its owner never called it.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import psycopg

from runtime.proc_tree import cpu_seconds, descendants

PG_BIN_DIRS = tuple(
    sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name, reverse=True)
)
SYSTEM_USER = "postgres"
PORT = 5432  # only names the socket file (.s.PGSQL.5432): the server listens on no TCP port


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL bin directory with initdb, pg_ctl and postgres, or None."""
    for candidate in (*PG_BIN_DIRS, *_path_dirs()):
        if all((candidate / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def _path_dirs() -> list[Path]:
    found = shutil.which("pg_ctl")
    return [Path(found).parent] if found else []


class PgServer:
    """One PostgreSQL server; ``url(db)`` for a database of it, ``create_database()`` for a
    fresh one. ``stop()`` stops the server and deletes its directory (idempotent)."""

    def __init__(self, bin_dir: Path, *, fsync: bool = False) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="orders-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "server.log"
        self.user = SYSTEM_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._started = False
        atexit.register(self.stop)  # also when the session ends without its teardown
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SYSTEM_USER)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            options = (
                f"-k {self.socket_dir} -c listen_addresses='' -p {PORT}"
                f" -c fsync={'on' if fsync else 'off'} -c max_connections=200"
                " -c shared_buffers=32MB"
            )
            self._started = True
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.log_file),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
        except BaseException:
            self.stop()
            raise

    def _run(self, tool: str, *args: str) -> None:
        command: Sequence[str] = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr}{log[-2000:]}")

    def url(self, database: str = "postgres") -> str:
        """A libpq URL of one database of this server, through its socket."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={PORT}"

    def create_schema(self) -> str:
        """A new empty schema in the server's default database; returns a URL whose
        connections work in it (much faster than a database per test: ~5 ms against ~200)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url()}&options=-c%20search_path%3D{name}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return self.url(name)

    def pids(self) -> list[int]:
        """The server's processes now: the postmaster and its children."""
        try:
            main = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return []
        return [main, *descendants(main)]

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far: every live process of it, and the backends
        that ended (counted in the postmaster's reaped children)."""
        pids = self.pids()
        if not pids:
            return 0.0
        total = cpu_seconds(pids[0], reaped=True) or 0.0
        return total + sum(cpu_seconds(pid) or 0.0 for pid in pids[1:])

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are cut) and remove its files."""
        if self._started:
            self._started = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
