"""Runs the HTTP API with uvicorn on the node's event loop, beside the msgpack gateway.

On the gateway's loop the API shares the gateway's bridge hand-over (one asyncio loop per bridge)
and admission slots. run.py owns SIGINT/SIGTERM; uvicorn's own signal capture is turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator

import uvicorn

from gateway.server import Gateway
from observability.tail import StoreTail

from .app import create_app
from .guard import Guard, HostPolicy

MAX_CONNECTIONS = 1024  # like the gateway; uvicorn answers 503 beyond


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # run.py's handlers drain the node; uvicorn's would replace them and re-raise the
        # signal on exit.
        yield


class HttpServer:
    """The API's listening socket and uvicorn server."""

    def __init__(self, gateway: Gateway, tail: StoreTail, *, ready: Callable[[], bool]) -> None:
        self._gateway = gateway
        self._tail = tail
        self._ready = ready
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on `host` (the gateway's) and `port` (0: any free); returns the address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        bound_host, bound_port = sock.getsockname()[:2]
        app = Guard(
            create_app(self._gateway, self._tail, ready=self._ready),
            HostPolicy(host, bound_port),
        )
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            proxy_headers=False,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.005)
        return bound_host, bound_port

    async def close(self) -> None:
        """End the live feeds (they would hold the shutdown), then stop serving."""
        self._tail.close_feeds()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
