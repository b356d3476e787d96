"""Operator lifecycle on the real control plane: killed mid-reconcile again and again, gone
before an uninstall, and upgraded from the version that kept a finalizer."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from kubernetes import client

from modeldeploy_operator import naming
from modeldeploy_operator.kube import RESOURCES
from tests.conftest import PROJECT_CRDS
from tests.controlplane import harness
from tests.operator.builders import model_deployment, variant
from tests.operator.cluster import ROUTER_IDENTITY_KEYS, Cluster, assert_matches_render, condition
from tests.operator.harness import GROUP, PLURAL, VERSION, wait_for

pytestmark = pytest.mark.controlplane
CRD_NAME = f"{PLURAL}.{GROUP}"


def split(name: str, weight: int) -> dict[str, Any]:
    return model_deployment(
        name=name, variants=[variant("v1", weight), variant("v2", 100 - weight)]
    )


def keys_of(name: str) -> set[tuple[str, str]]:
    """The children of a two-variant, one-replica ModelDeployment called `name` (router mode)."""
    return {
        ("Deployment", f"{name}-v1"),
        ("Service", f"{name}-v1"),
        ("Deployment", f"{name}-v2"),
        ("Service", f"{name}-v2"),
        ("RouteTable", f"{name}-routes"),
        ("Deployment", name),
        ("Service", name),
        ("PodDisruptionBudget", name),
    }


def labelled_objects(cluster: Cluster) -> list[dict[str, Any]]:
    """Every object in the namespace that carries the operator's managed-by label."""
    found = []
    for (api_version, kind), plural in RESOURCES.items():
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        listing = cluster.request(
            "GET",
            f"{prefix}/namespaces/{cluster.namespace}/{plural}"
            f"?labelSelector={naming.MANAGED_BY}%3D{naming.FIELD_MANAGER}",
        )
        for item in (listing or {}).get("items", []):
            found.append({**item, "kind": kind})
    return found


@pytest.mark.slow
def test_ten_kills_during_thirty_reconciles_converge_with_zero_orphans(cluster: Cluster) -> None:
    rng = random.Random(9)
    names = [f"m{i:02d}" for i in range(30)]
    weights = dict.fromkeys(names, 90)
    for name in names:
        cluster.create(split(name, weights[name]))
    wait_for(lambda: any(cluster.owned(n) for n in names), "a first child")
    for kill in range(10):
        # Weights change between kills, and the kill lands while reconciles are in flight.
        for name in rng.sample(names, 6):
            weights[name] = rng.randrange(0, 101)
            cluster.patch_spec(
                name,
                {"variants": [variant("v1", weights[name]), variant("v2", 100 - weights[name])]},
            )
        time.sleep(rng.uniform(0.05, 0.6))
        cluster.operator.kill()
        cluster.operator.start()
        if kill == 0:
            # From now on the variants are ready (as a kubelet would report), so every weight
            # change must reach the routes.
            for name in names:
                for deployment in (f"{name}-v1", f"{name}-v2"):
                    cluster.wait_child("Deployment", deployment, timeout=120)
                    cluster.set_ready(deployment)

    for name in names:
        cluster.wait_owned(name, keys_of(name))
        expected = {"v1": weights[name], "v2": 100 - weights[name]}
        cluster.wait_routes(name, expected, timeout=120)
        assert_matches_render(cluster, name)
        generation = cluster.get(name)["metadata"]["generation"]
        traffic = f"v1={expected['v1']},v2={expected['v2']}"
        status = cluster.wait_status(
            name,
            f"status of generation {generation} with traffic {traffic}",
            lambda s, g=generation, t=traffic: (
                (s.get("observedGeneration"), s.get("traffic")) == (g, t)
            ),
        )
        assert condition(status, "Degraded") == ("False", "AsExpected")
    # Zero orphans: every labelled object is a wanted child of an existing ModelDeployment,
    # owned by it, and there is exactly one of each; besides them, one router identity.
    wanted = {key for name in names for key in keys_of(name)} | ROUTER_IDENTITY_KEYS
    uids = {name: cluster.get(name)["metadata"]["uid"] for name in names}
    found = labelled_objects(cluster)
    keys = [(o["kind"], o["metadata"]["name"]) for o in found]
    assert sorted(keys) == sorted(wanted)
    for obj in found:
        if (obj["kind"], obj["metadata"]["name"]) in ROUTER_IDENTITY_KEYS:
            assert "ownerReferences" not in obj["metadata"]
            continue
        md_name = obj["metadata"]["labels"][naming.MODEL_DEPLOYMENT]
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == uids[md_name], obj["metadata"]["name"]


def test_legacy_finalizer_is_removed(cluster: Cluster) -> None:
    # What the kopf-based version left on every ModelDeployment.
    obj = model_deployment()
    obj["metadata"] = {"name": "iris", "finalizers": ["modeldeploy.dev/operator"]}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, obj)
    wait_for(
        lambda: not cluster.get("iris")["metadata"].get("finalizers"),
        "the finalizer removed",
        check=cluster.operator.check_alive,
    )
    cluster.wait_owned("iris", keys_of("iris"))


def test_uninstall_with_a_model_deployment_left_and_the_operator_gone(cluster: Cluster) -> None:
    for name in ("first", "left"):
        cluster.create(split(name, 90))
        cluster.wait_owned(name, keys_of(name))
    cluster.operator.kill()
    # A ModelDeployment deleted with the operator gone goes at once (no finalizer), and the
    # garbage collector takes its children.
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "first"
    )
    wait_for(lambda: not cluster.owned("first"), "first's children collected", timeout=60)
    extensions = client.ApiextensionsV1Api(cluster.api)
    try:
        # What `kubectl delete -k manifests/` does to the CRD, with the operator already gone
        # and a ModelDeployment left: it completes.
        extensions.delete_custom_resource_definition(CRD_NAME)
        wait_for(
            lambda: not crd_installed(extensions),
            "the CRD (and the ModelDeployment left) deleted",
            timeout=60,
        )
    finally:
        # The control plane is shared by the session: the CRD comes back for the next tests.
        if not crd_installed(extensions):
            documents = harness.crd_documents(PROJECT_CRDS.glob("*.yaml"))
            harness.install_crds(
                cluster.api, [d for d in documents if d["metadata"]["name"] == CRD_NAME]
            )


def crd_installed(extensions: client.ApiextensionsV1Api) -> bool:
    crds = extensions.list_custom_resource_definition().items
    return CRD_NAME in {c.metadata.name for c in crds if c.metadata}
