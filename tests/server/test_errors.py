"""Client errors over real HTTP: each answers 4xx with a JSON {"error": ...}, never 5xx."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.models import BuiltModel
from tests.processes import RunningProcess, serve_model

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
MAX_BYTES = 4096


def v2(data: Any = None, **tensor: Any) -> dict[str, Any]:
    fields = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": data or IRIS_ROW}
    return {"inputs": [{**fields, **tensor}]}


@pytest.fixture(scope="module")
def limited(iris: BuiltModel) -> Iterator[RunningProcess]:
    limits = ["--max-request-bytes", str(MAX_BYTES), "--max-rows", "10", "--request-timeout-s", "1"]
    with serve_model(iris.path, "iris", extra_args=limits) as server:
        yield server


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert fragment in body["error"]


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"{", {}, "not valid UTF-8 JSON"),
        (b"\xc3\x28\xff", {}, "not valid UTF-8 JSON"),
        (b'"just a string"', {}, "must be a JSON object"),
        (orjson.dumps(v2(datatype="INT64", data=[1, 2, 3, 4])), {}, "has datatype INT64"),
        (orjson.dumps(v2(shape=[2, 2])), {}, "has shape [2, 2]"),
        (orjson.dumps(v2(shape=[4])), {}, "has shape [4]"),
        (orjson.dumps(v2(name="other")), {}, "unknown input 'other'"),
        (orjson.dumps({"inputs": [v2()["inputs"][0]] * 2}), {}, "more than once"),
        (orjson.dumps({"inputs": []}), {}, "missing input(s) ['input']"),
        (orjson.dumps(v2(data=["a", "b", "c", "d"])), {}, "does not hold FP32"),
        (orjson.dumps(v2(data=[True, 3.5, 1.4, 0.2])), {}, "'input': data does not hold FP32"),
        (orjson.dumps({**v2(), "outputs": [{"name": "nope"}]}), {}, "unknown output"),
        (orjson.dumps(v2()), {"inference-header-content-length": "x"}, "must be an integer"),
        (orjson.dumps(v2()), {"inference-header-content-length": "99999"}, "does not fit"),
    ],
)
def test_v2_client_errors_are_400(
    iris_server: RunningProcess, content: bytes, headers: dict[str, str], fragment: str
) -> None:
    response = httpx.post(
        f"{iris_server.url}/v2/models/iris/infer", content=content, headers=headers
    )
    assert_error(response, 400, fragment)
    assert response.headers["x-model-version"] == "1"
    assert len(response.headers["x-model-sha256"]) == 64


@pytest.mark.parametrize(
    ("content", "content_type", "fragment"),
    [
        (b'{"instances": []}', "application/json", "must not be empty"),
        (b'{"instances": [[1, 2, 3]]}', "application/json", "has shape [1, 3]"),
        (b'{"instances": [[1, 2, 3, 4], {"input": [1, 2, 3, 4]}]}', "application/json", "all be"),
        (b'{"instances": [{"x": [1, 2, 3, 4]}]}', "application/json", "has keys ['x']"),
        (b'{"instances": [[5.1, true, 1.4, 0.2]]}', "application/json", "does not hold FP32"),
        (b'{"rows": []}', "application/json", '"instances" list'),
        (b"a,b,c,d\n1,2,3\n", "text/csv", "line 2 has 3 fields"),
        (b"a,b,c,d\n1,2,3,x\n", "text/csv", "'d', data row 1: 'x' is not a JSON number"),
        # CSV numbers follow JSON's rules: no NaN, no infinity, no overflow, same range checks.
        (b"a,b,c,d\n1,2,3,4\n1,2,3,inf\n", "text/csv", "data row 2: 'inf' is not a JSON number"),
        (b"a,b,c,d\n1,2,nan,4\n", "text/csv", "'nan' is not a JSON number"),
        (b"a,b,c,d\n1,2,3,1e400\n", "text/csv", "'1e400' is not a JSON number (number is inf"),
        (b"a,b,c,d\n1,2,3,1e39\n", "text/csv", "column 'd': a value is out of range for FP32"),
        (b"a,b,c,d\n1,2,3,true\n", "text/csv", "column 'd': data does not hold FP32 values"),
        (b"a,b,c,d\n1,2,3,4\x00\n", "text/csv", "control character '\\x00' at character 15"),
        (b"a,b,c\n1,2,3\n", "text/csv", "do not match the model's inputs"),
        (b"a,b,c,d\n", "text/csv", "at least one data row"),
        (b"\xff\xfe,\n", "text/csv", "not UTF-8 CSV"),
    ],
)
def test_records_and_csv_client_errors_are_400(
    iris_server: RunningProcess, content: bytes, content_type: str, fragment: str
) -> None:
    response = httpx.post(
        f"{iris_server.url}/v1/models/iris:predict",
        content=content,
        headers={"content-type": content_type},
    )
    assert_error(response, 400, fragment)


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("POST", "/v2/models/other/infer", 404, "'other' is not served"),
        ("POST", "/v2/models/iris/versions/9/infer", 404, "no version '9'"),
        ("POST", "/v1/models/other:predict", 404, "'other' is not served"),
        ("GET", "/v2/models/other", 404, "not served"),
        ("GET", "/v2/models/iris/versions/9/ready", 404, "no version"),
        ("GET", "/nowhere", 404, "Not Found"),
        ("GET", "/v2/models/iris/infer", 405, "Method Not Allowed"),
        ("PUT", "/v2/health/ready", 405, "Method Not Allowed"),
        ("DELETE", "/v1/models/iris:predict", 405, "Method Not Allowed"),
    ],
)
def test_unknown_paths_models_and_methods(
    iris_server: RunningProcess, method: str, path: str, status: int, fragment: str
) -> None:
    response = httpx.request(method, iris_server.url + path, json=v2())
    assert_error(response, status, fragment)


def test_content_encoding_is_refused_with_415(iris_server: RunningProcess) -> None:
    response = httpx.post(
        f"{iris_server.url}/v2/models/iris/infer",
        content=b"\x1f\x8b",
        headers={"content-encoding": "gzip"},
    )
    assert_error(response, 415, "Content-Encoding 'gzip'")


def test_too_many_rows_is_413(limited: RunningProcess) -> None:
    body = v2(data=IRIS_ROW * 11, shape=[11, 4])
    assert_error(httpx.post(f"{limited.url}/v2/models/iris/infer", json=body), 413, "11 rows")
    assert httpx.post(f"{limited.url}/v2/models/iris/infer", json=v2()).status_code == 200


def raw_exchange(server: RunningProcess, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a request head and body parts on a raw socket; return whatever comes back."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(head)
        for part in body_parts:
            connection.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_declared_oversized_body_is_refused_before_any_of_it_is_sent(
    limited: RunningProcess,
) -> None:
    head = (
        b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000000\r\n\r\n"
    )
    answer = raw_exchange(limited, head, [])
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"over the 4096 limit" in answer


def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(limited: RunningProcess) -> None:
    head = (
        b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"1000\r\n" + b" " * 0x1000 + b"\r\n"
    # Two chunks pass the limit; the terminating chunk is never sent, so an answer proves that
    # the server stopped reading instead of waiting for the whole body.
    answer = raw_exchange(limited, head, [chunk, chunk])
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"over the 4096 byte limit" in answer


def test_a_body_that_never_finishes_times_out_with_504(limited: RunningProcess) -> None:
    head = (
        b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 100\r\n\r\n"
    )
    started = time.monotonic()
    answer = raw_exchange(limited, head, [b'{"inputs": '])
    assert answer.startswith(b"HTTP/1.1 504 ")
    assert b"request took over 1.0 s" in answer
    assert time.monotonic() - started < 4


def test_overload_answers_503_with_retry_after(mlp: BuiltModel) -> None:
    features = mlp.features.astype("<f4")
    rows = len(features)
    raw = features.tobytes()
    header = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64],
                     "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "label"}]}
    )  # fmt: skip
    with (
        serve_model(
            mlp.path, "digits", extra_args=["--max-queue", "1", "--max-batch-size", "1"]
        ) as server,
        httpx.Client(limits=httpx.Limits(max_connections=64), timeout=60) as client,
        concurrent.futures.ThreadPoolExecutor(32) as pool,
    ):
        responses = list(
            pool.map(
                lambda _: client.post(
                    f"{server.url}/v2/models/digits/infer",
                    content=header + raw,
                    headers={"inference-header-content-length": str(len(header))},
                ),
                range(32),
            )
        )
    codes = [response.status_code for response in responses]
    assert set(codes) == {200, 503}, codes
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1"
    assert_error(refused, 503, "queue is full")
    served = next(r for r in responses if r.status_code == 200)
    assert served.json()["outputs"][0]["data"] == mlp.estimator.predict(mlp.features).tolist()


def test_ragged_string_instances_are_refused(mixed_server: RunningProcess) -> None:
    row = {"city": "paris", "plan": "pro", "age": 30.0, "income": 20000.0}
    response = httpx.post(
        f"{mixed_server.url}/v1/models/mixed:predict",
        json={"instances": [row, {**row, "city": ["lyon", "brest"]}]},
    )
    assert_error(response, 400, "different numbers of strings")
