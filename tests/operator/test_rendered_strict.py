"""Everything the operator renders is accepted by the real API server, and a field no schema
declares is refused however the operator applies it.

The operator applies with fieldValidation=Ignore: the strict second parse of every body costs the
API server a sixth of each apply, and could only add warnings for a duplicated key, which a body
serialized from a dict cannot have. Server-side apply itself refuses a field the schema does not
declare; the last test proves that stays so.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import yaml
from kubernetes import client

from modeldeploy_operator import naming
from modeldeploy_operator.batch_render import render_batch_job
from modeldeploy_operator.gate_jobs import render_with_gates
from modeldeploy_operator.kube import ApiError, KubeApi
from modeldeploy_operator.render import render_router_identity
from modeldeploy_operator.rollout import ProbeRun
from modeldeploy_operator.spec import BATCH_KIND, parse_batch_prediction, parse_model_deployment
from modeldeploy_operator.validation import default_model_deployment
from tests.controlplane.harness import ControlPlane
from tests.operator.builders import model_deployment, variant
from tests.operator.cluster import object_path, send

IMAGE = "registry.example/modeldeploy-server:1.0"
GATE = {"dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}}
SHADOW = {"variant": "v3", "percent": 25, "tolerance": 0.01}


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api_client:
        yield api_client


def strict_dry_run_apply(
    api: client.ApiClient, manifest: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """Server-side apply `manifest` as the operator's field manager, with strict field
    validation and nothing stored: (HTTP status, response body)."""
    meta = manifest["metadata"]
    query = {
        "fieldManager": naming.FIELD_MANAGER,
        "force": "true",
        "fieldValidation": "Strict",
        "dryRun": "All",
    }
    path = object_path(meta["namespace"], manifest["kind"], meta["name"])
    status, data = send(
        api, "PATCH", f"{path}?{urlencode(query)}", manifest, "application/apply-patch+yaml"
    )
    return status, json.loads(data or b"{}")


def rendered(namespace: str) -> list[dict[str, Any]]:
    """One of each object the operator renders: every routing mode, a shadow, gate and probe
    Jobs, the router identity and a BatchPrediction's Job."""
    production = yaml.safe_load(Path("examples/production.yaml").read_text())
    production["spec"]["variants"][1]["model"]["uri"] = "pvc://models/fraud/v2.onnx"
    production["spec"]["variants"][1]["gate"] = GATE
    production["spec"]["variants"].append(variant("v3", 0))
    production["spec"]["routing"]["shadow"] = SHADOW
    production["metadata"]["uid"] = "5d0d7f9e-3b1f-4c52-8f0e-6b1de2a4c7a9"
    gateway = model_deployment(
        variants=[variant("v1", 100), variant("v2", 0)],
        routing={
            "mode": "gateway",
            "gateway": {"parentRefs": [{"name": "gw"}], "hostnames": ["iris.example.com"]},
            "shadow": {"variant": "v2", "percent": 25},
        },
    )
    direct = model_deployment(variants=[variant("v1", 100)], routing={"mode": "none"})
    objects: list[dict[str, Any]] = []
    for obj in (production, gateway, direct):
        obj["metadata"]["namespace"] = namespace
        md = parse_model_deployment(default_model_deployment(obj))
        # A rollout's probes need a gate's dataset to send.
        gated = any(v.gate is not None for v in md.variants)
        probes = ProbeRun("k", tuple(v.name for v in md.variants), 60, 5) if gated else None
        objects += render_with_gates(md, server_image=IMAGE, probes=probes)
    batch = {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": BATCH_KIND,
        "metadata": {"name": "weekly", "namespace": namespace, "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"uri": "pvc://models/churn.onnx", "sha256": "ab" * 32},
            "input": {"uri": "pvc://data/customers.csv"},
            "output": {"uri": "pvc://data/scores/"},
            "shards": 3,
        },
    }
    bp = parse_batch_prediction(default_model_deployment(batch, BATCH_KIND))
    assert bp.model is not None  # its own model, not a ModelDeployment's variant
    objects.append(render_batch_job(bp, bp.model, server_image=IMAGE))
    return [*objects, *render_router_identity(namespace)]


def test_every_rendered_kind_passes_strict_field_validation(
    api: client.ApiClient, namespace: str
) -> None:
    objects = rendered(namespace)
    kinds = {o["kind"] for o in objects}
    assert kinds >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "RouteTable",
        "HTTPRoute",
        "Job",
        "ServiceAccount",
        "RoleBinding",
    }, kinds
    refused = {}
    for manifest in objects:
        status, body = strict_dry_run_apply(api, manifest)
        if status >= 400:
            refused[(manifest["kind"], manifest["metadata"]["name"])] = body.get("message")
    assert refused == {}


@pytest.mark.parametrize("kind", ["Deployment", "HTTPRoute"])
def test_an_undeclared_field_is_refused_as_the_operator_applies(
    api: client.ApiClient, namespace: str, kind: str
) -> None:
    """With the operator's own client and query (fieldValidation=Ignore), a field the schema
    does not declare, in a built-in kind or a custom resource, is refused, named."""
    manifest = copy.deepcopy(next(o for o in rendered(namespace) if o["kind"] == kind))
    manifest["spec"]["undeclaredField"] = 3
    with pytest.raises(ApiError) as refused:
        KubeApi(api).apply(manifest)
    assert ".spec.undeclaredField: field not declared in schema" in str(refused.value)
