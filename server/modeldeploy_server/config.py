"""The serve process's configuration: one frozen object from flags and MODELDEPLOY_* env."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from modeldeploy_operator.contract import SHUTDOWN_DELAY_S
from modeldeploy_server.errors import ConfigError

MIB = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EdgeSettings:
    """How `serve` and `route` treat any client at the HTTP layer: the same limits and drain."""

    # Request line plus headers (431 above); also bounds chunk framing and trailers.
    max_header_bytes: int = 32 * 1024
    # Open connections; one more is answered 503 and closed without reading it.
    max_connections: int = 2048
    # From a request's first byte (or the connection's start) to its last: 408 and close above.
    read_timeout_s: float = 10.0
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 5.0
    # Request bodies being received or served, process-wide: 503 with Retry-After above.
    max_body_bytes_in_flight: int = 64 * MIB
    # SIGTERM: readiness fails at once, the port stays open this long (answers carry
    # `Connection: close`), then in-flight requests finish.
    shutdown_delay_s: float = SHUTDOWN_DELAY_S
    # Then a connection between requests waits this long for a request already on its way (in
    # its socket, not read yet), which is answered with `Connection: close` instead of lost.
    shutdown_grace_s: float = 0.5


@dataclass(frozen=True)
class ServeConfig:
    """Everything `modeldeploy-server serve` needs, validated."""

    model_path: Path
    model_name: str
    model_version: str = "1"
    host: str = "0.0.0.0"
    port: int = 8080
    sha256: str | None = None
    max_request_bytes: int = 6 * MIB
    max_rows: int = 10_000
    request_timeout_s: float = 30.0
    max_batch_size: int = 1024
    # Requests that queue while a run is in progress form the next run; under concurrency a
    # forming run also waits up to this long for more (0: never wait).
    max_batch_delay_ms: float = 0.25
    max_queue: int = 256
    # 0 lets onnxruntime pick (one thread per core it sees).
    intra_op_threads: int = 0
    capture_path: Path | None = None
    capture_sample_rate: float = 0.1
    access_log: bool = False
    log_level: str = "info"
    # One request the model must answer before the server is ready (see parse_warmup_example).
    warmup_example: dict[str, Any] | None = None
    edge: EdgeSettings = EdgeSettings()


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def parse_positive_int(value: str) -> int:
    """An integer above 0."""
    number = int(value)
    if number <= 0:
        raise ValueError("must be a positive integer")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def parse_port(value: str) -> int:
    """A TCP port number, 0..65535."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be a port number 0..65535")
    return number


def parse_positive_float(value: str) -> float:
    """A finite number above 0."""
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError("must be a number >= 0")
    return number


def parse_fraction(value: str) -> float:
    """A number from 0 to 1."""
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def parse_sha256(value: str) -> str:
    """64 hexadecimal characters, lowercased."""
    digest = value.strip().lower()
    if not _SHA256.match(digest):
        raise ValueError("must be 64 hexadecimal characters")
    return digest


def parse_bool(value: str) -> bool:
    """true/false, also 1/0, yes/no, on/off; empty is false."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _log_level(value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in ("critical", "error", "warning", "info", "debug"):
        raise ValueError("must be one of critical, error, warning, info, debug")
    return lowered


def parse_warmup_example(value: str) -> dict[str, Any]:
    """A JSON object: one records instance (a value per input, as the ModelDeployment annotation
    modeldeploy.dev/example-instance holds) or a v2 inference request (an `inputs` list)."""
    try:
        example = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(example, dict):
        raise ValueError("must be a JSON object")
    return example


# field name -> (parser, help); the flag is --field-name and the env var MODELDEPLOY_FIELD_NAME,
# except where _ENV_NAMES says otherwise.
_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "model_path": (Path, "ONNX model file (required)"),
    "model_name": (_text, "model name served under /v2/models/NAME (required)"),
    "model_version": (_text, "model version"),
    "host": (_text, "address to listen on"),
    "port": (parse_port, "port to listen on"),
    "sha256": (parse_sha256, "expected sha256 of the model file; refuse to start on mismatch"),
    "max_request_bytes": (parse_positive_int, "largest request body accepted (413 above)"),
    "max_rows": (parse_positive_int, "most rows (batch dimension) per request (413 above)"),
    "request_timeout_s": (parse_positive_float, "time limit per request, in seconds (504 above)"),
    "max_batch_size": (parse_positive_int, "most rows merged into one model run"),
    "max_batch_delay_ms": (_non_negative_float, "time to wait for more requests to merge"),
    "max_queue": (parse_positive_int, "most requests waiting for the model (503 above)"),
    "intra_op_threads": (_non_negative_int, "onnxruntime intra-op threads (0: its default)"),
    "capture_path": (Path, "append sampled request/response pairs to this JSON-lines file"),
    "capture_sample_rate": (parse_fraction, "fraction of requests captured"),
    "access_log": (parse_bool, "log one line per request (costs throughput)"),
    "log_level": (_log_level, "log level"),
    "warmup_example": (
        parse_warmup_example,
        "request the model must answer before the server is ready: a records instance "
        '(JSON object, a value per input) or a v2 request (JSON object with "inputs"); without '
        "it, a synthetic request is tried and only logged if the model refuses it",
    ),
}
# The same flags and MODELDEPLOY_* variables for `serve` and `route`.
EDGE_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "max_header_bytes": (parse_positive_int, "most bytes of request line plus headers (431 above)"),
    "max_connections": (parse_positive_int, "most open connections (503 and close above)"),
    "read_timeout_s": (parse_positive_float, "time to receive a whole request (408 above)"),
    "keepalive_timeout_s": (parse_positive_float, "idle keep-alive connections close after"),
    "max_body_bytes_in_flight": (
        parse_positive_int,
        "request body bytes held at once, process-wide (503 above)",
    ),
    "shutdown_delay_s": (
        _non_negative_float,
        "seconds between SIGTERM (readiness fails) and closing the port",
    ),
}
_ENV_NAMES = {"sha256": "MODELDEPLOY_MODEL_SHA256"}
_REQUIRED = ("model_path", "model_name")


def env_name(field_name: str) -> str:
    """The environment variable that sets a config field."""
    return _ENV_NAMES.get(field_name, "MODELDEPLOY_" + field_name.upper())


def add_edge_flags(parser: argparse.ArgumentParser) -> None:
    """The EDGE_OPTIONS flags, for `serve` and `route` alike."""
    defaults = {f.name: f.default for f in fields(EdgeSettings)}
    for name, (_, help_) in EDGE_OPTIONS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            help=f"{help_} [env {env_name(name)}; default {defaults[name]}]",
        )


def parse_edge_settings(args: Mapping[str, Any], env: Mapping[str, str]) -> EdgeSettings:
    """EdgeSettings from the flags add_edge_flags added and MODELDEPLOY_* variables."""
    options = {name: (env_name(name), parse) for name, (parse, _) in EDGE_OPTIONS.items()}
    return EdgeSettings(**resolve_options(args, env, options))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeldeploy-server serve",
        description="Serve one ONNX model over the Open Inference Protocol v2 and records/CSV.",
    )
    defaults = {f.name: f.default for f in fields(ServeConfig)}
    for name, (_, help_) in _PARSERS.items():
        default = defaults.get(name)
        shown = "" if name in _REQUIRED or default is None else f"; default {default}"
        # Strings are parsed below, after env values are merged, so both get the same checks.
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"{help_} [env {env_name(name)}{shown}]"
        )
    add_edge_flags(parser)
    return parser


def resolve_options(
    args: Mapping[str, Any],
    env: Mapping[str, str],
    options: Mapping[str, tuple[str, Callable[[str], Any]]],
    *,
    defaults: Mapping[str, str] | None = None,
    required: Collection[str] = (),
) -> dict[str, Any]:
    """Each option's value: its flag, else its env var, else its raw default, through its parser.

    `options` maps a field to (env var, parser); the flag is --field-name. A field with no value
    anywhere is left out, or raises ConfigError when `required`, as does a value that fails to
    parse (naming the flag or env var it came from).
    """
    values: dict[str, Any] = {}
    for name, (env_var, parse) in options.items():
        flag = "--" + name.replace("_", "-")
        raw, source = args[name], flag
        if raw is None:
            raw, source = env.get(env_var, (defaults or {}).get(name)), env_var
        if raw is None:
            if name in required:
                raise ConfigError(f"{flag} (or {env_var}) is required")
            continue
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{source}={raw!r}: {exc}") from None
    return values


def parse_serve_config(argv: Sequence[str], env: Mapping[str, str]) -> ServeConfig:
    """Flags win over MODELDEPLOY_* variables, which win over defaults; raises ConfigError."""
    args = vars(_build_parser().parse_args(list(argv)))
    options = {name: (env_name(name), parse) for name, (parse, _) in _PARSERS.items()}
    config = ServeConfig(
        **resolve_options(args, env, options, required=_REQUIRED),
        edge=parse_edge_settings(args, env),
    )
    if config.edge.max_body_bytes_in_flight < config.max_request_bytes:
        raise ConfigError(
            f"--max-body-bytes-in-flight ({config.edge.max_body_bytes_in_flight}) must be at least"
            f" --max-request-bytes ({config.max_request_bytes})"
        )
    return config
