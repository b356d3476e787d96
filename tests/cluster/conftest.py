"""Fixtures of the real-cluster suite: the cluster itself, and the product installed on it the
way the README tells a user to."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import cluster

REPO_ROOT = cluster.REPO_ROOT
LOCK_FILE = Path("/tmp/modeldeploy-cluster.lock")
LOCK_WAIT_S = 1800.0


# Measurements the issue asks to report, printed at the end of the run.
MEASURED: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in MEASURED:
        terminalreporter.write_line(f"cluster suite: {line}")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    kubectl_argv: list[str]
    images: dict[str, str]
    models_dir: Path

    def kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 180, check: bool = True
    ) -> str:
        result = subprocess.run(
            [*self.kubectl_argv, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, documents: list[dict[str, Any]], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl(*ns, "apply", "-f", "-", stdin=yaml.safe_dump_all(documents))


@pytest.fixture(scope="session")
def real_cluster() -> Iterator[Cluster]:
    """The running cluster (started here if it is not up; stopped at the end if started here).

    Skips, naming what is missing, where the machine cannot run it; with CI=true that fails.
    """
    missing = cluster.missing_prerequisites()
    if missing:
        reason = "the real-cluster suite cannot run here; missing: " + "; ".join(missing)
        if _in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    with _exclusive(LOCK_FILE, LOCK_WAIT_S):
        paths = cluster.Paths(cluster.state_dir())
        state = cluster.read_state(paths)
        started_here = not (state is not None and cluster.healthy(paths, state))
        started = time.monotonic()
        state = cluster.up()
        seconds = time.monotonic() - started
        MEASURED.append(f"cluster {'up' if started_here else 'reused'} in {seconds:.1f}s")
        images = cluster.image_names()
        cluster.import_images(
            paths,
            {images[f"{what}_IMAGE"]: images[f"{what}_ARCHIVE"] for what in ("SERVER", "OPERATOR")},
        )
        paths.models.mkdir(exist_ok=True)
        paths.models.chmod(0o755)
        try:
            yield Cluster(paths.kubeconfig, state["kubectl"], images, paths.models)
        finally:
            if started_here and os.environ.get("MODELDEPLOY_CLUSTER_KEEP") != "1":
                started = time.monotonic()
                left = cluster.down()
                MEASURED.append(f"cluster down in {time.monotonic() - started:.1f}s")
                assert not left, f"the teardown left these behind: {left}"


@contextlib.contextmanager
def _exclusive(path: Path, wait_s: float) -> Iterator[None]:
    """One cluster session per machine (bridges, iptables chains and port 6443 are global)."""
    with path.open("w") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another real-cluster session holds {path}", pytrace=False)
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def kustomize_overlay(directory: Path, images: dict[str, str]) -> Path:
    """An overlay of manifests/ that sets both images, as a user would with kustomize."""
    operator_name, operator_tag = images["OPERATOR_IMAGE"].rsplit(":", 1)
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO_ROOT / "manifests", directory)],
        "images": [
            {
                "name": "ghcr.io/modeldeploy/modeldeploy-operator",
                "newName": operator_name,
                "newTag": operator_tag,
            }
        ],
        # The operator gets the server image from its environment (manifests/deployment.yaml).
        "patches": [
            {
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {
                            "name": "modeldeploy-operator",
                            "namespace": "modeldeploy-system",
                        },
                        "spec": {
                            "template": {
                                "spec": {
                                    "containers": [
                                        {
                                            "name": "operator",
                                            "env": [
                                                {
                                                    "name": "MODELDEPLOY_SERVER_IMAGE",
                                                    "value": images["SERVER_IMAGE"],
                                                }
                                            ],
                                        }
                                    ]
                                }
                            }
                        },
                    }
                )
            }
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    return directory


@pytest.fixture(scope="session")
def overlay(real_cluster: Cluster) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="modeldeploy-overlay-") as directory:
        yield kustomize_overlay(Path(directory), real_cluster.images)
