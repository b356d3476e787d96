"""The metrics sources a rollout reads (see rollout_metrics.py for the interface).

`Sources` picks one per window: Prometheus when the spec (spec.rollout.analysis.prometheus.url) or
the operator (MODELDEPLOY_PROMETHEUS_URL) names one, else the routers' own /metrics.

`PrometheusMetrics` asks Prometheus' HTTP API (instant queries at the reconcile's `now`) for the
increase of the routers' counters over the window; what it cannot read counts as no samples.

`DirectMetrics` scrapes the routers' own /metrics: it keeps, per ModelDeployment, the scrapes it
made (in memory) and answers a window with the counters now minus those of the last scrape made at
or before the window's start. The operator scrapes on every reconcile of an active rollout,
including the one that starts a step, so a window's baseline is read when it begins; the plan
keeps that read in `status.rollout.baseline`, and a restarted operator (nothing in memory) starts
from it, so the window still counts from its beginning. Without one (a status written before the
baseline was kept) the first scrape is the baseline: fewer samples, never wrong ones.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

from modeldeploy_operator.rollout import VariantMetrics
from modeldeploy_operator.rollout_metrics import (
    Counters,
    MetricsSource,
    RouterCounters,
    WindowQuery,
    metrics_from_vectors,
    parse_router_counters,
    prometheus_queries,
    window_metrics,
)

SCRAPE_TIMEOUT_S = 5.0
log = logging.getLogger("modeldeploy_operator")
Scrape = tuple[datetime, dict[str, dict[str, Counters]]]  # (when, target -> variant -> counters)


def http_get(url: str) -> str:
    """GET `url` (a router's /metrics) as text."""
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return str(response.read().decode("utf-8"))


class DirectMetrics:
    """Step windows from the routers' counters, scraped by the operator itself."""

    def __init__(self, fetch: Callable[[str], str] = http_get) -> None:
        self._fetch = fetch
        self._scrapes: dict[tuple[str, str], list[Scrape]] = {}

    def window(self, query: WindowQuery) -> Mapping[str, VariantMetrics]:
        current: dict[str, dict[str, Counters]] = {}
        for target in query.targets:
            try:
                current[target] = parse_router_counters(self._fetch(target))
            except (OSError, ValueError) as error:
                log.warning(f"[{query.namespace}/{query.name}] cannot read {target}: {error}")
        key = (query.namespace, query.name)
        scrapes = self._scrapes.setdefault(key, [])
        if not scrapes and query.baseline is not None:
            scrapes.append((query.since, {t: dict(c) for t, c in query.baseline.items()}))
        earlier = [s for s in scrapes if s[0] <= query.since]
        base = earlier[-1] if earlier else (scrapes[0] if scrapes else (query.now, current))
        # Keep the baseline and what came after it: a later window starts no earlier.
        kept = [s for s in scrapes if s[0] >= base[0]]
        self._scrapes[key] = [*kept, (query.now, current)][-64:]
        return window_metrics(current, base[1], query.variants)

    def read_at_now(self, query: WindowQuery) -> RouterCounters | None:
        scrapes = self._scrapes.get((query.namespace, query.name)) or []
        return scrapes[-1][1] if scrapes and scrapes[-1][0] == query.now else None

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept for a ModelDeployment that is gone."""
        self._scrapes.pop((namespace, name), None)


class PrometheusMetrics:
    """Step windows from Prometheus, which scrapes the routers."""

    def __init__(self, fetch: Callable[[str], str] = http_get) -> None:
        self._fetch = fetch

    def window(self, query: WindowQuery) -> Mapping[str, VariantMetrics]:
        assert query.prometheus_url is not None
        base = query.prometheus_url.rstrip("/")
        vectors: dict[str, dict[str, float]] = {}
        for what, promql in prometheus_queries(query).items():
            params = urllib.parse.urlencode({"query": promql, "time": query.now.timestamp()})
            try:
                answer = json.loads(self._fetch(f"{base}/api/v1/query?{params}"))
                vectors[what] = _vector(answer, "shadow" if "agreements" in what else "variant")
            except (OSError, ValueError, KeyError, TypeError) as error:
                where = f"[{query.namespace}/{query.name}]"
                log.warning(f"{where} cannot read {what} from Prometheus {base}: {error}")
                return metrics_from_vectors(query.variants, {})
        return metrics_from_vectors(query.variants, vectors)

    def read_at_now(self, query: WindowQuery) -> RouterCounters | None:
        return None  # Prometheus keeps the history: nothing to carry over


def _vector(answer: Mapping[str, object], label: str) -> dict[str, float]:
    """label value -> value of an instant vector answer (NaN left out)."""
    if answer.get("status") != "success":
        raise ValueError(f"query failed: {answer.get('error')}")
    data = answer["data"]
    assert isinstance(data, dict)
    result = {}
    for sample in data["result"]:
        value = float(sample["value"][1])
        if not math.isnan(value):
            result[str(sample["metric"].get(label, ""))] = value
    return result


class Sources:
    """Prometheus where one is named (the spec's, else the operator's default), else direct."""

    def __init__(self, default_prometheus: str | None = None) -> None:
        self.default_prometheus = default_prometheus
        self.direct = DirectMetrics()
        self.prometheus = PrometheusMetrics()

    def window(self, query: WindowQuery) -> Mapping[str, VariantMetrics]:
        return self._source(query).window(self._resolved(query))

    def read_at_now(self, query: WindowQuery) -> RouterCounters | None:
        return self._source(query).read_at_now(self._resolved(query))

    def _resolved(self, query: WindowQuery) -> WindowQuery:
        return replace(query, prometheus_url=query.prometheus_url or self.default_prometheus)

    def _source(self, query: WindowQuery) -> MetricsSource:
        return self.prometheus if self._resolved(query).prometheus_url else self.direct

    def forget(self, namespace: str, name: str) -> None:
        self.direct.forget(namespace, name)
