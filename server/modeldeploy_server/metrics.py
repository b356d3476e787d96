"""Prometheus metrics on the process's own registry, with bounded labels."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from modeldeploy_server.metadata import ModelMetadata

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RequestStats(Collector):
    """Per-request counters kept as plain ints on the event loop thread and turned into
    Prometheus families at scrape time: a dict increment instead of a locked metric per request."""

    def __init__(self, model: str, version: str) -> None:
        self._labels = (model, version)
        self._counts: dict[tuple[str, int], int] = {}
        # protocol -> [per-bucket counts (last is +Inf), sum]
        self._latency: dict[str, tuple[list[int], list[float]]] = {}

    def observe(self, protocol: str, code: int, seconds: float) -> None:
        """Count one request (event loop thread only)."""
        key = (protocol, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        histogram = self._latency.get(protocol)
        if histogram is None:
            histogram = self._latency[protocol] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        histogram[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[1][0] += seconds

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        """The families for a scrape."""
        requests = CounterMetricFamily(
            "modeldeploy_requests",
            "Inference requests by protocol and HTTP status code.",
            labels=["model", "version", "protocol", "code"],
        )
        for (protocol, code), count in sorted(self._counts.items()):
            requests.add_metric([*self._labels, protocol, str(code)], count)
        yield requests
        latency = HistogramMetricFamily(
            "modeldeploy_request_duration_seconds",
            "Inference request latency, from the first body byte to the response.",
            labels=["model", "version", "protocol"],
        )
        for protocol, (counts, total) in sorted(self._latency.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            latency.add_metric([*self._labels, protocol], buckets, total[0])
        yield latency


class ServerMetrics:
    """All metrics of one serve process; `render` is the /metrics body."""

    def __init__(self, metadata: ModelMetadata) -> None:
        self.registry = CollectorRegistry()
        model = {"model": metadata.name, "version": metadata.version}
        self._requests = RequestStats(metadata.name, metadata.version)
        self.registry.register(self._requests)
        self.observe_request = self._requests.observe
        self._batch_requests = Histogram(
            "modeldeploy_batch_size",
            "Requests merged into one model run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels(**model)
        self._batch_rows = Histogram(
            "modeldeploy_batch_rows",
            "Rows in one model run.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        ).labels(**model)
        self._run_latency = Histogram(
            "modeldeploy_model_run_duration_seconds",
            "Time in onnxruntime per model run (merge and split included).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**model)
        self._queue_depth = Gauge(
            "modeldeploy_queue_depth",
            "Requests waiting for a model run.",
            ["model", "version"],
            registry=self.registry,
        ).labels(**model)
        self.capture_dropped = Counter(
            "modeldeploy_capture_dropped",
            "Sampled request/response pairs dropped because the capture writer fell behind.",
            ["model", "version"],
            registry=self.registry,
        ).labels(**model)
        Info("modeldeploy_model", "The served model.", registry=self.registry).info(
            {"name": metadata.name, "version": metadata.version, "sha256": metadata.sha256}
        )

    def observe_batch(self, requests: int, rows: int, seconds: float) -> None:
        """Record one model run (from the worker thread; prometheus_client is thread-safe)."""
        self._batch_requests.observe(requests)
        self._batch_rows.observe(rows)
        self._run_latency.observe(seconds)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time instead of updating it per request."""
        self._queue_depth.set_function(depth)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
