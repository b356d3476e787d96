"""Operator configuration: one frozen object, read once at startup from MODELDEPLOY_* env vars."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SERVER_IMAGE = "ghcr.io/modeldeploy/modeldeploy-server:0.1.0"
DEFAULT_RESYNC_SECONDS = 300.0
DEFAULT_METRICS_PORT = 9090
DEFAULT_WORKERS = 8
MAX_WORKERS = 64


class ConfigError(ValueError):
    """A MODELDEPLOY_* variable has an unusable value; the message names it."""


@dataclass(frozen=True)
class OperatorConfig:
    # The server image for variants and routers, unless a ModelDeployment sets spec.pod.image.
    server_image: str = DEFAULT_SERVER_IMAGE
    # How often every ModelDeployment is reconciled even without events (drift correction).
    resync_seconds: float = DEFAULT_RESYNC_SECONDS
    # Prometheus metrics on this address and port; port 0 serves none.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = DEFAULT_METRICS_PORT
    # Reconciles of different ModelDeployments running at once (each in a worker thread).
    workers: int = DEFAULT_WORKERS
    # Where rollouts read their metrics unless spec.rollout.analysis.prometheus says: a
    # Prometheus' base URL, or None for the routers' own /metrics.
    prometheus_url: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        """Read MODELDEPLOY_SERVER_IMAGE, MODELDEPLOY_RESYNC_SECONDS, MODELDEPLOY_METRICS_HOST,
        MODELDEPLOY_METRICS_PORT, MODELDEPLOY_WORKERS and MODELDEPLOY_PROMETHEUS_URL; fail fast on
        bad values."""
        image = env.get("MODELDEPLOY_SERVER_IMAGE", DEFAULT_SERVER_IMAGE).strip()
        if not image or any(c.isspace() for c in image):
            raise ConfigError(f"MODELDEPLOY_SERVER_IMAGE: {image!r} is not an image reference")
        raw = env.get("MODELDEPLOY_RESYNC_SECONDS", str(DEFAULT_RESYNC_SECONDS))
        try:
            resync = float(raw)
        except ValueError:
            raise ConfigError(f"MODELDEPLOY_RESYNC_SECONDS: {raw!r} is not a number") from None
        if not resync > 0:
            raise ConfigError(f"MODELDEPLOY_RESYNC_SECONDS: {raw!r} must be positive")
        raw_port = env.get("MODELDEPLOY_METRICS_PORT", str(DEFAULT_METRICS_PORT))
        if not raw_port.isdigit() or int(raw_port) > 65535:
            raise ConfigError(f"MODELDEPLOY_METRICS_PORT: {raw_port!r} is not a port (0 for none)")
        host = env.get("MODELDEPLOY_METRICS_HOST", "0.0.0.0").strip()
        if not host:
            raise ConfigError("MODELDEPLOY_METRICS_HOST: empty (use 0.0.0.0 for every interface)")
        raw_workers = env.get("MODELDEPLOY_WORKERS", str(DEFAULT_WORKERS)).strip()
        if not raw_workers.isdigit() or not 1 <= int(raw_workers) <= MAX_WORKERS:
            raise ConfigError(f"MODELDEPLOY_WORKERS: {raw_workers!r} is not 1..{MAX_WORKERS}")
        prometheus = env.get("MODELDEPLOY_PROMETHEUS_URL", "").strip() or None
        if prometheus is not None and not prometheus.startswith(("http://", "https://")):
            raise ConfigError(f"MODELDEPLOY_PROMETHEUS_URL: {prometheus!r} is not an http(s) URL")
        return cls(
            server_image=image,
            resync_seconds=resync,
            metrics_host=host,
            metrics_port=int(raw_port),
            workers=int(raw_workers),
            prometheus_url=prometheus,
        )
