"""The uvicorn setup shared by `serve` and `route`, so both processes speak HTTP the same way:
the same edge limits (edge.py) and the same drain on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from modeldeploy_server.config import EdgeSettings
from modeldeploy_server.edge import Edge, EdgeProtocol, Forwarder

logger = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM first fails readiness (`on_drain`) and makes every answer
    close its connection, keeps the port open for the edge's shutdown delay, then shuts down
    gracefully (in-flight requests finish, then the lifespan ends)."""

    def __init__(self, config: uvicorn.Config, edge: Edge, on_drain: Callable[[], None]):
        super().__init__(config)
        self.edge = edge
        self._on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): readiness off now, listener closed after the delay."""
        first = not self.edge.draining
        self.edge.draining = True
        delay_s = self.edge.settings.shutdown_delay_s
        if first:
            self._on_drain()
        if first and sig == signal.SIGTERM and delay_s > 0:
            logger.info("SIGTERM: not ready; closing the port in %g s", delay_s)
            timer = threading.Timer(delay_s, super().handle_exit, (sig, None))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, except that the connections waiting in the port's listen queue are taken
        in before the port closes, instead of reset by the kernel when it does: a client that
        connected and sent its request an instant before gets its answer (with Connection:
        close, as every answer while draining)."""
        queued = [connection for server in self.servers for connection in _queued(server)]
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        for connection in queued:
            await loop.connect_accepted_socket(self._protocol, connection)
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        """A connection's protocol, as uvicorn's startup makes them."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol


def _queued(server: asyncio.base_events.Server) -> list[socket.socket]:
    """Accept every connection waiting in `server`'s listen queues, without blocking."""
    accepted = []
    for listening in server.sockets:
        with socket.socket(fileno=os.dup(listening.fileno())) as listener:
            listener.setblocking(False)
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:  # the queue is empty (or no descriptor is left for more)
                    break
                accepted.append(connection)
    return accepted


def build_server(
    app: Callable[..., Any],
    *,
    host: str,
    port: int,
    access_log: bool,
    graceful_shutdown_s: int,
    edge: EdgeSettings,
    on_drain: Callable[[], None],
    log_level: str | None = None,
    log_config: dict[str, Any] | None = LOGGING_CONFIG,
    forward: Forwarder | None = None,
    local_paths: frozenset[str] = frozenset(),
) -> DrainingServer:
    """A uvicorn server for a pod behind a Service or the router (uvloop, httptools + limits).

    With `forward`, every request but those for `local_paths` goes to it instead of `app`."""
    shared = Edge(edge, forward=forward, local_paths=local_paths)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=functools.partial(EdgeProtocol, edge=shared),  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        access_log=access_log,
        log_level=log_level,
        log_config=log_config,
        server_header=False,
        # The peer address is the real one (a Service or the router in front), and it is what the
        # router appends to X-Forwarded-For: never take it from a client-supplied header (uvicorn
        # trusts those from 127.0.0.1 by default).
        proxy_headers=False,
        timeout_graceful_shutdown=graceful_shutdown_s,
        # Beyond max_connections the protocol answers 503 itself; keep the kernel queue as deep.
        backlog=edge.max_connections,
    )
    return DrainingServer(config, shared, on_drain)


def run_until_stopped(server: uvicorn.Server) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and return."""
    # uvicorn re-raises the signal it handled once it has drained; that SIGTERM was a clean stop,
    # so it must not kill the process with status 143.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    server.run()
