"""`modeldeploy render`: the operator's own objects (render_objects, the one rendering path), as a
YAML stream that is valid for the Kubernetes API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from modeldeploy_operator.batch_render import render_batch_job, resolve_model
from modeldeploy_operator.cli import main
from modeldeploy_operator.config import DEFAULT_SERVER_IMAGE
from modeldeploy_operator.gate_jobs import render_with_gates
from modeldeploy_operator.render import render_router_identity
from modeldeploy_operator.spec import BATCH_KIND, parse_batch_prediction, parse_model_deployment
from modeldeploy_operator.validation import default_model_deployment
from tests.invalid_manifests import VALID_MANIFESTS

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))
# The Kubernetes version the control-plane tests run (tests/controlplane/versions.env).
VERSIONS = dict(
    line.split("=", 1)
    for line in (REPO_ROOT / "tests" / "controlplane" / "versions.env").read_text().splitlines()
    if "=" in line and not line.startswith("#")
)
KUBERNETES_VERSION = VERSIONS["KUBERNETES_VERSION"].removeprefix("v").rsplit(".", 1)[0] + ".0"
# kubernetes-validate ships schemas for built-in kinds only; the HTTPRoute (Gateway API CRD) and
# our RouteTable are checked by the real API server with the CRDs installed in tests/operator.
NO_OFFLINE_SCHEMA = {"HTTPRoute", "RouteTable"}


def manifests() -> list[Any]:
    examples = [pytest.param(yaml.safe_load(p.read_text()), id=p.name) for p in EXAMPLES]
    built = [pytest.param(build("iris"), id=name) for name, build in VALID_MANIFESTS.items()]
    return examples + built


def render_with_cli(
    manifest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> str:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    exit_code = main(["render", "-f", str(path), *args])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    return captured.out


def operator_objects(manifest: dict[str, Any], image: str = DEFAULT_SERVER_IMAGE) -> list[Any]:
    """What the operator applies: render_with_gates of the object as the API server stores it
    (CRD defaults filled in), every variant Ready, after its namespace's router identity when it
    has a router."""
    if manifest["kind"] == BATCH_KIND:
        bp = parse_batch_prediction(default_model_deployment(manifest, BATCH_KIND))
        return [render_batch_job(bp, resolve_model(bp, None), server_image=image)]
    md = parse_model_deployment(default_model_deployment(manifest))
    identity = render_router_identity(md.namespace) if md.routing.mode == "router" else []
    return identity + render_with_gates(md, server_image=image)


@pytest.mark.parametrize("manifest", manifests())
def test_output_is_exactly_what_the_operator_renders(
    manifest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = list(yaml.safe_load_all(render_with_cli(manifest, tmp_path, capsys)))
    assert printed == operator_objects(manifest)


@pytest.mark.parametrize("manifest", manifests())
def test_every_object_is_valid_for_the_kubernetes_api(
    manifest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    printed = list(yaml.safe_load_all(render_with_cli(manifest, tmp_path, capsys)))
    checked = [o for o in printed if o["kind"] not in NO_OFFLINE_SCHEMA]
    assert checked, "nothing to validate"
    for obj in checked:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_an_invalid_object_fails_the_offline_schema_check() -> None:
    # The check above can fail: a Deployment with a misspelt field is refused.
    objects = operator_objects(VALID_MANIFESTS["minimal"]("iris"))
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["contianers"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_namespace_and_server_image_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = VALID_MANIFESTS["two-variants"]("iris")
    image = "registry.example/modeldeploy-server:9.9"
    printed = list(
        yaml.safe_load_all(
            render_with_cli(
                manifest, tmp_path, capsys, "--namespace", "team-a", "--server-image", image
            )
        )
    )
    manifest["metadata"]["namespace"] = "team-a"
    assert printed == operator_objects(manifest, image)
    assert {o["metadata"]["namespace"] for o in printed} == {"team-a"}


def test_routes_are_readable_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = render_with_cli(VALID_MANIFESTS["two-variants"]("iris"), tmp_path, capsys)
    assert "kind: RouteTable\n" in text
    assert "spec:\n  routes:\n    version: " in text


def test_invalid_manifest_renders_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not even the valid documents before it."""
    manifest = VALID_MANIFESTS["two-variants"]("iris")
    manifest["spec"]["variants"][1]["weight"] = 20
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([VALID_MANIFESTS["minimal"]("first"), manifest]))
    assert main(["render", "-f", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{path}, document 2 (line " in captured.err
    assert "invalid ModelDeployment 'iris':\n  spec.variants: " in captured.err


def test_console_script_reads_stdin() -> None:
    manifest = (REPO_ROOT / "examples" / "iris.yaml").read_text()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("modeldeploy")), "render", "-f", "-"],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert list(yaml.safe_load_all(result.stdout)) == operator_objects(yaml.safe_load(manifest))


def test_a_multi_document_file_renders_every_model_deployment_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = VALID_MANIFESTS["minimal"]("first"), VALID_MANIFESTS["two-variants"]("second")
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all([first, second]))

    exit_code = main(["render", "-f", str(path)])

    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    rendered = list(yaml.safe_load_all(captured.out))
    # Both in one namespace: its router identity once, before the first.
    identity = render_router_identity("default")
    assert operator_objects(first)[:2] == operator_objects(second)[:2] == identity
    assert rendered == operator_objects(first) + operator_objects(second)[2:]
