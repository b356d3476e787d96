"""The onnxruntime adapter: load and verify a model, describe it, run it."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modeldeploy_server.digest import sha256_file
from modeldeploy_server.errors import ConfigError, ModelExecutionError, ModelRejected
from modeldeploy_server.metadata import (
    ONNX_TO_V2,
    V2_TO_NUMPY,
    ModelMetadata,
    TensorSpec,
    has_batch_axis,
)

logger = logging.getLogger("uvicorn.error")

# onnxruntime's messages: "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while
# running Reshape node. Name:'r' Status Message: /onnxruntime_src/.../reshape_helper.h:91
# onnxruntime::ReshapeHelper::ReshapeHelper(const ...&, bool) a == b was false. The input ..."
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE_FAILURE = re.compile(
    r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ",
)
# A source location, then the C++ function it is in (one level of nested parentheses), then the
# failed check's expression: internals, not the model's complaint.
_SOURCE_LOCATION = re.compile(
    r"\S+\.(?:h|hpp|cc|cpp|c):\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\)(?: const)? )?"
    r"(?:.*? was false\. )?"
)


def _spec(node: Any) -> TensorSpec:
    datatype = ONNX_TO_V2.get(node.type)
    if datatype is None:
        raise ConfigError(f"model tensor {node.name!r} has type {node.type}, not servable over v2")
    # Symbolic dims come back as strings, unknown ones as None: both are dynamic (-1).
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
    return TensorSpec(node.name, datatype, shape)


class OnnxModel:
    """One loaded ONNX model; `run` is blocking and must run off the event loop."""

    def __init__(self, session: ort.InferenceSession, metadata: ModelMetadata) -> None:
        self._session = session
        self.metadata = metadata
        self._output_names = [spec.name for spec in metadata.outputs]

    def run(self, feed: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model on validated inputs."""
        try:
            results = self._session.run(self._output_names, dict(feed))
        except Exception as exc:
            complaint = describe_rejection(str(exc))
            if complaint is None:
                logger.error("model execution failed: %s", exc)
                raise ModelExecutionError(
                    f"model execution failed: {_without_internals(str(exc))}"
                ) from None
            raise ModelRejected(complaint) from None
        return dict(zip(self._output_names, results, strict=True))

    def synthetic_feed(self) -> dict[str, np.ndarray[Any, Any]]:
        """A one-row input of zeros (empty strings) for warm-up."""
        feed: dict[str, np.ndarray[Any, Any]] = {}
        for spec in self.metadata.inputs:
            shape = tuple(1 if dim == -1 else dim for dim in spec.shape)
            if spec.datatype == "BYTES":
                feed[spec.name] = np.full(shape, "", dtype=object)
            else:
                feed[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
        return feed


def describe_rejection(message: str) -> str | None:
    """The client's share of an onnxruntime run failure: which node refused the request's values
    and why, without source paths; None when the failure is not about the request's values
    (validation already matched names, datatypes and shapes to the model)."""
    text = _without_internals(message)
    node = _NODE_FAILURE.search(text)
    if node is None:
        if not message.startswith("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT"):
            return None
        return f"the model cannot run on these inputs: {text}"
    op, name = node.group(1), node.group(2)
    where = f"{op} node {name!r}" if name else f"{op} node"
    return f"the model cannot run on these inputs: {where}: {text[node.end() :]}"


def _without_internals(message: str) -> str:
    """An onnxruntime message without its error-code prefix, source locations, C++ function
    names and failed-check expressions."""
    return _SOURCE_LOCATION.sub("", _ORT_PREFIX.sub("", message.strip())).strip()


def load_model(
    path: Path, name: str, version: str, expected_sha256: str | None, intra_op_threads: int
) -> OnnxModel:
    """Verify the file's sha256, then load it; raises ConfigError with a clear message."""
    try:
        sha256 = sha256_file(path)
    except OSError as exc:
        raise ConfigError(f"cannot read model file {path}: {exc.strerror}") from None
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ConfigError(
            f"model file {path} has sha256 {sha256}, expected {expected_sha256}; refusing to serve"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Fatal only: onnxruntime would print every failed run with its source paths, while a refusal
    # is the client's answer (422) and a fault is logged by `run`, once. Per-run options instead
    # would cost a logger per run.
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ConfigError(f"onnxruntime cannot load {path} as an ONNX model: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    leading = [node.shape[0] if node.shape else 0 for node in (*inputs, *outputs)]
    batch_axis = bool(inputs) and has_batch_axis(leading)
    metadata = ModelMetadata(
        name=name,
        version=version,
        sha256=sha256,
        inputs=tuple(_spec(node) for node in inputs),
        outputs=tuple(_spec(node) for node in outputs),
        batch_axis=batch_axis,
        batch_axis_named=batch_axis and any(isinstance(dim, str) for dim in leading),
    )
    return OnnxModel(session, metadata)
