"""Models that are not tables, over real HTTP: inputs that are data (sizes, shapes, weights), no
shared batch dimension, warm-up requests a model refuses, and values it cannot run on."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from modeldeploy_server.metadata import has_batch_axis
from modeldeploy_server.runtime import describe_rejection, load_model
from tests.models import BuiltModel, write_graph
from tests.processes import RunningProcess, serve_model, server_command

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
node = onnx.helper.make_node


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("graphs")
    return {
        # The MatMul: x's rows are dynamic, w is a second input of fixed shape.
        "matmul": write_graph(
            directory,
            "matmul",
            [node("MatMul", ["x", "w"], ["y"])],
            {"x": (FLOAT, [None, 4]), "w": (FLOAT, [4, 3])},
            {"y": (FLOAT, [None, 3])},
        ),
        # Two dynamic leading dimensions with different names are two sizes, not one batch.
        "concat": write_graph(
            directory,
            "concat",
            [node("Concat", ["a", "b"], ["c"], axis=0)],
            {"a": (FLOAT, ["N", 4]), "b": (FLOAT, ["M", 4])},
            {"c": (FLOAT, [None, 4])},
        ),
        # Every first dimension dynamic and unnamed: a batch axis, but nothing ties the sizes.
        "gather": write_graph(
            directory,
            "gather",
            [node("Gather", ["x", "indices"], ["y"])],
            {"x": (FLOAT, [None, 4]), "indices": (INT64, [None])},
            {"y": (FLOAT, [None, 4])},
        ),
        # Split sizes are data: zeros (the synthetic warm-up) do not add up to the input.
        "split": write_graph(
            directory,
            "split",
            [node("Split", ["x", "sizes"], ["head", "tail"], name="splitter")],
            {"x": (FLOAT, [None]), "sizes": (INT64, [2])},
            {"head": (FLOAT, [None]), "tail": (FLOAT, [None])},
        ),
        "reshape": write_graph(
            directory,
            "reshape",
            [node("Reshape", ["x", "shape"], ["y"], name="to_shape")],
            {"x": (FLOAT, [2, 3]), "shape": (INT64, [2])},
            {"y": (FLOAT, [None, None])},
        ),
    }


def tensor(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    datatype = {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def infer(server: RunningProcess, model: str, **inputs: np.ndarray[Any, Any]) -> httpx.Response:
    body = {"inputs": [tensor(name, array) for name, array in inputs.items()]}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=10)


def outputs(response: httpx.Response) -> dict[str, np.ndarray[Any, Any]]:
    assert response.status_code == 200, response.text
    return {
        out["name"]: np.array(out["data"]).reshape(out["shape"])
        for out in response.json()["outputs"]
    }


@pytest.fixture(scope="module")
def split_server(graphs: dict[str, Path]) -> Iterator[RunningProcess]:
    with serve_model(graphs["split"], "split") as server:
        yield server


@pytest.mark.parametrize(
    ("leading", "expected"),
    [
        ([None, None, None], True),  # skl2onnx leaves the batch dimension unnamed
        (["batch", None, "batch"], True),
        (["N", "M", None], False),
        ([None, 4], False),
        ([None, 0], False),  # a scalar has no first dimension
        ([], False),
    ],
)
def test_batch_axis_needs_one_dynamic_first_dimension_everywhere(
    leading: list[int | str | None], expected: bool
) -> None:
    assert has_batch_axis(leading) is expected


def test_inputs_without_a_shared_batch_dimension_are_run_as_sent(
    graphs: dict[str, Path],
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    a, b = np.ones((1, 4), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)
    with (
        serve_model(graphs["matmul"], "matmul", extra_args=["--max-rows", "1"]) as matmul,
        serve_model(graphs["concat"], "concat") as concat,
        serve_model(graphs["gather"], "gather", extra_args=["--max-rows", "5"]) as gather,
    ):
        # 2 rows against a row limit of 1: the limit counts a batch axis, and there is none.
        np.testing.assert_allclose(outputs(infer(matmul, "matmul", x=x, w=w))["y"], x @ w, 1e-5)
        np.testing.assert_array_equal(
            outputs(infer(concat, "concat", a=a, b=b))["c"], np.concatenate([a, b])
        )
        table = np.arange(20, dtype=np.float32).reshape(5, 4)
        picked = outputs(infer(gather, "gather", x=table, indices=np.array([4, 0])))["y"]
        np.testing.assert_array_equal(picked, table[[4, 0]])
        too_many = infer(gather, "gather", x=np.zeros((6, 4), np.float32), indices=np.array([0]))
        assert too_many.status_code == 413, too_many.text
        # Still validated against the metadata: w's shape is fixed.
        wrong = infer(matmul, "matmul", x=x, w=w[:2])
        assert wrong.status_code == 400
        assert "input 'w' has shape [2, 3], the model expects [4, 3]" in wrong.json()["error"]


def test_a_model_whose_rows_mix_is_not_batched_and_answers_each_request_right(
    graphs: dict[str, Path],
) -> None:
    # Gather's shapes say "batch axis", but its indices are row numbers: merged requests would
    # read each other's rows. The warm-up probe finds out and turns batching off.
    tables = [np.full((2, 4), k, dtype=np.float32) for k in range(24)]
    with serve_model(graphs["gather"], "gather") as server:
        assert "batching off" in server.output()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(
                    lambda table: infer(server, "gather", x=table, indices=np.array([1, 0])),
                    tables,
                )
            )
    for table, answer in zip(tables, answers, strict=True):
        np.testing.assert_array_equal(outputs(answer)["y"], table[[1, 0]])


def test_a_model_that_refuses_the_synthetic_warm_up_still_serves(
    split_server: RunningProcess,
) -> None:
    assert "refused a synthetic request" in split_server.output()
    answer = outputs(
        infer(
            split_server,
            "split",
            x=np.arange(4, dtype=np.float32),
            sizes=np.array([1, 3], dtype=np.int64),
        )
    )
    assert answer["head"].tolist() == [0.0]
    assert answer["tail"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("model", "inputs", "fragment"),
    [
        (
            "split",
            {"x": np.zeros(4, np.float32), "sizes": np.array([3, 3], np.int64)},
            "Split node 'splitter': Invalid value in 'split'",
        ),
        (
            "reshape",
            {"x": np.zeros((2, 3), np.float32), "shape": np.array([5, 5], np.int64)},
            "Reshape node 'to_shape': The input tensor cannot be reshaped to the requested "
            "shape. Input shape:{2,3}, requested shape:{5,5}",
        ),
    ],
)
def test_values_the_model_cannot_run_on_are_422_without_source_paths(
    graphs: dict[str, Path],
    split_server: RunningProcess,
    model: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    fragment: str,
) -> None:
    with serve_model(graphs["reshape"], "reshape") as reshape_server:
        server = {"split": split_server, "reshape": reshape_server}[model]
        response = infer(server, model, **inputs)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error.startswith("the model cannot run on these inputs: ")
    assert fragment in error
    assert "onnxruntime_src" not in error and "::" not in error and ".h:" not in error


def test_rejections_name_the_node_and_keep_only_the_complaint(graphs: dict[str, Path]) -> None:
    model = load_model(graphs["reshape"], "reshape", "1", None, 1)
    with pytest.raises(Exception, match="Reshape node 'to_shape'") as caught:
        model.run({"x": np.zeros((2, 3), np.float32), "shape": np.array([5, 5], np.int64)})
    assert type(caught.value).__name__ == "ModelRejected"
    # onnxruntime's own text for a failure inside a kernel (a source location, the C++ function,
    # the failed check) and for a failure that is no node's.
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. "
        "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/math/"
        "element_wise_ops.h:583 void onnxruntime::BroadcastIterator::Append(ptrdiff_t, ptrdiff_t) "
        "axis == 1 || axis == largest was false. Attempting to broadcast an axis by a dimension "
        "other than 1. 2 by 4\n"
    )
    assert describe_rejection(raw) == (
        "the model cannot run on these inputs: Add node: Attempting to broadcast an axis by a "
        "dimension other than 1. 2 by 4"
    )
    assert describe_rejection("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : bad_alloc") is None


def test_an_example_request_warms_up_and_must_succeed(
    graphs: dict[str, Path], iris: BuiltModel
) -> None:
    example = {
        "inputs": [
            tensor("x", np.arange(4, dtype=np.float32)),
            tensor("sizes", np.array([2, 2], np.int64)),
        ]
    }
    warm = ["--warmup-example", json.dumps(example)]
    with serve_model(graphs["split"], "split", extra_args=warm) as server:
        assert "refused a synthetic request" not in server.output()
    # A records instance (the form of the modeldeploy.dev/example-instance annotation), from env.
    env = {"MODELDEPLOY_WARMUP_EXAMPLE": '{"input": [5.1, 3.5, 1.4, 0.2]}'}
    with serve_model(iris.path, "iris", env=env) as server:
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    example["inputs"][1] = tensor("sizes", np.array([3, 3], np.int64))
    refused = subprocess.run(
        [
            *server_command(),
            "serve",
            "--model-path",
            str(graphs["split"]),
            "--model-name",
            "split",
            "--port",
            "0",
            "--warmup-example",
            json.dumps(example),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "warm-up with the example request failed: the model cannot run" in refused.stderr
