"""Startup verification, readiness, SIGTERM drain, batching under concurrency, metrics, capture."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from tests.models import BuiltModel
from tests.processes import LOOPBACK, RunningProcess, free_port, serve_model, server_command

SERVE = [*server_command(), "serve"]


def metric(server: RunningProcess, sample: str, **labels: str) -> float:
    """One sample from /metrics (labels must match exactly the ones given, in any order)."""
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != sample:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    raise AssertionError(f"no sample {sample} {labels} in:\n{text}")


def test_wrong_sha256_refuses_to_start(iris: BuiltModel) -> None:
    result = subprocess.run(
        [*SERVE, "--model-path", str(iris.path), "--model-name", "iris", "--sha256", "0" * 64],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"has sha256 {iris.sha256}, expected {'0' * 64}; refusing to serve" in result.stderr


def test_bad_configuration_and_unloadable_files_exit_with_a_message(tmp_path: Path) -> None:
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"this is not a protobuf")
    for argv, code, message in [
        (["--model-name", "x"], 2, "--model-path (or MODELDEPLOY_MODEL_PATH) is required"),
        (["--model-path", str(tmp_path / "absent.onnx"), "--model-name", "x"], 1, "cannot read"),
        (["--model-path", str(not_onnx), "--model-name", "x"], 1, "cannot load"),
    ]:
        result = subprocess.run([*SERVE, *argv], capture_output=True, text=True, timeout=60)
        assert (result.returncode, message in result.stderr) == (code, True), result.stderr


def test_metadata_readiness_and_model_headers(
    iris: BuiltModel, iris_server: RunningProcess
) -> None:
    assert httpx.get(f"{iris_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{iris_server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{iris_server.url}/v2/models/iris/versions/1/ready").status_code == 200
    assert httpx.get(f"{iris_server.url}/v1/models/iris").json() == {"name": "iris", "ready": True}
    metadata = httpx.get(f"{iris_server.url}/v2/models/iris/versions/1").json()
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    response = httpx.post(
        f"{iris_server.url}/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}
    )
    assert response.headers["x-model-version"] == "1"
    assert response.headers["x-model-sha256"] == iris.sha256
    assert metric(iris_server, "modeldeploy_model_info", sha256=iris.sha256, name="iris") == 1
    assert metric(iris_server, "modeldeploy_queue_depth", model="iris", version="1") == 0
    assert metric(iris_server, "modeldeploy_request_duration_seconds_count", protocol="v1") >= 1
    assert metric(iris_server, "modeldeploy_requests_total", protocol="v1", code="200") >= 1


def test_fixed_batch_model_serves_its_exact_shape_only(fixed_batch: BuiltModel) -> None:
    row = fixed_batch.features[:1].astype(np.float32)
    with serve_model(fixed_batch.path, "fixed") as server:
        metadata = httpx.get(f"{server.url}/v2/models/fixed").json()
        assert metadata["inputs"][0]["shape"] == [1, 4]

        def infer(rows: np.ndarray) -> httpx.Response:
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                "data": rows.ravel().tolist()}]}  # fmt: skip
            return httpx.post(f"{server.url}/v2/models/fixed/infer", json=body)

        answer = infer(row)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == fixed_batch.estimator.predict(row).tolist()
        refused = infer(np.repeat(row, 2, axis=0))
        assert refused.status_code == 400
        assert "the model expects [1, 4]" in refused.json()["error"]
        # Concurrent requests are never merged for a fixed batch dimension.
        with httpx.Client() as client:
            rows = fixed_batch.features[:20].astype(np.float32)
            for index in range(20):
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                    "data": rows[index].tolist()}]}  # fmt: skip
                assert (
                    client.post(f"{server.url}/v2/models/fixed/infer", json=body).status_code == 200
                )
        assert metric(server, "modeldeploy_batch_size_bucket", le="1.0") == metric(
            server, "modeldeploy_batch_size_count"
        )


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(mlp: BuiltModel) -> None:
    features = np.asarray(mlp.features, dtype=np.float32)
    expected = mlp.estimator.predict(features)
    # A delay makes merging certain rather than likely on a busy machine.
    merging = ["--max-batch-delay-ms", "20", "--max-batch-size", "256"]
    with serve_model(mlp.path, "digits", extra_args=merging) as server:

        async def run() -> list[int]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:

                async def one(index: int) -> int:
                    body = {"id": str(index), "inputs": [{"name": "input", "datatype": "FP32",
                            "shape": [1, 64], "data": features[index].tolist()}]}  # fmt: skip
                    response = await client.post(f"{server.url}/v2/models/digits/infer", json=body)
                    assert response.status_code == 200, response.text
                    document = response.json()
                    assert document["id"] == str(index)
                    label: int = document["outputs"][0]["data"][0]
                    return label

                return await asyncio.gather(*(one(index) for index in range(200)))

        labels = asyncio.run(run())
        assert labels == expected[:200].tolist()
        runs = metric(server, "modeldeploy_batch_size_count")
        merged = metric(server, "modeldeploy_batch_size_sum")
        assert merged == 201  # 200 requests plus the warm-up
        assert runs < 100, f"{runs} model runs for 201 requests: no merging"
        assert metric(server, "modeldeploy_requests_total", protocol="v2", code="200") == 200


def test_sigterm_fails_readiness_then_drains_in_flight_requests(iris: BuiltModel) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}
            ]
        }
    ).encode()
    with serve_model(iris.path, "iris", extra_args=["--shutdown-delay-s", "1.5"]) as server:
        # An in-flight request: headers and half of the body sent before SIGTERM.
        in_flight = socket.create_connection((LOOPBACK, server.port))
        in_flight.sendall(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.2)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Readiness fails at once while the port stays open for the delay.
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        in_flight.sendall(body[10:])
        answer = b""
        while not answer.endswith(b"}]}"):
            chunk = in_flight.recv(65536)
            if not chunk:
                break
            answer += chunk
        in_flight.close()
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert server.process.wait(30) == 0
        assert "Finished server process" in server.output()


def test_capture_writes_sampled_pairs_as_json_lines(iris: BuiltModel, tmp_path: Path) -> None:
    capture = tmp_path / "capture.jsonl"
    sampling = ["--capture-path", str(capture), "--capture-sample-rate", "1"]
    with serve_model(iris.path, "iris", extra_args=sampling) as server:
        for index in range(5):
            request = {"id": f"r{index}", "inputs": [{"name": "input", "datatype": "FP32",
                       "shape": [1, 4], "data": [5.1, 3.5, 1.4, index]}]}  # fmt: skip
            assert httpx.post(f"{server.url}/v2/models/iris/infer", json=request).status_code == 200
        httpx.post(
            f"{server.url}/v1/models/iris:predict",
            content=b"a,b,c,d\n1,2,3,4\n",
            headers={"content-type": "text/csv", "accept": "text/csv"},
        )
    records = [orjson.loads(line) for line in capture.read_bytes().splitlines()]
    assert len(records) == 6
    first = records[0]
    assert (first["model"], first["version"], first["protocol"]) == ("iris", "1", "v2")
    assert first["request"]["id"] == "r0"
    assert first["response"]["id"] == "r0"
    assert records[-1]["protocol"] == "csv"
    assert records[-1]["request"] == "a,b,c,d\n1,2,3,4\n"
    assert records[-1]["response"].startswith("label,")


def test_entrypoint_runs_from_environment_only(iris: BuiltModel, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "MODELDEPLOY_MODEL_PATH": str(iris.path),
        "MODELDEPLOY_MODEL_NAME": "iris",
        "MODELDEPLOY_MODEL_VERSION": "v7",
        "MODELDEPLOY_HOST": "127.0.0.1",
        "MODELDEPLOY_PORT": str(port),
        "MODELDEPLOY_MODEL_SHA256": iris.sha256,
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": str(Path(sys.executable).parent),
    }
    # The container's ENTRYPOINT is the console script with only `serve` as argument, run from a
    # directory it cannot write to.
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "modeldeploy-server"), "serve"],
        env=env,
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v2/models/iris/versions/v7/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
                ]
            },
        )
        assert answer.headers["x-model-version"] == "v7"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_access_log_is_off_by_default_and_a_flag_turns_it_on(
    iris: BuiltModel, iris_server: RunningProcess
) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    }
    assert httpx.post(f"{iris_server.url}/v2/models/iris/infer", json=body).status_code == 200
    assert "POST /v2/models/iris/infer" not in iris_server.output()
    with serve_model(iris.path, "iris", extra_args=["--access-log", "true"]) as server:
        assert httpx.post(f"{server.url}/v2/models/iris/infer", json=body).status_code == 200
        server.close()
        assert '"POST /v2/models/iris/infer HTTP/1.1" 200' in server.output()
