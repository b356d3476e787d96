"""`modeldeploy-server batch` against onnxruntime and the running server, row by row, and with bad
input (each a clear error, never a traceback, and no output presented as complete)."""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest

from modeldeploy_server import batch
from modeldeploy_server.batch import BatchConfig, run_batch
from modeldeploy_server.batchio import BatchError, Shard, decode_row
from modeldeploy_server.errors import ServerError
from modeldeploy_server.runtime import load_model
from tests.models import MIXED_FLOAT_COLUMNS, MIXED_STRING_COLUMNS, BuiltModel, write_graph
from tests.processes import RunningProcess, server_command

IRIS_COLUMNS = ["sepal_l", "sepal_w", "petal_l", "petal_w"]


def _value(value: Any) -> str:
    # float32 str is its shortest round-trip text; strings and float64 values as they are.
    return str(value)


def _table(name: str, built: BuiltModel) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (Python values) of the model's data, as the input file holds them."""
    if name == "mixed":
        header = [*MIXED_STRING_COLUMNS, *MIXED_FLOAT_COLUMNS]
        return header, built.features[header].to_numpy().tolist()
    header = IRIS_COLUMNS if name == "iris" else [f"pixel_{i}" for i in range(64)]
    return header, [[np.float32(v) for v in row] for row in built.features]


def write_input(path: Path, file_format: str, header: list[str], rows: list[list[Any]]) -> None:
    if file_format == "csv":
        lines = [",".join(header), *(",".join(_value(v) for v in row) for row in rows)]
        path.write_text("\n".join(lines) + "\n")
    elif len(header) == 4 and header[0] == MIXED_STRING_COLUMNS[0]:
        path.write_bytes(
            b"".join(
                orjson.dumps(dict(zip(header, row, strict=True)), option=orjson.OPT_APPEND_NEWLINE)
                for row in rows
            )
        )
    else:
        path.write_bytes(
            b"".join(
                orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
                for row in rows
            )
        )


def run_shards(
    built: BuiltModel, source: str, output: Path, file_format: str, shards: int, **extra: Any
) -> list[Path]:
    for index in range(shards):
        config = BatchConfig(
            model_path=built.path,
            input=source,
            output=output,
            format=file_format,
            shard=Shard(index, shards),
            sha256=built.sha256,
            **{"batch_rows": 64, **extra},
        )
        run_batch(config, progress=False)
    return [output / f"{Shard(i, shards).name}.{file_format}" for i in range(shards)]


def merge_parts(parts: list[Path], file_format: str) -> bytes:
    """The README's join: CSV parts each carry the header (empty parts are empty files)."""
    merged = b""
    for part in parts:
        data = part.read_bytes()
        if file_format == "csv" and merged and data:
            data = data.split(b"\n", 1)[1]
        merged += data
    return merged


def onnxruntime_outputs(name: str, built: BuiltModel) -> dict[str, np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(built.path), providers=["CPUExecutionProvider"])
    if name == "mixed":
        frame = built.features
        feed = {c: frame[[c]].to_numpy().astype(object) for c in MIXED_STRING_COLUMNS}
        feed |= {c: frame[[c]].to_numpy().astype(np.float32) for c in MIXED_FLOAT_COLUMNS}
    else:
        feed = {"input": built.features}
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def server_answer(server: RunningProcess, model: str, file_format: str, body: bytes) -> bytes:
    if file_format == "csv":
        headers = {"content-type": "text/csv", "accept": "text/csv"}
    else:
        headers = {"content-type": "application/json"}
        body = b'{"instances": [' + b",".join(body.splitlines()) + b"]}"
    response = httpx.post(
        f"{server.url}/v1/models/{model}:predict", content=body, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.content


# The models every batch format is checked on, each with its server fixture (conftest.py).
EACH_MODEL = pytest.mark.parametrize(
    ("name", "model", "server"),
    [
        ("iris", "iris", "iris_server"),
        ("mixed", "mixed", "mixed_server"),
        ("mlp", "digits", "mlp_server"),
    ],
)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("file_format", ["csv", "jsonl"])
@EACH_MODEL
def test_every_row_equals_onnxruntime_and_the_server(
    name: str,
    model: str,
    server: str,
    file_format: str,
    shards: int,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    built: BuiltModel = request.getfixturevalue(name)
    header, rows = _table(name, built)
    source = tmp_path / f"input.{file_format}"
    write_input(source, file_format, header, rows)
    parts = run_shards(built, str(source), tmp_path / "out", file_format, shards)
    merged = merge_parts(parts, file_format)

    expected = onnxruntime_outputs(name, built)
    if file_format == "csv":
        table = list(csv.reader(io.StringIO(merged.decode())))
        assert len(table) == len(rows) + 1
        got = np.array(table[1:], dtype=np.float64)
        np.testing.assert_array_equal(got[:, 0], expected["label"])
        np.testing.assert_array_equal(got[:, 1:].astype(np.float32), expected["probabilities"])
    else:
        lines = [orjson.loads(line) for line in merged.splitlines()]
        assert len(lines) == len(rows)
        np.testing.assert_array_equal([line["label"] for line in lines], expected["label"])
        np.testing.assert_array_equal(
            np.array([line["probabilities"] for line in lines], dtype=np.float32),
            expected["probabilities"],
        )
    # The server scores the same file as one records request: the same rows, byte for byte.
    answer = server_answer(request.getfixturevalue(server), model, file_format, source.read_bytes())
    if file_format == "csv":
        assert merged == answer
    else:
        predictions = orjson.loads(answer)["predictions"]
        assert [orjson.loads(line) for line in merged.splitlines()] == predictions
    # A row sent alone: onnxruntime's one-row kernels may differ in the last digit of a float
    # (measured up to 4.2e-7 on iris), so labels are equal and probabilities nearly so.
    lines = source.read_bytes().splitlines(keepends=True)
    first = 1 if file_format == "csv" else 0
    for row in (first, len(lines) // 2, len(lines) - 1):
        body = (lines[0] if first else b"") + lines[row]
        alone = server_answer(request.getfixturevalue(server), model, file_format, body)
        index = row - first
        if first:
            values = np.array(alone.splitlines()[1].decode().split(","), dtype=np.float64)
            assert values[0] == expected["label"][index]
            np.testing.assert_allclose(values[1:], expected["probabilities"][index], atol=1e-6)
        else:
            (prediction,) = orjson.loads(alone)["predictions"]
            assert prediction["label"] == expected["label"][index]
            np.testing.assert_allclose(
                prediction["probabilities"], expected["probabilities"][index], atol=1e-6
            )


def test_output_is_deterministic_and_manifests_name_every_part(
    mlp: BuiltModel, tmp_path: Path
) -> None:
    header, rows = _table("mlp", mlp)
    source = tmp_path / "digits.csv"
    write_input(source, "csv", header, rows)
    first = run_shards(mlp, str(source), tmp_path / "a", "csv", 2)
    second = run_shards(mlp, str(source), tmp_path / "b", "csv", 2)
    for one, two in zip(first, second, strict=True):
        assert one.read_bytes() == two.read_bytes()
    manifests = [orjson.loads(p.with_suffix(".manifest.json").read_bytes()) for p in first]
    assert [m["shard"] for m in manifests] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    assert sum(m["rowsOut"] for m in manifests) == len(rows)
    assert {m["model"]["sha256"] for m in manifests} == {mlp.sha256}
    for manifest, part in zip(manifests, first, strict=True):
        assert manifest["part"]["sha256"] == hashlib.sha256(part.read_bytes()).hexdigest()
        assert manifest["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    for one, two in zip(first, second, strict=True):
        manifest = one.with_suffix(".manifest.json").read_bytes()
        assert manifest == two.with_suffix(".manifest.json").read_bytes()


def test_a_shard_may_be_empty_and_more_shards_than_rows_still_cover_every_row(
    iris: BuiltModel, tmp_path: Path
) -> None:
    header, rows = _table("iris", iris)
    source = tmp_path / "few.jsonl"
    write_input(source, "jsonl", header, rows[:3])
    parts = run_shards(iris, str(source), tmp_path / "out", "jsonl", 7)
    assert len(merge_parts(parts, "jsonl").splitlines()) == 3
    assert any(part.read_bytes() == b"" for part in parts)


def test_the_readme_join_of_csv_parts(iris: BuiltModel, tmp_path: Path) -> None:
    header, rows = _table("iris", iris)
    source = tmp_path / "iris.csv"
    write_input(source, "csv", header, rows[:5])
    parts = run_shards(iris, str(source), tmp_path / "out", "csv", 4)
    joined = subprocess.run(
        ["awk", "FNR > 1 || !seen++", *map(str, parts)], capture_output=True, check=True
    ).stdout
    assert joined == merge_parts(parts, "csv")
    table = list(csv.reader(io.StringIO(joined.decode())))
    assert table[0][0] == "label" and len(table) == 6


# --- bad input -----------------------------------------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "batch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _iris_csv(tmp_path: Path, iris: BuiltModel, extra: str = "", at: int = 3) -> Path:
    header, rows = _table("iris", iris)
    lines = [",".join(header), *(",".join(_value(v) for v in row) for row in rows[:10])]
    if extra:
        lines.insert(at, extra)
    path = tmp_path / "input.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_nothing_complete(output: Path) -> None:
    leftovers = sorted(p.name for p in output.iterdir()) if output.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("5.1,3.5,1.4", "line 4: CSV line 4 has 3 fields, header has 4"),
        ("5.1,3.5,abc,0.2", "line 4: CSV column 'petal_l', data row 1: 'abc' is not a JSON number"),
        ('5.1,"3.5,1.4,0.2', "line 4: malformed CSV"),
    ],
)
def test_a_bad_csv_row_fails_with_its_line_number(
    iris: BuiltModel, tmp_path: Path, extra: str, message: str
) -> None:
    source = _iris_csv(tmp_path, iris, extra)
    result = run_cli("--model-path", iris.path, "--input", source, "--output", tmp_path / "out")
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_complete(tmp_path / "out")


def test_skip_lists_bad_rows_with_line_numbers_and_scores_the_rest(
    iris: BuiltModel, tmp_path: Path
) -> None:
    source = _iris_csv(tmp_path, iris, "5.1,3.5,abc,0.2", at=3)
    with source.open("a") as stream:
        stream.write("1,2\n\n6.7,3.0,5.0,1.7\n")
    result = run_cli(
        "--model-path", iris.path, "--input", source, "--output", tmp_path / "out",
        "--on-error", "skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    skipped = [
        orjson.loads(line)
        for line in (tmp_path / "out" / "part-00000-of-00001.skipped.jsonl")
        .read_bytes()
        .splitlines()
    ]
    assert [row["line"] for row in skipped] == [4, 13]
    assert (
        "'abc' is not a JSON number" in skipped[0]["error"]
        and "has 2 fields" in skipped[1]["error"]
    )
    manifest = orjson.loads((tmp_path / "out" / "part-00000-of-00001.manifest.json").read_bytes())
    assert (manifest["rowsIn"], manifest["rowsOut"], manifest["rowsSkipped"]) == (13, 11, 2)
    part = (tmp_path / "out" / "part-00000-of-00001.csv").read_text().splitlines()
    assert len(part) == 1 + 11


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (b'[5.1, 3.5, 1.4, 0.2]\n{"broken": \n', "line 2: "),
        (b"[5.1, 3.5, 1.4, 0.2]\n[5.1, 3.5, 1.4]\n", "line 2: "),
        (b'[5.1, 3.5, 1.4, 0.2]\n["a", 3.5, 1.4, 0.2]\n', "line 2: "),
        (b"", "has no data rows"),
        (b"\n\n", "has no data rows"),
    ],
)
def test_bad_json_lines_and_empty_files(
    iris: BuiltModel, tmp_path: Path, lines: bytes, message: str
) -> None:
    source = tmp_path / "input.jsonl"
    source.write_bytes(lines)
    result = run_cli(
        "--model-path", iris.path, "--input", source, "--output", tmp_path / "out",
        "--format", "jsonl",
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_complete(tmp_path / "out")


def test_wrong_columns_empty_csv_and_header_only(
    iris: BuiltModel, mixed: BuiltModel, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    source = tmp_path / "input.csv"
    source.write_text("city,plan,age,salary\nparis,pro,30,1000\n")
    result = run_cli("--model-path", mixed.path, "--input", source, "--output", out)
    assert result.returncode == 1
    assert "line 1: CSV columns ['city', 'plan', 'age', 'salary'] do not match" in result.stderr
    source.write_text("")
    result = run_cli("--model-path", iris.path, "--input", source, "--output", out)
    assert "is empty: CSV needs a header row" in result.stderr
    source.write_text(",".join(IRIS_COLUMNS) + "\n")
    result = run_cli("--model-path", iris.path, "--input", source, "--output", out)
    assert result.returncode == 1 and "has no data rows" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_complete(out)


def test_sha_mismatches_refuse_and_write_nothing(iris: BuiltModel, tmp_path: Path) -> None:
    source = _iris_csv(tmp_path, iris)
    out = tmp_path / "out"
    wrong = "0" * 64
    result = run_cli(
        "--model-path", iris.path, "--sha256", wrong, "--input", source, "--output", out
    )
    assert result.returncode == 1
    assert f"expected {wrong}; refusing" in result.stderr
    result = run_cli(
        "--model-path", iris.path, "--input", source, "--input-sha256", wrong, "--output", out
    )
    assert result.returncode == 1
    assert f"expected {wrong}" in result.stderr and "has sha256" in result.stderr
    assert_nothing_complete(out)


def test_unwritable_output_is_a_clear_error(iris: BuiltModel, tmp_path: Path) -> None:
    source = _iris_csv(tmp_path, iris)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--model-path", iris.path, "--input", source, "--output", blocker / "out")
    assert result.returncode == 1
    assert "cannot write to the output directory" in result.stderr
    assert "Traceback" not in result.stderr


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    claimed = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.claimed or len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_input() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/input", handler
    finally:
        server.shutdown()
        server.server_close()


def test_http_input_sharded_and_a_truncated_download(
    iris: BuiltModel, tmp_path: Path, http_input: tuple[str, type[_Handler]]
) -> None:
    url, handler = http_input
    header, rows = _table("iris", iris)
    local = tmp_path / "input.csv"
    write_input(local, "csv", header, rows)
    handler.body = local.read_bytes()
    over_http = merge_parts(run_shards(iris, url, tmp_path / "http", "csv", 2), "csv")
    from_file = merge_parts(run_shards(iris, str(local), tmp_path / "file", "csv", 1), "csv")
    assert over_http == from_file

    handler.claimed = len(handler.body) + 1000
    with pytest.raises(BatchError, match=r"is truncated: read \d+ of \d+ bytes"):
        run_shards(iris, url, tmp_path / "cut", "csv", 1)
    assert_nothing_complete(tmp_path / "cut")


def _iris_rows(iris: BuiltModel, count: int) -> list[str]:
    _, rows = _table("iris", iris)
    return [",".join(_value(v) for v in rows[i % len(rows)]) for i in range(count)]


def test_hostile_lines_in_a_large_numeric_chunk_are_found_by_line_number(
    iris: BuiltModel, tmp_path: Path
) -> None:
    """Good lines of plain numbers decode as one block; bad ones among them are each refused as a
    one-row request of that line is, by line number, and the rest are scored in one model run."""
    lines = _iris_rows(iris, 3000)
    hostile = {
        101: "5.1,3.5,1.4",  # ragged
        202: "5.1,3.5,abc,0.2",  # not a number
        303: "5.1,3.5,nan,0.2",
        404: "5.1,3.5,1e39,0.2",  # beyond FP32
        505: "5.1,3.5,1.4," + "9" * 200_000,  # a huge line: one 200,000-digit integer
        606: ",".join(["1.5"] * 100_000),  # a huge line: 100,000 fields
        707: "5.1,3.5,true,0.2",
        808: "5.1;3.5;1.4;0.2",
    }
    unusual = {
        150: '"5.1",3.5,1.4,0.2',  # quoted: valid, the csv module's path
        250: "5.1,3.5,1.4,0.2\r",  # CRLF
        350: " 5.1, 3.5 ,1.4,0.2",  # spaces around numbers, as JSON allows
    }
    for number, line in sorted({**hostile, **unusual}.items()):
        lines.insert(number - 2, line)  # file line numbers: the header is line 1
    source = tmp_path / "input.csv"
    source.write_text(",".join(IRIS_COLUMNS) + "\n" + "\n".join(lines) + "\n")
    base = ("--model-path", iris.path, "--input", source, "--output", tmp_path / "out")

    failed = run_cli(*base)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error: line 101: CSV line 101 has 3 fields, header has 4" in failed.stderr
    assert_nothing_complete(tmp_path / "out")

    result = run_cli(*base, "--on-error", "skip")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    side = (out / "part-00000-of-00001.skipped.jsonl").read_bytes()
    skipped = [orjson.loads(line) for line in side.splitlines()]
    assert [row["line"] for row in skipped] == sorted(hostile)
    session = ort.InferenceSession(str(iris.path), providers=["CPUExecutionProvider"])
    metadata = load_model(iris.path, "iris", "1", iris.sha256, 1).metadata
    for row in skipped:
        line = lines[row["line"] - 2].encode() + b"\n"
        with pytest.raises(ServerError) as alone:
            decode_row(line, "csv", IRIS_COLUMNS, metadata, row["line"])
        assert row["error"] == str(alone.value)
    good = [line for number, line in enumerate(lines, start=2) if number not in hostile]
    features = np.array(
        [[np.float32(v.strip('" \r')) for v in line.split(",")] for line in good], np.float32
    )
    labels, probabilities = session.run(None, {"input": features})
    part = list(csv.reader(io.StringIO((out / "part-00000-of-00001.csv").read_text())))
    assert part[0] == ["label", "probabilities_0", "probabilities_1", "probabilities_2"]
    assert [int(row[0]) for row in part[1:]] == labels.tolist()
    scored = np.array([[np.float32(v) for v in row[1:]] for row in part[1:]], np.float32)
    assert np.array_equal(scored, probabilities)  # the good rows ran together, in one run


def test_a_multi_input_model_takes_its_columns_by_name(tmp_path: Path) -> None:
    """Named columns in another order than the inputs, through the numeric path."""
    float_type = onnx.TensorProto.FLOAT
    path = write_graph(
        tmp_path,
        "two_inputs",
        [
            onnx.helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
            onnx.helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        {"a": (float_type, ["N", 1]), "b": (float_type, ["N", 1])},
        {"ab": (float_type, ["N", 2]), "product": (float_type, ["N", 1])},
    )
    values = np.random.default_rng(7).normal(0, 1e3, (5000, 2)).astype(np.float32)
    source = tmp_path / "input.csv"
    source.write_text("b,a\n" + "".join(f"{b},{a}\n" for a, b in values))
    result = run_cli("--model-path", path, "--input", source, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    part = list(csv.reader(io.StringIO((tmp_path / "out" / "part-00000-of-00001.csv").read_text())))
    assert part[0] == ["ab_0", "ab_1", "product"]
    scored = np.array([[np.float32(v) for v in row] for row in part[1:]], np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ab, product = session.run(None, {"a": values[:, :1], "b": values[:, 1:]})
    assert np.array_equal(scored[:, :2], values) and np.array_equal(scored[:, :2], ab)
    assert np.array_equal(scored[:, 2:], product)


def test_rows_of_a_model_whose_rows_mix_run_alone_as_the_server_runs_them(
    tmp_path: Path,
) -> None:
    """Gather's shapes say "batch axis", but its indices are row numbers: rows run together would
    read each other's rows. The server's batching probe finds out, and each row runs alone."""
    path = write_graph(
        tmp_path,
        "gather",
        [onnx.helper.make_node("Gather", ["x", "indices"], ["y"])],
        {"x": (onnx.TensorProto.FLOAT, [None, 4]), "indices": (onnx.TensorProto.INT64, [None])},
        {"y": (onnx.TensorProto.FLOAT, [None, 4])},
    )
    source = tmp_path / "input.jsonl"
    source.write_bytes(
        b"".join(b'{"x": [%d, %d, %d, %d], "indices": 0}\n' % ((k,) * 4) for k in range(5))
    )
    result = run_cli(
        "--model-path", path, "--input", source, "--output", tmp_path / "out", "--format", "jsonl"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "batching off" in result.stderr
    part = (tmp_path / "out" / "part-00000-of-00001.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line) for line in part] == [[float(k)] * 4 for k in range(5)]


def test_a_quoted_field_spanning_lines_is_refused_by_line_number_the_rest_is_quoted_csv(
    mixed: BuiltModel, mixed_server: RunningProcess, tmp_path: Path
) -> None:
    """Decided: in batch input every physical line is one row (so a shard can start at any line
    of its byte range, and line numbers are exact), so an RFC 4180 field holding a newline is
    refused with that reason, naming its line (with --on-error skip, the next line is a row of
    its own, as any line is). Quotes, commas and doubled quotes within a line are RFC 4180 as the
    server reads them."""
    header = "city,plan,age,income\n"
    quoted = '"paris","pro",30.5,1000\n"ly,on","te""am",40,2000.5\n'
    source = tmp_path / "input.csv"
    source.write_text(header + quoted + '"new\nyork",pro,30,1000\nlille,free,50,1500\n')
    base = ("--model-path", mixed.path, "--input", source, "--output", tmp_path / "out")
    failed = run_cli(*base)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error: line 4: malformed CSV" in failed.stderr
    assert "every line is one row: quoted fields may not span lines" in failed.stderr
    assert_nothing_complete(tmp_path / "out")
    skipped = run_cli(*base, "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    side = (tmp_path / "out" / "part-00000-of-00001.skipped.jsonl").read_bytes()
    assert [orjson.loads(line)["line"] for line in side.splitlines()] == [4]
    part = (tmp_path / "out" / "part-00000-of-00001.csv").read_bytes()
    body = (header + quoted + 'york",pro,30,1000\nlille,free,50,1500\n').encode()
    assert part == server_answer(mixed_server, "mixed", "csv", body)


@pytest.mark.parametrize("block_bytes", [7, 64, 1 << 20])
def test_shards_count_the_other_shards_lines_and_still_name_every_line_exactly(
    iris: BuiltModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """Lines outside a shard's byte range are counted in blocks of any size, never split: line
    numbers (of bad rows, in any shard) and the rows each shard scores stay exact."""
    monkeypatch.setattr(batch, "_BLOCK_BYTES", block_bytes)
    good = _iris_rows(iris, 400)
    lines = [",".join(IRIS_COLUMNS)]
    bad: list[int] = []
    for index, row in enumerate(good):
        lines.append(row)
        if index % 37 == 5:
            lines.append("")  # blank: skipped, but counted
        if index % 53 == 11:
            lines.append("1,2,x,4")
            bad.append(len(lines))  # its 1-based line number
    source = tmp_path / "input.csv"
    source.write_bytes(("\r\n".join(lines[:200]) + "\r\n" + "\n".join(lines[200:])).encode())
    whole = merge_parts(
        run_shards(iris, str(source), tmp_path / "one", "csv", 1, on_error="skip"), "csv"
    )
    for shards in (1, 2, 3, 8):
        out = tmp_path / f"of-{shards}"
        parts = run_shards(iris, str(source), out, "csv", shards, on_error="skip")
        assert merge_parts(parts, "csv") == whole
        skipped = [
            orjson.loads(line)["line"]
            for i in range(shards)
            if (out / f"{Shard(i, shards).name}.skipped.jsonl").exists()
            for line in (out / f"{Shard(i, shards).name}.skipped.jsonl").read_bytes().splitlines()
        ]
        assert skipped == bad
        digests = {
            orjson.loads((out / f"{Shard(i, shards).name}.manifest.json").read_bytes())["input"][
                "sha256"
            ]
            for i in range(shards)
        }
        assert digests == {hashlib.sha256(source.read_bytes()).hexdigest()}
