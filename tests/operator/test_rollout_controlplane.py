"""Rollouts against the real control plane: the operator (`kopf run`, its own RBAC) and the
`modeldeploy rollout` CLI steering it by annotation."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest

from modeldeploy_operator import cli
from modeldeploy_operator.rollout_control import COMMAND_ANNOTATION
from tests.controlplane.harness import ControlPlane
from tests.operator.builders import model_deployment
from tests.operator.cluster import Cluster, condition

pytestmark = pytest.mark.controlplane


def rollout_spec(
    v1: int, v2: int, holds: tuple[int, int] = (8, 8), min_samples: int = 10
) -> dict[str, Any]:
    """iris at v1/v2, reached in two steps (20% and 60% of the way), each held `holds` s,
    looked at every 5 s (the least intervalSeconds allowed)."""
    obj = model_deployment()
    obj["spec"]["variants"][0]["weight"] = v1
    obj["spec"]["variants"][1]["weight"] = v2
    obj["spec"]["rollout"] = {
        "steps": [{"percent": p, "holdSeconds": h} for p, h in zip((20, 60), holds, strict=True)],
        "analysis": {"errorRate": {"max": 0.05}, "p99LatencyMs": {"max": 5000}},
        "minSamples": min_samples,
        "intervalSeconds": 5,
    }
    return obj


def rollout(cluster: Cluster, name: str = "iris") -> dict[str, Any]:
    return dict((cluster.get(name).get("status") or {}).get("rollout") or {})


def wait_phase(
    cluster: Cluster, phase: str, generation: int, timeout: float = 120
) -> dict[str, Any]:
    status = cluster.wait_status(
        "iris",
        f"rollout of generation {generation} {phase}",
        lambda s: (
            (s.get("rollout") or {}).get("phase") == phase
            and s["rollout"].get("generation") == generation
        ),
        timeout=timeout,
    )
    return dict(status["rollout"])


def printed_columns(cluster: Cluster, name: str) -> dict[str, Any]:
    """The row `kubectl get modeldeployment NAME` prints (the server-side Table)."""
    path = f"/apis/modeldeploy.dev/v1alpha1/namespaces/{cluster.namespace}/modeldeployments/{name}"
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    _, url, headers, _, _ = cluster.api.param_serialize(
        "GET", path, header_params=headers, auth_settings=["BearerToken"]
    )
    response = cluster.api.call_api("GET", url, header_params=headers)
    table = json.loads(response.read())  # type: ignore[no-untyped-call]
    names = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    return dict(zip(names, row["cells"], strict=True))


def test_the_cli_pauses_resumes_and_aborts_by_annotation(
    control_plane: ControlPlane, cluster: Cluster
) -> None:
    gated = rollout_spec(100, 0)
    cluster.create(gated)
    wait_phase(cluster, "Promoted", 1)
    gated = rollout_spec(0, 100)
    gated["spec"]["variants"][1]["gate"] = {
        "dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}
    }
    cluster.apply(gated)
    wait_phase(cluster, "Gating", 2)
    base = ["rollout", "--kubeconfig", str(control_plane.kubeconfig_path), "-n", cluster.namespace]

    def modeldeploy(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*base[:1], *args, *base[1:]])
        return code, out.getvalue() + err.getvalue()

    code, text = modeldeploy("pause", "iris")
    assert code == 0, text
    assert "Paused" in text
    value = cluster.get("iris")["metadata"]["annotations"][COMMAND_ANNOTATION]
    assert value.startswith("pause@") and rollout(cluster)["command"] == value
    code, text = modeldeploy("status", "iris")
    assert code == 0 and "Paused (generation 2, step 1)" in text
    code, text = modeldeploy("resume", "iris")
    assert code == 0 and "Gating" in text, text
    code, text = modeldeploy("abort", "iris")
    assert code == 0 and "RolledBack" in text, text
    status = cluster.get("iris")["status"]
    assert condition(status, "Degraded") == ("True", "RolledBack")
    # The printer column, as `kubectl get` shows it.
    assert printed_columns(cluster, "iris")["Rollout"] == "RolledBack"
    code, text = modeldeploy("pause", "nothere")
    assert code == 1 and "404" in text
