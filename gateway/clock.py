"""The time the gateway's deadlines are measured in, and how their timers are armed.

Injectable so that tests can run the deadlines (idle, frame, write, request) on a clock they
advance themselves instead of sleeping through them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """An armed timer (``asyncio.TimerHandle`` is one)."""

    def when(self) -> float:
        """The clock time it fires at."""
        ...

    def cancel(self) -> None:
        """Disarm it; cancelling twice or after it fired is harmless."""
        ...


class Clock(Protocol):
    """A monotonic clock that can run a callback on the event loop at one of its times."""

    def now(self) -> float:
        """The current time, in seconds."""
        ...

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> Timer:
        """Run `callback(*args)` on the event loop once the clock reaches `when`."""
        ...


class LoopClock:
    """The running event loop's own clock: its timers are the loop's."""

    def now(self) -> float:
        """The loop's time."""
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[..., object], *args: object) -> Timer:
        """A loop timer."""
        return asyncio.get_running_loop().call_at(when, callback, *args)
