"""Rollouts against the real control plane: the operator (`kopf run`, its own RBAC) walks a new
generation's weights through the steps, judged on metrics from a real Prometheus scraping the real
router while real servers answer real requests on loopback; and the `modeldeploy rollout` CLI
steering it by annotation.

What the missing kubelet, kube-proxy and DNS would do, the tests do: the Deployments are marked
ready, and the routes the operator writes into its RouteTable reach the router as a file whose
variant URLs are the loopback servers (the router re-reads its file when it changes). Prometheus
scrapes the router every second with the labels its Kubernetes service discovery would give it
(namespace, modeldeployment).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modeldeploy_operator import cli, naming
from modeldeploy_operator.rollout_control import COMMAND_ANNOTATION
from tests.controlplane.harness import ControlPlane, start_prometheus
from tests.models import build_iris_logreg, build_iris_stump, write_graph
from tests.operator.builders import model_deployment
from tests.operator.cluster import Cluster, condition
from tests.operator.harness import wait_for
from tests.processes import RunningProcess, route, serve_model, server_command, stop

pytestmark = pytest.mark.controlplane

ROW = [5.1, 3.5, 1.4, 0.2]
REQUEST = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}
# Bounded load: at most this many requests a second, and never more than MAX_REQUESTS in a test.
RATE_PER_S = 25.0
MAX_REQUESTS = 20_000


@dataclass(frozen=True)
class Models:
    good: Path
    candidate: Path
    failing: Path
    slow: Path
    good_sha256: str
    candidate_sha256: str
    # The golden dataset: every iris row with its true label (logreg agrees on 146 of 150, the
    # stump on far fewer).
    golden: Path
    golden_sha256: str


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    directory = tmp_path_factory.mktemp("rollout-models")
    logreg = build_iris_logreg(directory)
    stump = build_iris_stump(directory)
    lines = ["sepal_l,sepal_w,petal_l,petal_w,expected.label"]
    lines += [
        ",".join([*(str(float(v)) for v in row), str(int(label))])
        for row, label in zip(logreg.features, logreg.target, strict=True)
    ]
    golden = directory / "golden.csv"
    golden.write_text("\n".join(lines) + "\n")
    return Models(
        logreg.path,
        stump.path,
        build_failing(directory),
        build_slow(directory),
        logreg.sha256,
        stump.sha256,
        golden,
        hashlib.sha256(golden.read_bytes()).hexdigest(),
    )


def build_failing(directory: Path) -> Path:
    """Takes iris rows like the others, but cannot run on one row: its Reshape to [3, -1] needs a
    multiple of 3 values (the server answers 422, the model's failure)."""
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [3, -1])
    nodes = [
        onnx.helper.make_node("Constant", [], ["shape"], value=shape),
        onnx.helper.make_node("Reshape", ["input", "shape"], ["label"], name="to_three_rows"),
    ]
    return write_graph(
        directory,
        "iris_failing",
        nodes,
        {"input": (onnx.TensorProto.FLOAT, [None, 4])},
        {"label": (onnx.TensorProto.FLOAT, [3, None])},
    )


def build_slow(directory: Path) -> Path:
    """Takes iris rows like the others and answers every one, each after about 0.1 s of one
    core here: 600 products with a 1024x1024 identity matrix (the answer: the row's largest value
    times 0.01)."""
    first = onnx.numpy_helper.from_array(np.full((4, 1024), 0.01, np.float32), "first")
    same = onnx.numpy_helper.from_array(np.eye(1024, dtype=np.float32), "same")
    nodes = [
        onnx.helper.make_node("Constant", [], ["first"], value=first),
        onnx.helper.make_node("Constant", [], ["same"], value=same),
        onnx.helper.make_node("MatMul", ["input", "first"], ["h0"]),
    ]
    nodes += [onnx.helper.make_node("MatMul", [f"h{i}", "same"], [f"h{i + 1}"]) for i in range(600)]
    nodes.append(onnx.helper.make_node("ReduceMax", ["h600"], ["label"], axes=[1], keepdims=1))
    return write_graph(
        directory,
        "iris_slow",
        nodes,
        {"input": (onnx.TensorProto.FLOAT, [None, 4])},
        {"label": (onnx.TensorProto.FLOAT, [None, 1])},
    )


def rollout_spec(
    v1: int,
    v2: int,
    holds: tuple[int, int] = (8, 8),
    min_samples: int = 10,
    prometheus: str | None = None,
    p99_max_ms: int = 5000,
) -> dict[str, Any]:
    """iris at v1/v2, reached in two steps (20% and 60% of the way), each held `holds` s,
    looked at every 5 s (the least intervalSeconds allowed), judged on `prometheus`'s numbers."""
    obj = model_deployment()
    obj["spec"]["variants"][0]["weight"] = v1
    obj["spec"]["variants"][1]["weight"] = v2
    obj["spec"]["rollout"] = {
        "steps": [{"percent": p, "holdSeconds": h} for p, h in zip((20, 60), holds, strict=True)],
        "analysis": {"errorRate": {"max": 0.05}, "p99LatencyMs": {"max": p99_max_ms}},
        "minSamples": min_samples,
        "intervalSeconds": 5,
    }
    if prometheus is not None:
        obj["spec"]["rollout"]["analysis"]["prometheus"] = {"url": prometheus}
    return obj


class Background:
    """`run` in a thread from `start` until `close` (which waits for it)."""

    stop: threading.Event
    thread: threading.Thread | None = None

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=15)


@dataclass
class Loopback(Background):
    """Plays DNS and kube-proxy for the router: the operator's routes, variant URLs replaced by
    the loopback servers, written to the router's routes file whenever they change."""

    cluster: Cluster
    md_name: str
    servers: dict[str, str]  # variant -> loopback URL
    path: Path
    written: str = ""
    routed: list[dict[str, int]] = field(default_factory=list)  # every split written, in order

    def sync(self) -> bool:
        name = naming.route_table_name(self.md_name)
        table = self.cluster.child("RouteTable", name)
        if table is None:
            return False
        routes = table["spec"]["routes"]
        for variant in routes["variants"]:
            variant["url"] = self.servers[variant["name"]]
        text = json.dumps(routes)
        if text != self.written:
            staged = self.path.with_suffix(".tmp")
            staged.write_text(text)
            os.replace(staged, self.path)
            self.written = text
            self.routed.append({v["name"]: v["weight"] for v in routes["variants"]})
        return True

    def run(self) -> None:
        while not self.stop.wait(0.2):
            with contextlib.suppress(Exception):  # the API server may be busy: next round
                self.sync()

    def start(self) -> None:
        wait_for(self.sync, "the RouteTable", timeout=60)
        super().start()


@dataclass
class Traffic(Background):
    """Users: bounded-rate inference requests through the router, counted by answer code (one
    iris row a request, taking `rows` in turn)."""

    url: str
    codes: dict[int, int] = field(default_factory=dict)
    rows: list[list[float]] = field(default_factory=lambda: [ROW])

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            for sent in range(MAX_REQUESTS):
                started = time.monotonic()
                row = self.rows[sent % len(self.rows)]
                request = {"inputs": [{**REQUEST["inputs"][0], "data": row}]}
                try:
                    code = client.post(self.url + "/v2/models/iris/infer", json=request).status_code
                except httpx.HTTPError:
                    code = 0
                self.codes[code] = self.codes.get(code, 0) + 1
                if self.stop.wait(max(0.0, 1 / RATE_PER_S - (time.monotonic() - started))):
                    return


@dataclass
class Prometheus:
    """A real Prometheus server on loopback scraping the router every second."""

    url: str
    process: subprocess.Popen[bytes]

    def close(self) -> None:
        stop(self.process)


@contextlib.contextmanager
def prometheus(tmp_path: Path, router: RunningProcess, namespace: str) -> Iterator[Prometheus]:
    config = tmp_path / "prometheus.yml"
    scrape = {
        "job_name": "modeldeploy-routers",
        "static_configs": [
            {
                "targets": [f"127.0.0.1:{router.port}"],
                "labels": {"namespace": namespace, "modeldeployment": "iris"},
            }
        ],
    }
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": [scrape]}))
    process, url = start_prometheus(config, tmp_path, "127.0.0.1")
    server = Prometheus(url, process)
    try:

        def scraped() -> bool:
            try:
                answer = httpx.get(f"{server.url}/api/v1/targets", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            targets = answer["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)

        wait_for(scraped, "Prometheus scraping the router", timeout=60)
        yield server
    finally:
        server.close()


@dataclass
class Serving:
    router: RunningProcess
    prometheus_url: str
    loopback: Loopback


@contextlib.contextmanager
def serving(
    cluster: Cluster, tmp_path: Path, obj: dict[str, Any], v1: Path, v2: Path
) -> Iterator[Serving]:
    """`obj` created, its variants served by real servers, its router a real process and
    Prometheus scraping it."""
    name = obj["metadata"]["name"]
    cluster.create(obj)
    with serve_model(v1, name) as server1, serve_model(v2, name) as server2:
        routes_file = tmp_path / "routes.json"
        loopback = Loopback(cluster, name, {"v1": server1.url, "v2": server2.url}, routes_file)
        for deployment in (f"{name}-v1", f"{name}-v2", name):
            cluster.wait_child("Deployment", deployment)
            cluster.set_ready(deployment)
        # The router is ready once some variant has weight.
        wait_for(
            lambda: any((cluster.routes(name) or {}).values()), "routes with weight", timeout=60
        )
        loopback.start()
        try:
            with (
                route(routes_file) as router,
                prometheus(tmp_path, router, cluster.namespace) as server,
            ):
                yield Serving(router, server.url, loopback)
        finally:
            loopback.close()


@contextlib.contextmanager
def users(router: RunningProcess, rows: list[list[float]] | None = None) -> Iterator[Traffic]:
    traffic = Traffic(router.url) if rows is None else Traffic(router.url, rows=rows)
    traffic.start()
    try:
        yield traffic
    finally:
        traffic.close()


def rollout(cluster: Cluster, name: str = "iris") -> dict[str, Any]:
    return dict((cluster.get(name).get("status") or {}).get("rollout") or {})


def wait_phase(
    cluster: Cluster, phase: str, generation: int, timeout: float = 120
) -> dict[str, Any]:
    status = cluster.wait_status(
        "iris",
        f"rollout of generation {generation} {phase}",
        lambda s: (
            (s.get("rollout") or {}).get("phase") == phase
            and s["rollout"].get("generation") == generation
        ),
        timeout=timeout,
    )
    return dict(status["rollout"])


def timeline(state: dict[str, Any]) -> str:
    """The decisions, one a line (printed by the tests: the closing note's timeline)."""
    lines = []
    for entry in state.get("history", []):
        weights = ",".join(f"{k}={v}" for k, v in entry["weights"].items())
        numbers = {
            k: {
                m: v[m]
                for m in ("requests", "errors", "errorRate", "p99LatencyMs", "probes")
                if m in v
            }
            for k, v in entry.get("numbers", {}).items()
            if isinstance(v, dict)
        }
        lines.append(
            f"{entry['time']} step {entry['step'] + 1} {entry['action']:<14} {weights:<12} "
            f"{json.dumps(numbers) if numbers else ''}"
        )
    return "\n".join(lines)


def printed_columns(cluster: Cluster, name: str) -> dict[str, Any]:
    """The row `kubectl get modeldeployment NAME` prints (the server-side Table)."""
    path = f"/apis/modeldeploy.dev/v1alpha1/namespaces/{cluster.namespace}/modeldeployments/{name}"
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    _, url, headers, _, _ = cluster.api.param_serialize(
        "GET", path, header_params=headers, auth_settings=["BearerToken"]
    )
    response = cluster.api.call_api("GET", url, header_params=headers)
    table = json.loads(response.read())  # type: ignore[no-untyped-call]
    names = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    return dict(zip(names, row["cells"], strict=True))


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def test_a_good_candidate_walks_every_step_and_is_promoted(
    cluster: Cluster, tmp_path: Path, models: Models
) -> None:
    with serving(cluster, tmp_path, rollout_spec(100, 0), models.good, models.candidate) as served:
        wait_phase(cluster, "Promoted", 1)
        cluster.wait_routes("iris", {"v1": 100, "v2": 0})
        with users(served.router) as traffic:
            cluster.apply(rollout_spec(0, 100, prometheus=served.prometheus_url))
            wait_phase(cluster, "Progressing", 2)
            cluster.wait_routes("iris", {"v1": 80, "v2": 20})
            # The spec's weights stay the destination: nobody rewrote them.
            spec = cluster.get("iris")["spec"]["variants"]
            assert [v["weight"] for v in spec] == [0, 100]
            cluster.wait_routes("iris", {"v1": 40, "v2": 60}, timeout=120)
            done = wait_phase(cluster, "Promoted", 2, timeout=180)
        cluster.wait_routes("iris", {"v1": 0, "v2": 100})
    print(f"\npromotion (answers {traffic.codes}):\n{timeline(done)}")
    passed = [e for e in done["history"] if e["action"] == "StepPassed"]
    assert [e["step"] for e in passed] == [0, 1]
    for entry in passed:
        assert entry["numbers"]["v2"]["requests"] >= 10
        assert entry["numbers"]["v2"]["errors"] == 0
    assert done["stableWeights"] == {"v1": 0, "v2": 100}
    status = cluster.get("iris")["status"]
    assert condition(status, "Degraded") == ("False", "AsExpected")
    assert set(traffic.codes) == {200}


# A candidate whose model fails (422 on each 1-row request) and one that is slow (about 100 ms of
# CPU a request, judged against a p99 bound of 30 ms).
BAD_CANDIDATES = {"failing": ("errorRate", 0.05, "error rate"), "slow": ("p99LatencyMs", 30, "p99")}


@pytest.mark.parametrize("kind", sorted(BAD_CANDIDATES))
def test_a_bad_candidate_is_rolled_back_within_one_window(
    cluster: Cluster, tmp_path: Path, models: Models, kind: str
) -> None:
    hold = 30
    metric, bound, words = BAD_CANDIDATES[kind]
    candidate = models.failing if kind == "failing" else models.slow
    with serving(cluster, tmp_path, rollout_spec(100, 0), models.good, candidate) as served:
        wait_phase(cluster, "Promoted", 1)
        with users(served.router):
            cluster.apply(
                rollout_spec(
                    0,
                    100,
                    holds=(hold, hold),
                    prometheus=served.prometheus_url,
                    p99_max_ms=30 if kind == "slow" else 5000,
                )
            )
            started = wait_phase(cluster, "Progressing", 2)
            back = wait_phase(cluster, "RolledBack", 2, timeout=90)
            cluster.wait_routes("iris", {"v1": 100, "v2": 0})
    print(f"\nrollback of the {kind} candidate:\n{timeline(back)}")
    decision = back["history"][-1]
    assert (decision["action"], decision["step"]) == ("RolledBack", 0)
    # Within the first step's window, on the candidate's own numbers.
    assert seconds(decision["time"]) - seconds(started["stepStartedAt"]) <= hold
    numbers = decision["numbers"]["v2"]
    assert numbers["requests"] >= 10 and numbers[metric] > bound, numbers
    assert back["weights"] == back["stableWeights"] == {"v1": 100, "v2": 0}
    status = cluster.get("iris")["status"]
    assert condition(status, "Degraded") == ("True", "RolledBack")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (
        words in degraded["message"] and f"requests={numbers['requests']}" in (degraded["message"])
    )
    assert [v["weight"] for v in cluster.get("iris")["spec"]["variants"]] == [0, 100]


def test_no_traffic_ends_inconclusive_and_holds_and_reapplying_changes_nothing(
    cluster: Cluster, tmp_path: Path, models: Models
) -> None:
    with serving(cluster, tmp_path, rollout_spec(100, 0), models.good, models.candidate) as served:
        wait_phase(cluster, "Promoted", 1)
        spec = rollout_spec(0, 100, holds=(3, 3), prometheus=served.prometheus_url)
        cluster.apply(spec)
        progressing = wait_phase(cluster, "Progressing", 2)
        # Re-applying the same YAML mid-rollout: same generation, same step, same window.
        cluster.apply(spec)
        assert cluster.get("iris")["metadata"]["generation"] == 2
        held = wait_phase(cluster, "Inconclusive", 2, timeout=60)
        assert held["startedAt"] == progressing["startedAt"]
        assert (held["step"], held["weights"]) == (0, {"v1": 80, "v2": 20})
        assert "fewer than 10 requests" in held["message"] and "policy hold" in held["message"]
        # It holds: windows come and go, the weights stay, nothing is promoted on silence.
        wait_for(
            lambda: sum(e["action"] == "Inconclusive" for e in rollout(cluster)["history"]) >= 2,
            "a second inconclusive window",
            timeout=60,
        )
        assert rollout(cluster)["phase"] == "Inconclusive"
        assert cluster.routes("iris") == {"v1": 80, "v2": 20}


def test_the_operator_killed_mid_rollout_resumes_at_the_same_step(
    cluster: Cluster, tmp_path: Path, models: Models
) -> None:
    with serving(cluster, tmp_path, rollout_spec(100, 0), models.good, models.candidate) as served:
        wait_phase(cluster, "Promoted", 1)
        with users(served.router):
            cluster.apply(rollout_spec(0, 100, holds=(6, 30), prometheus=served.prometheus_url))
            cluster.wait_status(
                "iris",
                "the second step",
                lambda s: (s.get("rollout") or {}).get("step") == 1,
                timeout=120,
            )
            cluster.operator.kill()
            before = rollout(cluster)
            offset = len(cluster.operator.log())
            cluster.operator.start()
            wait_for(
                lambda: "reconciled generation 2" in cluster.operator.log()[offset:],
                "a reconcile by the restarted operator",
                timeout=60,
            )
            # The restarted operator picks up where it was: the same rollout, step and weights
            # (the second step holds 30 s, longer than this takes on a quiet machine; on a
            # loaded one it may have passed on: then it was promoted from there, never restarted).
            after = rollout(cluster)
            assert after["startedAt"] == before["startedAt"]
            assert [e["action"] for e in after["history"]].count("Started") == 1
            if after["phase"] == "Progressing":
                assert (after["step"], after["weights"]) == (1, {"v1": 40, "v2": 60})
            wait_phase(cluster, "Promoted", 2, timeout=180)


def play_gate_pod(cluster: Cluster, job_name: str, loopback: Loopback, tmp_path: Path) -> int:
    """Play the Job controller and the kubelet for the gate Job (the test control plane runs
    neither): run the container's command here (the variant Services' URLs being the loopback
    servers), then create its pod from the Job's template with the exit code and the
    termination message in its status, as the kubelet would report them."""
    job = cluster.child("Job", job_name)
    assert job is not None
    template = job["spec"]["template"]
    (container,) = template["spec"]["containers"]
    services = {
        naming.variant_service_url("iris", v, cluster.namespace): url
        for v, url in loopback.servers.items()
    }
    message_path = tmp_path / "termination-log"
    args = [
        services.get(arg, str(message_path) if arg == "/dev/termination-log" else arg)
        for arg in container["args"]
    ]
    code = subprocess.run(
        [*server_command(), *args], check=False, timeout=120, capture_output=True
    ).returncode
    terminated = {"exitCode": code, "message": message_path.read_text(), "reason": "Completed"}
    status = {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [
            {
                "name": container["name"],
                "image": container["image"],
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    cluster.run_pod(f"{job_name}-0", template, status, labels={"job-name": job_name})
    return code


def gated_spec(v1: int, v2: int, models: Models, prometheus: str | None = None) -> dict[str, Any]:
    """rollout_spec with the real digests, v2 gated on the golden dataset (90% must agree)."""
    obj = rollout_spec(v1, v2, prometheus=prometheus)
    obj["spec"]["variants"][0]["model"]["sha256"] = models.good_sha256
    obj["spec"]["variants"][1]["gate"] = {
        "dataset": {"uri": models.golden.as_uri(), "sha256": models.golden_sha256},
        "outputs": ["label"],
        "minAgreement": 0.9,
    }
    return obj


@pytest.mark.parametrize("candidate", ["stump", "logreg"])
def test_a_candidate_gets_weight_only_once_its_gate_passed_for_its_digest(
    cluster: Cluster, tmp_path: Path, models: Models, candidate: str
) -> None:
    model, sha256 = {
        "stump": (models.candidate, models.candidate_sha256),
        "logreg": (models.good, models.good_sha256),
    }[candidate]
    first = gated_spec(100, 0, models)
    first["spec"]["variants"][1]["model"]["sha256"] = sha256
    with serving(cluster, tmp_path, first, models.good, model) as served:
        wait_phase(cluster, "Promoted", 1)
        second = gated_spec(0, 100, models, served.prometheus_url)
        second["spec"]["variants"][1]["model"]["sha256"] = sha256
        cluster.apply(second)
        gating = wait_phase(cluster, "Gating", 2)
        assert gating["pendingGates"] == ["v2"]
        job = f"iris-v2-gate-{sha256[:10]}"
        cluster.wait_child("Job", job)
        code = play_gate_pod(cluster, job, served.loopback, tmp_path)
        if candidate == "stump":
            assert code == 1
            back = wait_phase(cluster, "RolledBack", 2)
            assert back["reason"] == "GateFailed" and "rows agree" in back["message"]
            status = cluster.get("iris")["status"]
            assert condition(status, "Degraded") == ("True", "RolledBack")
        else:
            assert code == 0
            wait_phase(cluster, "Progressing", 2)
            cluster.wait_routes("iris", {"v1": 80, "v2": 20})
    routed = served.loopback.routed
    print(f"\ngate of the {candidate}: splits routed {routed}")
    if candidate == "stump":
        # It never got any weight.
        assert routed and all(split["v2"] == 0 for split in routed)


@dataclass
class ProbePlayer(Background):
    """Plays the Job controller and the kubelet for the probe Jobs: runs each new probe Job's
    container command here (the router Service's URL being the loopback router) as it appears,
    one at a time, stopped when its Job is deleted or the player is closed."""

    cluster: Cluster
    router_url: str
    played: list[str] = field(default_factory=list)

    def jobs(self) -> list[dict[str, Any]]:
        selector = f"{naming.COMPONENT}={naming.COMPONENT_PROBE}"
        path = f"/apis/batch/v1/namespaces/{self.cluster.namespace}/jobs?labelSelector={selector}"
        answer = self.cluster.request("GET", path) or {}
        return list(answer.get("items", []))

    def run(self) -> None:
        service = naming.router_url("iris", self.cluster.namespace)
        while not self.stop.wait(0.5):
            with contextlib.suppress(Exception):  # the API server may be busy: next round
                for job in self.jobs():
                    name = job["metadata"]["name"]
                    if name in self.played:
                        continue
                    self.played.append(name)
                    (container,) = job["spec"]["template"]["spec"]["containers"]
                    args = [self.router_url if a == service else a for a in container["args"]]
                    process = subprocess.Popen(
                        [*server_command(), *args],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    try:
                        # Until it ends, or the Job is deleted (pruned once its window is over).
                        while process.poll() is None and not self.stop.wait(1):
                            if self.cluster.child("Job", name) is None:
                                break
                    finally:
                        stop(process)


def test_low_traffic_with_probes_decides_on_the_probe_samples(
    cluster: Cluster, tmp_path: Path, models: Models
) -> None:
    """No user at all: each step's first look finds the candidate behind the pace of minSamples,
    probe traffic (the golden dataset's rows, through the router, counted apart) runs for the
    rest of the window, and the steps are judged on the probe samples: promoted."""
    first = gated_spec(100, 0, models)
    first["spec"]["variants"][1]["model"]["sha256"] = models.good_sha256
    with serving(cluster, tmp_path, first, models.good, models.good) as served:
        wait_phase(cluster, "Promoted", 1)
        second = gated_spec(0, 100, models, served.prometheus_url)
        second["spec"]["variants"][1]["model"]["sha256"] = models.good_sha256
        second["spec"]["rollout"]["steps"] = [
            {"percent": 20, "holdSeconds": 20},
            {"percent": 60, "holdSeconds": 20},
        ]
        second["spec"]["rollout"]["probes"] = {"requestsPerSecond": 10}
        cluster.apply(second)
        wait_phase(cluster, "Gating", 2)
        job = f"iris-v2-gate-{models.good_sha256[:10]}"
        cluster.wait_child("Job", job)
        assert play_gate_pod(cluster, job, served.loopback, tmp_path) == 0
        player = ProbePlayer(cluster, served.router.url)
        player.start()
        try:
            done = wait_phase(cluster, "Promoted", 2, timeout=240)
        finally:
            player.close()
        metrics = httpx.get(f"{served.router.url}/metrics", timeout=10).text
    print(f"\nprobes (Jobs played {player.played}):\n{timeline(done)}")
    actions = [(e["action"], e["step"]) for e in done["history"] if e["time"] >= done["startedAt"]]
    assert ("ProbesStarted", 0) in actions and ("ProbesStarted", 1) in actions
    assert len(player.played) >= 2
    passed = [e for e in done["history"] if e["action"] == "StepPassed"]
    assert [e["step"] for e in passed] == [0, 1]
    for entry in passed:
        v2 = entry["numbers"]["v2"]
        # No user request at all: decided on the probe samples alone.
        assert v2["requests"] == 0 and v2["probes"]["requests"] >= 10, v2
        assert v2["probes"]["errors"] == 0
    # The router kept them apart: no user request counted for either variant.
    assert 'modeldeploy_router_requests_total{code="200",variant="v2"}' not in metrics
    assert 'modeldeploy_router_probe_requests_total{code="200",variant="v2"}' in metrics


def test_the_cli_pauses_resumes_and_aborts_by_annotation(
    control_plane: ControlPlane, cluster: Cluster
) -> None:
    gated = rollout_spec(100, 0)
    cluster.create(gated)
    wait_phase(cluster, "Promoted", 1)
    gated = rollout_spec(0, 100)
    gated["spec"]["variants"][1]["gate"] = {
        "dataset": {"uri": "https://data.example/golden.csv", "sha256": "c" * 64}
    }
    cluster.apply(gated)
    wait_phase(cluster, "Gating", 2)
    base = ["rollout", "--kubeconfig", str(control_plane.kubeconfig_path), "-n", cluster.namespace]

    def modeldeploy(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*base[:1], *args, *base[1:]])
        return code, out.getvalue() + err.getvalue()

    code, text = modeldeploy("pause", "iris")
    assert code == 0, text
    assert "Paused" in text
    value = cluster.get("iris")["metadata"]["annotations"][COMMAND_ANNOTATION]
    assert value.startswith("pause@") and rollout(cluster)["command"] == value
    code, text = modeldeploy("status", "iris")
    assert code == 0 and "Paused (generation 2, step 1)" in text
    code, text = modeldeploy("resume", "iris")
    assert code == 0 and "Gating" in text, text
    code, text = modeldeploy("abort", "iris")
    assert code == 0 and "RolledBack" in text, text
    status = cluster.get("iris")["status"]
    assert condition(status, "Degraded") == ("True", "RolledBack")
    # The printer column, as `kubectl get` shows it.
    assert printed_columns(cluster, "iris")["Rollout"] == "RolledBack"
    code, text = modeldeploy("pause", "nothere")
    assert code == 1 and "404" in text


def answers(model: Path, rows: Any) -> tuple[Any, Any]:
    """onnxruntime's own labels and each row's argmax of the probabilities."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": rows})
    return label, np.argmax(probabilities, axis=1)


@pytest.mark.parametrize("candidate", ["stump", "logreg"])
def test_a_shadow_step_judges_the_candidate_on_its_disagreement_before_any_weight(
    cluster: Cluster, tmp_path: Path, models: Models, candidate: str
) -> None:
    """The candidate is mirrored every user request (answering none) and compared with the
    stable logistic regression by the router: the stump, which onnxruntime itself says disagrees
    on about a third of the iris rows, is rolled back without ever getting weight; the same
    model as the stable one agrees on every request and goes on to its first weighted step."""
    model = {"stump": models.candidate, "logreg": models.good}[candidate]
    rows = build_iris_logreg(tmp_path).features[np.random.default_rng(0).permutation(150)]
    (stable_label, stable_top), (label, top) = answers(models.good, rows), answers(model, rows)
    expected = float(np.mean((stable_label != label) | (stable_top != top)))

    def spec(v1: int, v2: int, prometheus: str | None = None) -> dict[str, Any]:
        obj = rollout_spec(v1, v2, min_samples=50, prometheus=prometheus)
        obj["spec"]["rollout"]["analysis"]["shadowDisagreement"] = {"max": 0.1}
        # Tolerance 1: probabilities agree unless their argmax differs (labels: exactly).
        obj["spec"]["rollout"]["shadow"] = {"percent": 100, "holdSeconds": 15, "tolerance": 1.0}
        return obj

    with serving(cluster, tmp_path, spec(100, 0), models.good, model) as served:
        wait_phase(cluster, "Promoted", 1)
        with users(served.router, rows=rows.tolist()):
            cluster.apply(spec(0, 100, served.prometheus_url))
            wait_phase(cluster, "Shadowing", 2)
            if candidate == "stump":
                done = wait_phase(cluster, "RolledBack", 2, timeout=120)
            else:
                table = cluster.child("RouteTable", naming.route_table_name("iris"))
                assert table is not None
                mirrored = table["spec"]["routes"]["shadow"]
                assert (mirrored["variant"], mirrored["percent"]) == ("v2", 100)
                done = wait_phase(cluster, "Progressing", 2, timeout=120)
                cluster.wait_routes("iris", {"v1": 80, "v2": 20})
    numbers = next(e for e in done["history"] if e["action"] in ("RolledBack", "ShadowPassed"))
    v2 = numbers["numbers"]["v2"]
    seen = v2["shadowDisagreed"] / v2["shadowCompared"]
    print(f"\nshadow step of the {candidate} (onnxruntime: {expected:.3f} of the rows disagree):")
    print(f"{timeline(done)}\nrouter: {v2['shadowDisagreed']}/{v2['shadowCompared']} disagree")
    assert v2["shadowCompared"] >= 50 and v2["requests"] == 0
    routed = served.loopback.routed
    if candidate == "stump":
        assert expected > 0.3 and seen > 0.1
        assert numbers["action"] == "RolledBack" and "shadow disagreement" in numbers["message"]
        # It never got any weight.
        assert routed and all(split["v2"] == 0 for split in routed)
    else:
        assert expected == 0.0 and v2["shadowDisagreed"] == 0
        assert numbers["action"] == "ShadowPassed"
