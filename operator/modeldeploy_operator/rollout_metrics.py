"""Where a rollout's numbers come from: one source interface (`MetricsSource`) and the pure
arithmetic of the direct source (counters read from the routers' own /metrics, turned into one
step window's per-variant counts by subtracting the counters read when the window began).

The router counts every request by the variant that served it (`modeldeploy_router_requests_total`
by code, `modeldeploy_router_request_duration_seconds` buckets) and every shadow comparison by
(primary, shadow) variant; errors are the answers the variant failed to give: 5xx, and 422 (the
server's answer when the model cannot run on the values sent, which the stable model could); other
4xx are the client's. p99 is estimated from the bucket counts as Prometheus'
`histogram_quantile` does. Probe requests (a rollout's probe traffic) are counted apart, in the
`modeldeploy_router_probe_*` families, and read into each variant's `probes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from modeldeploy_operator.rollout import VariantMetrics

REQUESTS = "modeldeploy_router_requests_total"
LATENCY_BUCKETS = "modeldeploy_router_request_duration_seconds_bucket"
SHADOW_AGREEMENTS = "modeldeploy_router_shadow_agreements_total"
SHADOW_DISAGREEMENTS = "modeldeploy_router_shadow_disagreements_total"
PROBE_REQUESTS = "modeldeploy_router_probe_requests_total"
PROBE_LATENCY_BUCKETS = "modeldeploy_router_probe_request_duration_seconds_bucket"
QUANTILE = 0.99


@dataclass(frozen=True)
class WindowQuery:
    """One step window of one ModelDeployment: its variants, since when, and the /metrics URLs of
    its routers (for the direct source), with the routers' counters read when the window began
    as `status.rollout.baseline` kept them (so a restarted operator counts from there too)."""

    namespace: str
    name: str
    variants: tuple[str, ...]
    since: datetime
    now: datetime
    targets: tuple[str, ...] = ()
    prometheus_url: str | None = None  # spec.rollout.analysis.prometheus.url
    baseline: RouterCounters | None = None


class MetricsSource(Protocol):
    """Each variant's user traffic over a step's window."""

    def window(self, query: WindowQuery) -> Mapping[str, VariantMetrics]: ...

    def read_at_now(self, query: WindowQuery) -> RouterCounters | None:
        """The routers' counters the last `window(query)` read at `query.now`, for a source
        that counts from such reads (the direct source); None for others."""
        ...


def prometheus_queries(query: WindowQuery) -> dict[str, str]:
    """The PromQL of one window for the Prometheus source, by what it measures: sums by variant
    (by shadow variant for the comparisons) of the routers' counters' increase over the window."""
    seconds = max(int((query.now - query.since).total_seconds()), 1)
    where = f'namespace="{query.namespace}",modeldeployment="{query.name}"'

    def increase(metric: str, extra: str = "") -> str:
        return f"increase({metric}{{{where}{extra}}}[{seconds}s])"

    queries = {
        "agreements": f"sum by (shadow) ({increase(SHADOW_AGREEMENTS)})",
        "disagreements": f"sum by (shadow) ({increase(SHADOW_DISAGREEMENTS)})",
    }
    for prefix, requests, buckets in (
        ("", REQUESTS, LATENCY_BUCKETS),
        ("probe", PROBE_REQUESTS, PROBE_LATENCY_BUCKETS),
    ):
        served = increase(requests, ',variant!=""')
        failed = increase(requests, ',variant!="",code=~"5..|422"')
        latency = f"sum by (variant, le) ({increase(buckets)})"
        queries[f"{prefix}requests"] = f"sum by (variant) ({served})"
        queries[f"{prefix}errors"] = f"sum by (variant) ({failed})"
        queries[f"{prefix}p99"] = f"histogram_quantile({QUANTILE}, {latency})"
    return queries


def metrics_from_vectors(
    variants: Sequence[str], vectors: Mapping[str, Mapping[str, float]]
) -> dict[str, VariantMetrics]:
    """Per-variant metrics from the answers to `prometheus_queries` (each: label value -> value;
    Prometheus extrapolates increases, so counts are rounded)."""

    def count(what: str, name: str) -> int:
        return round(vectors.get(what, {}).get(name, 0.0))

    def p99_ms(what: str, name: str) -> float | None:
        p99 = vectors.get(what, {}).get(name)
        return p99 * 1000.0 if p99 is not None and p99 == p99 else None

    result = {}
    for name in variants:
        agreed, disagreed = count("agreements", name), count("disagreements", name)
        result[name] = VariantMetrics(
            requests=count("requests", name),
            errors=count("errors", name),
            p99_latency_ms=p99_ms("p99", name),
            shadow_compared=agreed + disagreed,
            shadow_disagreed=disagreed,
            probes=VariantMetrics(
                requests=count("proberequests", name),
                errors=count("probeerrors", name),
                p99_latency_ms=p99_ms("probep99", name),
            ),
        )
    return result


@dataclass(frozen=True)
class Counters:
    """One variant's cumulative counters as one router exposes them."""

    requests: int = 0
    errors: int = 0
    # upper bound (seconds, inf for +Inf) -> cumulative count
    buckets: Mapping[float, int] = field(default_factory=dict)
    shadow_compared: int = 0
    shadow_disagreed: int = 0
    probes: Counters | None = None

    def since(self, base: Counters | None) -> Counters:
        """What was counted after `base`; all of it when the counters went back (a restart)."""
        if (
            base is None
            or self.requests < base.requests
            or self.shadow_compared < (base.shadow_compared)
            or (self.probes or Counters()).requests < (base.probes or Counters()).requests
        ):
            return self
        return Counters(
            requests=self.requests - base.requests,
            errors=max(self.errors - base.errors, 0),
            buckets={le: n - base.buckets.get(le, 0) for le, n in self.buckets.items()},
            shadow_compared=self.shadow_compared - base.shadow_compared,
            shadow_disagreed=max(self.shadow_disagreed - base.shadow_disagreed, 0),
            probes=None if self.probes is None else self.probes.since(base.probes),
        )


# Each router's (target's) counters by variant.
RouterCounters = Mapping[str, Mapping[str, Counters]]


def counters_json(counters: Counters) -> dict[str, Any]:
    """The status form of one variant's counters (`status.rollout.baseline`)."""
    document: dict[str, Any] = {
        "requests": counters.requests,
        "errors": counters.errors,
        "buckets": {repr(le): n for le, n in sorted(counters.buckets.items())},
        "shadowCompared": counters.shadow_compared,
        "shadowDisagreed": counters.shadow_disagreed,
    }
    if counters.probes is not None:
        document["probes"] = counters_json(counters.probes)
    return document


def parse_counters_json(raw: Mapping[str, Any]) -> Counters:
    """counters_json's inverse (KeyError, TypeError, ValueError on anything else)."""
    probes = raw.get("probes")
    return Counters(
        requests=int(raw["requests"]),
        errors=int(raw["errors"]),
        buckets={float(le): int(n) for le, n in dict(raw["buckets"]).items()},
        shadow_compared=int(raw["shadowCompared"]),
        shadow_disagreed=int(raw["shadowDisagreed"]),
        probes=None if probes is None else parse_counters_json(probes),
    )


def parse_router_counters(text: str) -> dict[str, Counters]:
    """Per-variant counters from a router's /metrics text (probe requests in `probes`)."""
    requests: dict[str, int] = {}
    errors: dict[str, int] = {}
    buckets: dict[str, dict[float, int]] = {}
    compared: dict[str, int] = {}
    disagreed: dict[str, int] = {}
    probe_requests: dict[str, int] = {}
    probe_errors: dict[str, int] = {}
    probe_buckets: dict[str, dict[float, int]] = {}
    counted = {REQUESTS: (requests, errors), PROBE_REQUESTS: (probe_requests, probe_errors)}
    bucketed = {LATENCY_BUCKETS: buckets, PROBE_LATENCY_BUCKETS: probe_buckets}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            count = int(sample.value)
            if sample.name in counted and labels.get("variant"):
                variant = labels["variant"]
                total, failed = counted[sample.name]
                total[variant] = total.get(variant, 0) + count
                if _is_error(labels.get("code", "")):
                    failed[variant] = failed.get(variant, 0) + count
            elif sample.name in bucketed and labels.get("variant"):
                bucketed[sample.name].setdefault(labels["variant"], {})[float(labels["le"])] = count
            elif sample.name in (SHADOW_AGREEMENTS, SHADOW_DISAGREEMENTS):
                shadow = labels.get("shadow", "")
                compared[shadow] = compared.get(shadow, 0) + count
                if sample.name == SHADOW_DISAGREEMENTS:
                    disagreed[shadow] = disagreed.get(shadow, 0) + count
    names = set(requests) | set(buckets) | set(compared) | set(probe_requests)
    return {
        name: Counters(
            requests=requests.get(name, 0),
            errors=errors.get(name, 0),
            buckets=buckets.get(name, {}),
            shadow_compared=compared.get(name, 0),
            shadow_disagreed=disagreed.get(name, 0),
            probes=Counters(
                requests=probe_requests.get(name, 0),
                errors=probe_errors.get(name, 0),
                buckets=probe_buckets.get(name, {}),
            ),
        )
        for name in names
    }


def window_metrics(
    current: Mapping[str, Mapping[str, Counters]],
    base: Mapping[str, Mapping[str, Counters]],
    variants: Sequence[str],
) -> dict[str, VariantMetrics]:
    """Per-variant metrics over a window, from each router's (target's) counters at its end and
    at its start (a router missing at the start counted everything in the window)."""
    result = {}
    for variant in variants:
        parts = [
            counters[variant].since(base.get(target, {}).get(variant))
            for target, counters in current.items()
            if variant in counters
        ]
        probes = [p.probes for p in parts if p.probes is not None]
        result[variant] = replace(
            _add_counters(parts), probes=_add_counters(probes) if probes else None
        )
    return result


def _add_counters(parts: Sequence[Counters]) -> VariantMetrics:
    """The metrics of several routers' counters of one variant together."""
    return VariantMetrics(
        requests=sum(p.requests for p in parts),
        errors=sum(p.errors for p in parts),
        p99_latency_ms=_quantile_ms(QUANTILE, _add_buckets(p.buckets for p in parts)),
        shadow_compared=sum(p.shadow_compared for p in parts),
        shadow_disagreed=sum(p.shadow_disagreed for p in parts),
    )


def _is_error(code: str) -> bool:
    return code.startswith("5") or code == "422"


def _add_buckets(parts: Iterable[Mapping[float, int]]) -> dict[float, int]:
    total: dict[float, int] = {}
    for buckets in parts:
        for le, count in buckets.items():
            total[le] = total.get(le, 0) + count
    return total


def _quantile_ms(q: float, buckets: Mapping[float, int]) -> float | None:
    """`histogram_quantile` over cumulative buckets, in milliseconds; None without observations.

    Linear within the bucket the rank falls in; in the +Inf bucket, the largest finite bound."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower * 1000.0
            share = (rank - below) / (count - below) if count > below else 1.0
            return (lower + (le - lower) * share) * 1000.0
        lower, below = le, count
    return lower * 1000.0
