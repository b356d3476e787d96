"""Per-request counters and latency histograms as plain ints, for the server and the router."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(frozen=True)
class RequestFamilies:
    """Names, help and labels of a request counter and latency histogram pair."""

    requests: str
    requests_help: str
    latency: str
    latency_help: str
    # Labels every sample carries with fixed values, then the per-request key's label name.
    fixed: tuple[tuple[str, str], ...]
    key: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS


class RequestStats(Collector):
    """Per-request counters kept as plain ints on the event loop thread and turned into
    Prometheus families at scrape time: a dict increment instead of a locked metric per request.

    Counts are by (key, status code), latency by key (the protocol in the server, the variant in
    the router)."""

    def __init__(self, families: RequestFamilies) -> None:
        self._families = families
        self._fixed = [value for _, value in families.fixed]
        self._buckets = families.buckets
        self._counts: dict[tuple[str, int], int] = {}
        # key -> [per-bucket counts (last is +Inf), sum]
        self._latency: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, key: str, code: int, seconds: float) -> None:
        """Count one request (event loop thread only)."""
        pair = (key, code)
        self._counts[pair] = self._counts.get(pair, 0) + 1
        histogram = self._latency.get(key)
        if histogram is None:
            histogram = self._latency[key] = ([0] * (len(self._buckets) + 1), [0.0])
        histogram[0][bisect.bisect_left(self._buckets, seconds)] += 1
        histogram[1][0] += seconds

    def count(self, key: str, code: int) -> None:
        """Count a request without a latency (one that no key's histogram should hold)."""
        pair = (key, code)
        self._counts[pair] = self._counts.get(pair, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The families for a scrape."""
        families = self._families
        names = [name for name, _ in families.fixed]
        requests = CounterMetricFamily(
            families.requests, families.requests_help, labels=[*names, families.key, "code"]
        )
        for (key, code), count in sorted(self._counts.items()):
            requests.add_metric([*self._fixed, key, str(code)], count)
        yield requests
        latency = HistogramMetricFamily(
            families.latency, families.latency_help, labels=[*names, families.key]
        )
        for key, (counts, total) in sorted(self._latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*self._buckets, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            latency.add_metric([*self._fixed, key], buckets, total[0])
        yield latency
