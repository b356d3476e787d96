"""A reconcile that has nothing to change costs the API server nothing (issue 14), on the real
control plane, counted by its audit log: every request the operator's ServiceAccount makes.

The control plane here is this module's own (audit logging on, and the test restarts its API
server); the operator resyncs every 2 s, so quiet windows hold several full reconciles.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from modeldeploy_operator import naming
from tests.controlplane import harness
from tests.operator.audit import Audit, audit_flags, operator_user
from tests.operator.cluster import ROUTER_KEYS, Cluster, assert_matches_render, iris
from tests.operator.harness import REPO_ROOT, running_operator, wait_for

pytestmark = pytest.mark.controlplane
NAMESPACE = "quiet"


@pytest.fixture(scope="module")
def plane(
    control_plane_binaries: harness.Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[harness.ControlPlane, Audit]]:
    flags, audit = audit_flags(tmp_path_factory.mktemp("audit"), operator_user(NAMESPACE))
    crds = [
        *(REPO_ROOT / "crds").glob("*.yaml"),
        *control_plane_binaries.gateway_crds.glob("*.yaml"),
    ]
    with harness.running(control_plane_binaries, crds, flags) as control_plane:
        with control_plane.api_client() as api:
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE))
            )
        yield control_plane, audit


@pytest.fixture(scope="module")
def quiet(
    plane: tuple[harness.ControlPlane, Audit], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Audit]]:
    control_plane, audit = plane
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with (
        running_operator(control_plane, [NAMESPACE], log, resync_seconds=2.0) as operator,
        control_plane.api_client() as api,
    ):
        cluster = Cluster(api, NAMESPACE, operator)
        cluster.create(iris())
        cluster.wait_owned("iris", ROUTER_KEYS)
        cluster.set_ready("iris-v1")
        cluster.set_ready("iris-v2")
        # The routes must carry both variants before the routers ack them: an ack of the
        # version before v2 was ready would stay stale, as no real router here re-acks.
        cluster.wait_routes("iris", {"v1": 90, "v2": 10})
        cluster.serve("iris")
        cluster.wait_status("iris", "Ready", lambda s: _ready(s))
        yield cluster, audit


def _ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def settle_then_count(cluster: Cluster, audit: Audit, resyncs: int = 3) -> Counter[str]:
    """The operator's writes during `resyncs` full reconciles, once the one in flight is over."""
    cluster.wait_resyncs("iris", 1)
    audit.mark()
    cluster.wait_resyncs("iris", resyncs)
    return audit.writes()


def test_an_unchanged_model_deployment_is_reconciled_without_a_single_write(
    quiet: tuple[Cluster, Audit],
) -> None:
    cluster, audit = quiet
    assert settle_then_count(cluster, audit) == Counter()
    # Nor a LIST: the reconciles read their snapshot from the watch index.
    assert audit.lists() == []


def test_kopf_runs_the_namespace_discovery_once_not_for_every_event(
    quiet: tuple[Cluster, Audit],
) -> None:
    cluster, _ = quiet
    # By now iris has been created, had its status written several times and been resynced:
    # each of those reached kopf as an event of the ModelDeployment.
    cluster.wait_resyncs("iris", 1)
    log = cluster.operator.log().splitlines()
    runs = [line for line in log if "'discover-namespaces' succeeded" in line]
    assert len(runs) == 1, runs


def test_a_hand_edited_child_is_still_repaired_and_it_alone_is_written(
    quiet: tuple[Cluster, Audit],
) -> None:
    cluster, audit = quiet
    cluster.wait_resyncs("iris", 1)
    audit.mark()
    cluster.edit_child(
        "Deployment",
        "iris-v1",
        [{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"}],
    )
    wait_for(
        lambda: "evil" not in json.dumps(cluster.deployment("iris-v1")["spec"]["template"]),
        "iris-v1 repaired",
        check=cluster.operator.check_alive,
    )
    cluster.wait_resyncs("iris", 2)
    # The edit moved the Deployment's generation, so the status may say so (and post an event):
    # of the children, the edited one alone is written.
    children = {w for w in audit.writes() if not w.startswith(("create events/", "patch model"))}
    assert children == {"patch deployments/iris-v1"}
    assert_matches_render(cluster, "iris")


def test_after_an_api_server_restart_drift_is_repaired_and_the_index_holds_no_stale_object(
    plane: tuple[harness.ControlPlane, Audit], quiet: tuple[Cluster, Audit]
) -> None:
    control_plane, _ = plane
    cluster, audit = quiet
    other = iris()
    other["metadata"]["name"] = "other"
    cluster.create(other)
    cluster.wait_owned(
        "other", {(kind, name.replace("iris", "other")) for kind, name in ROUTER_KEYS}
    )

    control_plane.restart_apiserver()
    # Right away, while the operator's watches are still reconnecting: a child deleted, a child
    # edited, and a whole ModelDeployment deleted (the garbage collector removes its children).
    cluster.delete_child("RouteTable", "iris-routes")
    cluster.edit_child(
        "Service", "iris", [{"op": "replace", "path": "/spec/ports/0/port", "value": 81}]
    )
    cluster.custom.delete_namespaced_custom_object(
        "modeldeploy.dev", "v1alpha1", NAMESPACE, "modeldeployments", "other"
    )
    wait_for(lambda: cluster.child("RouteTable", "iris-routes"), "iris-routes restored", timeout=60)

    def service_repaired() -> bool:
        service = cluster.child("Service", "iris")  # absent for a moment: it is recreated
        return service is not None and service["spec"]["ports"][0]["port"] == 80

    wait_for(service_repaired, "Service/iris repaired", timeout=60)

    def index_matches_cluster() -> bool:
        return _index_counts(cluster) == _live_counts(cluster)

    wait_for(
        index_matches_cluster,
        lambda: f"index {_index_counts(cluster)} == live {_live_counts(cluster)}",
        timeout=90,
    )
    assert _index_counts(cluster)["ModelDeployment"] == 1
    # And quiet again: the restart left nothing the operator keeps rewriting.
    cluster.serve("iris")
    cluster.wait_status("iris", "Ready", _ready)
    assert settle_then_count(cluster, audit) == Counter()


def _index_counts(cluster: Cluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in cluster.operator.metrics().splitlines():
        if line.startswith("modeldeploy_operator_index_objects{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            counts[kind] = int(float(line.rsplit(" ", 1)[1]))
    return {kind: count for kind, count in counts.items() if count}


def _live_counts(cluster: Cluster) -> dict[str, int]:
    counts = Counter(kind for kind, _ in cluster.owned("iris"))
    counts.update(kind for kind, _ in cluster.owned("other"))
    counts.update(kind for kind, _ in cluster.router_identity())
    selector = f"{naming.MANAGED_BY}={naming.FIELD_MANAGER},{naming.COMPONENT}=router"
    slices = cluster.request(
        "GET",
        f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices?labelSelector={selector}",
    )
    counts["EndpointSlice"] = len((slices or {})["items"])
    listing = cluster.custom.list_namespaced_custom_object(
        "modeldeploy.dev", "v1alpha1", NAMESPACE, "modeldeployments"
    )
    counts["ModelDeployment"] = len(listing["items"])  # type: ignore[index]
    return {kind: count for kind, count in counts.items() if count}
