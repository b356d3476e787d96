"""The operator's Prometheus metrics, on the process's own registry (created at startup)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class OperatorMetrics:
    """Counters a platform engineer alerts on; labels are bounded (kind, result)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        index_counts: Callable[[], Mapping[str, int]],
        queue_depth: Callable[[], int],
    ) -> None:
        self.registry = registry
        registry.register(_State(index_counts, queue_depth))
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


class _State(Collector):
    """What the operator holds now, read at each scrape: the index by kind, the queue's depth."""

    def __init__(
        self, index_counts: Callable[[], Mapping[str, int]], queue_depth: Callable[[], int]
    ) -> None:
        self._index_counts = index_counts
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        objects = GaugeMetricFamily(
            "modeldeploy_operator_index_objects",
            "Objects in the operator's watch index, by kind",
            labels=["kind"],
        )
        for kind, count in sorted(self._index_counts().items()):
            objects.add_metric([kind], count)
        yield objects
        yield GaugeMetricFamily(
            "modeldeploy_operator_queue_depth",
            "ModelDeployments waiting for a reconcile worker",
            value=self._queue_depth(),
        )
