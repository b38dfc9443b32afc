"""A private deployment for `loadtest.py --spawn-nodes N`: a throwaway PostgreSQL server
(runtime/pg.py) and N `run.py` nodes sharing one database of it, each measured, all stopped
at the end (the server too, whatever happened).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from typing import Any

from loadgen.spawn import SpawnedServer, SpawnError
from runtime.pg import PgServer, find_bin_dir


class SpawnedNodes:
    """PostgreSQL and `count` nodes (ids n1, n2, ...) on one fresh database of it.

    `extra` goes to every run.py. Raises SpawnError, with nothing left running, if the server
    or a node cannot start.
    """

    def __init__(
        self, count: int, *, base: str = "simple", extra: Sequence[str] = (), lease_ttl: float = 5.0
    ) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SpawnError(
                "--spawn-nodes needs the PostgreSQL server binaries (initdb, pg_ctl, postgres) "
                "under /usr/lib/postgresql/*/bin or on PATH"
            )
        self.nodes: list[SpawnedServer] = []
        try:
            self.pg: PgServer | None = PgServer(bin_dir)
        except (RuntimeError, OSError) as e:
            raise SpawnError(f"cannot start PostgreSQL: {e}") from e
        try:
            self.url = self.pg.create_database()
            # One after another: the first creates the schema and seeds the stock.
            for n in range(1, count + 1):
                node = SpawnedServer(
                    base=base,
                    store=self.url,
                    extra=[*extra, "--node-id", f"n{n}", "--lease-ttl", str(lease_ttl)],
                )
                self.nodes.append(node)
        except BaseException:
            self.stop()
            raise

    @property
    def targets(self) -> list[tuple[str, int]]:
        """Every node's gateway, in node order."""
        return [(node.host, node.port) for node in self.nodes]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each node (run.py itself) and by PostgreSQL."""
        figures = {f"n{n}": node.cpu_seconds() or 0.0 for n, node in enumerate(self.nodes, 1)}
        figures["postgres"] = self.pg.cpu_seconds() if self.pg is not None else 0.0
        return figures

    def figures(
        self, wall_s: float, cpu0: dict[str, float], terminal: int, cores: int | None
    ) -> dict[str, Any]:
        """Throughput in total, per node and per core, and where the CPU went over the run."""
        cpu1 = self.cpu_seconds()
        used = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
        busy = sum(used.values()) / wall_s if wall_s > 0 else 0.0
        total = terminal / wall_s if wall_s > 0 else 0.0
        return {
            "nodes": len(self.nodes),
            "orders_per_s": round(total, 1),
            "orders_per_s_per_node": round(total / max(len(self.nodes), 1), 1),
            "cores": cores,
            "orders_per_s_per_core": round(total / cores, 1) if cores else None,
            "cores_busy": round(busy, 2),
            "orders_per_cpu_s": round(total / busy, 1) if busy > 0 else None,
            "cpu_s": used,
        }

    def stop(self) -> list[int]:
        """SIGTERM every node (each drains), then stop and remove PostgreSQL; returns the
        nodes' exit statuses."""
        codes = []
        try:
            for node in self.nodes:
                codes.append(node.stop())
                node.remove()
        finally:
            pg, self.pg = self.pg, None
            if pg is not None:
                with contextlib.suppress(RuntimeError, OSError, subprocess.SubprocessError):
                    pg.stop()
        return codes

    def log_tails(self) -> str:
        """The last lines of every node's stderr (before `stop`, which removes them)."""
        return "\n".join(f"--- n{n}\n{node.log_tail()}" for n, node in enumerate(self.nodes, 1))


def nodes_line(figures: dict[str, Any]) -> str:
    """The nodes' figures in one line of the report."""
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in figures["cpu_s"].items())
    return (
        f"nodes: {figures['nodes']}, {figures['orders_per_s']:.0f} orders/s in total, "
        f"{figures['orders_per_s_per_node']:.0f} per node, "
        f"{figures['orders_per_s_per_core'] or 0:.0f} per core ({figures['cores']} cores); "
        f"{figures['cores_busy']:.2f} cores busy, {figures['orders_per_cpu_s'] or 0:.0f} orders "
        f"per CPU-second; CPU s: {cpu}"
    )
