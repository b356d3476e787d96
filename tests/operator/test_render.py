"""render_objects: the one rendering path (golden output, invariants, hardening, routing)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from modeldeploy_operator import naming
from modeldeploy_operator.contract import MAX_MODEL_BYTES
from modeldeploy_operator.gate_jobs import probe_args
from modeldeploy_operator.render import render_objects, render_router_identity, routes_version
from modeldeploy_operator.rollout import ProbeRun
from modeldeploy_operator.spec import ModelDeployment, parse_model_deployment
from modeldeploy_operator.traffic import compute_effective_weights
from tests.operator.builders import SHA_V1, model_deployment, variant

IMAGE = "registry.example/modeldeploy-server:1.0"
GOLDEN = Path(__file__).parent / "golden" / "production.yaml"
KUBERNETES_VERSION = "1.33.0"


def render(obj: dict[str, Any], ready: set[str] | None = None) -> list[dict[str, Any]]:
    md = parse_model_deployment(obj)
    weights = None if ready is None else compute_effective_weights(md.spec_weights, ready)
    return render_objects(md, server_image=IMAGE, weights=weights)


def by_kind_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"] for o in objects if o["kind"] == "Deployment"]


def production() -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(Path("examples/production.yaml").read_text())
    obj["metadata"]["uid"] = "5d0d7f9e-3b1f-4c52-8f0e-6b1de2a4c7a9"
    return obj


def test_production_example_matches_golden_output() -> None:
    rendered = yaml.safe_dump_all(render(production()), sort_keys=False)
    assert rendered == GOLDEN.read_text()


def test_rendering_is_deterministic_and_returns_fresh_objects() -> None:
    md = parse_model_deployment(production())
    first = render_objects(md, server_image=IMAGE)
    first[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "9Gi"
    second = render_objects(md, server_image=IMAGE)
    assert json.dumps(second) == json.dumps(render_objects(md, server_image=IMAGE))
    assert second[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "memory": "2Gi"
    }


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        (
            None,
            [
                ("Deployment", "iris-v1"),
                ("Service", "iris-v1"),
                ("Deployment", "iris-v2"),
                ("Service", "iris-v2"),
                ("RouteTable", "iris-routes"),
                ("Deployment", "iris"),
                ("Service", "iris"),
                ("PodDisruptionBudget", "iris"),
            ],
        ),
        (
            {"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}]}},
            [
                ("Deployment", "iris-v1"),
                ("Service", "iris-v1"),
                ("Deployment", "iris-v2"),
                ("Service", "iris-v2"),
                ("HTTPRoute", "iris"),
            ],
        ),
        (
            {"mode": "none"},
            [
                ("Deployment", "iris-v1"),
                ("Service", "iris-v1"),
                ("Deployment", "iris-v2"),
                ("Service", "iris-v2"),
            ],
        ),
    ],
    ids=["router", "gateway", "none"],
)
def test_objects_per_routing_mode(
    routing: dict[str, Any] | None, expected: list[tuple[str, str]]
) -> None:
    objects = render(model_deployment(routing=routing))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == expected
    assert {o["metadata"]["namespace"] for o in objects} == {"ml"}


@pytest.mark.parametrize(
    ("fields", "kinds"),
    [
        ({}, ["Deployment", "Service"]),
        ({"replicas": 3}, ["Deployment", "Service", "PodDisruptionBudget"]),
        (
            {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            ["Deployment", "Service", "HorizontalPodAutoscaler"],
        ),
        (
            {"autoscaling": {"minReplicas": 2, "maxReplicas": 4}},
            ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"],
        ),
    ],
    ids=["one replica", "three replicas", "autoscaling from 1", "autoscaling from 2"],
)
def test_pdb_and_hpa_follow_replicas_and_autoscaling(
    fields: dict[str, Any], kinds: list[str]
) -> None:
    objects = render(
        model_deployment(variants=[variant("v1", 100, **fields)], routing={"mode": "none"})
    )
    assert [o["kind"] for o in objects] == kinds
    deployment = objects[0]
    # The HPA owns replicas when autoscaling is on: rendering it would fight the HPA.
    assert ("replicas" in deployment["spec"]) == ("autoscaling" not in fields)
    for obj in objects[2:]:
        if obj["kind"] == "HorizontalPodAutoscaler":
            assert obj["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "iris-v1",
            }
            target = obj["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"]
            assert target == 80
        else:
            assert obj["spec"]["selector"] == deployment["spec"]["selector"]


def test_every_kubernetes_object_is_valid_for_the_api() -> None:
    obj = production()
    obj["spec"]["variants"][1]["model"]["uri"] = "pvc://models/fraud/v2.onnx"
    for routing in (None, {"mode": "none"}):
        if routing:
            obj["spec"]["routing"] = routing
        for manifest in (*render(obj), *render_router_identity("ml")):
            # Our own RouteTable meets its CRD on a real API server (the control-plane tests).
            if manifest["kind"] != "RouteTable":
                kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_pods_pass_the_restricted_pod_security_standard() -> None:
    for template in pod_templates(render(production())):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert isinstance(pod["securityContext"]["runAsUser"], int)
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # Only the router, which watches its RouteTable, holds an API token.
        is_router = template["metadata"]["labels"][naming.COMPONENT] == naming.COMPONENT_ROUTER
        assert pod["automountServiceAccountToken"] is is_router
        for volume in pod["volumes"]:
            assert set(volume) & {"emptyDir", "configMap", "persistentVolumeClaim"}
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]]
            assert "hostPort" not in json.dumps(container.get("ports", []))


def test_variant_pod_fetches_then_serves_the_pinned_model() -> None:
    objects = by_kind_name(render(model_deployment()))
    pod = objects[("Deployment", "iris-v1")]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["command"] + fetch["args"] == [
        "modeldeploy-server",
        "fetch",
        "https://models.example/iris-1.onnx",
        "/models/model.onnx",
        "--sha256",
        SHA_V1,
        "--max-bytes",
        str(MAX_MODEL_BYTES),
    ]
    (server,) = pod["containers"]
    assert server["command"] + server["args"] == ["modeldeploy-server", "serve"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env == {
        "MODELDEPLOY_MODEL_PATH": "/models/model.onnx",
        "MODELDEPLOY_MODEL_NAME": "iris",
        "MODELDEPLOY_MODEL_VERSION": "v1",
        "MODELDEPLOY_MODEL_SHA256": SHA_V1,
        "MODELDEPLOY_HOST": "0.0.0.0",
        "MODELDEPLOY_PORT": "8080",
    }
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert server["image"] == fetch["image"] == IMAGE


def test_server_settings_become_env() -> None:
    settings = {
        "maxBatchSize": 32,
        "maxBatchDelayMs": 2,
        "intraOpThreads": 1,
        "maxRequestBytes": 1024,
        "maxRows": 500,
        "requestTimeoutSeconds": 2.5,
    }
    (deployment, *_) = render(model_deployment(variants=[variant("v1", 100, server=settings)]))
    env = {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert {
        k: v
        for k, v in env.items()
        if k
        not in {
            "MODELDEPLOY_MODEL_PATH",
            "MODELDEPLOY_MODEL_NAME",
            "MODELDEPLOY_MODEL_VERSION",
            "MODELDEPLOY_MODEL_SHA256",
            "MODELDEPLOY_HOST",
            "MODELDEPLOY_PORT",
        }
    } == {
        "MODELDEPLOY_MAX_BATCH_SIZE": "32",
        "MODELDEPLOY_MAX_BATCH_DELAY_MS": "2",
        "MODELDEPLOY_INTRA_OP_THREADS": "1",
        "MODELDEPLOY_MAX_REQUEST_BYTES": "1024",
        "MODELDEPLOY_MAX_ROWS": "500",
        "MODELDEPLOY_REQUEST_TIMEOUT_S": "2.5",
    }


@pytest.mark.parametrize(("request_timeout", "server_grace"), [(None, 45), (120, 135), (0.5, 16)])
def test_pods_keep_serving_through_endpoint_removal_then_drain(
    request_timeout: float | None, server_grace: int
) -> None:
    settings = {} if request_timeout is None else {"requestTimeoutSeconds": request_timeout}
    objects = render(model_deployment(variants=[variant("v1", 100, server=settings)]))
    grace = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    # preStop sleep, the process's 5 s shutdown delay, then its own drain (request timeout, or
    # the router's 25 s).
    assert grace == {"iris-v1": server_grace, "iris": 40}
    for template in pod_templates(objects):
        (container,) = template["spec"]["containers"]
        assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}


def test_pvc_model_is_mounted_read_only_and_fetched_from_the_mount() -> None:
    model = {"uri": "pvc://model-store/iris/v1.onnx", "sha256": SHA_V1}
    (deployment, *_) = render(model_deployment(variants=[variant("v1", 100, model=model)]))
    pod = deployment["spec"]["template"]["spec"]
    assert {
        "name": "model-source",
        "persistentVolumeClaim": {"claimName": "model-store", "readOnly": True},
    } in pod["volumes"]
    fetch = pod["initContainers"][0]
    assert fetch["args"][1] == "/model-source/iris/v1.onnx"
    assert {"name": "model-source", "mountPath": "/model-source", "readOnly": True} in fetch[
        "volumeMounts"
    ]
    # The server never sees the claim, only the verified copy.
    assert "model-source" not in json.dumps(pod["containers"])


@pytest.mark.parametrize(
    ("routing", "headless"),
    [
        (None, True),
        ({"mode": "gateway", "gateway": {"parentRefs": [{"name": "gw"}]}}, False),
        ({"mode": "none"}, False),
    ],
    ids=["router", "gateway", "none"],
)
def test_variant_services_are_headless_only_behind_the_router(
    routing: dict[str, Any] | None, headless: bool
) -> None:
    objects = by_kind_name(render(model_deployment(routing=routing)))
    for name in ("iris-v1", "iris-v2"):
        spec = objects[("Service", name)]["spec"]
        assert (spec.get("clusterIP") == "None") is headless
        # Without a ClusterIP nothing maps ports: clients reach the pods' port as the Service's.
        assert spec["ports"][0]["port"] == naming.SERVER_PORT
    if routing is None:
        assert "clusterIP" not in objects[("Service", "iris")]["spec"]  # what users call


def test_labels_selectors_and_model_digest() -> None:
    objects = by_kind_name(render(model_deployment(pod={"labels": {"team": "risk"}})))
    deployment = objects[("Deployment", "iris-v1")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels[naming.MODEL_DIGEST] == SHA_V1[:63]
    assert labels["team"] == "risk"
    assert labels["app.kubernetes.io/managed-by"] == "modeldeploy-operator"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert naming.MODEL_DIGEST not in selector  # selectors are immutable; models change
    assert objects[("Service", "iris-v1")]["spec"]["selector"] == selector
    assert selector.items() <= labels.items()
    # The router Service must not select variant pods, nor the reverse.
    router_selector = objects[("Service", "iris")]["spec"]["selector"]
    assert not router_selector.items() <= labels.items()


def test_changing_the_model_does_not_change_the_selector() -> None:
    before = render(model_deployment())[0]
    obj = model_deployment()
    obj["spec"]["variants"][0]["model"]["sha256"] = "c" * 64
    after = render(obj)[0]
    assert before["spec"]["selector"] == after["spec"]["selector"]
    assert before["spec"]["template"] != after["spec"]["template"]


def test_owner_reference_only_when_the_object_exists() -> None:
    owned = render(model_deployment())
    assert all(o["metadata"]["ownerReferences"][0]["controller"] is True for o in owned)
    assert {o["metadata"]["ownerReferences"][0]["uid"] for o in owned} == {
        "0c4b7a4e-1f0e-4d8a-9a59-0d6f6a1e2b3c"
    }
    offline = render(model_deployment(uid=None))
    assert all("ownerReferences" not in o["metadata"] for o in offline)


def test_pod_settings_and_image_override() -> None:
    pod_settings = {
        "image": "mirror.example/server:2",
        "imagePullSecrets": [{"name": "pull"}],
        "serviceAccountName": "models-reader",
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {}},
        "annotations": {"prometheus.io/scrape": "false", "owner": "risk"},
    }
    for template in pod_templates(render(model_deployment(pod=pod_settings))):
        pod = template["spec"]
        assert {c["image"] for c in pod["containers"]} == {"mirror.example/server:2"}
        assert pod["imagePullSecrets"] == [{"name": "pull"}]
        router = template["metadata"]["labels"][naming.COMPONENT] == naming.COMPONENT_ROUTER
        assert pod["serviceAccountName"] == ("modeldeploy-router" if router else "models-reader")
        assert pod["nodeSelector"] == {"pool": "cpu"}
        assert pod["tolerations"] == pod_settings["tolerations"]
        assert pod["affinity"] == {"podAntiAffinity": {}}
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
        assert template["metadata"]["annotations"]["owner"] == "risk"


def routes(objects: list[dict[str, Any]]) -> dict[str, Any]:
    parsed: dict[str, Any] = by_kind_name(objects)[("RouteTable", "iris-routes")]["spec"]["routes"]
    return parsed


@pytest.mark.parametrize(
    ("ready", "weights"),
    [(None, [90, 10]), ({"v1", "v2"}, [90, 10]), ({"v1"}, [100, 0]), (set(), [0, 0])],
    ids=["offline", "both ready", "v2 not ready", "none ready"],
)
def test_router_config_has_effective_weights_and_service_urls(
    ready: set[str] | None, weights: list[int]
) -> None:
    rendered = routes(render(model_deployment(), ready))
    assert rendered.pop("version") == routes_version(rendered)
    assert rendered == {
        "model": "iris",
        "headerOverride": "x-model-variant",
        "probeToken": naming.probe_token("0c4b7a4e-1f0e-4d8a-9a59-0d6f6a1e2b3c"),
        "variants": [
            {"name": "v1", "url": "http://iris-v1.ml.svc:8080", "weight": weights[0]},
            {"name": "v2", "url": "http://iris-v2.ml.svc:8080", "weight": weights[1]},
        ],
    }


def test_probe_token_is_the_uid_s_own_and_the_probe_job_carries_it() -> None:
    """Two ModelDeployments never share a token; an offline render (no uid) has none, so no
    request counts as probe traffic there; the probe Job sends its routes' token."""
    first, second, offline = (
        routes(render(model_deployment(uid=uid)))
        for uid in (
            "0c4b7a4e-1f0e-4d8a-9a59-0d6f6a1e2b3c",
            "a1b2c3d4-0000-4000-8000-000000000001",
            None,
        )
    )
    assert re.fullmatch("[0-9a-f]{32}", first["probeToken"])
    assert first["probeToken"] != second["probeToken"]
    assert "probeToken" not in offline
    gate = {"dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}}
    gated = [variant("v1", 90), variant("v2", 10, gate=gate)]
    md = parse_model_deployment(model_deployment(variants=gated))
    args = probe_args(md, ProbeRun("k", ("v1", "v2"), 60, 5), "http://iris-router.ml.svc")
    assert args[args.index("--probe-token") + 1] == first["probeToken"]


def test_router_config_carries_the_sticky_header_lower_case() -> None:
    md = model_deployment(routing={"stickyHeader": "X-User-Id"})
    assert routes(render(md))["stickyHeader"] == "x-user-id"


def test_routes_version_is_a_content_hash() -> None:
    versions = {
        ready: routes(render(model_deployment(), set(ready)))["version"]
        for ready in [("v1", "v2"), ("v1",), ()]
    }
    assert all(re.fullmatch("[0-9a-f]{16}", v) for v in versions.values())
    assert len(set(versions.values())) == 3, "different routes, different versions"
    assert routes(render(model_deployment(), {"v2", "v1"}))["version"] == versions[("v1", "v2")]
    # Routes with the same weights but elsewhere (another namespace) are other routes.
    elsewhere = model_deployment()
    elsewhere["metadata"]["namespace"] = "other"
    assert routes(render(elsewhere, {"v1", "v2"}))["version"] != versions[("v1", "v2")]


SHADOWED = [variant("v1", 100), variant("v2", 0)]


def test_router_config_carries_the_shadow() -> None:
    shadow = {"variant": "v2", "percent": 25, "tolerance": 0.01}
    config = routes(render(model_deployment(variants=SHADOWED, routing={"shadow": shadow})))
    assert config["shadow"] == shadow
    del shadow["tolerance"]
    config = routes(render(model_deployment(variants=SHADOWED, routing={"shadow": shadow})))
    assert config["shadow"] == {"variant": "v2", "percent": 25}


def router_container_and_volumes(
    objects: list[dict[str, Any]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    pod = by_kind_name(objects)[("Deployment", "iris")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod["volumes"]


def test_router_writes_the_shadow_log_to_a_bounded_volume_of_its_own() -> None:
    shadow = {"variant": "v2", "percent": 25}
    objects = render(model_deployment(variants=SHADOWED, routing={"shadow": shadow}))
    container, volumes = router_container_and_volumes(objects)
    env = {e["name"]: e.get("value") for e in container["env"]}
    log = "/var/log/modeldeploy/shadow-disagreements.jsonl"
    assert env["MODELDEPLOY_ROUTER_SHADOW_LOG"] == log
    # Two files of 8 MiB (lines of at most 2 MiB) fit the limit, with room to spare.
    assert env["MODELDEPLOY_ROUTER_SHADOW_LOG_MAX_BYTES"] == str(8 << 20)
    assert {"name": "shadow-log", "mountPath": "/var/log/modeldeploy"} in container["volumeMounts"]
    assert {"name": "shadow-log", "emptyDir": {"sizeLimit": "32Mi"}} in volumes
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Without a shadow there is no log, and no volume for it.
    container, volumes = router_container_and_volumes(render(model_deployment()))
    assert not {e["name"] for e in container["env"]} & {"MODELDEPLOY_ROUTER_SHADOW_LOG"}
    assert [v["name"] for v in volumes] == ["tmp"]


@pytest.mark.parametrize(
    ("routing", "timeouts", "expected"),
    [
        ({"timeoutSeconds": 7}, [None, 120], "7"),
        ({}, [30, None], None),  # the router's 60 s outlasts the variants' own limits
        ({}, [30, 120], "125"),  # else it waits 5 s longer than the slowest variant's limit
    ],
    ids=["set", "default", "derived"],
)
def test_router_timeout_is_the_spec_s_or_outlasts_every_variant(
    routing: dict[str, Any], timeouts: list[int | None], expected: str | None
) -> None:
    variants = [
        variant(name, weight, **({"server": {"requestTimeoutSeconds": t}} if t else {}))
        for name, weight, t in zip(["v1", "v2"], [90, 10], timeouts, strict=True)
    ]
    container, _ = router_container_and_volumes(
        render(model_deployment(variants=variants, routing=routing))
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("MODELDEPLOY_ROUTER_TIMEOUT_S") == expected


def test_gateway_shadow_is_a_request_mirror_on_the_weighted_rule() -> None:
    routing = {
        "mode": "gateway",
        "gateway": {"parentRefs": [{"name": "gw"}]},
        "shadow": {"variant": "v2", "percent": 25},
    }
    route = render(model_deployment(variants=SHADOWED, routing=routing))[-1]
    *pinned, split = route["spec"]["rules"]
    assert split["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": "iris-v2", "port": 8080}, "percent": 25},
        }
    ]
    assert all("filters" not in rule for rule in pinned)


def test_weight_changes_touch_only_the_router_config() -> None:
    before = by_kind_name(render(model_deployment(), {"v1", "v2"}))
    after = by_kind_name(render(model_deployment(), {"v1"}))
    changed = [key for key in before if before[key] != after[key]]
    assert changed == [("RouteTable", "iris-routes")]


def test_router_watches_its_route_table_as_the_namespace_router_identity() -> None:
    objects = by_kind_name(render(model_deployment()))
    template = objects[("Deployment", "iris")]["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["route"]
    assert container["env"] == [
        {"name": "MODELDEPLOY_ROUTE_TABLE", "value": "ml/iris-routes"},
        {"name": "MODELDEPLOY_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    # No ConfigMap volume: the kubelet would deliver changes only at its next sync.
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert pod["serviceAccountName"] == "modeldeploy-router"
    assert pod["automountServiceAccountToken"] is True
    # The identity is the namespace's, owned by no ModelDeployment, and bound to the ClusterRole
    # that manifests/rbac.yaml installs (read RouteTables, patch their status: nothing else).
    identity = by_kind_name(render_router_identity("ml"))
    assert set(identity) == {
        ("ServiceAccount", "modeldeploy-router"),
        ("RoleBinding", "modeldeploy-router"),
    }
    for obj in identity.values():
        assert obj["metadata"]["namespace"] == "ml"
        assert "ownerReferences" not in obj["metadata"]
        assert naming.MODEL_DEPLOYMENT not in obj["metadata"]["labels"]
    binding = identity[("RoleBinding", "modeldeploy-router")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "modeldeploy-router",
    }
    account = {"kind": "ServiceAccount", "name": "modeldeploy-router", "namespace": "ml"}
    assert binding["subjects"] == [account]
    # Weight changes never restart a router pod.
    assert not any(
        "hash" in key or "checksum" in key for key in template["metadata"]["annotations"]
    )


def test_gateway_route_splits_by_effective_weight_and_pins_by_header() -> None:
    routing = {
        "mode": "gateway",
        "headerOverride": "x-variant",
        "gateway": {
            "parentRefs": [{"name": "gw", "namespace": "infra", "sectionName": "http"}],
            "hostnames": ["iris.example.com"],
            "pathPrefix": "/models",
        },
    }
    route = render(model_deployment(routing=routing), {"v2"})[-1]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route["spec"]
    assert spec["parentRefs"] == [{"name": "gw", "namespace": "infra", "sectionName": "http"}]
    assert spec["hostnames"] == ["iris.example.com"]
    *pinned, split = spec["rules"]
    assert [
        (r["matches"][0]["headers"][0]["value"], r["backendRefs"][0]["name"]) for r in pinned
    ] == [("v1", "iris-v1"), ("v2", "iris-v2")]
    assert all(r["matches"][0]["headers"][0]["name"] == "x-variant" for r in pinned)
    assert split["matches"] == [{"path": {"type": "PathPrefix", "value": "/models"}}]
    assert [(b["name"], b["port"], b["weight"]) for b in split["backendRefs"]] == [
        ("iris-v1", 8080, 0),
        ("iris-v2", 8080, 100),
    ]


def test_service_names_fit_dns_labels_for_the_longest_allowed_names() -> None:
    md: ModelDeployment = parse_model_deployment(
        model_deployment(name="m" * 59, variants=[variant("v1", 100)])
    )
    for obj in render_objects(md, server_image=IMAGE):
        # Services need DNS-1035 labels; the other kinds allow DNS-1123 subdomains.
        assert len(obj["metadata"]["name"]) <= (63 if obj["kind"] == "Service" else 253)
        assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())
