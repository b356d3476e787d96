"""OperatorConfig.from_env: one frozen object, bad values refused with the variable's name."""

from __future__ import annotations

import pytest

from modeldeploy_operator.config import ConfigError, OperatorConfig


def test_defaults_and_overrides() -> None:
    assert OperatorConfig.from_env({}) == OperatorConfig()
    assert (OperatorConfig().metrics_host, OperatorConfig().metrics_port) == ("0.0.0.0", 9090)
    config = OperatorConfig.from_env(
        {"MODELDEPLOY_METRICS_HOST": "127.0.0.1", "MODELDEPLOY_METRICS_PORT": "0"}
    )
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 0)
    assert OperatorConfig.from_env({"MODELDEPLOY_WORKERS": "32"}).workers == 32
    assert OperatorConfig().prometheus_url is None
    url = "http://prometheus.monitoring.svc:9090"
    assert OperatorConfig.from_env({"MODELDEPLOY_PROMETHEUS_URL": url}).prometheus_url == url


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"MODELDEPLOY_METRICS_PORT": "http"}, "MODELDEPLOY_METRICS_PORT"),
        ({"MODELDEPLOY_METRICS_PORT": "70000"}, "MODELDEPLOY_METRICS_PORT"),
        ({"MODELDEPLOY_METRICS_PORT": "-1"}, "MODELDEPLOY_METRICS_PORT"),
        ({"MODELDEPLOY_METRICS_HOST": " "}, "MODELDEPLOY_METRICS_HOST"),
        ({"MODELDEPLOY_RESYNC_SECONDS": "0"}, "MODELDEPLOY_RESYNC_SECONDS"),
        ({"MODELDEPLOY_WORKERS": "0"}, "MODELDEPLOY_WORKERS"),
        ({"MODELDEPLOY_WORKERS": "65"}, "MODELDEPLOY_WORKERS"),
        ({"MODELDEPLOY_WORKERS": "many"}, "MODELDEPLOY_WORKERS"),
        ({"MODELDEPLOY_PROMETHEUS_URL": "prometheus:9090"}, "MODELDEPLOY_PROMETHEUS_URL"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        OperatorConfig.from_env(env)
