"""The v2 codec on its own: every datatype both ways, JSON and binary, and strictness."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest

from modeldeploy_server.codec import (
    RequestedOutput,
    decode_infer_request,
    encode_infer_response,
    may_hold_booleans,
    select_outputs,
)
from modeldeploy_server.errors import InvalidInput, MalformedRequest
from modeldeploy_server.metadata import V2_TO_NUMPY, ModelMetadata, TensorSpec
from modeldeploy_server.records import decode_example

SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True],
    "INT8": [-128, 0, 5, 127],
    "INT16": [-32768, 1, 2, 32767],
    "INT32": [-(2**31), 0, 7, 2**31 - 1],
    "INT64": [-(2**63), 0, 9, 2**63 - 1],
    "UINT8": [0, 1, 200, 255],
    "UINT16": [0, 1, 2, 65535],
    "UINT32": [0, 1, 2, 2**32 - 1],
    "UINT64": [0, 1, 2, 2**64 - 1],
    "FP16": [0.5, -1.0, 2.0, 65504.0],
    "FP32": [0.1, -1.5, 3.25, 1e30],
    "FP64": [0.1, -1.5, 3.25, 1e300],
    "BYTES": ["a", "", "ünïcode", "x y"],
}


def assert_values(datatype: str, got: list[Any], expected: list[Any]) -> None:
    if datatype.startswith("FP"):
        assert got == pytest.approx(expected, rel=1e-3)
    else:
        assert got == expected


def request(datatype: str, data: Any, shape: list[int] | None = None, **extra: Any) -> bytes:
    tensor = {"name": "x", "datatype": datatype, "shape": shape or [2, 2], "data": data}
    return orjson.dumps({"inputs": [tensor], **extra})


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_decodes_from_json_flat_or_nested(datatype: str) -> None:
    values = SAMPLES[datatype]
    for data in (values, [values[:2], values[2:]]):
        (tensor,) = decode_infer_request(request(datatype, data)).inputs
        assert tensor.datatype == datatype
        assert tensor.array.shape == (2, 2)
        assert tensor.array.dtype == V2_TO_NUMPY[datatype]
        assert_values(datatype, tensor.array.ravel().tolist(), values)


NUMERIC = [datatype for datatype in SAMPLES if datatype not in ("BOOL", "BYTES")]


@pytest.mark.parametrize("datatype", NUMERIC)
# Apart from the boolean, each is valid data for every numeric datatype.
@pytest.mark.parametrize("data", [[True, 1, 2, 3], [1, 2, 3, False], [[1, 2], [True, 3]]])
def test_json_booleans_among_numbers_are_refused(datatype: str, data: list[Any]) -> None:
    # numpy would read true as 1 and false as 0; a client sending booleans for numbers has a bug.
    with pytest.raises(InvalidInput, match=f"input 'x': data does not hold {datatype} values"):
        decode_infer_request(request(datatype, data))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"data": [1.5, 2]}', False),
        (b'{"data": [1.5, true]}', True),
        (b'{"data": [false]}', True),
        (b'{"id": "true", "data": [1.5]}', True),  # only a string: the value check still runs
        (memoryview(b'{"data": [true]}'), True),  # the JSON header of a binary request
    ],
)
def test_booleans_are_looked_for_only_in_texts_that_can_hold_them(
    text: bytes | memoryview, expected: bool
) -> None:
    assert may_hold_booleans(text) is expected


def test_booleans_in_the_json_header_of_a_binary_request_are_refused() -> None:
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2], "data": [True, 1.5]},
                {
                    "name": "y",
                    "datatype": "FP32",
                    "shape": [1],
                    "parameters": {"binary_data_size": 4},
                },
            ]
        }
    )
    with pytest.raises(InvalidInput, match="input 'x': data does not hold FP32 values"):
        decode_infer_request(body + struct.pack("<f", 2.0), header_length=len(body))


@pytest.mark.parametrize("data", [[True, 1, 0, False], [[1.0, True], [False, 0.0]], [1, 0, 1, 0]])
def test_json_numbers_for_bool_are_refused(data: list[Any]) -> None:
    with pytest.raises(InvalidInput, match="input 'x': data does not hold BOOL values"):
        decode_infer_request(request("BOOL", data))


def binary_bytes(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
    return (
        np.array(values, dtype=V2_TO_NUMPY[datatype])
        .astype(V2_TO_NUMPY[datatype].newbyteorder("<"))
        .tobytes()
    )


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_round_trips_through_the_binary_extension(datatype: str) -> None:
    values = SAMPLES[datatype]
    raw = binary_bytes(datatype, values)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": [4],
                 "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    )  # fmt: skip
    (tensor,) = decode_infer_request(header + raw, len(header)).inputs
    body, json_length = encode_infer_response("m", "1", "id-7", [("y", tensor.array, True)])
    assert json_length is not None
    document = orjson.loads(body[:json_length])
    assert document["id"] == "id-7"
    assert document["outputs"][0]["datatype"] == datatype
    assert document["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    assert body[json_length:] == raw


@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_encodes_to_json(datatype: str) -> None:
    array = decode_infer_request(request(datatype, SAMPLES[datatype])).inputs[0].array
    body, json_length = encode_infer_response("m", "1", None, [("y", array, False)])
    assert json_length is None
    (output,) = orjson.loads(body)["outputs"]
    assert output == {
        "name": "y",
        "datatype": datatype,
        "shape": [2, 2],
        "data": output["data"],
    }
    assert_values(datatype, output["data"], SAMPLES[datatype])
    assert "id" not in orjson.loads(body)


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b"", MalformedRequest, "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", MalformedRequest, "not valid UTF-8 JSON"),
        (b"[]", MalformedRequest, "must be a JSON object"),
        (b'{"inputs": {}}', MalformedRequest, "inputs must be a list"),
        (b'{"inputs": [1]}', MalformedRequest, "inputs[0] must be an object"),
        (b'{"inputs": [{"name": 3}]}', MalformedRequest, "name must be a non-empty string"),
        (b'{"id": 5, "inputs": []}', MalformedRequest, "id must be a string"),
        (request("FP32", [1, 2, 3], [2, 2]), InvalidInput, "needs 4 values, data has 3"),
        (request("FP32", [[1, 2], [3]]), InvalidInput, "not a rectangular array"),
        (request("FP32", ["1", "2", "3", "4"]), InvalidInput, "does not hold FP32"),
        (request("FP32", [True, False, True, True]), InvalidInput, "does not hold FP32"),
        (request("INT32", [1.5, 2, 3, 4]), InvalidInput, "does not hold INT32"),
        (request("INT8", [1, 2, 3, 128]), InvalidInput, "out of range for INT8"),
        (request("UINT8", [1, 2, 3, -1]), InvalidInput, "out of range for UINT8"),
        (request("FP32", [1, 2, 3, 1e39]), InvalidInput, "out of range for FP32"),
        (request("FP32", []), InvalidInput, "needs 4 values, data has 0"),
        (request("FP16", [[1, 2], [3, -7e4]]), InvalidInput, "out of range for FP16"),
        (request("FP32", [-1e300] * 100, [10, 10]), InvalidInput, "out of range for FP32"),
        (request("BOOL", [1, 0, 1, 0]), InvalidInput, "does not hold BOOL"),
        (request("BYTES", ["a", 1, "b", "c"]), InvalidInput, "BYTES data must be"),
        (request("BF16", [1, 2, 3, 4]), InvalidInput, "datatype must be one of"),
        (request("FP32", [1, 2, 3, 4], [-1, 4]), InvalidInput, "shape must be a list"),
        (request("FP32", [1, 2, 3, 4], [True, 4]), InvalidInput, "shape must be a list"),
        (request("FP32", None), InvalidInput, "does not hold FP32"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', MalformedRequest,
         "has no data"),
        (request("FP32", [1, 2, 3, 4], outputs={"name": "y"}), MalformedRequest,
         "outputs must be a list"),
        (request("FP32", [1, 2, 3, 4], parameters=[]), MalformedRequest,
         "parameters must be an object"),
    ],
)  # fmt: skip
def test_bad_requests_raise_errors_that_say_where(body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        decode_infer_request(body)


def test_binary_sizes_must_account_for_every_byte() -> None:
    header = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2],
                     "parameters": {"binary_data_size": 8}}]}
    )  # fmt: skip
    raw = np.array([1, 2], dtype="<f4").tobytes()
    with pytest.raises(MalformedRequest, match="4 bytes of binary data belong to no input"):
        decode_infer_request(header + raw + b"xxxx", len(header))
    with pytest.raises(MalformedRequest, match="does not fit the binary section"):
        decode_infer_request(header + raw[:4], len(header))
    with pytest.raises(MalformedRequest, match="does not fit the body"):
        decode_infer_request(header + raw, len(header) + 100)
    with pytest.raises(InvalidInput, match="not length-prefixed UTF-8"):
        bad = orjson.dumps(
            {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1],
                         "parameters": {"binary_data_size": 5}}]}
        )  # fmt: skip
        decode_infer_request(bad + b"\x01\x00\x00\x00\xff", len(bad))


def test_requested_outputs_select_a_subset_in_the_requested_form() -> None:
    decoded = decode_infer_request(
        request(
            "FP32",
            [1, 2, 3, 4],
            outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}],
            parameters={"custom": 1},
        )
    )
    assert decoded.outputs == (RequestedOutput("probabilities", True),)
    assert decoded.parameters == {"custom": 1}
    assert select_outputs(decoded, ["label", "probabilities"]) == [("probabilities", True)]
    everything = decode_infer_request(
        request("FP32", [1, 2, 3, 4], parameters={"binary_data_output": True})
    )
    assert select_outputs(everything, ["label", "probabilities"]) == [
        ("label", True),
        ("probabilities", True),
    ]
    with pytest.raises(InvalidInput, match="unknown output 'nope'"):
        select_outputs(
            decode_infer_request(request("FP32", [1, 2, 3, 4], outputs=[{"name": "nope"}])),
            ["label"],
        )


def test_a_warm_up_example_is_a_records_instance_or_a_v2_request() -> None:
    metadata = ModelMetadata(
        "m",
        "1",
        "0" * 64,
        (TensorSpec("x", "FP32", (-1, 2)), TensorSpec("inputs", "INT64", (-1, 1))),
        (TensorSpec("y", "FP32", (-1,)),),
        batch_axis=True,
    )
    # An input may be called "inputs": only a list of objects makes a v2 request.
    instance = decode_example({"x": [1.5, 2], "inputs": 7}, metadata)
    assert [(t.name, t.array.tolist()) for t in instance] == [("x", [[1.5, 2]]), ("inputs", [[7]])]
    v2 = decode_example(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}, metadata
    )
    assert [(t.name, t.datatype, t.array.tolist()) for t in v2] == [("x", "FP32", [1.0, 2.0])]
