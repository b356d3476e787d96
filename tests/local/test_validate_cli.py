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
from tests.invalid_manifests import INVALID_MANIFESTS, VALID_MANIFESTS, InvalidManifest

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
    assert "valid ModelDeployment" in output


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


# What kubectl's YAML (go-yaml v2 through sigs.k8s.io/yaml, then JSON) makes of unquoted scalars
# where PyYAML's safe_load differs: (field line, kubectl's verdict). Proven against the real
# apiserver with a real kubectl in tests/operator/test_crd_admission.py.
KUBECTL_SCALARS = {
    # An all-digit sha256 is a float64 for go-yaml (too big for an int64): a JSON number.
    "all-digit-sha256": (
        "sha256: " + "1" * 64,
        'spec.variants[0].model.sha256: Invalid value: "number":'
        ' spec.variants[0].model.sha256 in body must be of type string: "number"',
    ),
    # y and n are booleans in YAML 1.1 as go-yaml reads it; PyYAML keeps them strings.
    "label-y-is-a-boolean": (
        "labels: {canary: y}",
        'spec.pod.labels.canary: Invalid value: "boolean":'
        ' spec.pod.labels.canary in body must be of type string: "boolean"',
    ),
    # 1e2 is a float for go-yaml, written as 100 in JSON: an integer for the apiserver.
    "weight-1e2": ("weight: 1e2", None),
    "weight-0o144-octal": ("weight: 0o144", None),
    # A date stays a string in go-yaml; PyYAML makes it a datetime.date.
    "annotation-date": ("annotations: {released: 2026-10-02}", None),
    # Sexagesimal is not YAML for go-yaml: a string; PyYAML makes it the int 100.
    "weight-sexagesimal": (
        "weight: 1:40",
        'spec.variants[0].weight: Invalid value: "string":'
        ' spec.variants[0].weight in body must be of type integer: "string"',
    ),
}
KUBECTL_BASE = """apiVersion: modeldeploy.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: iris
spec:
  variants:
    - name: v1
      model:
        uri: https://models.example.com/iris/v1.onnx
        sha256: 3f4a8c2d9e1b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c
      weight: 100
  pod:
    labels: {team: ml}
    annotations: {owner: ml}
"""


def kubectl_scalar_file(line: str) -> str:
    """KUBECTL_BASE with `line` replacing the line that sets the same field."""
    key = line.split(":", 1)[0]
    lines = KUBECTL_BASE.splitlines()
    (index,) = [i for i, old in enumerate(lines) if old.strip().startswith(f"{key}:")]
    indent = lines[index][: len(lines[index]) - len(lines[index].lstrip())]
    lines[index] = indent + line
    return "\n".join(lines) + "\n"


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
