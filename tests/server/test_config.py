"""The serve configuration: flags over MODELDEPLOY_* env over defaults, fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeldeploy_server.config import EdgeSettings, ServeConfig, env_name, parse_serve_config
from modeldeploy_server.errors import ConfigError

REQUIRED = ["--model-path", "/m.onnx", "--model-name", "iris"]


def test_defaults() -> None:
    config = parse_serve_config(REQUIRED, {})
    assert config == ServeConfig(model_path=Path("/m.onnx"), model_name="iris")
    assert config.max_request_bytes == 6 * 1024 * 1024
    assert (config.host, config.port, config.model_version) == ("0.0.0.0", 8080, "1")
    assert config.access_log is False


def test_env_names_follow_the_contract() -> None:
    assert env_name("sha256") == "MODELDEPLOY_MODEL_SHA256"
    assert env_name("max_batch_delay_ms") == "MODELDEPLOY_MAX_BATCH_DELAY_MS"
    assert env_name("request_timeout_s") == "MODELDEPLOY_REQUEST_TIMEOUT_S"


def test_env_configures_everything_and_flags_win() -> None:
    env = {
        "MODELDEPLOY_MODEL_PATH": "/env.onnx",
        "MODELDEPLOY_MODEL_NAME": "envname",
        "MODELDEPLOY_MODEL_VERSION": "v2",
        "MODELDEPLOY_PORT": "9000",
        "MODELDEPLOY_MODEL_SHA256": "AB" * 32,
        "MODELDEPLOY_MAX_REQUEST_BYTES": "1000",
        "MODELDEPLOY_MAX_ROWS": "5",
        "MODELDEPLOY_REQUEST_TIMEOUT_S": "2.5",
        "MODELDEPLOY_MAX_BATCH_SIZE": "8",
        "MODELDEPLOY_MAX_BATCH_DELAY_MS": "1.5",
        "MODELDEPLOY_MAX_QUEUE": "3",
        "MODELDEPLOY_INTRA_OP_THREADS": "2",
        "MODELDEPLOY_CAPTURE_PATH": "/tmp/c.jsonl",
        "MODELDEPLOY_CAPTURE_SAMPLE_RATE": "0.5",
        "MODELDEPLOY_ACCESS_LOG": "true",
        "MODELDEPLOY_WARMUP_EXAMPLE": '{"input": [5.1, 3.5, 1.4, 0.2]}',
        "MODELDEPLOY_MAX_HEADER_BYTES": "4096",
        "MODELDEPLOY_MAX_CONNECTIONS": "10",
        "MODELDEPLOY_READ_TIMEOUT_S": "3",
        "MODELDEPLOY_KEEPALIVE_TIMEOUT_S": "1.5",
        "MODELDEPLOY_MAX_BODY_BYTES_IN_FLIGHT": "5000",
        "MODELDEPLOY_SHUTDOWN_DELAY_S": "2",
    }
    config = parse_serve_config(["--port", "9001", "--shutdown-delay-s", "0"], env)
    assert config == ServeConfig(
        model_path=Path("/env.onnx"),
        model_name="envname",
        model_version="v2",
        port=9001,
        sha256="ab" * 32,
        max_request_bytes=1000,
        max_rows=5,
        request_timeout_s=2.5,
        max_batch_size=8,
        max_batch_delay_ms=1.5,
        max_queue=3,
        intra_op_threads=2,
        capture_path=Path("/tmp/c.jsonl"),
        capture_sample_rate=0.5,
        access_log=True,
        warmup_example={"input": [5.1, 3.5, 1.4, 0.2]},
        edge=EdgeSettings(
            max_header_bytes=4096,
            max_connections=10,
            read_timeout_s=3.0,
            keepalive_timeout_s=1.5,
            max_body_bytes_in_flight=5000,
            shutdown_delay_s=0.0,
        ),
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--model-path (or MODELDEPLOY_MODEL_PATH) is required"),
        (["--model-path", "/m"], {}, "--model-name (or MODELDEPLOY_MODEL_NAME) is required"),
        ([*REQUIRED, "--port", "70000"], {}, "--port='70000': must be a port number"),
        (
            [*REQUIRED],
            {"MODELDEPLOY_MAX_ROWS": "0"},
            "MODELDEPLOY_MAX_ROWS='0': must be a positive",
        ),
        ([*REQUIRED, "--sha256", "xyz"], {}, "--sha256='xyz': must be 64 hexadecimal"),
        ([*REQUIRED, "--capture-sample-rate", "2"], {}, "must be between 0 and 1"),
        ([*REQUIRED, "--request-timeout-s", "nan"], {}, "must be a positive number"),
        ([*REQUIRED, "--max-queue", "many"], {}, "--max-queue='many': invalid literal"),
        ([*REQUIRED, "--access-log", "maybe"], {}, "must be true or false"),
        ([*REQUIRED, "--model-name", " "], {}, "must not be empty"),
        ([*REQUIRED, "--warmup-example", "[1, 2]"], {}, "must be a JSON object"),
        ([*REQUIRED, "--warmup-example", "{x"], {}, "--warmup-example='{x': not JSON"),
        ([*REQUIRED, "--read-timeout-s", "0"], {}, "--read-timeout-s='0': must be a positive"),
        (
            [*REQUIRED, "--max-body-bytes-in-flight", "1000"],
            {},
            "--max-body-bytes-in-flight (1000) must be at least --max-request-bytes (6291456)",
        ),
    ],
)
def test_invalid_values_fail_fast_naming_the_source(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_serve_config(argv, env)
