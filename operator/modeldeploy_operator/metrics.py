"""The operator's Prometheus metrics, on the process's own registry (created at startup)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class OperatorMetrics:
    """Counters a platform engineer alerts on; labels are bounded (kind, result)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.reconciles = Counter(
            "modeldeploy_operator_reconciles_total",
            "Reconciles of a ModelDeployment, by result (ok, refused, retry)",
            ["result"],
            registry=registry,
        )
        self.reconcile_seconds = Histogram(
            "modeldeploy_operator_reconcile_seconds",
            "Wall time of one reconcile (observe, plan, act, status)",
            registry=registry,
        )
        self.recreated = Counter(
            "modeldeploy_operator_recreated_total",
            "Children deleted and created again because apply could not undo an edit, by kind",
            ["kind"],
            registry=registry,
        )
        self.refused = Counter(
            "modeldeploy_operator_apply_refused_total",
            "Children the API server refused to apply, by kind",
            ["kind"],
            registry=registry,
        )
