"""Plain ModelDeployment dicts for the operator tests (the shape the API server stores)."""

from __future__ import annotations

import copy
from typing import Any

SHA_V1 = "a" * 64
SHA_V2 = "b" * 64


def model_deployment(
    name: str = "iris",
    namespace: str = "ml",
    *,
    variants: list[dict[str, Any]] | None = None,
    routing: dict[str, Any] | None = None,
    pod: dict[str, Any] | None = None,
    uid: str | None = "0c4b7a4e-1f0e-4d8a-9a59-0d6f6a1e2b3c",
    generation: int = 1,
) -> dict[str, Any]:
    """A valid two-variant 90/10 ModelDeployment unless told otherwise."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "generation": generation}
    if uid is not None:
        metadata["uid"] = uid
    spec: dict[str, Any] = {
        "variants": copy.deepcopy(variants)
        if variants is not None
        else [
            {
                "name": "v1",
                "model": {"uri": "https://models.example/iris-1.onnx", "sha256": SHA_V1},
                "weight": 90,
            },
            {
                "name": "v2",
                "model": {"uri": "https://models.example/iris-2.onnx", "sha256": SHA_V2},
                "weight": 10,
            },
        ]
    }
    if routing is not None:
        spec["routing"] = routing
    if pod is not None:
        spec["pod"] = pod
    return {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": metadata,
        "spec": spec,
    }


def variant(name: str, weight: object, **extra: Any) -> dict[str, Any]:
    sha = format(sum(map(ord, name)), "x").rjust(64, "0")
    return {
        "name": name,
        "model": {"uri": f"https://models.example/{name}.onnx", "sha256": sha},
        "weight": weight,
        **extra,
    }
