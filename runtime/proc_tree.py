"""The processes of one run.py, from Linux's /proc: its descendants, and every process that
carries its run marker in its environment.

The marker is needed because the process bases' Thespian admin starts a session of its own and
is reparented to pid 1: it and the actors under it are no descendants of run.py, yet they
inherit its environment. run.py sets ``ORDERS_RUN_ID`` (unless its parent did, as loadtest.py
does to watch and clean up what it spawned).
"""

from __future__ import annotations

import os

RUN_MARKER = "ORDERS_RUN_ID"


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below `root`; empty where /proc is unavailable."""
    children: dict[int, list[int]] = {}
    for pid, stat in _stats():
        # The command name may contain spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
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
    for pid, stat in _stats():
        if pid == os.getpid() or stat[stat.rfind(")") + 2 :].startswith("Z"):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            continue  # gone, or not ours
    return found


def _stats() -> list[tuple[int, str]]:
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    stats = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stats.append((int(entry), f.read()))
        except OSError:
            continue  # the process exited while we looked
    return stats
