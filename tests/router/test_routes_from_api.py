"""The router's routes from its ConfigMap through the real API server, under the rendered Role.

Two `modeldeploy-server route` processes run on this host as the pods of a ModelDeployment would:
each with a TokenRequest token of the ServiceAccount `<md>-router` that the operator renders, so
every call they make is authorized by the rendered Role and nothing else. The ConfigMap is written
the way the operator writes it (the rendered object, server-side applied by the operator's own
adapter); its routes point at real model servers on loopback.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from modeldeploy_operator.contract import (
    POD_NAME_ENV,
    ROUTES_ACK_ANNOTATION_PREFIX,
    ROUTES_CONFIGMAP_ENV,
    ROUTES_KEY,
)
from modeldeploy_operator.kube import KubeApi
from modeldeploy_operator.render import render_objects, render_routes_config
from modeldeploy_operator.spec import parse_model_deployment
from tests.controlplane import harness
from tests.models import build_iris_logreg
from tests.operator.builders import model_deployment
from tests.processes import RunningProcess, running, serve_model
from tests.router.test_router import infer_body, metric

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


@dataclass
class Cluster:
    """A namespace with the rendered router RBAC, two routers and two model servers."""

    plane: harness.ControlPlane
    namespace: str
    kube: KubeApi
    core: client.CoreV1Api
    spec: dict[str, Any]
    backends: dict[str, RunningProcess]
    api_port: int
    routers: dict[str, RunningProcess] = field(default_factory=dict)
    before_routes: list[httpx.Response] = field(default_factory=list)

    @property
    def config_map_name(self) -> str:
        return f"{MODEL}-routes"

    @property
    def account(self) -> str:
        name: str = self.rendered("ServiceAccount")["metadata"]["name"]
        return name

    def router_env(self, pod: str, secrets: Path) -> dict[str, str]:
        """A router pod's environment, its ServiceAccount token and CA in `secrets`."""
        return {
            ROUTES_CONFIGMAP_ENV: f"{self.namespace}/{self.config_map_name}",
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

    def rendered(self, kind: str) -> dict[str, Any]:
        md = parse_model_deployment(self.spec)
        (obj,) = [o for o in render_objects(md, server_image="unused") if o["kind"] == kind]
        return obj

    def write_routes(self, v1: int, v2: int) -> str:
        """Apply the ConfigMap the operator renders for these weights; returns its version."""
        for variant, weight in zip(self.spec["spec"]["variants"], (v1, v2), strict=True):
            variant["weight"] = weight
        md = parse_model_deployment(self.spec)
        urls = {name: process.url for name, process in self.backends.items()}
        routes = render_routes_config(md, dict(md.spec_weights), urls)
        self.write_routes_text(json.dumps(routes, indent=2) + "\n")
        version: str = routes["version"]
        return version

    def write_routes_text(self, text: str) -> dict[str, Any]:
        """Apply the rendered ConfigMap with this routes.json; returns the object as applied."""
        config_map = self.rendered("ConfigMap")
        config_map["data"] = {ROUTES_KEY: text}
        return self.kube.apply(config_map)

    def wait_served(self, version: str, timeout_s: float = PROPAGATION_BOUND_S) -> list[float]:
        """Seconds until each router served `version` (measured one after the other)."""
        started = time.monotonic()
        done = []
        for pod in ROUTERS:
            poll(partial(self.serves, pod, version), timeout_s)
            done.append(time.monotonic() - started)
        return done

    def wait_acked(self, version: str, timeout_s: float = PROPAGATION_BOUND_S) -> float:
        """Seconds until every router's ack on the ConfigMap says `version`."""
        expected = dict.fromkeys(ROUTERS, version)
        return poll(lambda: self.acks() == expected, timeout_s, interval_s=0.02)

    def wait_logged(self, text: str, timeout_s: float = 30.0) -> None:
        """Wait until every router has logged `text` (a log line is no propagation bound: the
        bound is asserted on what the routers serve and acknowledge)."""
        poll(lambda: all(text in r.output() for r in self.routers.values()), timeout_s)

    def serves(self, pod: str, version: str) -> bool:
        return self.served_version(pod) == version

    def served_version(self, pod: str) -> str | None:
        answer = httpx.get(self.routers[pod].url + "/v2/health/ready", timeout=5)
        version: str | None = answer.json().get("routesVersion")
        return version

    def acks(self) -> dict[str, str]:
        config_map = self.core.read_namespaced_config_map(self.config_map_name, self.namespace)
        assert config_map.metadata is not None
        annotations = config_map.metadata.annotations or {}
        prefix = ROUTES_ACK_ANNOTATION_PREFIX
        return {k[len(prefix) :]: v for k, v in annotations.items() if k.startswith(prefix)}

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
        core = client.CoreV1Api(api)
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
        cluster = Cluster(control_plane, namespace, KubeApi(api), core, spec, backends, api_port)
        # What the operator renders for the routers' access, applied as the operator applies it.
        for kind in ("ServiceAccount", "Role", "RoleBinding"):
            cluster.kube.apply(cluster.rendered(kind))
        secrets = cluster.secrets(tmp_path_factory.mktemp("pods") / "serviceaccount")
        for pod in ROUTERS:
            env = cluster.router_env(pod, secrets)
            router = stack.enter_context(running(["route"], env=env, ready_path="/v2/health/live"))
            cluster.routers[pod] = router
        # The ConfigMap does not exist yet: the routers run but are not ready.
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
        f"all acks on the ConfigMap: median {statistics.median(acked) * 1000:.0f} ms, "
        f"max {max(acked) * 1000:.0f} ms"
    )
    assert max(applied) <= PROPAGATION_BOUND_S
    for pod, router in cluster.routers.items():
        metrics = httpx.get(router.url + "/metrics").text
        served = cluster.served_version(pod)
        assert metric(metrics, "modeldeploy_router_routes_info", version=str(served)) == 1


def test_invalid_routes_keep_the_last_good_ones(cluster: Cluster) -> None:
    good = cluster.write_routes(0, 100)
    cluster.wait_served(good)
    cluster.wait_acked(good)
    rejected_before = {
        pod: metric(
            httpx.get(r.url + "/metrics").text,
            "modeldeploy_router_config_reloads_total",
            result="rejected",
        )
        for pod, r in cluster.routers.items()
    }
    bad = json.loads(cluster.rendered("ConfigMap")["data"][ROUTES_KEY])
    bad["version"] = "broken"
    bad["variants"][0]["weight"], bad["variants"][1]["weight"] = 50, 10  # no longer 100
    applied = cluster.write_routes_text(json.dumps(bad))
    # The operator's apply (forced) leaves the routers' acks alone: they are not its fields.
    annotations = applied["metadata"]["annotations"]
    assert {pod: annotations[ROUTES_ACK_ANNOTATION_PREFIX + pod] for pod in ROUTERS} == (
        dict.fromkeys(ROUTERS, good)
    )
    unversioned = json.loads(cluster.rendered("ConfigMap")["data"][ROUTES_KEY])
    del unversioned["version"]
    cluster.wait_logged("weights sum to 60")
    cluster.write_routes_text(json.dumps(unversioned))
    cluster.wait_logged("version: required")
    for pod, router in cluster.routers.items():
        rejected = metric(
            httpx.get(router.url + "/metrics").text,
            "modeldeploy_router_config_reloads_total",
            result="rejected",
        )
        assert rejected == rejected_before[pod] + 2
        assert cluster.served_version(pod) == good
        assert cluster.served_by(pod) == {"v2": 20}
    assert cluster.acks() == dict.fromkeys(ROUTERS, good)
    # A good version after bad ones is applied as usual.
    cluster.wait_served(cluster.write_routes(100, 0))
    for pod in ROUTERS:
        assert cluster.served_by(pod) == {"v1": 20}


def test_watch_survives_the_api_servers_watch_timeouts(cluster: Cluster) -> None:
    # Each watch asks the API server to end it after WATCH_TIMEOUT_S: wait through several.
    time.sleep(4 * WATCH_TIMEOUT_S)
    cluster.wait_served(cluster.write_routes(0, 100))
    for router in cluster.routers.values():
        # Every watch ended cleanly and the next resumed from the last version: no re-list.
        assert "listing again" not in router.output()


def test_deleted_config_map_keeps_the_routes_and_a_new_one_is_acknowledged(
    cluster: Cluster,
) -> None:
    version = cluster.write_routes(50, 50)
    cluster.wait_acked(version)
    cluster.core.delete_namespaced_config_map(cluster.config_map_name, cluster.namespace)
    try:
        cluster.wait_logged("deleted; keeping")
        for pod in ROUTERS:
            assert cluster.served_version(pod) == version
            assert set(cluster.served_by(pod)) <= {"v1", "v2"}
    finally:
        # The operator recreates it (same routes, no acks yet): the routers ack again. (Also
        # when the checks above failed: the module's other tests need the ConfigMap.)
        recreated = cluster.write_routes(50, 50)
    assert recreated == version
    cluster.wait_acked(version)


def test_router_account_reaches_only_its_routes_config_map(cluster: Cluster) -> None:
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="other"), data={"a": "1"}),
    )
    kubeconfig = cluster.plane.service_account_kubeconfig(cluster.namespace, cluster.account)
    name, namespace = cluster.config_map_name, cluster.namespace
    with harness.api_client_from_kubeconfig(kubeconfig) as api:
        router = client.CoreV1Api(api)
        # What the router does, allowed: list by name, get, annotate.
        by_name = f"metadata.name={name}"
        selected = router.list_namespaced_config_map(namespace, field_selector=by_name)
        assert [item.metadata and item.metadata.name for item in selected.items] == [name]
        router.read_namespaced_config_map(name, namespace)
        denied: list[Callable[[], object]] = [
            lambda: router.read_namespaced_config_map("other", namespace),
            lambda: router.list_namespaced_config_map(namespace),
            lambda: router.list_namespaced_config_map(
                namespace, field_selector="metadata.name=other"
            ),
            lambda: router.patch_namespaced_config_map(
                "other", namespace, {"metadata": {"annotations": {"x": "y"}}}
            ),
            lambda: router.delete_namespaced_config_map(name, namespace),
            lambda: router.list_namespaced_secret(namespace),
            lambda: router.list_namespaced_pod(namespace),
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
    patch = {"metadata": {"annotations": {ROUTES_ACK_ANNOTATION_PREFIX + pod: None}}}
    cluster.core.patch_namespaced_config_map(cluster.config_map_name, cluster.namespace, patch)


def test_a_watch_whose_version_was_compacted_lists_again(
    control_plane_binaries: harness.Binaries, tmp_path: Path
) -> None:
    """410 Gone: an API server without watch cache resumes each watch from etcd, which compacts
    every 2 s here; once the router's last seen version is compacted away, it must list again."""
    flags = ["--watch-cache=false", "--etcd-compaction-interval=2s"]
    namespace = "gone"
    with ExitStack() as stack:
        plane = stack.enter_context(harness.running(control_plane_binaries, [], flags))
        api = stack.enter_context(plane.api_client())
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        api_port = urlsplit(plane.server_url).port
        assert api_port is not None
        spec = model_deployment(MODEL, namespace, uid=None)
        cluster = Cluster(plane, namespace, KubeApi(api), core, spec, {}, api_port)
        for kind in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap"):
            cluster.kube.apply(cluster.rendered(kind))
        first = json.loads(cluster.rendered("ConfigMap")["data"][ROUTES_KEY])["version"]
        env = cluster.router_env(ROUTERS[0], cluster.secrets(tmp_path / "serviceaccount"))
        router = stack.enter_context(running(["route"], env=env))
        cluster.routers[ROUTERS[0]] = router
        assert cluster.served_version(ROUTERS[0]) == first
        # Other writes move etcd's revision on; compaction then drops the router's version.
        for i in range(20):
            core.create_namespaced_config_map(
                namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"other-{i}"))
            )
        poll(lambda: "expired; listing again" in router.output(), 60, interval_s=0.2)
        spec["spec"]["variants"][0]["weight"], spec["spec"]["variants"][1]["weight"] = 10, 90
        config_map = cluster.rendered("ConfigMap")
        cluster.kube.apply(config_map)
        second = json.loads(config_map["data"][ROUTES_KEY])["version"]
        poll(partial(cluster.serves, ROUTERS[0], second), PROPAGATION_BOUND_S)
