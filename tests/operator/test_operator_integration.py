"""The operator against the real control plane, run as in production: `kopf run` in its own
process, as its ServiceAccount with the RBAC from manifests/.

There is no kubelet: tests play the Deployment controller by writing Deployment status through
the status subresource. Every wait polls with a timeout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modeldeploy_operator import naming
from modeldeploy_operator.contract import ROUTES_KEY
from modeldeploy_operator.render import render_objects
from modeldeploy_operator.spec import parse_model_deployment
from modeldeploy_operator.status import ready_variants
from tests.controlplane.harness import ControlPlane, api_client_from_kubeconfig
from tests.operator.builders import model_deployment, variant
from tests.operator.harness import (
    GROUP,
    PLURAL,
    SERVER_IMAGE,
    TEST_MANAGER,
    VERSION,
    OperatorProcess,
    running_operator,
    wait_for,
)

pytestmark = pytest.mark.controlplane
KINDS = {
    "Deployment": ("apps/v1", "list_namespaced_deployment"),
    "Service": ("v1", "list_namespaced_service"),
    "ConfigMap": ("v1", "list_namespaced_config_map"),
    "ServiceAccount": ("v1", "list_namespaced_service_account"),
    "Role": ("rbac.authorization.k8s.io/v1", "list_namespaced_role"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "list_namespaced_role_binding"),
    "PodDisruptionBudget": ("policy/v1", "list_namespaced_pod_disruption_budget"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "list_namespaced_horizontal_pod_autoscaler"),
}


class Cluster:
    """Admin-side view of one test namespace: what a user and kubectl would do."""

    def __init__(self, api: client.ApiClient, namespace: str, operator: OperatorProcess) -> None:
        self.api = api
        self.namespace = namespace
        self.operator = operator
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.apis = {
            "apps/v1": self.apps,
            "v1": self.core,
            "policy/v1": client.PolicyV1Api(api),
            "autoscaling/v2": client.AutoscalingV2Api(api),
            "rbac.authorization.k8s.io/v1": client.RbacAuthorizationV1Api(api),
        }

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = json.loads(json.dumps(obj))
        obj["metadata"] = {"name": obj["metadata"]["name"]}
        return cast(
            dict[str, Any],
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, obj
            ),
        )

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as a user would (`kubectl apply --server-side`)."""
        obj = json.loads(json.dumps(obj))
        obj["metadata"] = {"name": obj["metadata"]["name"], "namespace": self.namespace}
        applied = self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            obj["metadata"]["name"],
            obj,
            field_manager=TEST_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )
        return cast(dict[str, Any], applied)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def get(self, name: str) -> dict[str, Any]:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return cast(dict[str, Any], obj)

    def owned(self, md_name: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Every object labelled as the operator's for `md_name`, by (kind, name)."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for kind, (api_version, method) in KINDS.items():
            response = getattr(self.apis[api_version], method)(
                self.namespace,
                label_selector=naming.owned_selector(md_name),
                _preload_content=False,
            )
            for item in json.loads(response.data)["items"]:
                found[(kind, item["metadata"]["name"])] = {
                    "apiVersion": api_version,
                    "kind": kind,
                    **item,
                }
        routes = self.custom.list_namespaced_custom_object(
            "gateway.networking.k8s.io",
            "v1",
            self.namespace,
            "httproutes",
            label_selector=naming.owned_selector(md_name),
        )
        for item in cast(dict[str, Any], routes)["items"]:
            found[("HTTPRoute", item["metadata"]["name"])] = item
        return found

    def deployment(self, name: str) -> dict[str, Any]:
        # Raw JSON, as stored: the typed models would drop what they do not know.
        response: Any = self.apps.read_namespaced_deployment(
            name, self.namespace, _preload_content=False
        )
        obj: dict[str, Any] = json.loads(response.data)
        return obj

    def routes(self, md_name: str) -> dict[str, int] | None:
        try:
            config_map = self.core.read_namespaced_config_map(
                naming.routes_config_map_name(md_name), self.namespace
            )
        except ApiException:
            return None
        config = json.loads((config_map.data or {})[ROUTES_KEY])
        return {v["name"]: v["weight"] for v in config["variants"]}

    def set_ready(self, deployment_name: str, ready: bool = True) -> None:
        """Play the Deployment controller: every replica updated and ready, or none."""
        deployment = self.deployment(deployment_name)
        replicas = deployment["spec"].get("replicas", 1)
        count = replicas if ready else 0
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": count,
            "availableReplicas": count,
        }
        self.apps.patch_namespaced_deployment_status(
            deployment_name,
            self.namespace,
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    def wait_status(
        self, name: str, what: str, predicate: Any, timeout: float = 30
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.get(name).get("status") or {}
            return status if predicate(status) else None

        return wait_for(probe, what, timeout=timeout, check=self.operator.check_alive)

    def wait_routes(self, md_name: str, weights: dict[str, int]) -> None:
        wait_for(
            lambda: self.routes(md_name) == weights,
            f"routes {weights}",
            check=self.operator.check_alive,
        )

    def wait_owned(self, md_name: str, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        seen: set[tuple[str, str]] = set()

        def probe() -> dict[tuple[str, str], Any] | None:
            found = self.owned(md_name)
            seen.clear()
            seen.update(found)
            return found if set(found) == keys else None

        return wait_for(
            probe,
            lambda: f"exactly {sorted(keys)}; missing {keys - seen}, extra {seen - keys}",
            check=self.operator.check_alive,
        )

    def resyncs(self, md_name: str) -> int:
        """How many resync timer runs the operator has logged for `md_name`."""
        marker = f"[{self.namespace}/{md_name}] Timer 'resync' succeeded"
        return self.operator.log().count(marker)

    def wait_resyncs(self, md_name: str, count: int) -> None:
        start = self.resyncs(md_name)
        wait_for(
            lambda: self.resyncs(md_name) >= start + count,
            f"{count} resyncs",
            check=self.operator.check_alive,
        )


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    with (
        running_operator(control_plane, [namespace], tmp_path / "operator.log") as operator,
        control_plane.api_client() as api,
    ):
        yield Cluster(api, namespace, operator)


def condition(status: dict[str, Any], type_: str) -> tuple[str, str] | None:
    for c in status.get("conditions", []):
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def expected_objects(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    """What `modeldeploy render` produces for the stored object and the observed readiness."""
    md = parse_model_deployment(cluster.get(name))
    observed = {key[1]: obj for key, obj in cluster.owned(name).items() if key[0] == "Deployment"}
    return render_objects(
        md, server_image=SERVER_IMAGE, ready_variants=ready_variants(md, observed)
    )


def assert_contains(live: Any, rendered: Any, path: str = "") -> None:
    """`live` holds every field of `rendered` with the same value (the API server only adds
    defaults). Lists must match element by element."""
    if isinstance(rendered, dict):
        assert isinstance(live, dict), path
        for key, value in rendered.items():
            assert key in live, f"{path}.{key} missing"
            assert_contains(live[key], value, f"{path}.{key}")
    elif isinstance(rendered, list):
        assert isinstance(live, list) and len(live) == len(rendered), path
        for i, (a, b) in enumerate(zip(live, rendered, strict=True)):
            assert_contains(a, b, f"{path}[{i}]")
    else:
        assert live == rendered, f"{path}: {live!r} != {rendered!r}"


def assert_matches_render(cluster: Cluster, name: str) -> None:
    expected = expected_objects(cluster, name)
    live = cluster.owned(name)
    assert set(live) == {(o["kind"], o["metadata"]["name"]) for o in expected}
    for obj in expected:
        assert_contains(
            live[(obj["kind"], obj["metadata"]["name"])],
            obj,
            f"{obj['kind']}/{obj['metadata']['name']}",
        )


# The router pods' ServiceAccount and what lets it read its routes ConfigMap.
ROUTER_ACCESS = {
    ("ServiceAccount", "iris-router"),
    ("Role", "iris-router"),
    ("RoleBinding", "iris-router"),
}
ROUTER_KEYS = ROUTER_ACCESS | {
    ("Deployment", "iris-v1"),
    ("Service", "iris-v1"),
    ("PodDisruptionBudget", "iris-v1"),
    ("Deployment", "iris-v2"),
    ("Service", "iris-v2"),
    ("HorizontalPodAutoscaler", "iris-v2"),
    ("ConfigMap", "iris-routes"),
    ("Deployment", "iris"),
    ("Service", "iris"),
    ("PodDisruptionBudget", "iris"),
}


def iris() -> dict[str, Any]:
    return model_deployment(
        variants=[
            variant("v1", 90, replicas=2),
            variant("v2", 10, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
        ]
    )


def test_create_then_readiness_drives_traffic_and_status(cluster: Cluster) -> None:
    created = cluster.create(iris())
    found = cluster.wait_owned("iris", ROUTER_KEYS)
    for obj in found.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "ModelDeployment",
            "iris",
            created["metadata"]["uid"],
        )
    # Nothing is ready yet: no traffic anywhere, and the status says why.
    cluster.wait_routes("iris", {"v1": 0, "v2": 0})
    status = cluster.wait_status(
        "iris", "NoVariantReady", lambda s: condition(s, "Ready") == ("False", "NoVariantReady")
    )
    assert (
        status["readyVariants"] == "0/2" and status["url"] == f"http://iris.{cluster.namespace}.svc"
    )
    assert_matches_render(cluster, "iris")

    # v1 becomes ready: it takes all the traffic; v2, not ready, gets none.
    cluster.set_ready("iris-v1")
    cluster.wait_routes("iris", {"v1": 100, "v2": 0})
    status = cluster.wait_status(
        "iris", "VariantsNotReady", lambda s: condition(s, "Ready") == ("False", "VariantsNotReady")
    )
    assert [(r["name"], r["ready"], r["effectiveWeight"]) for r in status["variants"]] == [
        ("v1", True, 100),
        ("v2", False, 0),
    ]

    cluster.set_ready("iris-v2")
    cluster.wait_routes("iris", {"v1": 90, "v2": 10})
    status = cluster.wait_status(
        "iris", "Ready", lambda s: condition(s, "Ready") == ("True", "AllVariantsReady")
    )
    assert condition(status, "Progressing") == ("False", "RolloutComplete")
    assert condition(status, "Degraded") == ("False", "AsExpected")
    assert status["observedGeneration"] == cluster.get("iris")["metadata"]["generation"]
    assert (status["readyVariants"], status["traffic"]) == ("2/2", "v1=90,v2=10")
    assert status["variants"] == [
        {
            "name": "v1",
            "desiredReplicas": 2,
            "readyReplicas": 2,
            "weight": 90,
            "effectiveWeight": 90,
            "ready": True,
            "modelSha256": variant("v1", 0)["model"]["sha256"],
            "image": SERVER_IMAGE,
            "service": "iris-v1",
        },
        {
            "name": "v2",
            "desiredReplicas": 1,
            "readyReplicas": 1,
            "weight": 10,
            "effectiveWeight": 10,
            "ready": True,
            "modelSha256": variant("v2", 0)["model"]["sha256"],
            "image": SERVER_IMAGE,
            "service": "iris-v2",
        },
    ]
    # The same rendering path as `modeldeploy render`, now with both variants ready.
    assert_matches_render(cluster, "iris")
    events = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector="involvedObject.name=iris"
    )
    assert {"TrafficShifted", "AllVariantsReady"} <= {e.reason for e in events.items}


def test_weight_change_moves_traffic_without_restarting_anything(cluster: Cluster) -> None:
    cluster.create(iris())
    cluster.wait_owned("iris", ROUTER_KEYS)
    for name in ("iris-v1", "iris-v2"):
        cluster.set_ready(name)
    cluster.wait_routes("iris", {"v1": 90, "v2": 10})
    before = {name: cluster.deployment(name) for name in ("iris-v1", "iris-v2", "iris")}

    cluster.patch_spec(
        "iris",
        {
            "variants": [
                variant("v1", 40, replicas=2),
                variant("v2", 60, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
            ]
        },
    )
    cluster.wait_routes("iris", {"v1": 40, "v2": 60})
    cluster.wait_status("iris", "traffic 40/60", lambda s: s.get("traffic") == "v1=40,v2=60")
    for name, old in before.items():
        new = cluster.deployment(name)
        assert new["metadata"]["generation"] == old["metadata"]["generation"], name
        assert new["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"], name
        assert new["spec"]["template"] == old["spec"]["template"], name


def test_add_and_remove_variants_and_switch_routing(cluster: Cluster) -> None:
    cluster.create(iris())
    cluster.wait_owned("iris", ROUTER_KEYS)
    cluster.patch_spec(
        "iris",
        {
            "variants": [
                variant("v1", 50, replicas=2),
                variant("v2", 30, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
                variant("v3", 20),
            ]
        },
    )
    cluster.wait_owned("iris", ROUTER_KEYS | {("Deployment", "iris-v3"), ("Service", "iris-v3")})

    cluster.patch_spec("iris", {"variants": [variant("v1", 20, replicas=2), variant("v3", 80)]})
    keys = {
        ("Deployment", "iris-v1"),
        ("Service", "iris-v1"),
        ("PodDisruptionBudget", "iris-v1"),
        ("Deployment", "iris-v3"),
        ("Service", "iris-v3"),
        ("ConfigMap", "iris-routes"),
        ("Deployment", "iris"),
        ("Service", "iris"),
        ("PodDisruptionBudget", "iris"),
        *ROUTER_ACCESS,
    }
    cluster.wait_owned("iris", keys)
    cluster.wait_routes("iris", {"v1": 0, "v3": 0})
    cluster.set_ready("iris-v3")
    cluster.wait_routes("iris", {"v1": 0, "v3": 100})

    # Router -> Gateway API: the router's objects go, an HTTPRoute comes, with effective weights.
    cluster.patch_spec(
        "iris",
        {
            "routing": {
                "mode": "gateway",
                "gateway": {
                    "parentRefs": [{"name": "gw", "namespace": "infra"}],
                    "hostnames": ["iris.example.com"],
                },
            }
        },
    )
    variant_keys = {k for k in keys if k[1] != "iris"} - {("ConfigMap", "iris-routes")}
    variant_keys -= ROUTER_ACCESS
    found = cluster.wait_owned("iris", variant_keys | {("HTTPRoute", "iris")})
    split = found[("HTTPRoute", "iris")]["spec"]["rules"][-1]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in split] == [("iris-v1", 0), ("iris-v3", 100)]
    assert_matches_render(cluster, "iris")


def test_reapply_and_resync_change_nothing(cluster: Cluster) -> None:
    manifest = iris()
    cluster.apply(manifest)
    cluster.wait_owned("iris", ROUTER_KEYS)
    for name in ("iris-v1", "iris-v2"):
        cluster.set_ready(name)
    cluster.wait_status(
        "iris", "Ready", lambda s: condition(s, "Ready") == ("True", "AllVariantsReady")
    )
    cluster.wait_resyncs("iris", 1)
    children = {k: v["metadata"]["resourceVersion"] for k, v in cluster.owned("iris").items()}
    md_version = cluster.get("iris")["metadata"]["resourceVersion"]

    # The same manifest again (what GitOps does every few minutes), then two full resyncs.
    assert cluster.apply(manifest)["metadata"]["resourceVersion"] == md_version
    cluster.wait_resyncs("iris", 2)
    assert {
        k: v["metadata"]["resourceVersion"] for k, v in cluster.owned("iris").items()
    } == children
    assert cluster.get("iris")["metadata"]["resourceVersion"] == md_version


def test_edited_and_deleted_children_are_restored(cluster: Cluster) -> None:
    cluster.create(iris())
    cluster.wait_owned("iris", ROUTER_KEYS)
    cluster.set_ready("iris-v1")
    cluster.wait_routes("iris", {"v1": 100, "v2": 0})
    expected_image = cluster.deployment("iris-v1")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]

    # Someone edits things by hand, as another field manager.
    cluster.apps.patch_namespaced_deployment(
        "iris-v1",
        cluster.namespace,
        {"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:1"}]}}}},
        field_manager="kubectl-edit",
    )
    cluster.core.patch_namespaced_config_map(
        "iris-routes",
        cluster.namespace,
        {"data": {"routes.json": "{}"}},
        field_manager="kubectl-edit",
    )
    cluster.core.delete_namespaced_service("iris-v2", cluster.namespace)

    wait_for(
        lambda: (
            cluster.deployment("iris-v1")["spec"]["template"]["spec"]["containers"][0]["image"]
            == expected_image
        ),
        "the Deployment edit reverted",
        check=cluster.operator.check_alive,
    )
    cluster.wait_routes("iris", {"v1": 100, "v2": 0})
    cluster.wait_owned("iris", ROUTER_KEYS)
    assert_matches_render(cluster, "iris")


def test_spec_the_api_refuses_is_degraded_without_a_retry_storm(cluster: Cluster) -> None:
    # The CRD passes nodeSelector through as a free-form map; the Deployment API then refuses
    # the label key. The operator cannot fix that: Degraded, once, and no retry loop.
    cluster.create(model_deployment(pod={"nodeSelector": {"bad key!": "x"}}))
    status = cluster.wait_status(
        "iris", "Degraded", lambda s: condition(s, "Degraded") == ("True", "ApplyRejected")
    )
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "nodeSelector" in degraded["message"], degraded
    assert condition(status, "Ready") == ("False", "ApplyRejected")
    assert cluster.owned("iris") == {}
    version = cluster.get("iris")["metadata"]["resourceVersion"]
    cluster.wait_resyncs("iris", 2)
    assert cluster.get("iris")["metadata"]["resourceVersion"] == version
    assert cluster.operator.log().count("failed permanently") == 1

    # Fixing the spec recovers without any manual step.
    cluster.patch_spec("iris", {"pod": {"nodeSelector": {"bad key!": None, "pool": "cpu"}}})
    cluster.wait_status(
        "iris", "not Degraded", lambda s: condition(s, "Degraded") == ("False", "AsExpected")
    )


def test_delete_garbage_collects_every_child(cluster: Cluster) -> None:
    cluster.create(iris())
    cluster.wait_owned("iris", ROUTER_KEYS)
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "iris"
    )
    wait_for(lambda: not cluster.owned("iris"), "garbage collection", timeout=60)


def test_operator_killed_mid_reconcile_converges_without_duplicates_or_leaks(
    cluster: Cluster,
) -> None:
    names = [f"m{i}" for i in range(6)]
    for name in names:
        cluster.create(
            model_deployment(
                name=name,
                variants=[
                    variant("v1", 90, replicas=2),
                    variant("v2", 10, autoscaling={"minReplicas": 1, "maxReplicas": 3}),
                ],
            )
        )
    # Kill it as soon as it has started writing children, so some reconciles are cut short.
    wait_for(lambda: any(cluster.owned(n) for n in names), "a first child")
    cluster.operator.kill()
    cluster.operator.start()
    for name in names:
        cluster.wait_owned(name, {(kind, obj.replace("iris", name)) for kind, obj in ROUTER_KEYS})
        assert_matches_render(cluster, name)
    # Everything present is owned by a ModelDeployment that exists: nothing leaked.
    deployments = cluster.apps.list_namespaced_deployment(cluster.namespace).items
    assert sorted(d.metadata.name or "" for d in deployments if d.metadata) == sorted(
        f"{n}{suffix}" for n in names for suffix in ("", "-v1", "-v2")
    )


def test_operator_cannot_read_secrets(cluster: Cluster) -> None:
    with api_client_from_kubeconfig(cluster.operator.kubeconfig) as api:
        review = client.AuthorizationV1Api(api).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=cluster.namespace, verb="get", resource="secrets"
                    )
                )
            )
        )
        assert review.status is not None and review.status.allowed is False
