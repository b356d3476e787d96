"""The operator against the real control plane, run as in production: `kopf run` in its own
process, as its ServiceAccount with the RBAC from manifests/.

There is no kubelet: tests play the Deployment controller by writing Deployment status through
the status subresource. Every wait polls with a timeout.
"""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.controlplane.harness import api_client_from_kubeconfig
from tests.operator.builders import model_deployment, variant
from tests.operator.cluster import (
    ROUTER_IDENTITY_KEYS,
    ROUTER_KEYS,
    Cluster,
    assert_matches_render,
    condition,
    iris,
)
from tests.operator.harness import GROUP, PLURAL, SERVER_IMAGE, VERSION, wait_for

pytestmark = pytest.mark.controlplane


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
    # The routers' identity is the namespace's: no ModelDeployment owns it, so deleting one
    # leaves the others' routers their token.
    identity = cluster.router_identity()
    assert set(identity) == ROUTER_IDENTITY_KEYS
    assert not any("ownerReferences" in o["metadata"] for o in identity.values())
    # Nothing is ready yet: no traffic anywhere, and the status says why.
    cluster.wait_routes("iris", {"v1": 0, "v2": 0})
    status = cluster.wait_status(
        "iris", "NoVariantReady", lambda s: condition(s, "Ready") == ("False", "NoVariantReady")
    )
    assert (
        status["readyVariants"] == "0/2" and status["url"] == f"http://iris.{cluster.namespace}.svc"
    )
    assert_matches_render(cluster, "iris")

    # v1 becomes ready: it takes all the traffic; v2, not ready, gets none. The router, the
    # only entry point, is not ready: not Ready, whatever the variants.
    cluster.set_ready("iris-v1")
    cluster.wait_routes("iris", {"v1": 100, "v2": 0})
    status = cluster.wait_status(
        "iris", "RouterNotReady", lambda s: condition(s, "Ready") == ("False", "RouterNotReady")
    )
    assert [(r["name"], r["ready"], r["effectiveWeight"]) for r in status["variants"]] == [
        ("v1", True, 100),
        ("v2", False, 0),
    ]
    cluster.set_ready("iris-v2")
    cluster.wait_routes("iris", {"v1": 90, "v2": 10})
    cluster.wait_status(
        "iris",
        "still RouterNotReady with every variant ready",
        lambda s: (
            s.get("traffic") == "v1=90,v2=10"
            and condition(s, "Ready") == ("False", "RouterNotReady")
        ),
    )

    # Router replicas ready, but no endpoint has the current routes yet.
    cluster.set_ready("iris")
    cluster.wait_status(
        "iris", "RoutesPending", lambda s: condition(s, "Ready") == ("False", "RoutesPending")
    )
    cluster.set_router_endpoints("iris", {"router-a": True, "router-b": True, "router-c": False})
    cluster.ack_routes("iris", ["router-a"])
    # The slices and the ack come by different watches: a status between them may name both.
    status = cluster.wait_status(
        "iris",
        "RoutesPending on router-b only",
        lambda s: any(
            c["type"] == "Ready"
            and c["reason"] == "RoutesPending"
            and "router-b" in c["message"]
            and "router-a" not in c["message"]
            for c in s["conditions"]
        ),
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "router-c" not in ready["message"]
    # Every ready endpoint serves the current routes (router-c is not ready: it does not count).
    cluster.ack_routes("iris", ["router-b"])
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
    # Events are posted right after the status write that caused them.
    wait_for(
        lambda: (
            {"TrafficShifted", "AllVariantsReady"}
            <= {
                e.reason
                for e in cluster.core.list_namespaced_event(
                    cluster.namespace, field_selector="involvedObject.name=iris"
                ).items
            }
        ),
        "the TrafficShifted and AllVariantsReady events",
        check=cluster.operator.check_alive,
    )

    # router-b is no endpoint any more: its ack goes (router-c never acked).
    cluster.set_router_endpoints("iris", {"router-a": True})
    wait_for(
        lambda: set(cluster.routes_acks("iris")) == {"router-a"},
        "router-b's ack pruned",
        check=cluster.operator.check_alive,
    )
    cluster.wait_status(
        "iris", "still Ready", lambda s: condition(s, "Ready") == ("True", "AllVariantsReady")
    )


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
        ("RouteTable", "iris-routes"),
        ("Deployment", "iris"),
        ("Service", "iris"),
        ("PodDisruptionBudget", "iris"),
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
    variant_keys = {k for k in keys if k[1] != "iris"} - {("RouteTable", "iris-routes")}
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
    cluster.wait_routes("iris", {"v1": 90, "v2": 10})
    cluster.serve("iris")
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
    cluster.edit_child(
        "RouteTable", "iris-routes", [{"op": "replace", "path": "/spec/routes", "value": {}}]
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
    # the label key. The operator cannot fix that: Degraded, named per object, reported once,
    # and the children the API server accepts are still created.
    cluster.create(model_deployment(pod={"nodeSelector": {"bad key!": "x"}}))
    refused = ["Deployment/iris-v1", "Deployment/iris-v2", "Deployment/iris"]
    status = cluster.wait_status(
        "iris", "Degraded", lambda s: condition(s, "Degraded") == ("True", "ApplyRejected")
    )
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    for name in refused:
        assert f"{name}: " in degraded["message"], degraded
    assert "nodeSelector" in degraded["message"], degraded
    assert condition(status, "Ready") == ("False", "ApplyRejected")
    assert set(cluster.owned("iris")) == {
        ("Service", "iris-v1"),
        ("Service", "iris-v2"),
        ("RouteTable", "iris-routes"),
        ("Service", "iris"),
        ("PodDisruptionBudget", "iris"),
    }
    version = cluster.get("iris")["metadata"]["resourceVersion"]
    cluster.wait_resyncs("iris", 2)
    assert cluster.get("iris")["metadata"]["resourceVersion"] == version
    log = cluster.operator.log()
    for name in refused:
        assert log.count(f"{name} refused by the API server") == 1, name
    warnings = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector="involvedObject.name=iris,reason=ApplyRejected"
    ).items
    assert sorted((e.message or "").split(":")[0] for e in warnings) == sorted(refused)
    assert 'modeldeploy_operator_apply_refused_total{kind="Deployment"}' in (
        cluster.operator.metrics()
    )

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


def test_the_router_identity_goes_with_the_namespace_s_last_router(cluster: Cluster) -> None:
    """Shared by the namespace's routers, owned by none: it stays while one may run a router, and
    the operator deletes it after the last one (a namespace keeps nothing after uninstall)."""
    cluster.create(iris())
    other = iris()
    other["metadata"]["name"] = "other"
    cluster.create(other)
    cluster.wait_owned("other", {(k, n.replace("iris", "other")) for k, n in ROUTER_KEYS})
    first = cluster.router_identity()
    assert set(first) == ROUTER_IDENTITY_KEYS

    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "other"
    )
    wait_for(lambda: not cluster.owned("other"), "other's children collected", timeout=60)
    # iris still runs a router: its identity is untouched (the same objects, not recreated).
    assert {k: o["metadata"]["uid"] for k, o in cluster.router_identity().items()} == {
        k: o["metadata"]["uid"] for k, o in first.items()
    }

    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "iris"
    )
    wait_for(lambda: not cluster.router_identity(), "the router identity deleted", timeout=60)
    # A new router in the namespace gets it back.
    cluster.create(iris())
    wait_for(
        lambda: set(cluster.router_identity()) == ROUTER_IDENTITY_KEYS,
        "the router identity created again",
        timeout=60,
    )


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
