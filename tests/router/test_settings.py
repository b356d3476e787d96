"""`modeldeploy-server route` settings: flags, MODELDEPLOY_* env vars, defaults, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeldeploy_server.router import RouterSettings, parse_settings


def test_defaults_need_only_the_config() -> None:
    assert parse_settings(["--config", "/etc/router/routes.json"], {}) == RouterSettings(
        config=Path("/etc/router/routes.json"),
        host="0.0.0.0",
        port=8080,
        timeout_s=60.0,
        connect_timeout_s=5.0,
        reload_interval_s=1.0,
        access_log=False,
    )


def test_env_sets_and_flags_override() -> None:
    env = {
        "MODELDEPLOY_ROUTER_CONFIG": "/env/routes.json",
        "MODELDEPLOY_HOST": "127.0.0.1",
        "MODELDEPLOY_PORT": "9000",
        "MODELDEPLOY_ROUTER_TIMEOUT_S": "2.5",
        "MODELDEPLOY_ACCESS_LOG": "true",
    }
    from_env = parse_settings([], env)
    assert (from_env.config, from_env.host, from_env.port) == (
        Path("/env/routes.json"),
        "127.0.0.1",
        9000,
    )
    assert (from_env.timeout_s, from_env.access_log) == (2.5, True)
    flags = ["--config", "/flag.json", "--port", "9001", "--access-log", "false"]
    from_flags = parse_settings(flags, env)
    assert (from_flags.config, from_flags.port, from_flags.access_log) == (
        Path("/flag.json"),
        9001,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--config (or MODELDEPLOY_ROUTER_CONFIG) is required"),
        (["--config", "c", "--port", "70000"], {}, "--port='70000': must be a port number"),
        (["--config", "c"], {"MODELDEPLOY_PORT": "http"}, "MODELDEPLOY_PORT='http': invalid"),
        (["--config", "c", "--timeout-s", "0"], {}, "--timeout-s='0': must be a positive"),
        (
            ["--config", "c"],
            {"MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S": "-1"},
            "MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S='-1': must be a positive",
        ),
        (["--config", "c", "--access-log", "maybe"], {}, "--access-log='maybe': must be true"),
    ],
)
def test_invalid_settings_exit_2_naming_the_source(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, env)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
