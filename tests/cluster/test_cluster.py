"""The product on a real single-node cluster (tests/cluster): our images built from the
Dockerfiles, installed as the README says, real pods, real requests through the router's ClusterIP
Service (kube-proxy) from this host.

The tests run in file order and share one installation and one `iris` ModelDeployment; each test
leaves iris as examples/iris.yaml has it, and the last test uninstalls.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modeldeploy_operator.render import MODEL_SOURCE_DIR
from modeldeploy_operator.spec import EXAMPLE_ANNOTATION
from modeldeploy_server.upstream import IDLE_TIMEOUT_S
from tests.cluster.cluster import NODE_IP
from tests.cluster.conftest import MEASURED, REPO_ROOT, Cluster
from tests.controlplane.harness import expected_binaries, start_prometheus
from tests.models import write_graph
from tests.processes import server_command, stop
from tests.router.test_router import metric, requests_answered, within_binomial

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

NAMESPACE = "modeldeploy-e2e"
SYSTEM_NAMESPACE = "modeldeploy-system"
EXAMPLE = REPO_ROOT / "examples" / "iris.yaml"
MODELS = REPO_ROOT / "examples" / "models"
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
# Rows from the iris data set (setosa, versicolor, virginica and the row where v1 and v2 disagree).
ROWS = [
    [5.1, 3.5, 1.4, 0.2],
    [4.9, 3.0, 1.4, 0.2],
    [7.0, 3.2, 4.7, 1.4],
    [6.4, 3.2, 4.5, 1.5],
    [6.3, 3.3, 6.0, 2.5],
    [5.8, 2.7, 5.1, 1.9],
    [6.7, 3.0, 5.0, 1.7],
    [5.9, 3.0, 5.1, 1.8],
]
READY_TIMEOUT_S = 300.0
# A split check passes when the count is within this many standard deviations of the expected
# count: the chance that a correct 90/10 router fails it is below 1e-5.
BINOMIAL_SIGMAS = 4.5


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def poll(condition: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval)


def v2_body(rows: list[list[float]]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "shape": [len(rows), 1],
                "datatype": "FP32",
                "data": [r[i] for r in rows],
            }
            for i, name in enumerate(FEATURES)
        ]
    }


def reference(model: Path, rows: list[list[float]]) -> tuple[list[int], np.ndarray[Any, Any]]:
    """onnxruntime's labels and probabilities for `rows`, computed here."""
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {
        name: np.array([[r[i]] for r in rows], dtype=np.float32) for i, name in enumerate(FEATURES)
    }
    labels, probabilities = session.run(["label", "probabilities"], feeds)
    return [int(x) for x in labels], np.asarray(probabilities, dtype=np.float64)


# --- the ModelDeployment as a user edits it -------------------------------------------------------


def example_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def iris_document(
    weights: tuple[int, int] | None = None, v2_model: tuple[str, str] | None = None
) -> dict[str, Any]:
    """examples/iris.yaml with other weights (v1, v2) or another v2 model (uri, sha256)."""
    document = example_document()
    v1, v2 = document["spec"]["variants"]
    if weights is not None:
        v1["weight"], v2["weight"] = weights
    if v2_model is not None:
        v2["model"] = {"uri": v2_model[0], "sha256": v2_model[1]}
    return document


def condition(md: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in md.get("status", {}).get("conditions", []):
        if item["type"] == type_:
            return dict(item)
    return {}


def is_ready(md: dict[str, Any]) -> bool:
    return (
        condition(md, "Ready").get("status") == "True"
        and md.get("status", {}).get("observedGeneration") == md["metadata"]["generation"]
    )


def is_settled(md: dict[str, Any]) -> bool:
    """Ready, and no rollout in progress (old pods gone), for the current generation."""
    generation = md["metadata"].get("generation")
    return (
        md.get("status", {}).get("observedGeneration") == generation
        and is_ready(md)
        and condition(md, "Progressing").get("status") == "False"
    )


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Answer:
    started: float
    status: int  # 0: no HTTP answer (connection error or timeout)
    variant: str | None
    sha256: str | None
    error: str = ""


@dataclass
class Load:
    """`concurrency` clients sending v2 requests in a loop until stopped (bounded in time)."""

    url: str
    concurrency: int = 8
    headers: dict[str, str] = field(default_factory=dict)
    max_seconds: float = 240.0
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.concurrency):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self) -> None:
        body = v2_body(ROWS[:1])
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.answers.append(send(client, self.url, body, self.headers))

    def failures(self) -> list[Answer]:
        return [a for a in list(self.answers) if a.status != 200]

    def since(self, start: float, until: float = math.inf) -> list[Answer]:
        return [a for a in list(self.answers) if start <= a.started < until]


def send(
    client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Answer:
    started = time.monotonic()
    try:
        response = client.post(f"{url}/v2/models/iris/infer", json=body, headers=headers)
    except httpx.HTTPError as error:
        return Answer(started, 0, None, None, repr(error))
    return Answer(
        started,
        response.status_code,
        response.headers.get("x-model-variant"),
        response.headers.get("x-model-sha256"),
        "" if response.status_code == 200 else response.text[:200],
    )


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(real_cluster: Cluster, overlay: Path) -> Cluster:
    """`kubectl apply -k` of manifests/ through a kustomize overlay that sets the images."""
    real_cluster.kubectl("apply", "-k", str(overlay))
    return real_cluster


@pytest.fixture(scope="module")
def models_pvc(installed: Cluster) -> Cluster:
    """Namespace enforcing Pod Security `restricted`, and the claim `models` that
    examples/iris.yaml reads (a static hostPath PersistentVolume holding the example models)."""
    for model in MODELS.glob("*.onnx"):
        shutil.copyfile(model, installed.models_dir / model.name)
    # A second file with v1's content: a new URI and sha256 for v2 in the model-change test.
    shutil.copyfile(MODELS / "iris-v1.onnx", installed.models_dir / "iris-v1-copy.onnx")
    for path in installed.models_dir.iterdir():
        path.chmod(0o644)
    # A namespace left by an earlier session on a kept cluster would hide a first rollout.
    installed.kubectl(
        "delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=180s", timeout=200
    )
    installed.kubectl("delete", "persistentvolume", "modeldeploy-models", "--ignore-not-found")
    installed.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": NAMESPACE,
                    "labels": {
                        "pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/enforce-version": "latest",
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": "modeldeploy-models"},
                "spec": {
                    "capacity": {"storage": "16Mi"},
                    "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(installed.models_dir), "type": "Directory"},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "models", "namespace": NAMESPACE},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": "modeldeploy-models",
                    "resources": {"requests": {"storage": "16Mi"}},
                },
            },
        ]
    )
    return installed


@dataclass
class Iris:
    cluster: Cluster
    url: str  # the router's ClusterIP Service, reached from this host through kube-proxy

    def md(self, name: str = "iris") -> dict[str, Any]:
        document: dict[str, Any] = self.cluster.get("-n", NAMESPACE, "modeldeployment", name)
        return document

    def apply(self, document: dict[str, Any]) -> None:
        self.cluster.apply([document], NAMESPACE)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            md = self.md()
            return md if is_ready(md) else None

        found: dict[str, Any] = poll(ready, timeout_s, "iris Ready=True", interval=0.1)
        return found

    def wait_settled(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        poll(lambda: is_settled(self.md()), timeout_s, "iris Ready with no rollout in progress")

    def wait_servable(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until 20 requests in a row are answered (whatever the status said meanwhile)."""
        with httpx.Client(timeout=10) as client:
            poll(
                lambda: all(
                    send(client, self.url, v2_body(ROWS[:1])).status == 200 for _ in range(20)
                ),
                timeout_s,
                "iris to serve",
                interval=1,
            )

    def restore(self) -> None:
        self.apply(example_document())
        self.wait_settled()
        self.wait_servable()


@pytest.fixture(scope="module")
def iris_applied(models_pvc: Cluster) -> Iris:
    """examples/iris.yaml applied as a user would, once the operator is running."""
    wait_operator_available(models_pvc)
    models_pvc.kubectl("-n", NAMESPACE, "apply", "-f", str(EXAMPLE))
    service = poll(lambda: _service(models_pvc, "iris"), READY_TIMEOUT_S, "Service iris")
    return Iris(models_pvc, f"http://{service['spec']['clusterIP']}:80")


@pytest.fixture
def iris(iris_applied: Iris) -> Iris:
    """iris, Ready and serving: each test below checks its own claim, not the Ready one."""
    iris_applied.wait_settled()
    iris_applied.wait_servable()
    return iris_applied


@pytest.fixture
def edited_iris(iris: Iris) -> Iterator[Iris]:
    """iris for a test that edits it; afterwards it is back to examples/iris.yaml, settled and
    serving, whether the test passed or not."""
    try:
        yield iris
    finally:
        iris.restore()


def _service(cluster: Cluster, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl(
        "-n", NAMESPACE, "get", "service", name, "-o", "json", "--ignore-not-found"
    )
    return yaml.safe_load(out) if out.strip() else None


def operator_pods(cluster: Cluster) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.get(
        "-n", SYSTEM_NAMESPACE, "pods", "-l", "app.kubernetes.io/name=modeldeploy-operator"
    )["items"]
    return pods


def wait_operator_available(cluster: Cluster) -> None:
    cluster.kubectl(
        "-n",
        SYSTEM_NAMESPACE,
        "rollout",
        "status",
        "deployment/modeldeploy-operator",
        "--timeout=240s",
        timeout=260,
    )


# --- the tests ------------------------------------------------------------------------------------


def test_operator_runs_in_its_own_pod_from_its_image(installed: Cluster) -> None:
    """The operator's image starts and stays up as uid 65532 under `restricted` (it used to
    crash-loop: kopf calls getpass.getuser(), and that uid had no passwd entry)."""
    poll(
        lambda: any(_ready(p) for p in operator_pods(installed)),
        240,
        "the operator pod to be Ready",
    )
    # A crash loop shows as restarts: watch the pod for longer than kopf's start-up.
    time.sleep(20)
    (pod,) = operator_pods(installed)
    (container,) = pod["status"]["containerStatuses"]
    assert container["image"].endswith(installed.images["OPERATOR_IMAGE"].split("/", 1)[1])
    assert container["restartCount"] == 0, installed.kubectl(
        "-n", SYSTEM_NAMESPACE, "logs", pod["metadata"]["name"], "--previous", check=False
    )
    assert container["ready"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
    assert env["MODELDEPLOY_SERVER_IMAGE"] == installed.images["SERVER_IMAGE"]


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def test_ready_means_served(iris_applied: Iris) -> None:
    """From the moment the ModelDeployment reports Ready=True, its URL serves: no 503 window."""
    iris = iris_applied
    md = iris.wait_ready()
    ready_at = time.monotonic()
    with httpx.Client(timeout=10) as client:
        answers = [send(client, iris.url, v2_body(ROWS[:1])) for _ in range(40)]
        # How long the window lasts, for the report (bounded: at most 60 s more).
        late = answers[:]
        while late[-1].status != 200 and time.monotonic() < ready_at + 60:
            late.append(send(client, iris.url, v2_body(ROWS[:1])))
            time.sleep(0.05)
    served = next((a.started for a in late if a.status == 200), None)
    failed = [a for a in late if a.status != 200]
    MEASURED.append(
        f"after Ready=True: {len(failed)} failed requests "
        f"({sorted({a.error[:60] for a in failed})}), first answer "
        + (f"{served - ready_at:.2f}s after Ready was seen" if served else "never (60 s)")
    )
    assert md["status"]["url"] == f"http://iris.{NAMESPACE}.svc"
    assert [a.status for a in answers] == [200] * len(answers), [
        (a.status, a.error) for a in answers if a.status != 200
    ]


def test_split_override_and_answers_equal_onnxruntime(iris: Iris) -> None:
    n = 2000
    with Load(iris.url, concurrency=8) as load:
        poll(lambda: len(load.answers) >= n, 300, f"{n} answers", interval=0.2)
    answers = load.answers[:n]
    assert not [a for a in answers if a.status != 200]
    v2 = sum(a.variant == "v2" for a in answers)
    assert sum(a.variant == "v1" for a in answers) + v2 == n
    by_pod = router_pod_split(iris.cluster)
    MEASURED.append(
        f"split 90/10: v2 answered {v2} of {n}; router pods since they started {by_pod}"
    )
    assert within_binomial(v2, n, 0.10, BINOMIAL_SIGMAS), (
        f"v2 answered {v2} of {n}, expected about {n // 10}"
    )

    with httpx.Client(timeout=10) as client:
        for variant, model in (("v1", "iris-v1.onnx"), ("v2", "iris-v2.onnx")):
            pinned = {"x-model-variant": variant}
            labels, probabilities = reference(MODELS / model, ROWS)
            answers = [send(client, iris.url, v2_body(ROWS), pinned) for _ in range(20)]
            assert {a.variant for a in answers} == {variant}
            assert {a.sha256 for a in answers} == {sha256_of(MODELS / model)}

            v2_json = client.post(
                f"{iris.url}/v2/models/iris/infer", json=v2_body(ROWS), headers=pinned
            ).json()
            outputs = {o["name"]: o for o in v2_json["outputs"]}
            assert outputs["label"]["data"] == labels
            np.testing.assert_allclose(
                np.reshape(outputs["probabilities"]["data"], (len(ROWS), 3)),
                probabilities,
                rtol=1e-6,
            )

            records = client.post(
                f"{iris.url}/v1/models/iris:predict",
                headers=pinned,
                json={"instances": [dict(zip(FEATURES, r, strict=True)) for r in ROWS]},
            ).json()["predictions"]
            assert [p["label"] for p in records] == labels
            np.testing.assert_allclose(
                [p["probabilities"] for p in records], probabilities, rtol=1e-6
            )

            body = ",".join(FEATURES) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in ROWS)
            text = client.post(
                f"{iris.url}/v1/models/iris:predict",
                content=body.encode(),
                headers={**pinned, "content-type": "text/csv", "accept": "text/csv"},
            ).text
            table = list(csv.DictReader(io.StringIO(text)))
            assert [int(row["label"]) for row in table] == labels
            np.testing.assert_allclose(
                [[float(row[f"probabilities_{k}"]) for k in range(3)] for row in table],
                probabilities,
                rtol=1e-6,
            )


def test_weight_change_by_apply_shows_within_5s_without_failures(edited_iris: Iris) -> None:
    """GitOps style: `kubectl apply` of new weights. Every request sent 5 s after the apply
    returned follows the new split, and none fails under steady load (c=8) meanwhile."""
    iris = edited_iris
    with Load(iris.url, concurrency=8) as load:
        poll(lambda: len(load.answers) >= 200, 120, "load to start", interval=0.2)
        iris.apply(iris_document(weights=(50, 50)))
        applied = time.monotonic()
        window_start = applied + 5.0
        poll(
            lambda: len(load.since(window_start)) >= 400,
            120,
            "400 answers after the 5 s",
            interval=0.2,
        )
    after = load.since(window_start)
    v2 = sum(a.variant == "v2" for a in after)
    MEASURED.append(f"weight change by apply: {_first_new_split(load, applied)}")
    assert not load.failures(), [(a.status, a.error) for a in load.failures()[:10]]
    assert within_binomial(v2, len(after), 0.5, BINOMIAL_SIGMAS), (
        f"{v2} of {len(after)} requests sent 5 s or more after the apply went to v2; "
        f"50/50 expected ({_first_new_split(load, applied)})"
    )


def _first_new_split(load: Load, applied: float) -> str:
    """When the observed split changed: the first v2 share >= 30% in a 1 s window."""
    answers = load.since(applied)
    for second in range(int((answers[-1].started - applied) if answers else 0)):
        window = [a for a in answers if applied + second <= a.started < applied + second + 1]
        if window and sum(a.variant == "v2" for a in window) / len(window) >= 0.3:
            return f"the split first changed {second}-{second + 1} s after the apply"
    return "the split never changed while measured"


def test_model_change_rolls_without_failures(edited_iris: Iris) -> None:
    """A new URI and sha256 for v2 rolls its pods; no request fails under load (c=8)."""
    iris = edited_iris
    new_sha = sha256_of(MODELS / "iris-v1.onnx")
    with Load(iris.url, concurrency=8) as load:
        poll(lambda: len(load.answers) >= 100, 120, "load to start", interval=0.2)
        iris.apply(iris_document(v2_model=("pvc://models/iris-v1-copy.onnx", new_sha)))
        poll(lambda: _v2_serves(iris, new_sha), READY_TIMEOUT_S, "v2 serving the new model")
        iris.wait_settled()
        settled = len(load.answers)
        poll(lambda: len(load.answers) >= settled + 100, 60, "load after the rollout")
    assert not load.failures(), [(a.status, a.error) for a in load.failures()[:10]]


def _v2_serves(iris: Iris, sha256: str) -> bool:
    with httpx.Client(timeout=10) as client:
        answers = [
            send(client, iris.url, v2_body(ROWS[:1]), {"x-model-variant": "v2"}) for _ in range(10)
        ]
    return all(a.status == 200 and a.sha256 == sha256 for a in answers)


# --- rollouts judged on Prometheus scraping the pods ---------------------------------------------

SCRAPE_CONFIG = REPO_ROOT / "examples" / "prometheus" / "scrape.yaml"
ROLLOUT_TIMEOUT_S = 420.0
ENTERED = (
    "GatesPassed",
    "StepStarted",
    "Promoted",
)  # the history's actions that change the routed weights


@dataclass
class ClusterPrometheus:
    url: str  # on the node's address: the operator's pod reaches it there
    process: subprocess.Popen[bytes]

    def series(self, promql: str) -> list[dict[str, Any]]:
        try:
            answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
            result: list[dict[str, Any]] = answer.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            return []
        return result


@pytest.fixture
def prometheus(installed: Cluster, tmp_path: Path) -> Iterator[ClusterPrometheus]:
    """A real Prometheus on this host (the node) with the scrape job of
    examples/prometheus/scrape.yaml, finding the pods through the API server as an in-cluster
    Prometheus would; only where to find the API server is added."""
    binary = expected_binaries().prometheus
    if not binary.exists():
        message = f"{binary} is missing: run tests/controlplane/build.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for discovery in job["kubernetes_sd_configs"]:
            discovery["kubeconfig_file"] = str(installed.kubeconfig)
            discovery["namespaces"] = {"names": [NAMESPACE]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    process, url = start_prometheus(tmp_path / "prometheus.yml", tmp_path, NODE_IP)
    server = ClusterPrometheus(url, process)
    try:
        yield server
    finally:
        stop(process, timeout_s=30)


def rollout_document(
    prometheus: ClusterPrometheus, weights: tuple[int, int], v2_model: tuple[str, str] | None = None
) -> dict[str, Any]:
    """iris towards `weights` in two steps (30% and 70% of the way, 30 s each), judged every 5 s
    on the Prometheus numbers: at most 1% errors and a p99 under 2 s, from 50 requests on."""
    document = iris_document(weights=weights, v2_model=v2_model)
    document["spec"]["rollout"] = {
        "steps": [{"percent": 30, "holdSeconds": 30}, {"percent": 70, "holdSeconds": 30}],
        "analysis": {
            "errorRate": {"max": 0.01},
            "p99LatencyMs": {"max": 2000},
            "prometheus": {"url": prometheus.url},
        },
        "minSamples": 50,
        "intervalSeconds": 5,
    }
    return document


def wait_scraped(prometheus: ClusterPrometheus) -> None:
    """Until Prometheus has the routers' series with the labels rollouts query by."""
    routes = f'modeldeploy_router_routes_info{{namespace="{NAMESPACE}",modeldeployment="iris"}}'
    poll(lambda: prometheus.series(routes), 180, "Prometheus scraping iris' routers", interval=1)


def rollout_phase(md: dict[str, Any], *phases: str) -> dict[str, Any] | None:
    rollout = md.get("status", {}).get("rollout", {})
    done = rollout.get("generation") == md["metadata"]["generation"]
    return md if done and rollout.get("phase") in phases else None


def roll_out_under_load(
    iris: Iris, document: dict[str, Any]
) -> tuple[dict[str, Any], Load, float, float]:
    """`document` applied under load (c=8 through the Service) until its rollout ended
    (Promoted or RolledBack) and 200 answers more: the ModelDeployment then, the load, when the
    apply was sent and when the end was seen."""
    with Load(iris.url, concurrency=8, max_seconds=ROLLOUT_TIMEOUT_S + 120) as load:
        poll(lambda: len(load.answers) >= 200, 120, "load to start", interval=0.2)
        started = time.monotonic()
        iris.apply(document)
        md = poll(
            lambda: rollout_phase(iris.md(), "Promoted", "RolledBack"),
            ROLLOUT_TIMEOUT_S,
            "the rollout to end",
            interval=1,
        )
        ended = time.monotonic()
        poll(lambda: len(load.since(ended + 5)) >= 200, 120, "load after the rollout's end")
    return md, load, started, ended


def timeline(rollout: dict[str, Any]) -> str:
    """The decisions with their weights and the candidate's numbers, for the closing note."""
    lines = []
    for decision in rollout["history"]:
        numbers = decision.get("numbers", {})
        v2 = numbers.get("v2") or {}
        seen = (
            f" (v2 {v2.get('requests')} requests, {v2.get('errors')} errors, "
            f"p99 {v2.get('p99LatencyMs')} ms; stable {numbers['stable'].get('requests')})"
            if v2
            else ""
        )
        weights = "/".join(str(w) for w in decision["weights"].values())
        lines.append(
            f"{decision['time']} step {decision['step']} {decision['action']} {weights}{seen}"
        )
    return "; ".join(lines)


def test_rollout_walks_its_steps_on_prometheus_and_no_request_fails(
    edited_iris: Iris, prometheus: ClusterPrometheus
) -> None:
    """`spec.rollout` from 90/10 to 0/100: the operator (in its pod) reads the Prometheus that
    scrapes the routers' pods, walks the routes through both steps on real traffic and promotes;
    no request of the load (c=8, through the Service) fails meanwhile, and afterwards v2 answers
    everything."""
    iris = edited_iris
    wait_scraped(prometheus)
    md, load, _, ended = roll_out_under_load(iris, rollout_document(prometheus, (0, 100)))
    rollout = md["status"]["rollout"]
    MEASURED.append(f"rollout 90/10 -> 0/100 on Prometheus: {timeline(rollout)}")
    assert rollout["phase"] == "Promoted", rollout
    assert not load.failures(), [(a.status, a.error) for a in load.failures()[:10]]
    walked = [d["weights"] for d in rollout["history"] if d["action"] in ENTERED]
    assert walked == [{"v1": 63, "v2": 37}, {"v1": 27, "v2": 73}, {"v1": 0, "v2": 100}], walked
    passed = [d for d in rollout["history"] if d["action"] == "StepPassed"]
    assert len(passed) == 2, rollout["history"]
    for decision in passed:  # each step judged on real v2 traffic, counted by Prometheus
        assert decision["numbers"]["v2"]["requests"] >= 50, decision
        assert decision["numbers"]["v2"]["errors"] == 0, decision
    assert {a.variant for a in load.since(ended + 5)} == {"v2"}


def build_failing_iris(directory: Path) -> Path:
    """iris' four inputs, but its Reshape of the row to [3, -1] fails on one row (4 values): the
    server answers each 1-row request 422, the model's failure."""
    shape = onnx.helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [3, -1])
    nodes = [
        onnx.helper.make_node("Concat", list(FEATURES), ["row"], axis=1),
        onnx.helper.make_node("Constant", [], ["shape"], value=shape),
        onnx.helper.make_node("Reshape", ["row", "shape"], ["label"]),
    ]
    return write_graph(
        directory,
        "iris-failing",
        nodes,
        {name: (onnx.TensorProto.FLOAT, [None, 1]) for name in FEATURES},
        {"label": (onnx.TensorProto.FLOAT, [3, None])},
    )


def without_example(document: dict[str, Any]) -> dict[str, Any]:
    """`document` without its example instance: the servers warm up on a synthetic request, which
    a model may refuse and still serve (an example it refuses would stop it from starting)."""
    document["metadata"].get("annotations", {}).pop(EXAMPLE_ANNOTATION, None)
    return document


def test_rollout_of_a_failing_candidate_rolls_back_within_one_window(
    edited_iris: Iris, prometheus: ClusterPrometheus
) -> None:
    """v2 serves a model that fails every 1-row request, first at weight 0; then a rollout to
    50/50: the first step's window shows v2's errors through Prometheus, the operator rolls back to
    100/0 (Degraded, reason RolledBack, with the numbers), and then every request succeeds on v1."""
    iris = edited_iris
    failing = build_failing_iris(iris.cluster.models_dir)
    failing.chmod(0o644)
    v2_model = ("pvc://models/iris-failing.onnx", sha256_of(failing))
    at_zero = without_example(iris_document(weights=(100, 0), v2_model=v2_model))
    iris.apply(at_zero)
    iris.wait_settled()
    wait_scraped(prometheus)
    document = without_example(rollout_document(prometheus, (50, 50), v2_model))
    md, load, started, ended = roll_out_under_load(iris, document)
    rollout = md["status"]["rollout"]
    MEASURED.append(
        f"rollback of a failing v2 ({ended - started:.0f} s from the apply): {timeline(rollout)}"
    )
    assert rollout["phase"] == "RolledBack", rollout
    assert rollout["weights"] == {"v1": 100, "v2": 0}, rollout
    degraded = condition(md, "Degraded")
    assert (degraded.get("status"), degraded.get("reason")) == ("True", "RolledBack"), degraded
    rolled_back = rollout["history"][-1]
    assert rolled_back["action"] == "RolledBack" and rolled_back["step"] == 0, rolled_back
    assert rolled_back["numbers"]["v2"]["errors"] > 0, rolled_back
    failed = load.failures()
    assert failed, "the failing candidate answered every request it was sent"
    assert {(a.status, a.variant) for a in failed} == {(422, "v2")}, failed[:10]
    after = load.since(ended + 5)
    assert {(a.status, a.variant) for a in after} == {(200, "v1")}, after[:10]


def window_begun(md: dict[str, Any]) -> dict[str, Any] | None:
    """`md` once its rollout's step window has begun with the routers' counters kept."""
    found = rollout_phase(md, "Progressing")
    return found if found and "baseline" in found["status"]["rollout"] else None


def test_rollout_on_the_routers_own_metrics_counts_its_window_across_an_operator_restart(
    edited_iris: Iris,
) -> None:
    """Without Prometheus the operator scrapes the routers' pods itself. Its pod is deleted late
    in the step's window; the new operator counts the window from its start (the counters kept in
    `status.rollout.baseline`), not from its own first scrape: the step passes on at least the v2
    answers the load saw before the kill, and no request fails."""
    iris = edited_iris
    document = iris_document(weights=(0, 100))
    document["spec"]["rollout"] = {
        "steps": [{"percent": 50, "holdSeconds": 45}],
        "analysis": {"errorRate": {"max": 0.01}, "p99LatencyMs": {"max": 2000}},
        "minSamples": 50,
        "intervalSeconds": 5,
    }
    old_operator = {pod["metadata"]["name"] for pod in operator_pods(iris.cluster)}
    with Load(iris.url, concurrency=8, max_seconds=ROLLOUT_TIMEOUT_S + 120) as load:
        poll(lambda: len(load.answers) >= 200, 120, "load to start", interval=0.2)
        iris.apply(document)
        poll(lambda: window_begun(iris.md()), 120, "the step's window to begin", interval=0.2)
        began = time.monotonic()
        # Late in the 45 s window: most of its answers come before the kill.
        poll(lambda: time.monotonic() - began >= 25, 60, "25 s of the window", interval=1)
        killed = time.monotonic()
        for name in old_operator:
            iris.cluster.kubectl("-n", SYSTEM_NAMESPACE, "delete", "pod", name, "--wait=false")
        md = poll(
            lambda: rollout_phase(iris.md(), "Promoted", "RolledBack", "Inconclusive"),
            ROLLOUT_TIMEOUT_S,
            "the rollout to be decided",
            interval=1,
        )
    before_kill = [a for a in load.since(began, killed) if a.variant == "v2"]
    rollout = md["status"]["rollout"]
    MEASURED.append(
        f"rollout on the routers' own metrics, operator killed 25 s into the window: "
        f"{len(before_kill)} v2 answers seen before the kill; {timeline(rollout)}"
    )
    assert rollout["phase"] == "Promoted", rollout
    assert not load.failures(), [(a.status, a.error) for a in load.failures()[:10]]
    decided = [d for d in rollout["history"] if d["action"] == "StepPassed"]
    assert len(decided) == 1, rollout["history"]
    assert decided[0]["numbers"]["v2"]["requests"] >= len(before_kill), decided[0]
    assert not old_operator & {pod["metadata"]["name"] for pod in operator_pods(iris.cluster)}


def router_metrics(cluster: Cluster) -> list[str]:
    """Each router pod's /metrics, read from its pod IP (this host routes to the pod network)."""
    pods = cluster.get(
        "-n", NAMESPACE, "pods", "-l", "modeldeploy.dev/model-deployment=iris,"
        "app.kubernetes.io/component=router",
    )["items"]  # fmt: skip
    return [
        httpx.get(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10).text
        for pod in pods
        if pod["status"].get("podIP")
    ]


ROUTER_COUNTS = {
    "modeldeploy_router_requests_total": "requests",
    "modeldeploy_router_retries_total": "retries",
}


def router_pod_split(cluster: Cluster) -> list[dict[str, float]]:
    """Per router pod: its weights, requests answered, and retries (to another variant after a
    failure), by variant."""
    rows = []
    for text in router_metrics(cluster):
        row: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                variant = sample.labels.get("variant")
                if sample.name == "modeldeploy_router_variant_weight":
                    row[f"weight {variant}"] = sample.value
                elif counted := ROUTER_COUNTS.get(sample.name):
                    key = f"{counted} {variant}"
                    row[key] = row.get(key, 0) + sample.value  # summed over status codes
        rows.append(row)
    return rows


def shadow_total(texts: list[str], kind: str) -> float:
    """A shadow counter of primary v1 and shadow v2, summed over the router pods."""
    name = f"modeldeploy_router_shadow_{kind}_total"
    return sum(metric(text, name, primary="v1", shadow="v2") for text in texts)


def settled_shadow_counts(cluster: Cluster) -> dict[str, float] | None:
    """The shadow counters summed over the router pods, once every copy offered so far has an
    outcome (compared, failed or dropped); None while some are still in the workers' hands."""
    texts = router_metrics(cluster)
    counts = {kind: shadow_total(texts, kind) for kind in SHADOW_KINDS}
    outcomes = sum(counts[kind] for kind in SHADOW_KINDS if kind != "requests")
    return counts if outcomes == counts["requests"] else None


def test_shadow_copies_are_compared_by_the_router_pods(edited_iris: Iris) -> None:
    """`routing.shadow` copies every request to v2 (weight 0). Users get only v1's answers; the
    shadow workers (processes of their own in the router pods, under the pods' restricted
    security) compare each copy, and their verdicts match what onnxruntime says of the two
    models: with tolerance 1, a row disagrees exactly when the labels differ."""
    iris = edited_iris
    document = iris_document(weights=(100, 0))
    document["spec"]["routing"]["shadow"] = {"variant": "v2", "percent": 100, "tolerance": 1}
    iris.apply(document)
    iris.wait_settled()
    iris.wait_servable()
    rows = ROWS * 25
    v1_labels, _ = reference(MODELS / "iris-v1.onnx", rows)
    v2_labels, _ = reference(MODELS / "iris-v2.onnx", rows)
    differing = sum(a != b for a, b in zip(v1_labels, v2_labels, strict=True))
    # The copies of the requests sent so far (wait_servable's) are all accounted for first.
    counted = poll(
        lambda: settled_shadow_counts(iris.cluster), 60, "earlier copies compared", interval=0.5
    )
    with httpx.Client(timeout=10) as client:
        answers = [send(client, iris.url, v2_body([row])) for row in rows]
    sent = time.monotonic()

    def compared() -> dict[str, float] | None:
        now = settled_shadow_counts(iris.cluster)
        if now is None or now["requests"] - counted["requests"] < len(rows):
            return None
        return {kind: now[kind] - counted[kind] for kind in SHADOW_KINDS}

    counts = poll(compared, 60, "every copy compared", interval=0.5)
    MEASURED.append(
        f"shadow 100%: {len(rows)} copies compared by the router pods' workers "
        f"{time.monotonic() - sent:.1f} s after the last answer; {counts}"
    )
    assert [a.status for a in answers] == [200] * len(rows)
    assert {a.variant for a in answers} == {"v1"}
    assert counts == {
        "requests": len(rows),
        "dropped": 0,
        "errors": 0,
        "agreements": len(rows) - differing,
        "disagreements": differing,
    }


SHADOW_KINDS = ("requests", "dropped", "errors", "agreements", "disagreements")


def test_the_routers_spread_a_variants_connections_over_its_pods(edited_iris: Iris) -> None:
    """Behind the router a variant's Service is headless: each router pod resolves it to the
    ready pods' addresses (this cluster's DNS always lists them in one order) and picks one per
    new connection. With v1 at 2 replicas, both pods answer a share of the load."""
    iris = edited_iris
    document = iris_document(weights=(100, 0))
    document["spec"]["variants"][0]["replicas"] = 2
    iris.apply(document)
    iris.wait_settled()
    service = _service(iris.cluster, "iris-v1")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    sha256 = sha256_of(MODELS / "iris-v1.onnx")

    def two_ready() -> list[dict[str, Any]] | None:
        ready = [p for p in installed_pods(iris.cluster, "v1", sha256) if _ready(p)]
        return ready if len(ready) == 2 else None

    pods = poll(two_ready, READY_TIMEOUT_S, "2 ready v1 pods")
    # Connections the routers opened before the second pod was ready are dropped once idle.
    time.sleep(IDLE_TIMEOUT_S + 1)
    before = {p["metadata"]["name"]: served(p) for p in pods}
    with Load(iris.url, concurrency=16) as load:
        poll(lambda: len(load.answers) >= 800, 120, "800 answers", interval=0.2)
    shares = {p["metadata"]["name"]: served(p) - before[p["metadata"]["name"]] for p in pods}
    MEASURED.append(f"v1 at 2 replicas behind the routers: requests per pod {shares}")
    assert load.failures() == []
    assert sum(shares.values()) >= 800
    assert min(shares.values()) >= 0.1 * sum(shares.values()), shares


def served(pod: dict[str, Any]) -> float:
    """The inference requests a variant pod has answered (read from its pod IP)."""
    return requests_answered(f"http://{pod['status']['podIP']}:8080")


def test_wrong_sha256_never_ready_never_served_and_status_says_why(edited_iris: Iris) -> None:
    iris = edited_iris
    served_sha = sha256_of(MODELS / "iris-v2.onnx")
    wrong = sha256_of(MODELS / "iris-v1.onnx")  # a real digest, of another file
    iris.apply(iris_document(v2_model=("pvc://models/iris-v2.onnx", wrong)))
    pods = lambda: installed_pods(iris.cluster, "v2", wrong)  # noqa: E731
    poll(lambda: any(_init_failed(p) for p in pods()), 180, "the wrong-digest pod to fail")
    with httpx.Client(timeout=10) as client:
        answers = [
            send(client, iris.url, v2_body(ROWS[:1]), {"x-model-variant": "v2"}) for _ in range(30)
        ]
    assert {(a.status, a.sha256) for a in answers} == {(200, served_sha)}
    assert not any(_ready(p) for p in pods())

    def degraded_says_why() -> dict[str, Any] | None:
        found = condition(iris.md(), "Degraded")
        return found if found.get("status") == "True" else None

    # The pod's failure reaches the status through the operator's pod watch.
    degraded = poll(degraded_says_why, 60, "Degraded=True naming the refused model")
    assert degraded["reason"] == "PodsFailing"
    assert degraded["message"].startswith("v2: pod iris-v2-"), degraded
    assert (
        f"sha256 mismatch for {MODEL_SOURCE_DIR}/iris-v2.onnx: expected {wrong}"
        in degraded["message"]
    ), degraded
    assert condition(iris.md(), "Ready").get("status") == "True"  # v1 and the old v2 still serve


def installed_pods(cluster: Cluster, variant: str, sha256: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.get(
        "-n",
        NAMESPACE,
        "pods",
        "-l",
        f"modeldeploy.dev/model-deployment=iris,modeldeploy.dev/variant={variant},"
        f"modeldeploy.dev/model-digest={sha256[:63]}",
    )["items"]
    # A pod being deleted belongs to an earlier rollout (an earlier test may have served the same
    # digest from another URI); it stays Ready through its preStop sleep and shutdown delay.
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _init_failed(pod: dict[str, Any]) -> bool:
    for status in pod.get("status", {}).get("initContainerStatuses", []):
        terminated = (
            status.get("lastState", {}).get("terminated")
            or status.get("state", {}).get("terminated")
            or {}
        )
        if terminated.get("exitCode", 0) != 0:
            return True
    return False


def test_pod_deletion_under_load(iris: Iris) -> None:
    """The Deployment replaces a deleted variant pod; at most a handful of requests fail."""
    (victim,) = [
        p
        for p in installed_pods(iris.cluster, "v1", sha256_of(MODELS / "iris-v1.onnx"))
        if not p["metadata"].get("deletionTimestamp")
    ]
    with Load(iris.url, concurrency=8) as load:
        poll(lambda: len(load.answers) >= 100, 120, "load to start", interval=0.2)
        iris.cluster.kubectl(
            "-n", NAMESPACE, "delete", "pod", victim["metadata"]["name"], "--wait=false"
        )
        poll(
            lambda: any(
                _ready(p) and p["metadata"]["name"] != victim["metadata"]["name"]
                for p in installed_pods(iris.cluster, "v1", sha256_of(MODELS / "iris-v1.onnx"))
            ),
            READY_TIMEOUT_S,
            "a replacement v1 pod",
        )
        iris.wait_ready()
        settled = len(load.answers)
        poll(lambda: len(load.answers) >= settled + 100, 60, "load after the replacement")
    failed = load.failures()
    MEASURED.append(f"pod deletion under load: {len(failed)} of {len(load.answers)} failed")
    assert len(failed) <= 5, [(a.status, a.error) for a in failed[:10]]


def test_gateway_mode_renders_an_accepted_httproute(iris_applied: Iris) -> None:
    """routing.mode gateway: the operator's HTTPRoute passes the apiserver's validation of the
    Gateway API CRDs. No gateway controller runs on this cluster, so nothing routes by it and
    its status stays without parents: only acceptance by the apiserver is proven here."""
    iris = iris_applied
    document = copy.deepcopy(example_document())
    document["metadata"] = {"name": "iris-gw"}
    # A Gateway that does not exist: the HTTPRoute is still valid and stored.
    document["spec"]["routing"] = {
        "mode": "gateway",
        "gateway": {"parentRefs": [{"name": "models"}], "hostnames": ["iris.example.test"]},
    }
    iris.apply(document)
    route = poll(
        lambda: _get_or_none(iris.cluster, "httproute", "iris-gw"), 120, "HTTPRoute iris-gw"
    )
    backends = {
        (b["name"], b.get("weight"))
        for rule in route["spec"]["rules"]
        for b in rule.get("backendRefs", [])
    }
    assert {name for name, _ in backends} == {"iris-gw-v1", "iris-gw-v2"}
    assert not route.get("status", {}).get("parents")
    iris.cluster.kubectl("-n", NAMESPACE, "delete", "modeldeployment", "iris-gw", timeout=120)


def _get_or_none(cluster: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl("-n", NAMESPACE, "get", kind, name, "-o", "json", "--ignore-not-found")
    return yaml.safe_load(out) if out.strip() else None


CHILD_KINDS = (
    "deployments,replicasets,pods,services,routetables,poddisruptionbudgets,"
    "horizontalpodautoscalers,httproutes"
)


BATCH_ROWS = 300_000


def test_batch_prediction_in_4_shards_equals_the_local_run_byte_for_byte(
    models_pvc: Cluster, tmp_path: Path
) -> None:
    """A BatchPrediction over 300,000 rows as 4 real pods of an Indexed Job (the model and the
    input on the claim, the output written to it), against `modeldeploy-server batch` here."""
    work = models_pvc.models_dir / "batch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    work.chmod(0o777)  # the shards run as uid 65532
    source = work / "input.csv"
    lines = [",".join(FEATURES)] + [
        ",".join(map(str, ROWS[i % len(ROWS)])) for i in range(BATCH_ROWS)
    ]
    source.write_text("\n".join(lines) + "\n")
    source.chmod(0o644)
    model = MODELS / "iris-v1.onnx"
    document = {
        "apiVersion": "modeldeploy.dev/v1alpha1",
        "kind": "BatchPrediction",
        "metadata": {"name": "iris-batch", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "pvc://models/iris-v1.onnx", "sha256": sha256_of(model)},
            "input": {"uri": "pvc://models/batch/input.csv", "sha256": sha256_of(source)},
            "output": {"uri": "pvc://models/batch/out/"},
            "shards": 4,
            "parallelism": 4,
        },
    }
    models_pvc.apply([document])

    def finished() -> dict[str, Any] | None:
        obj = models_pvc.get("-n", NAMESPACE, "batchprediction", "iris-batch")
        status: dict[str, Any] = obj.get("status") or {}
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = poll(finished, 600, "the BatchPrediction to finish")
    assert status["phase"] == "Succeeded", status
    assert (status["rowsIn"], status["rowsOut"], status["shardsDone"]) == (
        BATCH_ROWS,
        BATCH_ROWS,
        "4/4",
    )
    local = tmp_path / "local"
    for index in range(4):
        subprocess.run(
            [
                *server_command(), "batch", "--model-path", str(model), "--input", str(source),
                "--output", str(local), "--shard", f"{index}/4",
                "--run-id", "local-run", "--run-name", "iris-batch",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    for output in status["outputs"]:
        in_cluster = (work / "out" / output["name"]).read_bytes()
        assert in_cluster == (local / output["name"]).read_bytes(), output["name"]
        assert output["sha256"] == hashlib.sha256(in_cluster).hexdigest()
    # The last shard pod to finish wrote the run's manifest.json: the local run's, but for where
    # each side read the input (the pods from their mount of the claim).
    manifests = [json.loads((out / "manifest.json").read_bytes()) for out in (work / "out", local)]
    assert [m["input"].pop("uri") for m in manifests] == ["/input/batch/input.csv", str(source)]
    assert manifests[0] == manifests[1]
    assert manifests[0]["rowsOut"] == BATCH_ROWS and len(manifests[0]["parts"]) == 4
    models_pvc.kubectl("-n", NAMESPACE, "delete", "batchprediction", "iris-batch", timeout=120)
    poll(
        lambda: (
            not models_pvc.get(
                "-n", NAMESPACE, "jobs,pods", "-l", "modeldeploy.dev/batch-prediction=iris-batch"
            )["items"]
        ),
        120,
        "the Job and its pods to be gone",
    )


def test_deleting_the_modeldeployment_removes_every_child(iris_applied: Iris) -> None:
    iris = iris_applied
    selector = "modeldeploy.dev/model-deployment=iris"
    assert iris.cluster.get("-n", NAMESPACE, CHILD_KINDS, "-l", selector)["items"]
    iris.cluster.kubectl("-n", NAMESPACE, "delete", "modeldeployment", "iris", timeout=120)
    poll(
        lambda: not iris.cluster.get("-n", NAMESPACE, CHILD_KINDS, "-l", selector)["items"],
        120,
        "every child of iris to be gone",
    )


def test_uninstall_as_the_readme_says_leaves_nothing(installed: Cluster) -> None:
    """README: delete the ModelDeployments and BatchPredictions first, then
    `kubectl delete -k manifests/`."""
    installed.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLE))
    installed.kubectl("delete", "mdep,bpred", "--all", "-A", "--timeout=120s", timeout=150)
    identity = ("-A", "-l", "app.kubernetes.io/name=modeldeploy-router")
    poll(
        lambda: not installed.get("serviceaccount,rolebinding", *identity)["items"],
        60,
        "the operator to delete the namespace's router identity",
    )
    installed.kubectl("delete", "-k", str(REPO_ROOT / "manifests"), "--timeout=120s", timeout=150)
    crds = installed.get("crd")["items"]
    assert not [c for c in crds if c["spec"]["group"] == "modeldeploy.dev"]
    assert not installed.kubectl("get", "namespace", SYSTEM_NAMESPACE, "--ignore-not-found")
    assert not installed.kubectl(
        "get", "clusterrole,clusterrolebinding", "modeldeploy-operator", "--ignore-not-found"
    )
    poll(
        lambda: not installed.get("-n", NAMESPACE, "all")["items"],
        120,
        f"every object in {NAMESPACE} to be gone",
    )
