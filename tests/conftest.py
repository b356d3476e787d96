"""Fixtures shared by the whole suite: the real test control plane and per-test namespaces."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.controlplane import harness

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_CRDS = REPO_ROOT / "crds"
_started: list[harness.ControlPlane] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def control_plane_binaries() -> harness.Binaries:
    """The built control-plane binaries; skips (fails in CI) when they are not there."""
    binaries = harness.expected_binaries()
    missing = harness.missing_binaries(binaries)
    if not missing:
        return binaries
    build = harness.BUILD_SCRIPT.relative_to(REPO_ROOT)
    if shutil.which("go") is None:
        reason = (
            "control-plane binaries are not built and no Go toolchain was found: install Go >="
            f" {harness.read_versions()['GO_VERSION']} (https://go.dev/dl/ or your distribution's"
            f" golang package), then run {build}"
            " (or scripts/test.sh, which runs it)"
        )
    else:
        reason = (
            f"control-plane binaries are not built (missing {', '.join(map(str, missing))}):"
            f" run {build} (a cold build took about 5 minutes on 2 cores)"
        )
    # In CI the suite must prove the operator against a real API server, never skip it.
    if _in_ci():
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane(control_plane_binaries: harness.Binaries) -> Iterator[harness.ControlPlane]:
    """A real etcd + kube-apiserver + kube-controller-manager with the project's and Gateway CRDs.

    Started on first use only, shared by the session, stopped (by PID) at the end.
    """
    gateway_crds = control_plane_binaries.gateway_crds.glob("*.yaml")
    crd_paths = [*PROJECT_CRDS.glob("*.yaml"), *gateway_crds]
    with harness.running(control_plane_binaries, crd_paths) as plane:
        _started.append(plane)
        yield plane


@pytest.fixture
def namespace(control_plane: harness.ControlPlane) -> Iterator[str]:
    """A fresh, uniquely named namespace; deleted afterwards without waiting for it to go."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    body = client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    with control_plane.api_client() as api:
        client.CoreV1Api(api).create_namespace(body)
    yield name
    with control_plane.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever needs the control plane is a control-plane test, so `-m "not controlplane"` works
    # without every test module remembering the marker.
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.controlplane)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for plane in _started:
        terminalreporter.write_line(
            f"control plane: started in {plane.startup_seconds:.1f}s ({plane.server_url})"
        )
