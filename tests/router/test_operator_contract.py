"""The router accepts exactly what the operator renders for it (the RouteTable contract).

The operator's rendering is pure, so the objects it would apply for the examples are checked
here against the router's own parsers: the RouteTable's spec.routes and the container's arguments,
and the identity the router pods run as against what the router does through the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy_operator.contract import (
    ROUTE_TABLE_API_VERSION,
    ROUTE_TABLE_ENV,
    ROUTE_TABLE_PLURAL,
    ROUTER_IDENTITY,
)
from modeldeploy_operator.render import render_objects, render_router_identity
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_operator.traffic import compute_effective_weights
from modeldeploy_server.config import parse_serve_config
from modeldeploy_server.router import DRAIN_TIMEOUT_S, parse_settings
from modeldeploy_server.routes_source import RouteTableRef
from modeldeploy_server.routing import ShadowConfig, parse_router_config
from tests.invalid_manifests import shadow_manifest, sticky_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
RBAC = REPO_ROOT / "manifests" / "rbac.yaml"


def find(objects: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        if obj["kind"] == kind and component in (None, labels.get("app.kubernetes.io/component")):
            return obj
    raise AssertionError(f"no {kind} {component or ''} rendered")


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """What the kubelet gives the container: its env (the pod name from the downward API) and the
    API server's address, which it sets in every pod."""
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    for var in container.get("env", []):
        field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        in_pod[var["name"]] = "iris-7d4b9c-x2x9z" if field == "metadata.name" else var["value"]
    return in_pod


@pytest.mark.parametrize("example", ["iris.yaml", "production.yaml"])
@pytest.mark.parametrize("ready", ["all", "first", "none"])
def test_rendered_routes_and_arguments_are_accepted_by_the_router(example: str, ready: str) -> None:
    md = parse_model_deployment(yaml.safe_load((EXAMPLES / example).read_text()))
    names = [v.name for v in md.variants]
    ready_variants = {"all": names, "first": names[:1], "none": []}[ready]
    traffic = compute_effective_weights(md.spec_weights, ready_variants)
    objects = render_objects(md, server_image="modeldeploy-server:test", weights=traffic)

    route_table = find(objects, "RouteTable")
    assert route_table["apiVersion"] == ROUTE_TABLE_API_VERSION
    config = parse_router_config(routes_text(route_table))
    # A RouteTable's routes must carry the version the routers acknowledge.
    assert config.version is not None
    assert config.model == md.name
    assert config.header_override == md.routing.header_override.lower()
    assert [v.name for v in config.variants] == names
    weights = {v.name: v.weight for v in config.variants}
    # Only Ready variants get traffic; every variant stays reachable through the override header.
    assert {n for n, w in weights.items() if w > 0} <= set(ready_variants)
    assert config.routable == bool(ready_variants)

    deployment = find(objects, "Deployment", "router")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "route"
    env = pod_env(container)
    settings = parse_settings(container["args"][1:], env)
    assert settings.routes.config is None
    meta = route_table["metadata"]
    assert env[ROUTE_TABLE_ENV] == f"{meta['namespace']}/{meta['name']}"
    assert settings.routes.route_table == RouteTableRef(meta["namespace"], meta["name"])
    assert settings.routes.pod_name == "iris-7d4b9c-x2x9z"
    assert pod["serviceAccountName"] == routes_reader(meta["namespace"]) == ROUTER_IDENTITY
    assert settings.port == container["ports"][0]["containerPort"]
    # No per-ModelDeployment RBAC: the namespace's one router identity serves every router.
    assert not [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ServiceAccount")]


def routes_text(route_table: dict[str, Any]) -> str:
    """The RouteTable's spec.routes as the router reads it off the API: JSON text."""
    routes = route_table["spec"]["routes"]
    assert isinstance(routes, dict)
    return json.dumps(routes)


def routes_reader(namespace: str) -> str:
    """The ServiceAccount of `namespace` whose rendered RoleBinding grants the router's ClusterRole
    (manifests/rbac.yaml), checked to allow what the router does with its RouteTable."""
    objects = render_router_identity(namespace)
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert account["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": ROUTER_IDENTITY,
    }
    (subject,) = binding["subjects"]
    assert subject == {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": namespace,
    }
    group = ROUTE_TABLE_API_VERSION.split("/")[0]
    granted = router_cluster_role_grants()
    assert granted == {
        (group, ROUTE_TABLE_PLURAL): {"get", "list", "watch"},
        (group, f"{ROUTE_TABLE_PLURAL}/status"): {"patch"},
    }
    name: str = subject["name"]
    return name


def router_cluster_role_grants() -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of manifests/rbac.yaml's ClusterRole modeldeploy-router."""
    (role,) = [
        doc
        for doc in yaml.safe_load_all(RBAC.read_text())
        if doc and doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == ROUTER_IDENTITY
    ]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rendered_sticky_header_reaches_the_router() -> None:
    md = parse_model_deployment(sticky_manifest("iris"))
    route_table = find(render_objects(md, server_image="modeldeploy-server:test"), "RouteTable")
    config = parse_router_config(routes_text(route_table))
    assert config.sticky_header == md.routing.sticky_header == "x-user-id"


@pytest.mark.parametrize("ready", [None, {"v1"}, {"v1", "v2"}, set()])
def test_rendered_shadow_reaches_the_router(ready: set[str] | None) -> None:
    md = parse_model_deployment(shadow_manifest("iris"))
    traffic = None if ready is None else compute_effective_weights(md.spec_weights, ready)
    objects = render_objects(md, server_image="modeldeploy-server:test", weights=traffic)
    config = parse_router_config(routes_text(find(objects, "RouteTable")))
    assert config.shadow == ShadowConfig("v2", 10.0, 0.001)


def test_rendered_timeout_and_shadow_log_reach_the_router_on_its_volume() -> None:
    md = parse_model_deployment(shadow_manifest("iris"))
    objects = render_objects(md, server_image="modeldeploy-server:test")
    pod = find(objects, "Deployment", "router")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = parse_settings(container["args"][1:], pod_env(container))
    assert settings.timeout_s == md.routing.timeout_seconds == 20
    assert settings.shadow_log is not None
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "shadow-log"]
    assert settings.shadow_log.parent == Path(mount["mountPath"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "shadow-log"]
    # The volume holds the log and its one rotated file.
    limit_mib = int(volume["emptyDir"]["sizeLimit"].removesuffix("Mi"))
    assert 2 * settings.shadow_log_max_bytes * 1.25 <= limit_mib << 20


@pytest.mark.parametrize("example", ["iris.yaml", "production.yaml"])
def test_grace_periods_cover_prestop_then_each_process_own_shutdown(example: str) -> None:
    md = parse_model_deployment(yaml.safe_load((EXAMPLES / example).read_text()))
    objects = render_objects(md, server_image="modeldeploy-server:test")
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) >= 2
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = pod_env(container)
        command, args = container["args"][0], container["args"][1:]
        if command == "route":
            settings = parse_settings(args, env)
            edge, drain_s = settings.edge, DRAIN_TIMEOUT_S
        else:
            config = parse_serve_config(args, env)
            edge, drain_s = config.edge, int(config.request_timeout_s) + 1
        assert edge.shutdown_delay_s > 0  # a plain SIGTERM keeps the port open for a while
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        needed = pre_stop + edge.shutdown_delay_s + drain_s
        assert pod["terminationGracePeriodSeconds"] >= needed, deployment["metadata"]["name"]
