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
        ("", "expected one YAML document, found 0"),
        ("a: [", "cannot read"),
        (EXAMPLES[0].read_text() + "\n---\n" + EXAMPLES[0].read_text(), "found 2"),
        ("kind: Deployment\napiVersion: apps/v1\n", 'kind: Unsupported value: "Deployment"'),
    ],
    ids=["empty", "not-yaml", "two-documents", "other-kind"],
)
def test_files_that_are_not_one_model_deployment(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exit_code, output = validate(text, tmp_path, capsys)
    assert exit_code == 1
    assert message in output


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
    assert f"{path}: invalid ModelDeployment:\n  spec.variants[0].weight: " in result.stderr
