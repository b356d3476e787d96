"""Real v2 clients, unmodified: NVIDIA's tritonclient[http] and KServe's InferenceRESTClient."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from tests.models import MIXED_FLOAT_COLUMNS, MIXED_STRING_COLUMNS, BuiltModel
from tests.processes import RunningProcess

ATOL = 1e-5


def triton_client(server: RunningProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def test_triton_health_and_metadata(iris_server: RunningProcess) -> None:
    client = triton_client(iris_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert not client.is_model_ready("absent")
    metadata = client.get_model_metadata("iris")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_triton_infer(iris: BuiltModel, iris_server: RunningProcess, binary: bool) -> None:
    client = triton_client(iris_server)
    features = np.asarray(iris.features, dtype=np.float32)
    tensor = triton.InferInput("input", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features, binary_data=binary)
    result = client.infer(
        "iris",
        [tensor],
        model_version="1",
        request_id="req-42",
        outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary),
            triton.InferRequestedOutput("label", binary_data=not binary),
        ],
    )
    assert result.get_response()["id"] == "req-42"
    np.testing.assert_array_equal(result.as_numpy("label"), iris.estimator.predict(features))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), iris.estimator.predict_proba(features), atol=ATOL
    )


def test_triton_infer_all_outputs_binary_by_default(
    mixed: BuiltModel, mixed_server: RunningProcess
) -> None:
    frame = mixed.features
    inputs = []
    for column in MIXED_STRING_COLUMNS:
        tensor = triton.InferInput(column, [len(frame), 1], "BYTES")
        tensor.set_data_from_numpy(frame[[column]].to_numpy().astype(np.object_))
        inputs.append(tensor)
    for column in MIXED_FLOAT_COLUMNS:
        tensor = triton.InferInput(column, [len(frame), 1], "FP32")
        tensor.set_data_from_numpy(frame[[column]].to_numpy().astype(np.float32))
        inputs.append(tensor)
    # No requested outputs: tritonclient asks for every output in binary.
    result = triton_client(mixed_server).infer("mixed", inputs, model_version="v2")
    np.testing.assert_array_equal(result.as_numpy("label"), mixed.estimator.predict(frame))


def test_triton_errors_surface_as_exceptions(iris_server: RunningProcess) -> None:
    client = triton_client(iris_server)
    tensor = triton.InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(triton.InferenceServerException, match="has shape \\[1, 3\\]"):
        client.infer("iris", [tensor])


def test_kserve_v2_client(iris: BuiltModel, iris_server: RunningProcess) -> None:
    features = np.asarray(iris.features, dtype=np.float32)

    async def run() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        try:
            assert await client.is_server_ready(iris_server.url)
            assert await client.is_model_ready(iris_server.url, "iris")
            for binary in (False, True):
                tensor = InferInput("input", list(features.shape), "FP32")
                tensor.set_data_from_numpy(features, binary_data=binary)
                response = await client.infer(
                    iris_server.url,
                    InferRequest("iris", [tensor], request_id="k-1"),
                    model_name="iris",
                )
                outputs = {output.name: output.as_numpy() for output in response.outputs}
                np.testing.assert_array_equal(outputs["label"], iris.estimator.predict(features))
                np.testing.assert_allclose(
                    outputs["probabilities"], iris.estimator.predict_proba(features), atol=ATOL
                )
        finally:
            await client.close()

    asyncio.run(run())


def test_kserve_v1_client(iris: BuiltModel, iris_server: RunningProcess) -> None:
    features = np.asarray(iris.features, dtype=np.float32)

    async def run() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v1", retries=0))
        try:
            assert await client.is_model_ready(iris_server.url, "iris")
            response = await client.infer(
                iris_server.url, {"instances": features.tolist()}, model_name="iris"
            )
            labels = [prediction["label"] for prediction in response["predictions"]]
            np.testing.assert_array_equal(labels, iris.estimator.predict(features))
        finally:
            await client.close()

    asyncio.run(run())
