"""Conformance: every ONNX backend node test case that onnxruntime runs is served.

The cases are onnx's own operator tests (`onnx.backend.test.case.node`: the generators that write
onnx/backend/test/data/node/*/model.onnx and test_data_set_0/*.pb; onnx wheels now ship the
generators rather than the files, so the cases are generated here, in memory). A case is included
when onnxruntime, in this process, loads its model, runs data set 0 and matches the expected outputs
within the case's tolerances: computed, not listed. Each included model is served by the server's
own app and uvicorn setup on a loopback port (one server per model, on a thread of this process so
that starting one costs milliseconds, not a process), and checked with tritonclient's HTTP client:
the metadata against the ONNX graph, then the outputs through v2 JSON (when every value has a JSON
form) and through the binary tensor extension. The counts (ran, passed, excluded per reason) are
printed and written to $MODELDEPLOY_CONFORMANCE_REPORT when that is set.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton

from modeldeploy_server.app import build_app
from modeldeploy_server.config import ServeConfig
from modeldeploy_server.errors import ConfigError
from modeldeploy_server.http_server import build_server
from modeldeploy_server.metadata import NUMPY_TO_V2, ONNX_TO_V2
from modeldeploy_server.runtime import load_model

LOOPBACK = "127.0.0.1"
NOT_LOADED = "onnxruntime cannot load the model"
NOT_RUN = "onnxruntime fails on data set 0"
DIFFERENT = "onnxruntime's outputs differ from the expected ones"
NOT_TENSOR = "onnxruntime runs it, but an input or output is not a tensor (v2 carries tensors)"
NO_DATATYPE = "onnxruntime runs it, but a tensor type has no v2 datatype (bfloat16, float8...)"


@dataclass(frozen=True)
class Case:
    """One node test case: the model, data set 0, and its tolerances."""

    name: str
    model: onnx.ModelProto
    inputs: dict[str, Any]
    outputs: list[Any]
    rtol: float
    atol: float


def generate_cases() -> list[Case]:
    """onnx's node test cases, generated the way `backend-test-tools generate-data` does."""
    with warnings.catch_warnings():
        # The reference implementations divide by zero and overflow on purpose.
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        generated = collect_testcases()
    cases = []
    for case in generated:
        assert case.model is not None and case.data_sets, case.name
        inputs, outputs = case.data_sets[0]
        initializers = {init.name for init in case.model.graph.initializer}
        names = [i.name for i in case.model.graph.input if i.name not in initializers]
        # Values as the .pb files would give them: the generators also use numpy scalars for
        # rank-0 tensors and TensorProtos for types numpy lacks (the cast tests).
        feed = {name: _tensor(value) for name, value in zip(names, inputs, strict=False)}
        expected = [_tensor(value) for value in outputs]
        cases.append(Case(case.name, case.model, feed, expected, case.rtol, case.atol))
    return cases


def _tensor(value: Any) -> Any:
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return np.asarray(value) if isinstance(value, np.generic) else value


def mismatch(expected: Sequence[Any], got: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Why `got` is not `expected` (output by output, values, dtypes and shapes), or None."""
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        if not isinstance(want, np.ndarray) or not isinstance(have, np.ndarray):
            return f"output {index} is not a tensor"
        if want.dtype == object:
            want, have = _strings(want), _strings(have)
        elif want.dtype != have.dtype:
            return f"output {index} has dtype {have.dtype}, expected {want.dtype}"
        try:
            if want.dtype.kind in "fc":
                np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, equal_nan=True)
            else:
                np.testing.assert_array_equal(have, want, strict=True)
        except AssertionError as exc:
            return f"output {index}: {str(exc).strip()[:300]}"
    return None


def _strings(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    texts = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return np.array(texts, dtype=object).reshape(array.shape)


def exclusion(case: Case) -> str | None:
    """Why the case is not one onnxruntime itself runs with a v2 signature, or None."""
    try:
        session = ort.InferenceSession(
            case.model.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"]
        )
    except Exception:
        return NOT_LOADED
    try:
        got = session.run(None, case.inputs)
    except Exception:
        return NOT_RUN
    unservable = _v2_types(session)
    if unservable is not None:
        return unservable
    return None if mismatch(case.outputs, got, case.rtol, case.atol) is None else DIFFERENT


def _v2_types(session: ort.InferenceSession) -> str | None:
    types = [node.type for node in (*session.get_inputs(), *session.get_outputs())]
    if any(not t.startswith("tensor(") for t in types):
        return NOT_TENSOR
    if any(t not in ONNX_TO_V2 for t in types):
        return NO_DATATYPE
    return None


def _quiet_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return options


def graph_signature(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """The v2 metadata the graph declares: names, datatypes, shapes (-1 where not fixed)."""
    initializers = {init.name for init in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        datatype = NUMPY_TO_V2[onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)]
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "datatype": datatype, "shape": dims}

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
    }


class InProcessServer:
    """`modeldeploy-server serve`'s app and uvicorn setup on a thread, on a loopback port."""

    def __init__(self) -> None:
        self._stopping: list[threading.Thread] = []

    @contextlib.contextmanager
    def serve(self, path: Path, name: str) -> Iterator[str]:
        config = ServeConfig(model_path=path, model_name=name, host=LOOPBACK, port=0)
        app, _ = build_app(config, load_model(path, name, "1", None, 1))
        server = build_server(
            app,
            host=LOOPBACK,
            port=0,
            access_log=False,
            graceful_shutdown_s=1,
            edge=config.edge,
            on_drain=lambda: None,
            log_level="error",
            log_config=None,
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive(), f"the server for {name} stopped while starting"
            assert time.monotonic() < deadline, f"the server for {name} did not start in 30 s"
            time.sleep(0.001)
        try:
            yield f"{LOOPBACK}:{port}"
        finally:
            # uvicorn notices should_exit within 0.1 s; join later, not one by one.
            server.should_exit = True
            self._stopping.append(thread)
            sock.close()

    def join(self) -> None:
        """Wait for every server started so far to stop."""
        for thread in self._stopping:
            thread.join(10)
            assert not thread.is_alive(), "a server did not stop"
        self._stopping.clear()


def _has_json_form(values: Sequence[Any]) -> bool:
    for array in values:
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return False  # JSON has no NaN or infinity
        if array.dtype == object and any(
            isinstance(v, bytes) and not _utf8(v) for v in array.reshape(-1)
        ):
            return False
    return True


def _utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def infer(address: str, case: Case, binary: bool) -> list[np.ndarray[Any, Any]]:
    """The case's outputs, in graph order, as tritonclient reads them from the server."""
    client = triton.InferenceServerClient(address, network_timeout=30)
    try:
        inputs = []
        for name, array in case.inputs.items():
            tensor = triton.InferInput(name, list(array.shape), NUMPY_TO_V2[array.dtype])
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        names = [output.name for output in case.model.graph.output]
        requested = [triton.InferRequestedOutput(n, binary_data=binary) for n in names]
        result = client.infer(case.name, inputs, outputs=requested)
        return [_as_numpy(result, name) for name in names]
    finally:
        client.close()


def _as_numpy(result: triton.InferResult, name: str) -> np.ndarray[Any, Any]:
    array: np.ndarray[Any, Any] | None = result.as_numpy(name)
    assert array is not None, f"no output {name}"
    return array


def check_served(server: InProcessServer, directory: Path, case: Case) -> tuple[str | None, bool]:
    """Serve the case's model and check it; returns (what went wrong or None, JSON checked)."""
    path = directory / f"{case.name}.onnx"
    path.write_bytes(case.model.SerializeToString())
    with server.serve(path, case.name) as address:
        client = triton.InferenceServerClient(address)
        try:
            if not client.is_model_ready(case.name):
                return "not ready", False
            metadata = client.get_model_metadata(case.name)
        finally:
            client.close()
        expected = graph_signature(case.model)
        for side in ("inputs", "outputs"):
            if metadata[side] != expected[side]:
                return f"metadata {side} {metadata[side]} != graph {expected[side]}", False
        problem = mismatch(case.outputs, infer(address, case, binary=True), case.rtol, case.atol)
        if problem is not None:
            return f"binary: {problem}", False
        values = [*case.inputs.values(), *case.outputs]
        if not _has_json_form(values):
            return None, False
        problem = mismatch(case.outputs, infer(address, case, binary=False), case.rtol, case.atol)
        return (None if problem is None else f"json: {problem}"), True


# About 1,900 cases, 1,500 of them served: a minute or two on 2 cores, more when they are busy.
@pytest.mark.timeout(1200)
def test_every_node_case_onnxruntime_runs_is_served(tmp_path: Path) -> None:
    started = time.monotonic()
    cases = generate_cases()
    excluded: collections.Counter[str] = collections.Counter()
    refused_as_expected = 0
    included = []
    for case in cases:
        reason = exclusion(case)
        if reason is None:
            included.append(case)
            continue
        excluded[reason] += 1
        if reason in (NOT_TENSOR, NO_DATATYPE):
            # onnxruntime runs it but v2 cannot carry it: the server must say so and not start.
            path = tmp_path / f"{case.name}.onnx"
            path.write_bytes(case.model.SerializeToString())
            with pytest.raises(ConfigError, match="not servable over v2"):
                load_model(path, case.name, "1", None, 1)
            refused_as_expected += 1
    server = InProcessServer()
    failures: dict[str, str] = {}
    json_checked = 0
    for case in included:
        try:
            problem, checked_json = check_served(server, tmp_path, case)
        except Exception as exc:  # one case's failure must not hide the others'
            problem, checked_json = f"{type(exc).__name__}: {str(exc)[:300]}", False
        json_checked += checked_json
        if problem is not None:
            failures[case.name] = problem
    server.join()
    report = {
        "generated": len(cases),
        "ran": len(included),
        "passed": len(included) - len(failures),
        "json_checked": json_checked,
        "binary_only": len(included) - len(failures) - json_checked,
        "excluded": dict(excluded.most_common()),
        "refused_by_the_server_as_not_v2": refused_as_expected,
        "failures": failures,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report, indent=2))
    if "MODELDEPLOY_CONFORMANCE_REPORT" in os.environ:
        Path(os.environ["MODELDEPLOY_CONFORMANCE_REPORT"]).write_text(json.dumps(report, indent=2))
    # Most of onnx's cases run in onnxruntime: a small count means the inclusion broke.
    assert len(included) > len(cases) // 2, report
    assert not failures, json.dumps(failures, indent=2)
