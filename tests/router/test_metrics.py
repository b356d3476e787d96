"""The router's metrics: per-process registry, weights follow the applied config."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from modeldeploy_server.router import RouterMetrics
from modeldeploy_server.routing import RouterConfig, parse_router_config


def config(weights: dict[str, int]) -> RouterConfig:
    variants = [{"name": n, "url": f"http://{n}:8080", "weight": w} for n, w in weights.items()]
    return parse_router_config(json.dumps({"model": "iris", "variants": variants}))


def weights(metrics: RouterMetrics) -> dict[str, float]:
    families = text_string_to_metric_families(metrics.render().decode())
    family = next(f for f in families if f.name == "modeldeploy_router_variant_weight")
    return {s.labels["variant"]: s.value for s in family.samples}


def test_weight_gauge_follows_reloads_and_forgets_removed_variants() -> None:
    metrics = RouterMetrics()
    first = config({"v1": 90, "v2": 10})
    metrics.set_config(None, first)
    assert weights(metrics) == {"v1": 90, "v2": 10}
    metrics.set_config(first, config({"v1": 50, "v3": 50}))
    assert weights(metrics) == {"v1": 50, "v3": 50}


def test_each_router_has_its_own_registry() -> None:
    one, two = RouterMetrics(), RouterMetrics()
    one.observe("v1", 200, 0.01)
    assert b'modeldeploy_router_requests_total{code="200",variant="v1"} 1.0' in one.render()
    assert b"modeldeploy_router_requests_total{" not in two.render()
