"""The router accepts exactly what the operator renders for it (the routes.json contract).

The operator's rendering is pure, so the objects it would apply for the examples are checked
here against the router's own parsers: the ConfigMap's routes.json and the container's arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy_operator.contract import ROUTES_KEY
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_operator.traffic import compute_effective_weights
from modeldeploy_server.config import parse_serve_config
from modeldeploy_server.router import DRAIN_TIMEOUT_S, parse_settings
from modeldeploy_server.routes_source import ConfigMapRef
from modeldeploy_server.routing import ShadowConfig, parse_router_config
from tests.invalid_manifests import shadow_manifest, sticky_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


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

    config_map = find(objects, "ConfigMap")
    ((routes_key, routes_text),) = config_map["data"].items()
    config = parse_router_config(routes_text)
    # A ConfigMap's routes must carry the version the routers acknowledge.
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
    settings = parse_settings(container["args"][1:], pod_env(container))
    assert settings.routes.config is None
    assert settings.routes.config_map == ConfigMapRef(
        config_map["metadata"]["namespace"], config_map["metadata"]["name"]
    )
    assert routes_key == ROUTES_KEY
    assert settings.routes.pod_name == "iris-7d4b9c-x2x9z"
    assert pod["serviceAccountName"] == routes_reader(objects)
    assert settings.port == container["ports"][0]["containerPort"]


def routes_reader(objects: list[dict[str, Any]]) -> str:
    """The ServiceAccount bound to the rendered Role that reaches the routes ConfigMap."""
    (role,) = [o for o in objects if o["kind"] == "Role"]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    name: str = subject["name"]
    return name


def test_rendered_sticky_header_reaches_the_router() -> None:
    md = parse_model_deployment(sticky_manifest("iris"))
    config_map = find(render_objects(md, server_image="modeldeploy-server:test"), "ConfigMap")
    (routes_text,) = config_map["data"].values()
    assert parse_router_config(routes_text).sticky_header == md.routing.sticky_header == "x-user-id"


@pytest.mark.parametrize("ready", [None, {"v1"}, {"v1", "v2"}, set()])
def test_rendered_shadow_reaches_the_router(ready: set[str] | None) -> None:
    md = parse_model_deployment(shadow_manifest("iris"))
    traffic = None if ready is None else compute_effective_weights(md.spec_weights, ready)
    objects = render_objects(md, server_image="modeldeploy-server:test", weights=traffic)
    (routes_text,) = find(objects, "ConfigMap")["data"].values()
    assert parse_router_config(routes_text).shadow == ShadowConfig("v2", 10.0, 0.001)


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
