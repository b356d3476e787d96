"""The uvicorn setup shared by `serve` and `route`, so both processes speak HTTP the same way."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG


def build_uvicorn_config(
    app: Callable[..., Any],
    *,
    host: str,
    port: int,
    access_log: bool,
    graceful_shutdown_s: int,
    log_level: str | None = None,
    log_config: dict[str, Any] | None = LOGGING_CONFIG,
) -> uvicorn.Config:
    """uvicorn's Config for a pod behind a Service or the router (uvloop, httptools)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
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
    )


def run_until_stopped(server: uvicorn.Server) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and return."""
    # uvicorn re-raises the signal it handled once it has drained; that SIGTERM was a clean stop,
    # so it must not kill the process with status 143.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)
    server.run()
