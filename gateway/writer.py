"""The reply side of one connection: replies gathered into one write per loop pass, and the
write clock that tells a client slowly reading its replies from one that takes none."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.clock import Clock
from gateway.framing import Outbox
from messages.wire import encode_frame


class ReplyWriter:
    """Writes one connection's replies; once `closing` is set it queues nothing more."""

    def __init__(self, clock: Clock, write_timeout: float, high_water: int) -> None:
        self._clock = clock
        self._write_timeout = write_timeout
        self._high_water = high_water
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out = Outbox()
        self._flush_scheduled = False
        self.closing = False
        self.lost = False  # the transport is gone (connection_lost)
        self.stalled_since = 0.0  # when the client last took reply bytes (clock started)
        self._stalled_size = 0

    def attach(self, transport: asyncio.Transport) -> None:
        """Write to `transport`; past the high-water mark it calls ``pause_writing``."""
        self._transport = transport
        transport.set_write_buffer_limits(high=self._high_water)

    @property
    def unsent_bytes(self) -> int:
        """Reply bytes made and not yet taken by the client."""
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._out.size + buffered

    def send(self, reply: dict[str, Any]) -> None:
        """Queue one reply; every reply queued in this loop pass leaves in one write, or at
        once when the high-water mark is queued (so the transport's pause applies before more
        requests are cut)."""
        if self.closing:
            return
        self._out.add(reply)
        if self._out.size >= self._high_water:
            self.flush()  # the transport calls pause_writing() now if it is over the mark
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued now."""
        self._flush_scheduled = False
        data = self._out.take()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def refuse(self, reply: dict[str, Any]) -> None:
        """Answer once more (after the replies already made) and close."""
        assert self._transport is not None
        self.flush()
        self._transport.write(encode_frame(reply))
        self.close_after_writing()

    def start_write_clock(self) -> None:
        """Replies are waiting on the client: the write deadline starts now."""
        self.stalled_since = self._clock.now()
        self._stalled_size = self._transport.get_write_buffer_size() if self._transport else 0

    def write_time_left(self, now: float) -> float:
        """Seconds the client has left to take some of its replies; any progress (the write
        buffer shrank) restarts the clock."""
        size = self._transport.get_write_buffer_size() if self._transport else 0
        if size < self._stalled_size:
            self.stalled_since = now  # it is reading, slowly
        self._stalled_size = size
        return self.stalled_since + self._write_timeout - now

    def close_after_writing(self) -> None:
        """Close once what is buffered is written; a client that takes none of it for
        write_timeout is cut off (one that keeps reading, however slowly, gets it all)."""
        assert self._transport is not None
        self.closing = True
        self._transport.close()
        self.start_write_clock()
        self._watch_close()

    def _watch_close(self) -> None:
        transport = self._transport
        if transport is None or self.lost:
            return
        now = self._clock.now()
        if self.write_time_left(now) <= 0:
            transport.abort()
            return
        self._clock.call_at(now + min(1.0, self._write_timeout), self._watch_close)

    def drop(self) -> None:
        """Close at once; replies the client has not taken are discarded."""
        self.closing = True
        transport = self._transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()
