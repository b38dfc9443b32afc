"""The `audit` op in a child process.

The audit reads every event of the store and holds a record per order (GBs at a million
orders), and a Python process seldom gives back memory it has grown into: a node that audited
in its own process kept the audit's peak for the rest of its life. The child opens the store
read-only, writes the result as JSON on its stdout and exits, and its memory goes with it.
A ``memory:`` store lives in the node's process only, so it is audited there.

    python -m gateway.audit_process STORE_URL      # what the node runs; prints the audit
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from messages.errors import ErrorCode, ServiceError
from saga.audit import audit
from store import EventStore, open_store
from store.factory import MEMORY_PREFIX

ROOT = Path(__file__).resolve().parent.parent  # the project: what `-m` needs on the path


def audit_store(store: EventStore, url: str | None) -> dict[str, Any]:
    """The audit of the store at `url` (`store` is the node's own read-only handle of it),
    run in a child process unless only this process can read the store."""
    if url is None or url.startswith(MEMORY_PREFIX):
        return audit(store)
    return audit_in_child(url)


def audit_in_child(url: str) -> dict[str, Any]:
    """The audit of the store at `url`, by `python -m gateway.audit_process` (not a
    ``memory:`` URL: the child has its own memory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-m", "gateway.audit_process", url],
        capture_output=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise ServiceError(ErrorCode.INTERNAL, f"the audit failed: {why}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m gateway.audit_process STORE_URL", file=sys.stderr)
        return 2
    with open_store(args[0], readonly=True) as store:
        result = audit(store)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
