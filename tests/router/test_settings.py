"""`modeldeploy-server route` settings: flags, MODELDEPLOY_* env vars, defaults, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeldeploy_server.config import EdgeSettings
from modeldeploy_server.router import RouterSettings, parse_settings
from modeldeploy_server.routes_source import RoutesSettings, RouteTableRef
from modeldeploy_server.routing import TrustedProxies, parse_trusted_proxies

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_defaults_need_only_the_config() -> None:
    assert parse_settings(["--config", "/etc/router/routes.json"], {}) == RouterSettings(
        routes=RoutesSettings(
            config=Path("/etc/router/routes.json"),
            reload_interval_s=1.0,
            route_table=None,
            pod_name=None,
            api_server=None,
            service_account_dir=SERVICE_ACCOUNT_DIR,
            watch_timeout_s=300.0,
        ),
        host="0.0.0.0",
        port=8080,
        timeout_s=60.0,
        connect_timeout_s=5.0,
        trusted_proxies=TrustedProxies(),
        shadow_queue=256,
        shadow_log_sample=0.1,
        shadow_log_max_bytes=10 << 20,
        access_log=False,
        edge=EdgeSettings(),
    )


def test_edge_limits_come_from_the_same_flags_and_env_as_the_server() -> None:
    env = {"MODELDEPLOY_READ_TIMEOUT_S": "3", "MODELDEPLOY_MAX_CONNECTIONS": "9"}
    flags = ["--config", "/r.json", "--max-connections", "10", "--shutdown-delay-s", "0"]
    assert parse_settings(flags, env).edge == EdgeSettings(
        max_connections=10, read_timeout_s=3.0, shutdown_delay_s=0.0
    )


def test_in_a_pod_the_routes_come_from_the_route_table_through_the_api() -> None:
    env = {**IN_POD, "MODELDEPLOY_ROUTE_TABLE": "ml/iris-routes", "MODELDEPLOY_POD_NAME": "p"}
    assert parse_settings([], env).routes == RoutesSettings(
        config=None,
        reload_interval_s=1.0,
        route_table=RouteTableRef("ml", "iris-routes"),
        pod_name="p",
        api_server="https://10.0.0.1:443",
        service_account_dir=SERVICE_ACCOUNT_DIR,
        watch_timeout_s=300.0,
    )
    ipv6 = {**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}
    assert parse_settings([], ipv6).routes.api_server == "https://[fd00::1]:443"


def test_env_sets_and_flags_override() -> None:
    env = {
        "MODELDEPLOY_ROUTER_CONFIG": "/env/routes.json",
        "MODELDEPLOY_HOST": "127.0.0.1",
        "MODELDEPLOY_PORT": "9000",
        "MODELDEPLOY_ROUTER_TIMEOUT_S": "2.5",
        "MODELDEPLOY_ACCESS_LOG": "true",
    }
    from_env = parse_settings([], env)
    assert (from_env.routes.config, from_env.host, from_env.port) == (
        Path("/env/routes.json"),
        "127.0.0.1",
        9000,
    )
    assert (from_env.timeout_s, from_env.access_log) == (2.5, True)
    flags = ["--config", "/flag.json", "--port", "9001", "--access-log", "false"]
    from_flags = parse_settings(flags, env)
    assert (from_flags.routes.config, from_flags.port, from_flags.access_log) == (
        Path("/flag.json"),
        9001,
        False,
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "exactly one of --config (MODELDEPLOY_ROUTER_CONFIG) and --route-table"),
        (["--config", "c", "--route-table", "ns/n"], {}, "exactly one of --config"),
        (["--route-table", "ns"], IN_POD, "--route-table='ns': must be NAMESPACE/NAME"),
        (["--route-table", "Ns/n", "--pod-name", "p"], IN_POD, "must be NAMESPACE/NAME"),
        (["--route-table", "ns/n"], IN_POD, "--route-table needs --pod-name"),
        (["--route-table", "ns/n", "--pod-name", "p"], {}, "needs KUBERNETES_SERVICE_HOST"),
        (["--route-table", "ns/n", "--pod-name", "x" * 254], IN_POD, "at most 253 characters"),
        (["--route-table", "ns/n", "--pod-name", "P"], IN_POD, "must be a pod name"),
        (["--config", "c", "--port", "70000"], {}, "--port='70000': must be a port number"),
        (["--config", "c"], {"MODELDEPLOY_PORT": "http"}, "MODELDEPLOY_PORT='http': invalid"),
        (["--config", "c", "--timeout-s", "0"], {}, "--timeout-s='0': must be a positive"),
        (
            ["--config", "c"],
            {"MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S": "-1"},
            "MODELDEPLOY_ROUTER_RELOAD_INTERVAL_S='-1': must be a positive",
        ),
        (["--config", "c", "--access-log", "maybe"], {}, "--access-log='maybe': must be true"),
        (
            ["--config", "c", "--trusted-proxies", "10.0.0.0/8,proxy"],
            {},
            "--trusted-proxies='10.0.0.0/8,proxy': 'proxy' is not an IP network",
        ),
    ],
)
def test_invalid_settings_exit_2_naming_the_source(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, env)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_trusted_proxies_from_env() -> None:
    env = {"MODELDEPLOY_ROUTER_TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::/32"}
    settings = parse_settings(["--config", "c"], env)
    assert settings.trusted_proxies == parse_trusted_proxies("10.0.0.0/8,2001:db8::/32")
    assert settings.trusted_proxies.trusts("10.9.8.7")
    assert not settings.trusted_proxies.trusts("192.0.2.1")
