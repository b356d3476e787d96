"""Run `modeldeploy-server serve` as a real process on a loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

SERVER = [sys.executable, "-m", "modeldeploy_server.cli", "serve"]


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class RunningServer:
    """A started server process and where to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        """Signal the process and wait for its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)


def wait_ready(server: RunningServer, timeout_s: float = 60) -> None:
    """Poll readiness until 200; fail with the log if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + "/v2/health/ready", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not ready after {timeout_s} s:\n{server.log()}")


@contextlib.contextmanager
def serve(
    model_path: Path,
    model_name: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    ready: bool = True,
) -> Iterator[RunningServer]:
    """Start a server (optionally under `prefix`, e.g. taskset), stop it with SIGTERM after."""
    port = free_port()
    command = [
        *prefix,
        *SERVER,
        "--model-path",
        str(model_path),
        "--model-name",
        model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    with tempfile.NamedTemporaryFile(prefix="modeldeploy-server-", suffix=".log") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Unbuffered, so that the log file is complete while the server still runs.
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        server = RunningServer(process, f"http://127.0.0.1:{port}", Path(log.name))
        try:
            if ready:
                wait_ready(server)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
