"""`modeldeploy-server serve`: load, verify and warm up one ONNX model, then serve it."""

from __future__ import annotations

import logging
import os
import sys

from modeldeploy_server.app import build_app
from modeldeploy_server.config import ServeConfig, parse_serve_config
from modeldeploy_server.errors import ConfigError
from modeldeploy_server.http_server import build_server, run_until_stopped
from modeldeploy_server.runtime import load_model

logger = logging.getLogger("uvicorn.error")


def run_server(config: ServeConfig) -> int:
    """Load the model (exit 1 on failure) and serve until SIGTERM/SIGINT."""
    try:
        model = load_model(
            config.model_path,
            config.model_name,
            config.model_version,
            config.sha256,
            config.intra_op_threads,
        )
    except ConfigError as exc:
        print(f"modeldeploy-server serve: error: {exc}", file=sys.stderr)
        return 1
    app, service = build_app(config, model)
    server = build_server(
        app,
        host=config.host,
        port=config.port,
        access_log=config.access_log,
        graceful_shutdown_s=int(config.request_timeout_s) + 1,
        edge=config.edge,
        on_drain=service.state.drain,
        log_level=config.log_level,
    )
    metadata = model.metadata
    logger.info(
        "model %s version %s sha256 %s (%d inputs, %d outputs, batch axis %s)",
        metadata.name,
        metadata.version,
        metadata.sha256,
        len(metadata.inputs),
        len(metadata.outputs),
        metadata.batch_axis,
    )
    try:
        run_until_stopped(server)
    except SystemExit as exc:  # uvicorn exits 3 when the lifespan (warm-up) fails
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `modeldeploy-server serve`."""
    try:
        config = parse_serve_config(argv, os.environ)
    except ConfigError as exc:
        print(f"modeldeploy-server serve: error: {exc}", file=sys.stderr)
        return 2
    return run_server(config)
