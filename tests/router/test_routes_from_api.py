"""The router's routes from its RouteTable through the real API server, under the shipped RBAC.

Two `modeldeploy-server route` processes run on this host as the pods of a ModelDeployment would:
each with a TokenRequest token of the namespace's ServiceAccount `modeldeploy-router` that the
operator renders (`render_router_identity`), bound to the ClusterRole `modeldeploy-router` of
manifests/rbac.yaml, so every call they make is authorized by that ClusterRole and nothing else.
The RouteTable is written the way the operator writes it (the rendered object, server-side applied
by the operator's own adapter); its routes point at real model servers on loopback.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modeldeploy_operator import naming
from modeldeploy_operator.contract import (
    POD_NAME_ENV,
    ROUTE_TABLE_API_VERSION,
    ROUTE_TABLE_ENV,
    ROUTE_TABLE_PLURAL,
    ROUTER_IDENTITY,
)
from modeldeploy_operator.kube import KubeApi
from modeldeploy_operator.render import (
    render_objects,
    render_router_identity,
    render_routes_config,
)
from modeldeploy_operator.spec import parse_model_deployment
from tests.controlplane import harness
from tests.models import build_iris_logreg
from tests.operator.builders import model_deployment
from tests.processes import RunningProcess, running, serve_model
from tests.router.test_router import infer_body, metric

REPO_ROOT = Path(__file__).resolve().parents[2]
RBAC = REPO_ROOT / "manifests" / "rbac.yaml"
ROUTE_TABLE_CRD = REPO_ROOT / "crds" / "routetables.modeldeploy.dev.yaml"
GROUP, VERSION = ROUTE_TABLE_API_VERSION.split("/")
TEST_MANAGER = "modeldeploy-tests"
MODEL = "iris"
ROUTERS = ("iris-7c9f8d-a1b2c", "iris-7c9f8d-d3e4f")
# The bound: routes reach every router within 2 s of the operator writing them.
PROPAGATION_BOUND_S = 2.0
# Each watch is ended by the API server after this long, so the tests cross many watch ends.
WATCH_TIMEOUT_S = 2
CHANGES = [(0, 100), (100, 0), (50, 50), (0, 100), (90, 10), (100, 0), (10, 90), (0, 100)]


def poll(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.01) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(interval_s)
    return time.monotonic() - started


def as_object(answer: object) -> dict[str, Any]:
    """A custom-objects answer: a JSON object."""
    assert isinstance(answer, dict)
    return answer


def install_router_access(api: client.ApiClient, kube: KubeApi, namespace: str) -> None:
    """The ClusterRole modeldeploy-router as shipped (server-side applied: the shared control plane
    may have it already), and the namespace's router identity as the operator applies it."""
    (role,) = [
        doc
        for doc in yaml.safe_load_all(RBAC.read_text())
        if doc and doc["kind"] == "ClusterRole" and doc["metadata"]["name"] == ROUTER_IDENTITY
    ]
    client.RbacAuthorizationV1Api(api).patch_cluster_role(
        ROUTER_IDENTITY,
        role,
        field_manager=TEST_MANAGER,
        force=True,
        _content_type="application/apply-patch+yaml",
    )
    for obj in render_router_identity(namespace):
        kube.apply(obj)


@dataclass
class Cluster:
    """A namespace with the router identity, two routers and two model servers."""

    plane: harness.ControlPlane
    namespace: str
    kube: KubeApi
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    spec: dict[str, Any]
    backends: dict[str, RunningProcess]
    api_port: int
    routers: dict[str, RunningProcess] = field(default_factory=dict)
    before_routes: list[httpx.Response] = field(default_factory=list)

    @property
    def route_table_name(self) -> str:
        return naming.route_table_name(MODEL)

    @property
    def account(self) -> str:
        # What the rendered router Deployment runs as: the namespace's router identity.
        pod = self.rendered("Deployment", "router")["spec"]["template"]["spec"]
        name: str = pod["serviceAccountName"]
        assert name == ROUTER_IDENTITY
        return name

    def router_env(self, pod: str, secrets: Path) -> dict[str, str]:
        """A router pod's environment, its ServiceAccount token and CA in `secrets`."""
        return {
            ROUTE_TABLE_ENV: f"{self.namespace}/{self.route_table_name}",
            POD_NAME_ENV: pod,
            "MODELDEPLOY_SERVICE_ACCOUNT_DIR": str(secrets),
            "MODELDEPLOY_ROUTER_WATCH_TIMEOUT_S": str(WATCH_TIMEOUT_S),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
        }

    def secrets(self, directory: Path, token: str | None = None) -> Path:
        """A ServiceAccount directory as the kubelet projects it: token and ca.crt."""
        directory.mkdir()
        (directory / "token").write_text(
            token or self.plane.service_account_token(self.namespace, self.account)
        )
        shutil.copy(self.plane.pki.ca_cert, directory / "ca.crt")
        return directory

    def rendered(self, kind: str, component: str | None = None) -> dict[str, Any]:
        md = parse_model_deployment(self.spec)
        (obj,) = [
            o
            for o in render_objects(md, server_image="unused")
            if o["kind"] == kind
            and component in (None, o["metadata"]["labels"].get(naming.COMPONENT))
        ]
        return obj

    def write_routes(self, v1: int, v2: int) -> str:
        """Apply the RouteTable the operator renders for these weights; returns its version."""
        for variant, weight in zip(self.spec["spec"]["variants"], (v1, v2), strict=True):
            variant["weight"] = weight
        md = parse_model_deployment(self.spec)
        urls = {name: process.url for name, process in self.backends.items()}
        routes = render_routes_config(md, dict(md.spec_weights), urls)
        self.write_routes_document(routes)
        version: str = routes["version"]
        return version

    def write_routes_document(self, routes: Any) -> dict[str, Any]:
        """Apply the rendered RouteTable with these spec.routes; returns the object as applied."""
        return self.write_spec({"routes": routes})

    def write_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Apply the rendered RouteTable with this spec; returns the object as applied."""
        route_table = self.rendered("RouteTable")
        route_table["spec"] = spec
        return self.kube.apply(route_table)

    def rendered_routes(self) -> dict[str, Any]:
        """A copy of the spec.routes the operator renders now."""
        routes: dict[str, Any] = copy.deepcopy(self.rendered("RouteTable")["spec"]["routes"])
        return routes

    def route_table(self) -> dict[str, Any]:
        return as_object(
            self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, ROUTE_TABLE_PLURAL, self.route_table_name
            )
        )

    def wait_served(self, version: str, timeout_s: float = PROPAGATION_BOUND_S) -> list[float]:
        """Seconds until each router served `version` (measured one after the other)."""
        started = time.monotonic()
        done = []
        for pod in ROUTERS:
            poll(partial(self.serves, pod, version), timeout_s)
            done.append(time.monotonic() - started)
        return done

    def wait_acked(self, version: str, timeout_s: float = PROPAGATION_BOUND_S) -> float:
        """Seconds until every router's ack in the RouteTable's status says `version`."""
        expected = dict.fromkeys(ROUTERS, version)
        return poll(lambda: self.acks() == expected, timeout_s, interval_s=0.02)

    def wait_logged(self, text: str, timeout_s: float = 30.0) -> None:
        """Wait until every router has logged `text` (a log line is no propagation bound: the
        bound is asserted on what the routers serve and acknowledge)."""
        try:
            poll(lambda: all(text in r.output() for r in self.routers.values()), timeout_s)
        except AssertionError as error:
            silent = {
                p: r.output()[-1500:] for p, r in self.routers.items() if text not in r.output()
            }
            raise AssertionError(f"{text!r} not logged by {list(silent)}: {silent}") from error

    def serves(self, pod: str, version: str) -> bool:
        return self.served_version(pod) == version

    def served_version(self, pod: str) -> str | None:
        answer = httpx.get(self.routers[pod].url + "/v2/health/ready", timeout=5)
        version: str | None = answer.json().get("routesVersion")
        return version

    def acks(self) -> dict[str, str]:
        acks: dict[str, str] = (self.route_table().get("status") or {}).get("acks") or {}
        return acks

    def served_by(self, pod: str, count: int = 20) -> Counter[str]:
        body = infer_body_for_iris()
        with httpx.Client(timeout=10) as http:
            answers = [
                http.post(f"{self.routers[pod].url}/v2/models/{MODEL}/infer", json=body)
                for _ in range(count)
            ]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        return Counter(a.json()["model_version"] for a in answers)


def infer_body_for_iris() -> dict[str, Any]:
    return infer_body(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))


@pytest.fixture(scope="module")
def cluster(
    control_plane: harness.ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    namespace = f"routes-{time.monotonic_ns() % 10**8}"
    iris = build_iris_logreg(tmp_path_factory.mktemp("models"))
    with ExitStack() as stack:
        api = stack.enter_context(control_plane.api_client())
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        stack.callback(core.delete_namespace, namespace)
        backends = {
            name: stack.enter_context(serve_model(iris.path, MODEL, name)) for name in ("v1", "v2")
        }
        # No uid: owner references to a ModelDeployment that does not exist would have the garbage
        # collector delete the objects.
        spec = model_deployment(MODEL, namespace, uid=None)
        api_port = urlsplit(control_plane.server_url).port
        assert api_port is not None
        kube = KubeApi(api)
        cluster = Cluster(control_plane, namespace, kube, core, custom, spec, backends, api_port)
        install_router_access(api, kube, namespace)
        secrets = cluster.secrets(tmp_path_factory.mktemp("pods") / "serviceaccount")
        for pod in ROUTERS:
            env = cluster.router_env(pod, secrets)
            router = stack.enter_context(running(["route"], env=env, ready_path="/v2/health/live"))
            cluster.routers[pod] = router
        # The RouteTable does not exist yet: the routers run but are not ready.
        time.sleep(1)
        cluster.before_routes = [
            httpx.get(r.url + "/v2/health/ready") for r in cluster.routers.values()
        ]
        cluster.wait_served(cluster.write_routes(100, 0), timeout_s=30)
        yield cluster


def test_router_is_not_ready_until_it_has_routes(cluster: Cluster) -> None:
    for answer in cluster.before_routes:
        assert answer.status_code == 503
        assert answer.json() == {"error": "no routes applied yet", "routesVersion": None}
    for router in cluster.routers.values():
        assert "does not exist (yet)" in router.output()


def test_routes_changes_reach_every_router_within_2_s_and_are_acknowledged(
    cluster: Cluster,
) -> None:
    applied: list[float] = []
    acked: list[float] = []
    for v1, v2 in CHANGES:
        started = time.monotonic()
        version = cluster.write_routes(v1, v2)
        written = time.monotonic() - started
        applied.extend(written + seconds for seconds in cluster.wait_served(version))
        acked.append(time.monotonic() - started + cluster.wait_acked(version))
        if 0 in (v1, v2):
            expected = "v1" if v1 else "v2"
            for pod in ROUTERS:
                assert cluster.served_by(pod) == {expected: 20}
    print(
        f"\nroutes applied after the write, {len(CHANGES)} changes x {len(ROUTERS)} routers: "
        f"median {statistics.median(applied) * 1000:.0f} ms, max {max(applied) * 1000:.0f} ms; "
        f"all acks in the RouteTable's status: median {statistics.median(acked) * 1000:.0f} ms, "
        f"max {max(acked) * 1000:.0f} ms"
    )
    assert max(applied) <= PROPAGATION_BOUND_S
    for pod, router in cluster.routers.items():
        metrics = httpx.get(router.url + "/metrics").text
        served = cluster.served_version(pod)
        assert metric(metrics, "modeldeploy_router_routes_info", version=str(served)) == 1


def rejected_reloads(router: RunningProcess) -> float:
    metrics = httpx.get(router.url + "/metrics").text
    return metric(metrics, "modeldeploy_router_config_reloads_total", result="rejected")


def test_invalid_routes_keep_the_last_good_ones(cluster: Cluster) -> None:
    good = cluster.write_routes(0, 100)
    cluster.wait_served(good)
    cluster.wait_acked(good)
    rejected_before = {pod: rejected_reloads(r) for pod, r in cluster.routers.items()}
    bad = cluster.rendered_routes()
    bad["version"] = "broken"
    bad["variants"][0]["weight"], bad["variants"][1]["weight"] = 50, 10  # no longer 100
    applied = cluster.write_routes_document(bad)
    # The operator's apply (forced) leaves the routers' acks alone: they are in the status.
    acks = applied["status"]["acks"]
    assert {pod: acks[pod] for pod in ROUTERS} == dict.fromkeys(ROUTERS, good)
    unversioned = cluster.rendered_routes()
    del unversioned["version"]
    cluster.wait_logged("weights sum to 60")
    cluster.write_routes_document(unversioned)
    cluster.wait_logged("version: required")
    for pod, router in cluster.routers.items():
        assert rejected_reloads(router) == rejected_before[pod] + 2
        assert cluster.served_version(pod) == good
        assert cluster.served_by(pod) == {"v2": 20}
    assert cluster.acks() == dict.fromkeys(ROUTERS, good)
    # A good version after bad ones is applied as usual.
    cluster.wait_served(cluster.write_routes(100, 0))
    for pod in ROUTERS:
        assert cluster.served_by(pod) == {"v1": 20}


def relists(router: RunningProcess) -> list[str]:
    return [line for line in router.output().splitlines() if "listing again" in line]


def test_watch_survives_the_api_servers_watch_timeouts(cluster: Cluster) -> None:
    before = {pod: relists(router) for pod, router in cluster.routers.items()}
    # Each watch asks the API server to end it after WATCH_TIMEOUT_S: wait through several.
    time.sleep(4 * WATCH_TIMEOUT_S)
    cluster.wait_served(cluster.write_routes(0, 100))
    for pod, router in cluster.routers.items():
        # Every watch ended cleanly and the next resumed from the last version: no re-list.
        assert relists(router) == before[pod]


def test_a_removed_ack_is_set_again(cluster: Cluster) -> None:
    version = cluster.write_routes(90, 10)
    cluster.wait_acked(version)
    # The operator prunes the acks of pods it no longer sees as endpoints; a live router whose ack
    # went (an endpoint update racing the prune) sets it again on that status change.
    cluster.kube.remove_acks(cluster.route_table(), [ROUTERS[0]])
    cluster.wait_acked(version)


def test_deleted_route_table_keeps_the_routes_and_a_new_one_is_acknowledged(
    cluster: Cluster,
) -> None:
    version = cluster.write_routes(50, 50)
    cluster.wait_acked(version)
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, ROUTE_TABLE_PLURAL, cluster.route_table_name
    )
    try:
        cluster.wait_logged("deleted; keeping")
        for pod in ROUTERS:
            assert cluster.served_version(pod) == version
            assert set(cluster.served_by(pod)) <= {"v1", "v2"}
    finally:
        # The operator recreates it (same routes, no acks yet): the routers ack again. (Also
        # when the checks above failed: the module's other tests need the RouteTable.)
        recreated = cluster.write_routes(50, 50)
    assert recreated == version
    cluster.wait_acked(version)


def test_router_account_reaches_only_route_tables(cluster: Cluster) -> None:
    """The router's token reads the RouteTables of its namespace and patches their status, and
    nothing else: no ConfigMaps, Secrets or pods, no writes to a RouteTable's spec, no other
    namespace. It may read the namespace's other RouteTables, by design: one identity per
    namespace (the ClusterRole modeldeploy-router, bound there) serves every router instead of a
    Role per ModelDeployment, and routes are nothing to hide from the namespace's routers."""
    namespace, name = cluster.namespace, cluster.route_table_name
    other_md = parse_model_deployment(model_deployment("other", namespace, uid=None))
    (other,) = [
        o for o in render_objects(other_md, server_image="unused") if o["kind"] == "RouteTable"
    ]
    other_name = other["metadata"]["name"]
    cluster.kube.apply(other)
    cluster.core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other"), data={"a": "1"}),
    )
    kubeconfig = cluster.plane.service_account_kubeconfig(namespace, cluster.account)
    table = (GROUP, VERSION, namespace, ROUTE_TABLE_PLURAL)
    hijack = {"spec": {"routes": {**other["spec"]["routes"], "version": "hijacked"}}}
    with harness.api_client_from_kubeconfig(kubeconfig) as api:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        # What the router does, allowed: list by name, get, acknowledge in the status.
        by_name = f"metadata.name={name}"
        selected = as_object(custom.list_namespaced_custom_object(*table, field_selector=by_name))
        assert [item["metadata"]["name"] for item in selected["items"]] == [name]
        custom.get_namespaced_custom_object(*table, name)
        custom.get_namespaced_custom_object(*table, other_name)  # by design, see above
        ack = {"status": {"acks": {"rbac-check": "v"}}}
        acked = as_object(custom.patch_namespaced_custom_object_status(*table, other_name, ack))
        assert acked["status"]["acks"] == {"rbac-check": "v"}
        # A status patch cannot carry a spec change: the status subresource ignores it.
        custom.patch_namespaced_custom_object_status(*table, other_name, hijack)
        unchanged = as_object(cluster.custom.get_namespaced_custom_object(*table, other_name))
        assert unchanged["spec"] == other["spec"]
        denied: list[Callable[[], object]] = [
            lambda: custom.patch_namespaced_custom_object(*table, name, hijack),
            lambda: custom.delete_namespaced_custom_object(*table, name),
            lambda: custom.create_namespaced_custom_object(
                *table, {**other, "metadata": {"name": "forged", "namespace": namespace}}
            ),
            lambda: custom.list_namespaced_custom_object(
                GROUP, VERSION, "default", ROUTE_TABLE_PLURAL
            ),
            lambda: core.read_namespaced_config_map("other", namespace),
            lambda: core.list_namespaced_config_map(namespace),
            lambda: core.list_namespaced_secret(namespace),
            lambda: core.list_namespaced_pod(namespace),
        ]
        for call in denied:
            with pytest.raises(ApiException) as caught:
                call()
            assert caught.value.status == 403


def test_a_rotated_token_is_read_again(cluster: Cluster, tmp_path: Path) -> None:
    # The kubelet rotates projected tokens in place; this pod starts with one the API server
    # refuses and gets a valid one while running.
    secrets = cluster.secrets(tmp_path / "serviceaccount", token="expired")
    pod = "iris-7c9f8d-g5h6i"
    env = cluster.router_env(pod, secrets)
    with running(["route"], env=env, ready_path="/v2/health/live") as router:
        poll(lambda: "401: " in router.output(), 30)
        assert httpx.get(router.url + "/v2/health/ready").status_code == 503
        (secrets / "token").write_text(
            cluster.plane.service_account_token(cluster.namespace, cluster.account)
        )
        poll(lambda: httpx.get(router.url + "/v2/health/ready").status_code == 200, 30)
        served = httpx.get(router.url + "/v2/health/ready").json()["routesVersion"]
        poll(lambda: cluster.acks().get(pod) == served, PROPAGATION_BOUND_S)
    # The operator removes the acks of pods that are gone.
    cluster.kube.remove_acks(cluster.route_table(), [pod])
    assert pod not in cluster.acks()


@contextmanager
def bare_cluster(plane: harness.ControlPlane, namespace: str) -> Iterator[Cluster]:
    """A namespace with the router identity and no model servers on a control plane of its own."""
    with plane.api_client() as api:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        api_port = urlsplit(plane.server_url).port
        assert api_port is not None
        spec = model_deployment(MODEL, namespace, uid=None)
        kube = KubeApi(api)
        install_router_access(api, kube, namespace)
        yield Cluster(plane, namespace, kube, core, custom, spec, {}, api_port)


def test_a_watch_whose_version_was_compacted_lists_again(
    control_plane_binaries: harness.Binaries, tmp_path: Path
) -> None:
    """410 Gone: an API server without watch cache resumes each watch from etcd, which compacts
    every 2 s here; once the router's last seen version is compacted away, it must list again."""
    flags = ["--watch-cache=false", "--etcd-compaction-interval=2s"]
    namespace = "gone"
    with ExitStack() as stack:
        plane = stack.enter_context(
            harness.running(control_plane_binaries, [ROUTE_TABLE_CRD], flags)
        )
        cluster = stack.enter_context(bare_cluster(plane, namespace))
        first = cluster.write_routes_document(cluster.rendered_routes())["spec"]["routes"][
            "version"
        ]
        env = cluster.router_env(ROUTERS[0], cluster.secrets(tmp_path / "serviceaccount"))
        router = stack.enter_context(running(["route"], env=env))
        cluster.routers[ROUTERS[0]] = router
        assert cluster.served_version(ROUTERS[0]) == first
        # Other writes move etcd's revision on; compaction then drops the router's version.
        for i in range(20):
            cluster.core.create_namespaced_config_map(
                namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"other-{i}"))
            )
        poll(lambda: "expired; listing again" in router.output(), 60, interval_s=0.2)
        spec = cluster.spec["spec"]
        spec["variants"][0]["weight"], spec["variants"][1]["weight"] = 10, 90
        second = cluster.write_routes_document(cluster.rendered_routes())["spec"]["routes"][
            "version"
        ]
        assert second != first
        poll(partial(cluster.serves, ROUTERS[0], second), PROPAGATION_BOUND_S)


def test_a_route_table_without_a_routes_object_is_rejected_and_watched_on(
    control_plane_binaries: harness.Binaries, tmp_path: Path
) -> None:
    """The CRD's schema requires spec.routes to be an object; under a schema that does not (an
    edited or foreign CRD) the router rejects such a RouteTable as invalid routes, keeps serving
    the last good ones, and applies the next good ones."""
    crd = yaml.safe_load(ROUTE_TABLE_CRD.read_text())
    (served,) = crd["spec"]["versions"]
    schema = served["schema"]["openAPIV3Schema"]
    schema.pop("required", None)
    schema["properties"]["spec"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    loose_crd = tmp_path / "routetables.yaml"
    loose_crd.write_text(yaml.safe_dump(crd))
    with ExitStack() as stack:
        plane = stack.enter_context(harness.running(control_plane_binaries, [loose_crd]))
        cluster = stack.enter_context(bare_cluster(plane, "loose"))
        good = cluster.write_routes_document(cluster.rendered_routes())["spec"]["routes"]["version"]
        pod = ROUTERS[0]
        env = cluster.router_env(pod, cluster.secrets(tmp_path / "serviceaccount"))
        router = stack.enter_context(running(["route"], env=env))
        cluster.routers[pod] = router
        assert cluster.served_version(pod) == good
        poll(lambda: cluster.acks() == {pod: good}, PROPAGATION_BOUND_S)
        before = rejected_reloads(router)
        # (An empty spec would not do: server-side apply drops it, and the schema wants one.)
        malformed: list[tuple[dict[str, Any], str]] = [
            ({"comment": "no routes"}, "spec.routes: missing"),
            ({"routes": [1, 2]}, "spec.routes: not a JSON object"),
            ({"routes": "routes"}, "spec.routes: not a JSON object"),
        ]
        for count, (spec, problem) in enumerate(malformed, 1):
            assert cluster.write_spec(spec)["spec"] == spec
            expected = before + count
            poll(lambda: rejected_reloads(router) == expected, PROPAGATION_BOUND_S)  # noqa: B023
            assert problem in router.output()
            assert cluster.served_version(pod) == good
        assert cluster.acks() == {pod: good}
        weights = cluster.spec["spec"]["variants"]
        weights[0]["weight"], weights[1]["weight"] = 10, 90
        second = cluster.write_routes_document(cluster.rendered_routes())["spec"]["routes"][
            "version"
        ]
        poll(partial(cluster.serves, pod, second), PROPAGATION_BOUND_S)
        poll(lambda: cluster.acks() == {pod: second}, PROPAGATION_BOUND_S)
        assert "unexpected error" not in router.output()
