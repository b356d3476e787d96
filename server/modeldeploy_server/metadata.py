"""A model's signature as plain data, and the validation of decoded tensors against it."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modeldeploy_server.errors import InvalidInput, PayloadTooLarge

# The Open Inference Protocol v2 datatypes that ONNX has, and their numpy dtypes (plain data).
# BYTES tensors are numpy object arrays of str, which is what onnxruntime takes for tensor(string).
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
ONNX_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
NUMPY_TO_V2: dict[np.dtype[Any], str] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: v2 datatype and shape, -1 for a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        """The v2 metadata form."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMetadata:
    """What the server knows about the model it serves."""

    name: str
    version: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Requests merge along the first dimension, and the row limit applies to it (see
    # has_batch_axis); a model without one runs each request exactly as sent.
    batch_axis: bool
    # The graph names the batch axis, so a request's inputs must agree on its size; unnamed, they
    # may differ (nothing ties them), and such a request runs alone.
    batch_axis_named: bool = False

    @functools.cached_property
    def input_specs(self) -> dict[str, TensorSpec]:
        """Inputs by name."""
        return {spec.name: spec for spec in self.inputs}

    @property
    def uniform(self) -> bool:
        """No input has a dynamic dimension besides the batch one, and a request's inputs cannot
        disagree on that one (so valid requests merge)."""
        return (self.batch_axis_named or len(self.inputs) == 1) and all(
            -1 not in spec.shape[1:] for spec in self.inputs
        )

    def as_json(self) -> dict[str, Any]:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnxruntime_onnx",
            "inputs": [spec.as_json() for spec in self.inputs],
            "outputs": [spec.as_json() for spec in self.outputs],
        }


def has_batch_axis(leading_dims: Sequence[int | str | None]) -> bool:
    """Whether the graph lets requests merge along their first dimension: `leading_dims` holds the
    first dimension of every input and output as ONNX declares it (an int when fixed, a name when
    symbolic, None when unnamed, 0 for a scalar). Every one must be dynamic, and all the named
    ones must share one name: two names are two independent sizes (Concat's [N, 4] and [M, 4])."""
    names = {dim for dim in leading_dims if isinstance(dim, str)}
    return (
        bool(leading_dims)
        and all(dim is None or isinstance(dim, str) for dim in leading_dims)
        and len(names) <= 1
    )


# Per-request records are plain slotted dataclasses: a frozen one costs 4x as much to create.
@dataclass(slots=True)
class DecodedTensor:
    """An input tensor as the client sent it, already converted to its declared datatype."""

    name: str
    datatype: str
    array: np.ndarray[Any, Any]


def validate_inputs(
    tensors: Sequence[DecodedTensor], metadata: ModelMetadata, max_rows: int
) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
    """Check names, datatypes and shapes against the model; return the feed and its row count
    (1 for a model without a batch axis: its requests run as sent, whatever their sizes; the
    largest first dimension when the inputs' unnamed batch dimensions differ)."""
    specs = metadata.input_specs
    batch_axis = metadata.batch_axis
    feed: dict[str, np.ndarray[Any, Any]] = {}
    rows = -1
    for tensor in tensors:
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are {sorted(specs)}")
        if name in feed:
            raise InvalidInput(f"input {name!r} is given more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input {name!r} has datatype {tensor.datatype}, the model expects {spec.datatype}"
            )
        shape = tensor.array.shape
        if len(shape) != len(spec.shape) or any(
            want != -1 and want != got for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise InvalidInput(
                f"input {name!r} has shape {list(shape)}, the model expects {list(spec.shape)} "
                "(-1: any size)"
            )
        if batch_axis:
            first = shape[0]
            if rows not in (-1, first) and metadata.batch_axis_named:
                raise InvalidInput(
                    f"inputs disagree on the batch dimension ({rows} and {first} rows)"
                )
            if first > rows:
                rows = first
        feed[name] = tensor.array
    if len(feed) != len(specs):
        missing = [name for name in specs if name not in feed]
        raise InvalidInput(f"missing input(s) {missing}; the model needs {list(specs)}")
    if not batch_axis:
        return feed, 1
    if rows > max_rows:
        raise PayloadTooLarge(f"request has {rows} rows, the limit is {max_rows}")
    return feed, rows
