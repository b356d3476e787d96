"""The README's "Run the operator on your machine" block, run as written against the real control
plane with a real kubectl: a ServiceAccount kubeconfig from a TokenRequest, the production example
in its namespace, and the operator from this checkout reconciling it with the shipped RBAC only."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.controlplane.harness import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADING = "### Run the operator on your machine (development)"
GROUP, VERSION, PLURAL = "modeldeploy.dev", "v1alpha1", "modeldeployments"


def readme_block() -> tuple[str, str]:
    """The block's commands before the operator starts, and the (foreground) operator command."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(HEADING) :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]
    setup, _, operator = block.partition('KUBECONFIG="$dev_kubeconfig"')
    (assignment,) = [line for line in setup.splitlines() if line.startswith("dev_kubeconfig=")]
    return setup, f'{assignment}\nKUBECONFIG="$dev_kubeconfig"{operator}'


def test_readme_block_runs_the_operator_as_its_service_account(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the README block is written for kubectl")
    setup, operator = readme_block()
    env = {
        **os.environ,
        "KUBECONFIG": str(control_plane.kubeconfig_path),  # the admin's, as a user would have
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", setup],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "system:serviceaccount:modeldeploy-system:modeldeploy-operator" in done.stdout
    kubeconfig = (tmp_path / "modeldeploy-operator.kubeconfig").read_text()
    assert "client-key" not in kubeconfig and "token:" in kubeconfig

    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", operator],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status = _wait_for_status(control_plane, process, log_path)
        assert status["readyVariants"].endswith("/2"), status
        log = log_path.read_text(errors="replace")
        assert "Forbidden" not in log, log[-3000:]
        # Delete while the operator runs, so whatever it does on deletion happens.
        with control_plane.api_client() as api:
            client.CustomObjectsApi(api).delete_namespaced_custom_object(
                GROUP, VERSION, "ml-serving", PLURAL, "fraud-scorer"
            )
            _wait_until_gone(api, process, log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have died: the assert says why
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        with control_plane.api_client() as api:
            client.CoreV1Api(api).delete_namespace("ml-serving")


def _wait_for_status(
    plane: ControlPlane, process: subprocess.Popen[bytes], log: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    with plane.api_client() as api:
        apps = client.AppsV1Api(api)
        custom = client.CustomObjectsApi(api)
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            deployments = apps.list_namespaced_deployment("ml-serving").items
            names = {d.metadata.name for d in deployments if d.metadata}
            md: Any = custom.get_namespaced_custom_object(
                GROUP, VERSION, "ml-serving", PLURAL, "fraud-scorer"
            )
            status = md.get("status") or {}
            if {"fraud-scorer-v1", "fraud-scorer-v2"} <= names and "readyVariants" in status:
                return dict(status)
            time.sleep(0.5)
    raise AssertionError(log.read_text(errors="replace")[-3000:])


def _wait_until_gone(api: client.ApiClient, process: subprocess.Popen[bytes], log: Path) -> None:
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            custom.get_namespaced_custom_object(
                GROUP, VERSION, "ml-serving", PLURAL, "fraud-scorer"
            )
        except ApiException as error:
            if error.status == 404:
                return
            raise
        time.sleep(0.5)
    raise AssertionError(log.read_text(errors="replace")[-3000:])
