"""Prometheus metrics on the process's own registry, with bounded labels."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from modeldeploy_server.metadata import ModelMetadata
from modeldeploy_server.request_stats import LATENCY_BUCKETS, RequestFamilies, RequestStats

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """All metrics of one serve process; `render` is the /metrics body."""

    def __init__(self, metadata: ModelMetadata) -> None:
        self.registry = CollectorRegistry()
        model = {"model": metadata.name, "version": metadata.version}
        self._requests = RequestStats(
            RequestFamilies(
                "modeldeploy_requests",
                "Inference requests by protocol and HTTP status code.",
                "modeldeploy_request_duration_seconds",
                "Inference request latency, from the first body byte to the response.",
                fixed=(("model", metadata.name), ("version", metadata.version)),
                key="protocol",
            )
        )
        self.registry.register(self._requests)
        self.observe_request = self._requests.observe
        # Probe traffic (requests with the probe header) apart: users' numbers stay users'.
        self._probes = RequestStats(
            RequestFamilies(
                "modeldeploy_probe_requests",
                "Probe requests (a rollout's probe traffic) by protocol and HTTP status code.",
                "modeldeploy_probe_request_duration_seconds",
                "Probe request latency, from the first body byte to the response.",
                fixed=(("model", metadata.name), ("version", metadata.version)),
                key="protocol",
            )
        )
        self.registry.register(self._probes)
        self.observe_probe = self._probes.observe
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
