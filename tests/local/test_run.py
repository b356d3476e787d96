"""`modeldeploy run -f examples/iris.yaml` as a user runs it: a subprocess of the console script.

Through the router it starts: the 90/10 split over 2,000 requests, the override header, v2, records
and CSV answers equal to onnxruntime's on the committed models, the printed example commands. Then
SIGTERM, SIGKILL and a failed start must each leave no process behind.
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

from tests.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "iris.yaml"
MODELS = REPO_ROOT / "examples" / "models"
MODEL = "iris"
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
REQUESTS = 2000
V2_SHARE = 0.10
SIGMAS = 5
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
# Every process a run starts inherits this variable, so a leftover is found even after the
# `modeldeploy run` that started it has gone.
RUN_MARKER = "MODELDEPLOY_TEST_LOCAL_RUN"

pytestmark = pytest.mark.slow


@dataclass
class LocalRun:
    """A running `modeldeploy run` and everything it has printed so far."""

    process: subprocess.Popen[str]
    url: str
    marker: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """The first printed line matching `pattern`; fails if the run exits or times out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the reader thread drain the pipe
                pytest.fail(f"modeldeploy run exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern!r} after {timeout_s} s:\n{self.output()}")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def start_run(manifest: Path, tmp_path: Path, port: int | None = None) -> LocalRun:
    """Start `modeldeploy run -f MANIFEST --port PORT` (a free one by default), with its own
    model cache."""
    port = free_port() if port is None else port
    marker = uuid.uuid4().hex
    command = [
        str(Path(sys.executable).with_name("modeldeploy")),
        "run",
        "-f",
        str(manifest),
        "--port",
        str(port),
    ]
    env = {**os.environ, RUN_MARKER: marker, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    run = LocalRun(process, f"http://127.0.0.1:{port}", marker)

    def read_lines() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            run.lines.append(line.rstrip("\n"))

    run.reader = threading.Thread(target=read_lines, daemon=True)
    run.reader.start()
    return run


def marked_processes(marker: str) -> list[psutil.Process]:
    """Every live process started by the run with this marker."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_MARKER) == marker and process.status() != "zombie":
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_run(run: LocalRun) -> None:
    """Kill the run and anything it left; close its pipe once everything printed is read."""
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()
    for leftover in marked_processes(run.marker):
        leftover.kill()
    if run.reader is not None:
        run.reader.join(timeout=10)
    if run.process.stdout is not None:
        run.process.stdout.close()


def write_manifest(manifest: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "iris.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def run_until_it_fails(manifest: dict[str, Any], tmp_path: Path, port: int | None = None) -> str:
    """Run a manifest that must fail to start; check it left no process; return its output."""
    run = start_run(write_manifest(manifest, tmp_path), tmp_path, port)
    try:
        assert run.process.wait(START_TIMEOUT_S) == 1
        assert run.reader is not None
        run.reader.join(timeout=10)
        assert marked_processes(run.marker) == []
        return run.output()
    finally:
        stop_run(run)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    run = start_run(EXAMPLE, tmp_path_factory.mktemp("local-run"))
    try:
        run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
        yield run
    finally:
        stop_run(run)


@pytest.fixture(scope="module")
def client(local_run: LocalRun) -> Iterator[httpx.Client]:
    # One keep-alive connection for all requests, as a load balancer would hold.
    with httpx.Client(base_url=local_run.url, timeout=10.0) as client:
        yield client


def iris_rows() -> np.ndarray[Any, Any]:
    rows: np.ndarray[Any, Any] = load_iris().data.astype(np.float32)
    return rows


def expected(variant: str, rows: np.ndarray[Any, Any]) -> tuple[list[int], np.ndarray[Any, Any]]:
    """What onnxruntime itself answers for the committed model of `variant`."""
    session = ort.InferenceSession(str(MODELS / f"iris-{variant}.onnx"))
    feeds = {name: rows[:, i : i + 1] for i, name in enumerate(FEATURES)}
    labels, probabilities = session.run(["label", "probabilities"], feeds)
    return labels.tolist(), probabilities


def v2_body(rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": name,
                "shape": [len(rows), 1],
                "datatype": "FP32",
                "data": rows[:, i].tolist(),
            }
            for i, name in enumerate(FEATURES)
        ]
    }


def test_starts_one_server_per_variant_and_the_router(local_run: LocalRun) -> None:
    commands = [" ".join(p.cmdline()) for p in local_run.children()]
    assert sum(" serve " in c for c in commands) == 2, commands
    assert sum(" route " in c for c in commands) == 1, commands
    assert all("--host 127.0.0.1" in c for c in commands), commands
    assert f"ModelDeployment {MODEL}: 2 variant(s)" in local_run.output()


def test_split_follows_the_weights_within_binomial_bounds(
    local_run: LocalRun, client: httpx.Client
) -> None:
    body = v2_body(iris_rows()[:1])
    served: Counter[str] = Counter()
    for _ in range(REQUESTS):
        answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert answer.status_code == 200, answer.text
        # The router's header and the server's own must agree: the split is real, not labelled.
        assert answer.headers["x-model-variant"] == answer.headers["x-model-version"]
        served[answer.headers["x-model-variant"]] += 1
    sigma = math.sqrt(REQUESTS * V2_SHARE * (1 - V2_SHARE))
    low, high = REQUESTS * V2_SHARE - SIGMAS * sigma, REQUESTS * V2_SHARE + SIGMAS * sigma
    assert served["v1"] + served["v2"] == REQUESTS
    assert low <= served["v2"] <= high, served


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_override_header_pins_the_variant(client: httpx.Client, variant: str) -> None:
    rows = iris_rows()
    for _ in range(50):
        answer = client.post(
            f"/v2/models/{MODEL}/infer",
            json=v2_body(rows[:1]),
            headers={"x-model-variant": variant},
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model-version"] == variant
        assert answer.headers["x-model-variant"] == variant


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_v2_answers_equal_onnxruntime(client: httpx.Client, variant: str) -> None:
    rows = iris_rows()
    answer = client.post(
        f"/v2/models/{MODEL}/infer", json=v2_body(rows), headers={"x-model-variant": variant}
    )
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    labels, probabilities = expected(variant, rows)
    assert outputs["label"]["data"] == labels
    assert outputs["probabilities"]["shape"] == [len(rows), 3]
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(-1, 3), probabilities, rtol=1e-6
    )


def test_variants_really_are_different_models(client: httpx.Client) -> None:
    labels = {}
    for variant in ("v1", "v2"):
        answer = client.post(
            f"/v2/models/{MODEL}/infer",
            json=v2_body(iris_rows()),
            headers={"x-model-variant": variant},
        )
        labels[variant] = answer.json()["outputs"][0]["data"]
    assert labels["v1"] != labels["v2"]


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_records_answers_equal_onnxruntime(client: httpx.Client, variant: str) -> None:
    rows = iris_rows()
    instances = [dict(zip(FEATURES, row.tolist(), strict=True)) for row in rows]
    answer = client.post(
        f"/v1/models/{MODEL}:predict",
        json={"instances": instances},
        headers={"x-model-variant": variant},
    )
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    labels, probabilities = expected(variant, rows)
    assert [p["label"] for p in predictions] == labels
    np.testing.assert_allclose([p["probabilities"] for p in predictions], probabilities, rtol=1e-6)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_csv_answers_equal_onnxruntime(client: httpx.Client, variant: str) -> None:
    rows = iris_rows()
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(FEATURES)
    writer.writerows(rows.tolist())
    answer = client.post(
        f"/v1/models/{MODEL}:predict",
        content=text.getvalue(),
        headers={"content-type": "text/csv", "accept": "text/csv", "x-model-variant": variant},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(answer.text)))
    labels, probabilities = expected(variant, rows)
    assert [int(r["label"]) for r in table] == labels
    answered = [[float(r[f"probabilities_{k}"]) for k in range(3)] for r in table]
    np.testing.assert_allclose(answered, probabilities, rtol=1e-6)


def test_printed_example_commands_work(local_run: LocalRun) -> None:
    """The curl commands `modeldeploy run` prints are ready to paste into a shell."""
    commands = [line.strip() for line in local_run.lines if "curl -s" in line]
    assert len(commands) == 3, local_run.output()
    outputs = [
        subprocess.run(["bash", "-c", c], capture_output=True, text=True, check=True, timeout=30)
        for c in commands
    ]
    setosa = 0  # the example row in examples/iris.yaml's annotation is an iris setosa
    v2_answer = json.loads(outputs[0].stdout)
    assert v2_answer["outputs"][0]["data"] == [setosa]
    assert json.loads(outputs[1].stdout)["predictions"][0]["label"] == setosa
    assert "x-model-variant: v2" in commands[1]
    header, row = outputs[2].stdout.splitlines()
    assert header.startswith("label,") and row.startswith(f"{setosa},")
    assert shlex.split(commands[0])[2] == f"{local_run.url}/v2/models/{MODEL}/infer"


def readme_examples() -> list[tuple[str, list[str]]]:
    """The README's curl examples against the local demo: (commands, expected output lines).

    Expected lines are the `# ` comments of a block that pins a variant, except the elided ones.
    """
    text = (REPO_ROOT / "README.md").read_text()
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        if "curl" not in block or "http://127.0.0.1:8080/" not in block:
            continue
        lines = block.splitlines()
        commands = "\n".join(line for line in lines if not line.startswith("#"))
        pinned = "x-model-variant:" in block or "/versions/" in block
        comments = [line.removeprefix("# ") for line in lines if line.startswith("# ")]
        expected = [c for c in comments if pinned and "..." not in c and " " not in c]
        examples.append((commands, expected))
    return examples


def test_readme_curl_examples_work(local_run: LocalRun) -> None:
    examples = readme_examples()
    assert len(examples) >= 4
    for commands, expected in examples:
        script = commands.replace("http://127.0.0.1:8080", local_run.url)
        result = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, check=True, timeout=30
        )
        assert result.stdout and '"error"' not in result.stdout, (commands, result.stdout)
        for line in expected:
            assert line in result.stdout, (commands, result.stdout)


def test_readme_metrics_exist(local_run: LocalRun, client: httpx.Client) -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Metrics") : text.index("## Limits")]
    documented = set(re.findall(r"`(modeldeploy_[a-z_]+)", section))
    client.post(f"/v2/models/{MODEL}/infer", json=v2_body(iris_rows()[:1]))  # one of each series
    variant_url = local_run.wait_for_line(r"v1: 90% of traffic, direct: (\S+)", 1).group(1)
    exposed = set()
    for url in (f"{local_run.url}/metrics", f"{variant_url}/metrics"):
        for family in text_string_to_metric_families(httpx.get(url).text):
            # A labelled counter with no series yet (no backend error so far) shows only its
            # HELP and TYPE lines, under the name without `_total`.
            suffix = "_total" if family.type == "counter" else ""
            exposed |= {family.name + suffix, *(sample.name for sample in family.samples)}
    assert len(documented) >= 12
    assert documented <= exposed, documented - exposed


def test_ignored_kubernetes_fields_are_reported(tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["variants"][0].update(
        replicas=3, resources={"limits": {"memory": "1Gi"}}, model=_model_uri("v1")
    )
    manifest["spec"]["variants"][1]["model"] = _model_uri("v2")
    manifest["spec"]["pod"] = {"nodeSelector": {"pool": "ml"}}
    path = write_manifest(manifest, tmp_path)
    run = start_run(path, tmp_path)
    try:
        run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
        output = run.output()
    finally:
        stop_run(run)
    assert "ignored locally (Kubernetes only): spec.variants[0].replicas: 3" in output
    assert "ignored locally (Kubernetes only): spec.variants[0].resources" in output
    assert "ignored locally (Kubernetes only): spec.pod.nodeSelector" in output


def _model_uri(variant: str) -> dict[str, str]:
    # file:///absolute/path, the other local form (examples/iris.yaml uses pvc://).
    path = MODELS / f"iris-{variant}.onnx"
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]["variants"]
    sha256 = next(v["model"]["sha256"] for v in spec if v["name"] == variant)
    return {"uri": path.as_uri(), "sha256": sha256}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_stops_every_process(tmp_path: Path, signum: signal.Signals) -> None:
    run = start_run(EXAMPLE, tmp_path)
    try:
        run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
        children = run.children()
        assert len(children) == 3
        run.process.send_signal(signum)
        assert run.process.wait(STOP_TIMEOUT_S) == 0, run.output()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
        assert marked_processes(run.marker) == []
        assert run.reader is not None
        run.reader.join(timeout=10)
        assert f"{signum.name}: stopping" in run.output()
    finally:
        stop_run(run)


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
def test_sigkill_of_the_cli_leaves_no_orphans(tmp_path: Path) -> None:
    run = start_run(EXAMPLE, tmp_path)
    try:
        run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
        children = run.children()
        run.process.kill()  # no chance to clean up: the kernel must stop the children
        run.process.wait()
        _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
        assert alive == []
    finally:
        stop_run(run)


def test_failed_start_stops_what_was_started(tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["variants"][0]["model"] = _model_uri("v1")
    wrong = {"uri": (MODELS / "iris-v1.onnx").as_uri(), "sha256": _model_uri("v2")["sha256"]}
    manifest["spec"]["variants"][1]["model"] = wrong  # v1's file, v2's digest
    output = run_until_it_fails(manifest, tmp_path)
    assert "v2 exited with code" in output
    assert "sha256" in output


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        manifest = yaml.safe_load(EXAMPLE.read_text())
        for variant in manifest["spec"]["variants"]:
            variant["model"] = _model_uri(variant["name"])
        output = run_until_it_fails(manifest, tmp_path, port)
    assert f"error: port {port} on 127.0.0.1 is taken" in output
    assert "starting" not in output


@pytest.fixture
def model_host() -> Iterator[str]:
    """examples/models/ over plain HTTP on loopback, standing in for a model store."""
    handler = functools.partial(QuietFileHandler, directory=str(MODELS))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()
        thread.join()


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output for failures

    def copyfile(self, source: Any, outputfile: Any) -> None:
        # `/slow/...` trickles the file out over about 5 s, as a large model would arrive.
        if not self.path.startswith("/slow/"):
            super().copyfile(source, outputfile)
            return
        while chunk := source.read(64):
            outputfile.write(chunk)
            outputfile.flush()
            time.sleep(5 / 12)

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix("/slow"))


def test_http_models_are_downloaded_once_into_the_cache(model_host: str, tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    for variant in manifest["spec"]["variants"]:
        variant["model"]["uri"] = f"{model_host}/iris-{variant['name']}.onnx"
    path = write_manifest(manifest, tmp_path)
    outputs = []
    for _ in range(2):
        run = start_run(path, tmp_path)
        try:
            run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
            outputs.append(run.output())
        finally:
            stop_run(run)
    for variant in manifest["spec"]["variants"]:
        model = variant["model"]
        cached = tmp_path / "cache" / "modeldeploy" / "models" / f"{model['sha256']}.onnx"
        assert cached.read_bytes() == (MODELS / f"iris-{variant['name']}.onnx").read_bytes()
        assert f"{variant['name']}: downloading {model['uri']}" in outputs[0]
        assert f"{variant['name']}: model {model['uri']} (cached: {cached})" in outputs[1]


def test_a_long_download_reports_progress(model_host: str, tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["variants"][0]["model"]["uri"] = f"{model_host}/slow/iris-v1.onnx"
    manifest["spec"]["variants"][1]["model"] = _model_uri("v2")
    run = start_run(write_manifest(manifest, tmp_path), tmp_path)
    try:
        run.wait_for_line(r"^Ready: ", START_TIMEOUT_S)
    finally:
        stop_run(run)
    progress = [int(m) for m in re.findall(r"v1: (\d+) bytes so far", run.output())]
    assert progress, run.output()
    assert progress == sorted(progress) and progress[-1] <= (MODELS / "iris-v1.onnx").stat().st_size


def test_download_with_the_wrong_digest_is_refused(model_host: str, tmp_path: Path) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["variants"][0]["model"]["uri"] = f"{model_host}/iris-v2.onnx"
    output = run_until_it_fails(manifest, tmp_path)
    assert "error: spec.variants[0].model.uri: fetch-v1 exited with code 1" in output
    assert "sha256 mismatch" in output
    assert list((tmp_path / "cache").glob("**/*.onnx*")) == []
