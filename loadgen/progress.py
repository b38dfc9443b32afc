"""The progress line on stderr: redrawn in place on a terminal, plain lines in a file."""

from __future__ import annotations

from typing import IO

TTY_INTERVAL = 0.2  # seconds between redraws on a terminal
PLAIN_INTERVAL = 5.0  # seconds between lines in a file or pipe, where every line stays


class Progress:
    """Reports orders done, the rate so far and the orders in flight.

    On a terminal the line is redrawn with a carriage return; anywhere else (a log file, a CI
    capture) carriage returns would pile up as one unreadable line, so it writes a plain line
    every PLAIN_INTERVAL seconds and a last one at the end.
    """

    def __init__(self, stream: IO[str], *, tty: bool | None = None) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._next = 0.0

    @property
    def interval(self) -> float:
        """How often `update` wants to be called."""
        return TTY_INTERVAL if self._tty else PLAIN_INTERVAL

    def update(self, *, done: int, total: int, in_flight: int, elapsed: float, final: bool) -> None:
        """Show the state at `elapsed` seconds; `final` ends the line (or writes the last one)."""
        if not final and elapsed < self._next:
            return
        self._next = elapsed + self.interval
        rate = done / max(elapsed, 1e-9)
        figures = f"{done}/{total} {rate:7.0f} orders/s  in flight {in_flight:5d}  {elapsed:6.1f}s"
        if self._tty:
            width = 30
            filled = width * done // max(total, 1)
            bar = f"[{'#' * filled}{'.' * (width - filled)}]"
            self._stream.write(f"\r{bar} {figures}" + ("\n" if final else ""))
        else:
            self._stream.write(f"progress {figures}\n")
        self._stream.flush()
