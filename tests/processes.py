"""Run `modeldeploy-server serve|route` as real subprocesses on loopback ports (tests, benches).

    with serve_model(model.path, "iris", "v1") as server, route(config_path) as router:
        httpx.post(router.url + "/v2/models/iris/infer", ...)

Each helper picks a free port, waits until `/v2/health/ready` (or `ready_path`) answers 200 and,
on leaving the block, stops the process with SIGTERM (then SIGKILL if it does not exit in time).
If the process dies or never becomes ready, the error carries its output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

import httpx

LOOPBACK = "127.0.0.1"
READY_PATH = "/v2/health/ready"
# Another process can take a port between our probe and the child's bind; a retry on a new port
# makes that race harmless.
_BIND_ATTEMPTS = 3


class RunOptions(TypedDict, total=False):
    """How `running` starts a process; every key is optional."""

    ready_timeout_s: float  # default 60
    ready_path: str | None  # default /v2/health/ready; None: do not wait for readiness
    env: Mapping[str, str]  # added to os.environ
    prefix: Sequence[str]  # goes before the command, for example ["taskset", "-c", "1"]
    host: str  # default 127.0.0.1; another loopback address gives a name several (tests/router)
    port: int  # default: a free one, chosen again if it was taken meanwhile


class ProcessStartError(RuntimeError):
    """The process exited or did not become ready in time; the message includes its output."""


@dataclass
class RunningProcess:
    """A started process, the base URL it listens on and the file holding its stdout+stderr."""

    process: subprocess.Popen[bytes]
    command: str
    url: str
    port: int
    log_path: Path
    # What the process wrote, kept when it is stopped and its log file removed.
    final_output: str | None = None

    def output(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        if self.final_output is not None:
            return self.final_output
        return self.log_path.read_text(errors="replace")

    def close(self, sig: int = signal.SIGTERM) -> int:
        """Stop the process, keep its output and remove the log file; return its exit code."""
        code = stop(self.process, sig)
        if self.final_output is None:
            self.final_output = self.output()
            self.log_path.unlink()
        return code


def server_command() -> list[str]:
    """The `modeldeploy-server` console script of the environment running the tests."""
    script = Path(sys.executable).with_name("modeldeploy-server")
    if not script.exists():
        raise FileNotFoundError(f"{script} is missing: install the project (pip install -e .)")
    return [str(script)]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def stop(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 15.0
) -> int:
    """Signal the process, wait for it, SIGKILL it if it is still there; return its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def running(args: Sequence[str], **options: Unpack[RunOptions]) -> Iterator[RunningProcess]:
    """Run `modeldeploy-server ARGS --host 127.0.0.1 --port P` (or `host`, `port`) until the block
    ends."""
    prefix = options.get("prefix", ())
    env = options.get("env", {})
    host = options.get("host", LOOPBACK)
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        port = options.get("port") or free_port()
        command = [*prefix, *server_command(), *args, "--host", host, "--port", str(port)]
        fd, log_name = tempfile.mkstemp(prefix="modeldeploy-", suffix=".log")
        log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Unbuffered, so that output() is complete while the process still runs.
                # No shutdown delay unless a test asks for one: stopping would take seconds.
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "MODELDEPLOY_SHUTDOWN_DELAY_S": "0",
                    **env,
                },
            )
        url = f"http://{host}:{port}"
        started = RunningProcess(process, " ".join(command), url, port, log_path)
        ready_path = options.get("ready_path", READY_PATH)
        try:
            if ready_path is not None:
                _wait_ready(started, ready_path, options.get("ready_timeout_s", 60.0))
        except ProcessStartError:
            started.close()
            taken = "address already in use" in started.output().lower()
            if taken and "port" not in options and attempt < _BIND_ATTEMPTS:
                continue
            raise
        try:
            yield started
        finally:
            started.close()
        return


def serve_model(
    model_path: Path,
    model_name: str,
    model_version: str = "1",
    extra_args: Sequence[str] = (),
    **options: Unpack[RunOptions],
) -> contextlib.AbstractContextManager[RunningProcess]:
    """`modeldeploy-server serve` for one model file."""
    args = ["serve", "--model-path", str(model_path), "--model-name", model_name]
    args += ["--model-version", model_version, *extra_args]
    return running(args, **options)


def route(
    config_path: Path, extra_args: Sequence[str] = (), **options: Unpack[RunOptions]
) -> contextlib.AbstractContextManager[RunningProcess]:
    """`modeldeploy-server route` with a routing config file."""
    return running(["route", "--config", str(config_path), *extra_args], **options)


def _wait_ready(started: RunningProcess, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = started.url + path
    last = "no answer yet"
    while time.monotonic() < deadline:
        code = started.process.poll()
        if code is not None:
            raise ProcessStartError(
                f"{started.command} exited with {code} before it was ready:\n{started.output()}"
            )
        try:
            answer = httpx.get(url, timeout=1.0)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text}"
        time.sleep(0.05)
    raise ProcessStartError(
        f"{started.command} not ready after {timeout_s} s ({url}: {last}):\n{started.output()}"
    )
