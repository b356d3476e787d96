"""Operator configuration: one frozen object, read once at startup from MODELDEPLOY_* env vars."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_SERVER_IMAGE = "ghcr.io/modeldeploy/modeldeploy-server:0.1.0"
DEFAULT_RESYNC_SECONDS = 300.0


class ConfigError(ValueError):
    """A MODELDEPLOY_* variable has an unusable value; the message names it."""


@dataclass(frozen=True)
class OperatorConfig:
    # The server image for variants and routers, unless a ModelDeployment sets spec.pod.image.
    server_image: str = DEFAULT_SERVER_IMAGE
    # How often every ModelDeployment is reconciled even without events (drift correction).
    resync_seconds: float = DEFAULT_RESYNC_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        """Read MODELDEPLOY_SERVER_IMAGE and MODELDEPLOY_RESYNC_SECONDS; fail fast on bad values."""
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
        return cls(server_image=image, resync_seconds=resync)
