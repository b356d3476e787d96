"""The docs follow their sources: docs/api.md the CRD, the README's limits the server defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from modeldeploy_server.config import ServeConfig
from tests.controlplane.harness import read_versions

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date_with_the_crd() -> None:
    result = subprocess.run(
        [sys.executable, "-P", str(REPO_ROOT / "docs" / "generate_api_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_reference_documents_every_spec_field() -> None:
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    for field in ("spec.variants[].model.uri", "spec.routing.gateway.parentRefs", "spec.pod.image"):
        assert f"| `{field}` |" in text


def test_readme_limits_are_the_server_defaults() -> None:
    defaults = ServeConfig(model_path=Path("m.onnx"), model_name="m")
    edge = defaults.edge
    rows = {
        line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1]
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if line.startswith("| ") and "(`--" in line
    }
    assert rows == {
        "request body (`--max-request-bytes`, `maxRequestBytes`)": (
            f"{defaults.max_request_bytes // 2**20} MiB"
        ),
        "rows per request (`--max-rows`, `maxRows`)": f"{defaults.max_rows:,}",
        "request time (`--request-timeout-s`, `requestTimeoutSeconds`)": (
            f"{defaults.request_timeout_s:g} s"
        ),
        "waiting requests (`--max-queue`)": str(defaults.max_queue),
        "batching (`--max-batch-size`, `--max-batch-delay-ms`)": (
            f"{defaults.max_batch_size} rows per model run; under concurrency a forming run "
            f"waits up to {defaults.max_batch_delay_ms:g} ms for more"
        ),
        # The HTTP edge, shared with the router.
        "request line + headers (`--max-header-bytes`)": f"{edge.max_header_bytes // 1024} KiB",
        "open connections (`--max-connections`)": str(edge.max_connections),
        "time to receive a whole request (`--read-timeout-s`)": f"{edge.read_timeout_s:g} s",
        "idle keep-alive (`--keepalive-timeout-s`)": f"{edge.keepalive_timeout_s:g} s",
        "request bodies in flight, process-wide (`--max-body-bytes-in-flight`)": (
            f"{edge.max_body_bytes_in_flight // 2**20} MiB"
        ),
        "SIGTERM (`--shutdown-delay-s`)": f"{edge.shutdown_delay_s:g} s",
    }


def test_one_go_version_is_stated_everywhere() -> None:
    """README, scripts and skip messages quote versions.env's GO_VERSION, which build.sh checks
    against the go.mod of each pinned component (k8s.io/kubernetes v1.35.4 needs Go 1.25)."""
    go_version = read_versions()["GO_VERSION"]
    places = [
        REPO_ROOT / "README.md",
        REPO_ROOT / "scripts" / "test.sh",
        REPO_ROOT / "tests" / "controlplane" / "build.sh",
        REPO_ROOT / "tests" / "conftest.py",
        *(REPO_ROOT / "docs").glob("*.md"),
        *(REPO_ROOT / "bench").glob("*.md"),
    ]
    stated = {
        (path.name, version)
        for path in places
        for version in re.findall(r"Go >= ?([0-9][0-9.]*[0-9])", path.read_text())
    }

    assert go_version == "1.25"
    assert stated == {("README.md", go_version)}
