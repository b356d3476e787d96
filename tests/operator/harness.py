"""Run the operator as it runs in production: `kopf run -m modeldeploy_operator.main` in its own
process, authenticated as its ServiceAccount with the RBAC shipped in manifests/.

Shared by the integration tests and bench/operator_bench.py.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.controlplane.harness import ControlPlane, free_port

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
KOPF = Path(sys.executable).parent / "kopf"
GROUP, VERSION, PLURAL = "modeldeploy.dev", "v1alpha1", "modeldeployments"
SERVER_IMAGE = "registry.example/modeldeploy-server:test"
# Starts of the operator on a new metrics port when the chosen one was taken meanwhile.
PORT_ATTEMPTS = 3
STARTUP_TIMEOUT_S = 60.0
TEST_MANAGER = "modeldeploy-tests"
APPLY = "application/apply-patch+yaml"


def manifest_documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]


def install_operator_identity(plane: ControlPlane, namespace: str) -> str:
    """The shipped ServiceAccount (in `namespace`), ClusterRoles (the operator's, and the routers'
    that it binds in each namespace) and a binding; its kubeconfig."""
    (account,) = manifest_documents("serviceaccount.yaml")
    role, binding, router_role = manifest_documents("rbac.yaml")
    account = copy.deepcopy(account)
    account["metadata"]["namespace"] = namespace
    binding = copy.deepcopy(binding)
    binding["metadata"]["name"] = f"{binding['metadata']['name']}-{namespace}"
    for subject in binding["subjects"]:
        subject["namespace"] = namespace
    with plane.api_client() as api:
        rbac = client.RbacAuthorizationV1Api(api)
        apply_kwargs: dict[str, Any] = {
            "field_manager": TEST_MANAGER,
            "force": True,
            "_content_type": APPLY,
        }
        for cluster_role in (role, router_role):
            rbac.patch_cluster_role(cluster_role["metadata"]["name"], cluster_role, **apply_kwargs)
        rbac.patch_cluster_role_binding(binding["metadata"]["name"], binding, **apply_kwargs)
        client.CoreV1Api(api).patch_namespaced_service_account(
            account["metadata"]["name"], namespace, account, **apply_kwargs
        )
    return plane.service_account_kubeconfig(namespace, account["metadata"]["name"])


def remove_operator_identity(plane: ControlPlane, namespace: str) -> None:
    _, binding, _ = manifest_documents("rbac.yaml")
    with plane.api_client() as api, contextlib.suppress(ApiException):
        client.RbacAuthorizationV1Api(api).delete_cluster_role_binding(
            f"{binding['metadata']['name']}-{namespace}"
        )


class OperatorProcess:
    """One `kopf run` child process; its output goes to a log file the tests can read."""

    def __init__(
        self,
        kubeconfig: str,
        namespaces: list[str],
        log_path: Path,
        resync_seconds: float,
        verbose: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.verbose = verbose
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it serves its metrics. Their port was free when chosen, but
        another process (a test's server) may take it before the operator binds it; kopf then
        retries that startup activity only a minute later, with no reconcile meanwhile. So a
        taken port means a new port and a new start."""
        for _ in range(PORT_ATTEMPTS):
            log_size = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            if self._serves_metrics(log_size):
                return
            self.stop()
            self.metrics_port = free_port()
        raise AssertionError(f"the operator's metrics port was taken {PORT_ATTEMPTS} times")

    def _serves_metrics(self, log_size: int) -> bool:
        """True once the metrics answer; False if the port was taken (per the log since
        `log_size`)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                self.metrics()
            except OSError:
                pass
            else:
                return True
            with self.log_path.open("rb") as log:
                log.seek(log_size)
                if b"Address already in use" in log.read():
                    return False
            time.sleep(0.1)
        raise AssertionError(f"operator never served its metrics:\n{self.log()[-3000:]}")

    def _launch(self) -> None:
        assert self.process is None or self.process.poll() is not None
        argv = [str(KOPF), "run", "--standalone", "-m", "modeldeploy_operator.main"]
        if self.verbose:
            argv.append("--verbose")
        for namespace in self.namespaces:
            argv += ["--namespace", namespace]
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "MODELDEPLOY_SERVER_IMAGE": SERVER_IMAGE,
            "MODELDEPLOY_RESYNC_SECONDS": str(self.resync_seconds),
            "MODELDEPLOY_METRICS_HOST": "127.0.0.1",
            "MODELDEPLOY_METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as when a node dies."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def rss_bytes(self) -> int:
        """Resident memory of the operator process now (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metrics(self) -> str:
        """The operator's Prometheus metrics, as scraped."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"operator exited ({self.process.returncode}):\n{self.log()[-3000:]}"
            )


@contextlib.contextmanager
def running_operator(
    plane: ControlPlane,
    namespaces: list[str],
    log_path: Path,
    resync_seconds: float = 2.0,
    verbose: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[OperatorProcess]:
    """The operator under its ServiceAccount's RBAC, watching `namespaces` (the first holds the
    ServiceAccount). Stopped afterwards; it leaves no finalizer behind, so namespaces can go."""
    kubeconfig = install_operator_identity(plane, namespaces[0])
    operator = OperatorProcess(kubeconfig, namespaces, log_path, resync_seconds, verbose, env)
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
        remove_operator_identity(plane, namespaces[0])


def wait_for(
    probe: Callable[[], T | None],
    what: str | Callable[[], str],
    timeout: float = 30.0,
    interval: float = 0.1,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        last = probe()
        if last:
            return last
        time.sleep(interval)
    description = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {description} (last: {last!r})")
