"""`modeldeploy validate`: refuses what admission refuses, naming the same field; accepts the
examples and every valid manifest of the admission tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy_operator.cli import main
from tests.invalid_manifests import (
    INVALID_MANIFESTS,
    KUBECTL_SCALARS,
    VALID_MANIFESTS,
    InvalidManifest,
    kubectl_scalar_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def validate(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    exit_code = main(["validate", "-f", str(path)])
    captured = capsys.readouterr()
    return exit_code, captured.out + captured.err


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=[c.id for c in INVALID_MANIFESTS])
def test_invalid_manifest_is_refused_naming_the_field(
    case: InvalidManifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code, output = validate(yaml.safe_dump(case.manifest), tmp_path, capsys)
    assert exit_code == 1
    named = [line.strip().split(": ", 1)[0] for line in output.splitlines()[1:]]
    assert case.field in named, output


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exit_code, output = validate(path.read_text(), tmp_path, capsys)
    assert exit_code == 0, output
    assert "valid ModelDeployment" in output or "valid BatchPrediction" in output


@pytest.mark.parametrize("name", VALID_MANIFESTS)
def test_valid_manifests_are_accepted(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest: dict[str, Any] = VALID_MANIFESTS[name]("iris")
    exit_code, output = validate(yaml.safe_dump(manifest), tmp_path, capsys)
    assert exit_code == 0, output


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no YAML document in it"),
        ("---\n# only a comment\n---\n", "no YAML document in it"),
        ("a: [", "cannot read"),
        ("kind: Deployment\napiVersion: apps/v1\n", 'kind: Unsupported value: "Deployment"'),
        ("a: .nan\n", "cannot convert YAML to JSON: json: unsupported value: NaN"),
    ],
    ids=["empty", "only-separators", "not-yaml", "other-kind", "nan"],
)
def test_files_that_hold_no_valid_model_deployment(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code, output = validate(text, tmp_path, capsys)
    assert exit_code == 1
    assert message in output


def test_one_verdict_per_document_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = next(c for c in INVALID_MANIFESTS if c.id == "weights-sum-not-100").manifest
    documents = [VALID_MANIFESTS["minimal"]("first"), {**bad, "metadata": {"name": "second"}}]
    documents.append(VALID_MANIFESTS["two-variants"]("third"))
    text = "# a comment\n---\n" + yaml.safe_dump_all(documents) + "---\n"
    path = tmp_path / "manifest.yaml"
    path.write_text(text)

    exit_code = main(["validate", "-f", str(path)])

    captured = capsys.readouterr()
    assert exit_code == 1
    starts = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith("apiVersion")]
    assert starts[0] == 3
    lines = [f"{path}, document {n} (line {line})" for n, line in enumerate(starts, 1)]
    assert captured.out.splitlines() == [
        f"{lines[0]}: valid ModelDeployment 'first' (1 variants)",
        f"{lines[2]}: valid ModelDeployment 'third' (2 variants)",
    ]
    assert captured.err.splitlines() == [
        f"{lines[1]}: invalid ModelDeployment 'second':",
        "  spec.variants: Invalid value: the weights of all variants must sum to 100",
    ]


def test_every_document_valid_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = [VALID_MANIFESTS["minimal"](name) for name in ("a", "b")]

    exit_code, output = validate(yaml.safe_dump_all(documents), tmp_path, capsys)

    assert exit_code == 0, output
    assert [line.split(": ", 1)[1] for line in output.splitlines()] == [
        "valid ModelDeployment 'a' (1 variants)",
        "valid ModelDeployment 'b' (1 variants)",
    ]


@pytest.mark.parametrize("case", sorted(KUBECTL_SCALARS))
def test_unquoted_scalars_are_read_as_kubectl_reads_them(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line, refusal = KUBECTL_SCALARS[case]

    exit_code, output = validate(kubectl_scalar_file(line), tmp_path, capsys)

    if refusal is None:
        assert exit_code == 0, output
    else:
        assert exit_code == 1
        assert output.splitlines()[1] == f"  {refusal}"


def test_console_script_exit_code_and_message(tmp_path: Path) -> None:
    case = next(c for c in INVALID_MANIFESTS if c.id == "weight-above-100")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(case.manifest))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("modeldeploy")), "validate", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: invalid ModelDeployment 'iris':\n  spec.variants[0].weight: " in result.stderr


def test_run_takes_one_model_deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all([VALID_MANIFESTS["minimal"](n) for n in ("a", "b")]))

    exit_code = main(["run", "-f", str(path), "--port", "1"])

    assert exit_code == 1
    assert capsys.readouterr().err == (
        f"{path}: run takes one ModelDeployment, the file has 2: put each in a file of its own\n"
    )
