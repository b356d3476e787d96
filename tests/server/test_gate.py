"""`modeldeploy-server gate` against real servers on loopback: expected answers, another variant's
answers, tolerances, refused rows, and every way it cannot judge (exit 2, never a traceback)."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest

from modeldeploy_server.gate import (
    GateConfig,
    GateError,
    Tolerance,
    compare,
    run_gate,
    summary,
)
from tests.models import BuiltModel, build_iris_stump
from tests.processes import RunningProcess, serve_model, server_command

IRIS_COLUMNS = ["sepal_l", "sepal_w", "petal_l", "petal_w"]


@pytest.mark.parametrize(
    ("expected", "actual", "tolerance", "agrees"),
    [
        (1, 1, Tolerance(), True),
        (1, 2, Tolerance(atol=5), False),  # integers (labels) are exact whatever the tolerance
        ("setosa", "setosa", Tolerance(), True),
        ("setosa", "virginica", Tolerance(), False),
        (True, 1, Tolerance(), False),
        (0.5, 0.5, Tolerance(), True),
        (0.5, 0.5001, Tolerance(), False),
        (0.5, 0.5001, Tolerance(atol=1e-3), True),
        (0.5, 0.5001, Tolerance(rtol=1e-3), True),
        (100.0, 100.5, Tolerance(rtol=1e-3), False),
        (100.0, 100.05, Tolerance(rtol=1e-3), True),
        (1, 1.0, Tolerance(), True),
        ([0.1, 0.9], [0.1, 0.9], Tolerance(), True),
        ([0.1, 0.9], [0.1, 0.8], Tolerance(atol=0.05), False),
        ([0.1, 0.9], [0.1], Tolerance(), False),
        ({"label": 1}, {"label": 1, "probabilities": [0.2, 0.8]}, Tolerance(), True),
        ({"label": 1, "score": 0.1}, {"label": 1}, Tolerance(), False),
        ({"label": 1}, 1, Tolerance(), False),
        (0.5, float("nan"), Tolerance(atol=1.0), False),
    ],
)
def test_compare(expected: Any, actual: Any, tolerance: Tolerance, agrees: bool) -> None:
    reason = compare(expected, actual, tolerance)
    assert (reason is None) == agrees, reason


def test_compare_names_the_first_difference() -> None:
    reason = compare({"probabilities": [0.1, 0.9]}, {"probabilities": [0.1, 0.7]}, Tolerance())
    assert reason is not None and reason.startswith("probabilities[1]: 0.7 differs from 0.9")


def _run_ort(model: BuiltModel) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"input": model.features})
    return label, probabilities


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> str:
    text = "\n".join([",".join(header), *(",".join(str(v) for v in row) for row in rows)]) + "\n"
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def _write_jsonl(path: Path, documents: list[Any]) -> str:
    option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    data = b"".join(orjson.dumps(document, option=option) for document in documents)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _gate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "gate", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def stump(model_dir: Path) -> BuiltModel:
    return build_iris_stump(model_dir)


@pytest.fixture(scope="module")
def stump_server(stump: BuiltModel) -> Iterator[RunningProcess]:
    # Served under the same name as the logistic regression: a candidate replacing it.
    with serve_model(stump.path, "iris") as server:
        yield server


def test_true_labels_pass_at_the_models_accuracy_and_list_its_errors(
    iris: BuiltModel, iris_server: RunningProcess, tmp_path: Path
) -> None:
    labels, _ = _run_ort(iris)
    rows = [
        [*map(str, features), int(t)]
        for features, t in zip(iris.features, iris.target, strict=True)
    ]
    dataset = tmp_path / "golden.csv"
    sha = _write_csv(dataset, [*IRIS_COLUMNS, "expected.label"], rows)
    wrong = [index + 2 for index in np.flatnonzero(labels != iris.target)]  # line 1 is the header
    assert 0 < len(wrong) < 0.05 * len(rows)  # the model is good, not perfect
    verdict_path = tmp_path / "verdict.json"
    common = ["--dataset", str(dataset), "--sha256", sha, "--url", iris_server.url]
    common += ["--model-name", "iris", "--batch-rows", "7", "--verdict", str(verdict_path)]

    passed = _gate(
        *common, "--min-agreement", "0.95", "--max-mismatches", "100", "--model-sha256", iris.sha256
    )
    assert passed.returncode == 0, passed.stderr
    verdict = orjson.loads(verdict_path.read_bytes())
    assert verdict["passed"] is True
    assert verdict["candidate"]["modelSha256"] == [iris.sha256]
    assert (verdict["rows"], verdict["mismatched"]) == (len(rows), len(wrong))
    assert [m["line"] for m in verdict["mismatches"]] == wrong
    assert {m["expected"]["label"] for m in verdict["mismatches"]} <= {0, 1, 2}
    assert verdict["dataset"] == {"uri": str(dataset), "sha256": sha}
    assert passed.stderr.strip() == summary(verdict)

    failed = _gate(*common, "--max-mismatches", "1")  # every row must agree by default
    assert failed.returncode == 1, failed.stderr
    verdict = orjson.loads(verdict_path.read_bytes())
    assert verdict["passed"] is False and verdict["mismatched"] == len(wrong)
    assert [m["line"] for m in verdict["mismatches"]] == wrong[:1]
    assert failed.stderr.startswith("gate FAILED: ")


def test_a_different_model_fails_against_the_stable_variants_answers(
    iris: BuiltModel,
    stump: BuiltModel,
    iris_server: RunningProcess,
    stump_server: RunningProcess,
    tmp_path: Path,
) -> None:
    stable, _ = _run_ort(iris)
    candidate, _ = _run_ort(stump)
    agree = float(np.mean(stable == candidate))
    assert 0.5 < agree < 0.9  # genuinely different, though not on every row
    dataset = tmp_path / "inputs.jsonl"
    sha = _write_jsonl(dataset, list(iris.features))
    config = GateConfig(
        dataset=str(dataset),
        sha256=sha,
        url=stump_server.url,
        model_name="iris",
        baseline_url=iris_server.url,
        file_format="jsonl",
        min_agreement=0.9,
        max_mismatches=3,
        outputs=("label",),
    )
    verdict = run_gate(config, tmp_path / "work")
    assert verdict["passed"] is False
    assert verdict["agreed"] == int(np.sum(stable == candidate))
    different = [index + 1 for index in np.flatnonzero(stable != candidate)][:3]
    assert [m["line"] for m in verdict["mismatches"]] == different
    first = verdict["mismatches"][0]
    index = different[0] - 1
    assert first["expected"] == {"label": int(stable[index])}
    assert first["actual"] == {"label": int(candidate[index])}

    lenient = run_gate(
        dataclasses.replace(config, min_agreement=round(agree - 0.01, 6)), tmp_path / "w2"
    )
    assert lenient["passed"] is True and lenient["agreed"] == verdict["agreed"]

    # As a Job reports it: the verdict as the termination message, within the kubelet's 4096
    # bytes (100 mismatches with their probabilities do not fit: they are left out, and counted).
    message = tmp_path / "termination-log"
    args = ["--dataset", str(dataset), "--sha256", sha, "--url", stump_server.url]
    args += ["--model-name", "iris", "--baseline-url", iris_server.url, "--max-mismatches", "100"]
    failed = _gate(*args, "--termination-message-path", str(message))
    assert failed.returncode == 1, failed.stderr
    full = orjson.loads(failed.stdout)
    assert len(full["mismatches"]) == 100 and len(orjson.dumps(full)) > 4096
    short = orjson.loads(message.read_bytes())
    assert len(message.read_bytes()) <= 4096
    assert short == {**full, "mismatches": [], "mismatchesOmitted": 100}
    fits = _gate(*args[:-2], "--max-mismatches", "1", "--termination-message-path", str(message))
    assert orjson.loads(message.read_bytes()) == orjson.loads(fits.stdout)

    # The same model behind both URLs agrees on every answer, probabilities included, exactly.
    same = dataclasses.replace(config, url=iris_server.url, outputs=())
    assert run_gate(same, tmp_path / "w3")["agreement"] == 1.0


def test_float_scores_within_tolerance(
    iris: BuiltModel, iris_server: RunningProcess, tmp_path: Path
) -> None:
    _, probabilities = _run_ort(iris)
    nudged = probabilities.astype(np.float64)
    nudged[4, 0] += 1e-3  # line 5 expects a probability off by 0.001
    documents = [
        {"instance": features, "expected": {"probabilities": expected}}
        for features, expected in zip(iris.features, nudged, strict=True)
    ]
    dataset = tmp_path / "golden.jsonl"
    sha = _write_jsonl(dataset, documents)

    def judge(tolerance: Tolerance) -> dict[str, Any]:
        config = GateConfig(
            str(dataset), sha, iris_server.url, "iris", file_format="jsonl", tolerance=tolerance
        )
        return run_gate(config, tmp_path / "work")

    tight = judge(Tolerance(atol=1e-4))
    assert tight["passed"] is False
    assert [m["line"] for m in tight["mismatches"]] == [5]
    assert "probabilities[0]" in tight["mismatches"][0]["reason"]
    assert judge(Tolerance(atol=2e-3))["passed"] is True
    assert judge(Tolerance(rtol=0.5))["passed"] is True


def test_a_row_the_candidate_refuses_is_a_mismatch(
    iris: BuiltModel, iris_server: RunningProcess, tmp_path: Path
) -> None:
    labels, _ = _run_ort(iris)
    documents: list[Any] = [
        {"instance": features, "expected": {"label": int(label)}}
        for features, label in zip(iris.features[:20], labels[:20], strict=True)
    ]
    documents[6] = {"instance": [1.0, 2.0, "three", 4.0], "expected": {"label": 0}}
    dataset = tmp_path / "golden.jsonl"
    sha = _write_jsonl(dataset, documents)
    config = GateConfig(
        str(dataset), sha, iris_server.url, "iris", file_format="jsonl", min_agreement=0.9
    )
    verdict = run_gate(config, tmp_path / "work")
    assert (verdict["passed"], verdict["agreed"], verdict["mismatched"]) == (True, 19, 1)
    (refused,) = verdict["mismatches"]
    assert refused["line"] == 7
    assert refused["reason"].startswith("the candidate refused the row: HTTP 400")


def test_cannot_judge_exits_2(
    iris: BuiltModel, iris_server: RunningProcess, tmp_path: Path
) -> None:
    dataset = tmp_path / "golden.csv"
    sha = _write_csv(dataset, IRIS_COLUMNS, [list(map(str, row)) for row in iris.features[:5]])
    base = ["--dataset", str(dataset), "--url", iris_server.url, "--model-name", "iris"]
    cases = {
        "sha256 mismatch": (["--sha256", "0" * 64], "sha256 mismatch"),
        "no expected answers": (["--sha256", sha], "line 2 has no expected answer"),
        "another model answers": (
            ["--sha256", sha, "--model-sha256", "c" * 64, "--baseline-url", iris_server.url],
            f"answered with model sha256 {iris.sha256}, expected {'c' * 64}",
        ),
        "digest not hex": (["--sha256", sha, "--model-sha256", "xyz"], "64 hexadecimal"),
        "nothing listening": (
            ["--sha256", sha, "--baseline-url", "http://127.0.0.1:9"],
            "127.0.0.1:9",
        ),
    }
    for name, (extra, message) in cases.items():
        result = _gate(*base, *extra)
        assert result.returncode == 2, (name, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
    message = tmp_path / "termination-log"
    failed = _gate(*base, "--sha256", "0" * 64, "--termination-message-path", str(message))
    assert failed.returncode == 2
    assert "sha256 mismatch" in orjson.loads(message.read_bytes())["error"]
    remote = _gate(
        "--dataset",
        "http://127.0.0.1:9/golden.csv",
        "--url",
        iris_server.url,
        "--model-name",
        "iris",
    )
    assert remote.returncode == 2 and "--sha256 is required" in remote.stderr

    broken = tmp_path / "broken.csv"
    broken.write_text("sepal_l,sepal_w,petal_l,petal_w,expected\n1,2,3,4,0\n1,2,3\n")
    with pytest.raises(GateError, match="line 3 has 3 fields, the header has 5"):
        run_gate(GateConfig(str(broken), None, iris_server.url, "iris"), tmp_path / "work")
