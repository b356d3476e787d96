"""Local mode's shell: fetch the models, start the planned processes, supervise, stop them all.

Every child runs in its own session, so the terminal's Ctrl-C reaches only this process, which
then stops each child's whole process group: SIGTERM (the servers drain), SIGKILL after a grace
period. On Linux each child also gets SIGTERM from the kernel if this process dies without
cleaning up (even from SIGKILL), so no server outlives the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import httpx

from modeldeploy_operator.contract import ROUTER_SHADOW_LOG_ENV
from modeldeploy_operator.local import (
    LOOPBACK,
    LocalFile,
    LocalProcess,
    list_ignored_fields,
    locate_model,
    plan_local_run,
    render_example_requests,
)
from modeldeploy_operator.local_rollout import LocalRollout, Reload
from modeldeploy_operator.spec import ModelDeployment, ModelSource

# -P: the working directory stays off sys.path, so a checkout's operator/ folder cannot shadow
# the standard library's `operator` module when run from the repository root.
SERVER_COMMAND = (sys.executable, "-P", "-m", "modeldeploy_server.cli")
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
DOWNLOAD_REPORT_S = 2.0
_POLL_S = 0.1
_LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1

Say = Callable[[str], None]


class LocalRunError(Exception):
    """Local mode cannot go on; the message says why (and names the field where one is at fault)."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop everything and exit 0."""


@dataclass(frozen=True)
class LocalRunSettings:
    port: int
    base_dir: Path  # pvc:// claims default to directories here (the YAML file's directory)
    claim_dirs: Mapping[str, Path]
    cache_dir: Path
    # Re-reads the YAML file when it changed (None: stdin, read once); see local_rollout.py.
    reload: Reload | None = None


class Supervisor:
    """The children of one run, their logs, and the stop request set by the signal handlers."""

    def __init__(self, run_dir: Path, out: TextIO) -> None:
        self.run_dir = run_dir
        self._out = out
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # Children expected to end (gates, probes): their exit is no failure of the run.
        self._jobs: set[str] = set()
        self._stop_signal: int | None = None

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_signal = signum

    def check_stop(self) -> None:
        """Raise StopRequested once a signal has asked to stop."""
        if self._stop_signal is not None:
            raise StopRequested(signal.Signals(self._stop_signal).name)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
        """Start a child with its output in `<run dir>/<name>.log`; return its pid."""
        with self.log_path(name).open("wb") as log:
            child = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        self._children[name] = child
        return child.pid

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def exit_code(self, name: str) -> int | None:
        return self._children[name].poll()

    def first_exited(self) -> str | None:
        return next(
            (n for n, c in self._children.items() if n not in self._jobs and c.poll() is not None),
            None,
        )

    def start_job(self, name: str, args: Sequence[str]) -> None:
        """Start `modeldeploy-server ARGS`, a child expected to end (its log: `<name>.log`)."""
        self._jobs.add(name)
        self.start(name, [*SERVER_COMMAND, *args], {})

    def job_exit_code(self, name: str) -> int | None:
        return self.exit_code(name)

    def stop_job(self, name: str) -> None:
        """SIGTERM the job's process group; SIGKILL after the grace period."""
        child = self._children.pop(name)
        self._jobs.discard(name)
        if child.poll() is None:
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.wait()

    def wait_exit(self, name: str, report: Callable[[], None], every_s: float) -> int:
        """Wait for a short-lived child (a fetch), calling `report` every `every_s` seconds and
        staying responsive to stop requests."""
        next_report = time.monotonic() + every_s
        while (code := self.exit_code(name)) is None:
            self.check_stop()
            if time.monotonic() >= next_report:
                report()
                next_report += every_s
            time.sleep(_POLL_S)
        return code

    def describe_exit(self, name: str) -> str:
        lines = self.log_path(name).read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        output = "\n".join(f"    {line}" for line in lines)
        return f"{name} exited with code {self.exit_code(name)}; its last output:\n{output}"

    def stop_all(self) -> None:
        """SIGTERM every child's process group, wait, SIGKILL the groups still there."""
        running = {n: c for n, c in self._children.items() if c.poll() is None}
        for child in running.values():
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, child in running.items():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Still unreaped, so its pid (the group id) cannot have been reused.
                print(f"  {name} did not stop in {STOP_GRACE_S:g} s: killing", file=self._out)
                _signal_group(child.pid, signal.SIGKILL)
                child.wait()


def run_local(md: ModelDeployment, settings: LocalRunSettings, out: TextIO, err: TextIO) -> int:
    """Run `md` on this machine until SIGINT/SIGTERM; 0 after a requested stop, 1 on failure.

    Progress goes to `out`, the reason for a failure to `err`.
    """
    if md.uid is None:
        # A uid of this run's own: the routes' probe token derives from it.
        md = dataclasses.replace(md, uid=f"local-{uuid.uuid4()}")
    run_dir = Path(tempfile.mkdtemp(prefix=f"modeldeploy-{md.name}-"))
    supervisor = Supervisor(run_dir, out)
    try:
        with _stop_signals_to(supervisor):
            _run(md, settings, supervisor, functools.partial(print, file=out, flush=True))
    except StopRequested as stop:
        print(f"\n{stop}: stopping", file=out, flush=True)
        return 0
    except LocalRunError as error:
        print(f"error: {error}", file=err, flush=True)
        return 1
    finally:
        supervisor.stop_all()
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(md: ModelDeployment, settings: LocalRunSettings, sup: Supervisor, say: Say) -> NoReturn:
    say(f"ModelDeployment {md.name}: {len(md.variants)} variant(s), logs in {sup.run_dir}")
    for note in list_ignored_fields(md):
        say(f"  ignored locally (Kubernetes only): {note}")
    _check_port_free(settings.port)
    model_paths = {
        variant.name: _fetch_model(sup, i, md, settings, say)
        for i, variant in enumerate(md.variants)
    }
    names = [v.name for v in md.variants]
    routes_path = sup.run_dir / "routes.json"
    plan = plan_local_run(
        md,
        server_command=SERVER_COMMAND,
        model_paths=model_paths,
        variant_ports=dict(zip(names, _free_ports(len(names), settings.port), strict=True)),
        router_port=settings.port,
        routes_path=routes_path,
    )
    routes_path.write_text(json.dumps(plan.routes, indent=2) + "\n")
    with httpx.Client(timeout=2.0) as client:
        for process in plan.variants:
            _start(sup, process, say)
        for process in plan.variants:
            _wait_ready(sup, client, process, say)
        _start(sup, plan.router, say)
        _wait_ready(sup, client, plan.router, say)
        metadata = client.get(f"{plan.variants[0].url}/v2/models/{md.name}").json()
    say(f"\nReady: {md.name} on {plan.router.url}  (Ctrl-C stops everything)")
    for process, route in zip(plan.variants, plan.routes["variants"], strict=True):
        say(f"  {process.name}: {route['weight']}% of traffic, direct: {process.url}")
    say(f"  metrics: {plan.router.url}/metrics (router), <variant URL>/metrics (servers)")
    if md.routing.shadow is not None:
        shadow_log = plan.router.env[ROUTER_SHADOW_LOG_ENV]
        say(
            f"  shadow: {md.routing.shadow.percent}% copied to {md.routing.shadow.variant}, "
            f"a sample of the disagreements in {shadow_log}"
        )
    say("\nTry:")
    inputs = metadata["inputs"]
    for command in render_example_requests(md, plan.router.url, inputs, md.example_instance):
        say(f"  {command}")
    urls = {process.name: process.url for process in plan.variants}

    def dataset_location(source: ModelSource) -> str:
        # A local file (file://, pvc:// in its claim's directory) by its path; a download by its
        # URL (the gate fetches and verifies it itself).
        location = locate_model(
            source,
            base_dir=settings.base_dir,
            claim_dirs=settings.claim_dirs,
            cache_dir=settings.cache_dir,
        )
        return str(location.path) if isinstance(location, LocalFile) else source.uri

    rollout = LocalRollout(
        md, urls, plan.router.url, routes_path, say, settings.reload, sup, dataset_location
    )
    while (name := sup.first_exited()) is None:
        sup.check_stop()
        rollout.tick()
        time.sleep(_POLL_S)
    raise LocalRunError(sup.describe_exit(name))


def _fetch_model(
    sup: Supervisor, index: int, md: ModelDeployment, settings: LocalRunSettings, say: Say
) -> Path:
    variant = md.variants[index]
    field = f"spec.variants[{index}].model.uri"
    location = locate_model(
        variant.model,
        base_dir=settings.base_dir,
        claim_dirs=settings.claim_dirs,
        cache_dir=settings.cache_dir,
    )
    if isinstance(location, LocalFile):
        if not location.path.is_file():
            raise LocalRunError(f"{field}: {variant.model.uri} -> {location.path}: no such file")
        say(f"  {variant.name}: model {location.path}")
        return location.path
    if location.cache_path.is_file():
        # The server verifies the sha256 of what it loads, so a damaged cache entry is caught.
        say(f"  {variant.name}: model {location.url} (cached: {location.cache_path})")
        return location.cache_path
    say(f"  {variant.name}: downloading {location.url} ...")
    started = time.monotonic()
    name = f"fetch-{variant.name}"
    # A name of our own, renamed into place once verified: two runs downloading the same model
    # at once never write the same file, and an interrupted download leaves no cache entry.
    download = location.cache_path.with_name(f"{location.cache_path.name}.{os.getpid()}")

    def report() -> None:
        # `modeldeploy-server fetch` writes to `.NAME.<random>.part` until the digest checks out.
        for partial in download.parent.glob(f".{download.name}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                say(f"  {variant.name}: {partial.stat().st_size} bytes so far")

    argv = [*SERVER_COMMAND, "fetch", location.url, str(download), "--sha256", variant.model.sha256]
    sup.start(name, argv, {})
    if sup.wait_exit(name, report, DOWNLOAD_REPORT_S) != 0:
        raise LocalRunError(f"{field}: {sup.describe_exit(name)}")
    os.replace(download, location.cache_path)
    size = location.cache_path.stat().st_size
    say(f"  {variant.name}: downloaded {size} bytes in {time.monotonic() - started:.1f} s")
    return location.cache_path


def _start(sup: Supervisor, process: LocalProcess, say: Say) -> None:
    pid = sup.start(process.name, process.argv, process.env)
    say(f"  {process.name}: starting on {process.url} (pid {pid})")


def _wait_ready(sup: Supervisor, client: httpx.Client, process: LocalProcess, say: Say) -> None:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        sup.check_stop()
        if sup.exit_code(process.name) is not None:
            raise LocalRunError(sup.describe_exit(process.name))
        try:
            if client.get(f"{process.url}/v2/health/ready").status_code == 200:
                say(f"  {process.name}: ready after {time.monotonic() - started:.1f} s")
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(_POLL_S)
    raise LocalRunError(f"{process.name} not ready after {READY_TIMEOUT_S:g} s; see its log")


@contextlib.contextmanager
def _stop_signals_to(supervisor: Supervisor) -> Iterator[None]:
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, supervisor.request_stop) for signum in stop_signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does: connections of an earlier run lingering in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as error:
            raise LocalRunError(
                f"port {port} on 127.0.0.1 is taken ({error.strerror}); choose one with --port"
            ) from None


def _free_ports(count: int, router_port: int) -> list[int]:
    """Distinct free loopback ports other than the router's.

    All probe sockets stay open until every port is chosen, so the kernel cannot hand out the
    same port twice.
    """
    ports: list[int] = []
    with contextlib.ExitStack() as probes:
        while len(ports) < count:
            sock = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
            if port != router_port:
                ports.append(port)
    return ports


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has already gone
        os.killpg(pid, signum)


def _die_with_parent() -> Callable[[], Any] | None:
    """A preexec_fn that has the kernel SIGTERM the child when this process dies (Linux only)."""
    if sys.platform != "linux":
        return None
    # Resolved here, in the parent: the child only calls it, between fork and exec, and the
    # setting survives the exec.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return functools.partial(prctl, _PR_SET_PDEATHSIG, signal.SIGTERM)
