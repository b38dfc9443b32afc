"""Everything this project reads from Linux's /proc: process trees, run markers, command lines,
memory and CPU figures, and listening sockets. Every function returns an empty or None answer
where /proc is unavailable or the process is gone, never raises for that.

The run marker is needed because the process bases' Thespian admin starts a session of its own
and is reparented to pid 1: it and the actors under it are no descendants of run.py, yet they
inherit its environment. run.py sets ``ORDERS_RUN_ID`` (unless its parent did, as the load
generator and the tests do to watch and clean up what they spawned).
"""

from __future__ import annotations

import contextlib
import os
import socket

RUN_MARKER = "ORDERS_RUN_ID"

_LISTEN = "0A"  # the TCP state column of /proc/net/tcp{,6}


def all_pids() -> list[int]:
    """Every process id /proc lists right now."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`; empty where /proc is unavailable."""
    children: dict[int, list[int]] = {}
    for pid, fields in _stats():
        if len(fields) > 1 and fields[0] != "Z" and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(pid)
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def marked(run_id: str) -> list[int]:
    """Live processes (this one excluded) whose environment carries ``ORDERS_RUN_ID=run_id``."""
    needle = f"{RUN_MARKER}={run_id}".encode()
    found = []
    for pid, fields in _stats():
        if pid == os.getpid() or fields[:1] == ["Z"]:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue  # gone, or not ours
    return found


def with_cmdline(needle: str) -> list[int]:
    """Processes (this one excluded) whose command line contains `needle`.

    Thespian's actor processes keep run.py's command line, so a database path finds them all.
    """
    raw = needle.encode()
    found = []
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if raw in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def parent(pid: int) -> int | None:
    """The parent process id of `pid`, or None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


def status_kib(pid: int, key: str) -> int | None:
    """A ``VmRSS``/``VmHWM``-style line of /proc/PID/status in KiB, or None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int, *, reaped: bool = False) -> float | None:
    """utime + stime of `pid` (its own threads, not its children), in seconds; with `reaped`
    also that of its children that ended and were waited for (cutime + cstime)."""
    fields = _stat_fields(pid) or []
    try:
        ticks = int(fields[11]) + int(fields[12])
        if reaped:
            ticks += int(fields[13]) + int(fields[14])
    except (ValueError, IndexError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers of the sockets `pid` holds open (needs permission to read its fds)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def listening_tcp(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket held by `pids`, from /proc/net/tcp{,6}."""
    inodes = set().union(*(socket_inodes(pid) for pid in pids))
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] != _LISTEN or cols[9] not in inodes:
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # The kernel prints each 32-bit word in host (little-endian) byte order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            found.add((socket.inet_ntop(family, words), int(hex_port, 16)))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields follow the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def _stats() -> list[tuple[int, list[str]]]:
    stats = []
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields is not None:  # else the process exited while we looked
            stats.append((pid, fields))
    return stats
