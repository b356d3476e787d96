"""`modeldeploy-server batch --format npz` against onnxruntime and the server's v2 answer, and with
bad input (each a clear error naming the problem, never a traceback, nothing presented as
complete). An .npz is read without pickle, ever."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
import skl2onnx
from skl2onnx.common.data_types import FloatTensorType

from modeldeploy_server.batch import BatchConfig, run_batch
from modeldeploy_server.batchio import BatchError, Shard
from tests.models import MIXED_FLOAT_COLUMNS, MIXED_STRING_COLUMNS, BuiltModel, write_graph
from tests.server.test_batch import (
    EACH_MODEL,
    _Handler,
    assert_nothing_complete,
    http_input,
    run_cli,
)
from tests.server.test_differential import v2_outputs

__all__ = ["http_input"]  # the fixture, shared with test_batch.py


def model_inputs(name: str, built: BuiltModel) -> dict[str, np.ndarray[Any, Any]]:
    """The data set as the model's inputs: numpy arrays (str arrays for string columns)."""
    if name != "mixed":
        return {"input": np.asarray(built.features, dtype=np.float32)}
    frame = built.features
    arrays = {c: frame[[c]].to_numpy().astype(str) for c in MIXED_STRING_COLUMNS}
    # float64 columns: the shard casts them to the model's FP32 as the server does.
    return arrays | {c: frame[[c]].to_numpy() for c in MIXED_FLOAT_COLUMNS}


def run_npz(
    built: BuiltModel, source: Path | str, output: Path, shards: int, **extra: Any
) -> list[Path]:
    for index in range(shards):
        config = BatchConfig(
            model_path=built.path,
            input=str(source),
            output=output,
            format="npz",
            shard=Shard(index, shards),
            sha256=built.sha256,
            **{"batch_rows": 64, **extra},
        )
        run_batch(config, progress=False)
    return [output / f"{Shard(i, shards).name}.npz" for i in range(shards)]


def joined(parts: list[Path]) -> dict[str, np.ndarray[Any, Any]]:
    """The README's join: concatenate each member over the parts, in order."""
    loaded = [np.load(part, allow_pickle=False) for part in parts]
    return {name: np.concatenate([part[name] for part in loaded]) for name in loaded[0].files}


def v2_inputs(arrays: dict[str, np.ndarray[Any, Any]], specs: dict[str, str]) -> list[Any]:
    return [
        {"name": n, "datatype": specs[n], "shape": list(a.shape), "data": a.ravel().tolist()}
        for n, a in arrays.items()
    ]


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
@EACH_MODEL
def test_every_row_equals_onnxruntime_and_the_server_v2_answer(
    name: str,
    model: str,
    server: str,
    shards: int,
    compressed: bool,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    built: BuiltModel = request.getfixturevalue(name)
    arrays = model_inputs(name, built)
    source = tmp_path / "input.npz"
    (np.savez_compressed if compressed else np.savez)(source, **arrays)
    out = joined(run_npz(built, source, tmp_path / "out", shards))

    session = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    feed = {
        i.name: arrays[i.name].astype(np.float32 if i.type == "tensor(float)" else object)
        for i in session.get_inputs()
    }
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(names, feed), strict=True))
    assert sorted(out) == sorted(names)
    for output in names:
        assert out[output].dtype == expected[output].dtype
        np.testing.assert_array_equal(out[output], expected[output])
    # The server's v2 answer for the same rows in one request.
    specs = {n: ("BYTES" if a.dtype.kind == "U" else "FP32") for n, a in arrays.items()}
    answer = v2_outputs(request.getfixturevalue(server), model, v2_inputs(arrays, specs))
    np.testing.assert_array_equal(out["label"], answer["label"])
    np.testing.assert_array_equal(out["probabilities"], answer["probabilities"].astype(np.float32))


def test_parts_are_deterministic_and_the_manifest_hashes_them(
    mlp: BuiltModel, tmp_path: Path
) -> None:
    source = tmp_path / "digits.npz"
    np.savez(source, **model_inputs("mlp", mlp))
    first = run_npz(mlp, source, tmp_path / "a", 2)
    second = run_npz(mlp, source, tmp_path / "b", 2)
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes()
        manifest = orjson.loads(one.with_suffix(".manifest.json").read_bytes())
        assert manifest["part"]["sha256"] == hashlib.sha256(one.read_bytes()).hexdigest()
        assert manifest["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        assert manifest["format"] == "npz"
        with zipfile.ZipFile(one) as archive:
            infos = archive.infolist()
        assert [i.filename for i in infos] == ["label.npy", "probabilities.npy"]
        assert {(i.date_time, i.compress_type) for i in infos} == {
            ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED)
        }


def test_an_empty_shard_still_names_every_output_with_its_dtype_and_row_shape(
    mixed: BuiltModel, tmp_path: Path
) -> None:
    arrays = {k: v[:2] for k, v in model_inputs("mixed", mixed).items()}
    source = tmp_path / "two.npz"
    np.savez(source, **arrays)
    parts = run_npz(mixed, source, tmp_path / "out", 5)
    loaded = [np.load(part, allow_pickle=False) for part in parts]
    assert [len(part["label"]) for part in loaded] == [0, 0, 1, 0, 1]
    assert {part["probabilities"].shape[1:] for part in loaded} == {(2,)}
    assert len(joined(parts)["probabilities"]) == 2


def test_http_input_is_the_file_input(
    iris: BuiltModel, tmp_path: Path, http_input: tuple[str, type[_Handler]]
) -> None:
    url, handler = http_input
    source = tmp_path / "iris.npz"
    np.savez(source, **model_inputs("iris", iris))
    handler.body = source.read_bytes()
    over_http = run_npz(iris, url, tmp_path / "http", 2)
    from_file = run_npz(iris, source, tmp_path / "file", 2)
    assert [p.read_bytes() for p in over_http] == [p.read_bytes() for p in from_file]
    handler.claimed = len(handler.body) + 1000
    with pytest.raises(BatchError, match=r"is truncated: read \d+ of \d+ bytes"):
        run_npz(iris, url, tmp_path / "cut", 1)
    assert_nothing_complete(tmp_path / "cut")


# --- bad input -----------------------------------------------------------------------------------


def _iris_x(iris: BuiltModel) -> np.ndarray[Any, Any]:
    return np.asarray(iris.features, dtype=np.float32)[:10]


def _truncated(path: Path, iris: BuiltModel) -> None:
    np.savez(path, input=_iris_x(iris))
    path.write_bytes(path.read_bytes()[:-30])


def _fortran(path: Path, iris: BuiltModel) -> None:
    np.savez(path, input=np.asfortranarray(_iris_x(iris)))


def _short_member(path: Path, iris: BuiltModel) -> None:
    # A member whose header promises more rows than it holds.
    np.savez(path, input=_iris_x(iris))
    with zipfile.ZipFile(path) as archive:
        data = archive.read("input.npy")
    data = data.replace(b"(10, 4)", b"(12, 4)")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", data)


BAD_INPUTS = [
    (
        lambda p, i: np.savez(p, input=np.array([[1.0, 2.0, 3.0, None]], dtype=object)),
        "member 'input.npy' holds Python objects (dtype object), which only pickle could read",
    ),
    (
        lambda p, i: np.savez(p, features=_iris_x(i)),
        "missing ['input.npy'], unexpected ['features.npy']",
    ),
    (
        lambda p, i: np.savez(p, input=_iris_x(i), extra=_iris_x(i)),
        "missing [], unexpected ['extra.npy']",
    ),
    (_truncated, "is not an .npz file (a zip of .npy arrays)"),
    (lambda p, i: p.write_bytes(b""), "is not an .npz file"),
    (
        lambda p, i: np.savez(p, input=_iris_x(i).astype(str)),
        "member 'input.npy' has dtype <U",
    ),
    (
        lambda p, i: np.savez(p, input=_iris_x(i).astype(np.complex64)),
        "member 'input.npy' has dtype <c8, input 'input' needs FP32",
    ),
    (
        lambda p, i: np.savez(p, input=_iris_x(i)[:, :3]),
        "has shape [10, 3], input 'input' expects [-1, 4]",
    ),
    (lambda p, i: np.savez(p, input=np.float32(1.0)), "is a scalar"),
    (_fortran, "is stored in Fortran order"),
    (_short_member, "holds 160 bytes of data, its header's shape [12, 4] needs 192"),
    (lambda p, i: np.savez(p, input=_iris_x(i)[:0]), "has no data rows"),
]


@pytest.mark.parametrize(("write", "message"), BAD_INPUTS)
def test_bad_npz_input_is_a_clear_error_and_leaves_nothing(
    iris: BuiltModel, tmp_path: Path, write: Any, message: str
) -> None:
    source = tmp_path / "input.npz"
    write(source, iris)
    out = tmp_path / "out"
    result = run_cli(
        "--model-path", iris.path, "--input", source, "--output", out, "--format", "npz",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_complete(out)


def test_members_disagreeing_on_rows_are_refused(mixed: BuiltModel, tmp_path: Path) -> None:
    arrays = model_inputs("mixed", mixed)
    arrays["age"] = arrays["age"][:-1]
    source = tmp_path / "input.npz"
    np.savez(source, **arrays)
    result = run_cli(
        "--model-path", mixed.path, "--input", source, "--output", tmp_path / "out",
        "--format", "npz",
    )  # fmt: skip
    assert result.returncode == 1
    assert "the members disagree on the number of rows" in result.stderr
    assert "'age.npy': 599" in result.stderr
    assert_nothing_complete(tmp_path / "out")


def test_values_out_of_range_fail_by_row_or_are_skipped(iris: BuiltModel, tmp_path: Path) -> None:
    x = np.asarray(iris.features, dtype=np.float64)[:100]
    x[[7, 70], 2] = 1e39  # beyond float32, as the server refuses it
    source = tmp_path / "input.npz"
    np.savez(source, input=x)
    args = ("--model-path", iris.path, "--input", source, "--format", "npz", "--batch-rows", "64")
    result = run_cli(*args, "--output", tmp_path / "fail")
    assert result.returncode == 1
    assert "row 7: input 'input': a value is out of range for FP32" in result.stderr
    assert_nothing_complete(tmp_path / "fail")

    result = run_cli(*args, "--output", tmp_path / "skip", "--on-error", "skip")
    assert result.returncode == 0, result.stderr
    part = tmp_path / "skip" / "part-00000-of-00001"
    skipped = [
        orjson.loads(line) for line in part.with_suffix(".skipped.jsonl").read_bytes().splitlines()
    ]
    assert [row["row"] for row in skipped] == [7, 70]
    labels = np.load(part.with_suffix(".npz"), allow_pickle=False)["label"]
    session = ort.InferenceSession(str(iris.path), providers=["CPUExecutionProvider"])
    good = np.delete(x, [7, 70], axis=0).astype(np.float32)
    np.testing.assert_array_equal(labels, session.run(["label"], {"input": good})[0])


def test_string_outputs_are_str_arrays_widened_across_chunks(tmp_path: Path) -> None:
    """A string tensor out (onnxruntime's objects) becomes a numpy str array, no pickle; chunks
    of longer strings widen the whole member, and the values are onnxruntime's."""
    path = write_graph(
        tmp_path,
        "echo",
        [onnx.helper.make_node("Identity", ["text"], ["same"])],
        {"text": (onnx.TensorProto.STRING, ["n", 1])},
        {"same": (onnx.TensorProto.STRING, ["n", 1])},
    )
    built = BuiltModel(path, hashlib.sha256(path.read_bytes()).hexdigest(), None, None, None)
    text = np.array([["x" * (i % 40) + "é" * (i // 40)] for i in range(300)])  # widths grow
    source = tmp_path / "text.npz"
    np.savez(source, text=text)
    parts = run_npz(built, source, tmp_path / "out", 2, batch_rows=16)
    out = joined(parts)
    assert out["same"].dtype.kind == "U"
    np.testing.assert_array_equal(out["same"], text)


def test_a_model_with_non_tensor_outputs_is_refused_by_name(
    iris: BuiltModel, tmp_path: Path
) -> None:
    estimator = iris.estimator
    onnx_model = skl2onnx.convert_sklearn(
        estimator, initial_types=[("input", FloatTensorType([None, 4]))], target_opset=17
    )  # zipmap on: the probabilities are a sequence of maps
    path = tmp_path / "zipmap.onnx"
    path.write_bytes(onnx_model.SerializeToString())
    source = tmp_path / "input.npz"
    np.savez(source, input=_iris_x(iris))
    result = run_cli("--model-path", path, "--input", source, "--output", tmp_path / "out",
                     "--format", "npz")  # fmt: skip
    assert result.returncode == 1
    assert "model tensor 'output_probability' has type seq(map(int64,tensor(float)))" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert_nothing_complete(tmp_path / "out")
