"""Shadow traffic: copies of requests sent to a shadow variant after the user has their answer.

The copies are sent, and their answers compared, by a worker process at the lowest CPU priority
(`modeldeploy_server.shadow_worker`), started with the first copy. In the router's own process
that work held its event loop for a millisecond at a time, between users' requests: with 10%
mirrored, users' p99 rose 1.25-1.47x. Here the router only writes each copy to the worker's
socket (a few microseconds), and reads one line of outcomes per round of copies, which it counts
in its metrics.

`offer` never waits: when `queue_size` copies are already in the worker's hands (waiting, or sent
and not answered yet), or the worker cannot run, the copy is dropped and counted, so a slow or
dead shadow variant can neither delay nor change what users get. A worker that dies is started
again with the copy after `RESTART_DELAY_S`; the copies it held are counted as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from modeldeploy_server.routing import ShadowConfig

if TYPE_CHECKING:
    from modeldeploy_server.router import RouterMetrics

log = logging.getLogger("modeldeploy.router")

RESTART_DELAY_S = 1.0
# How long a stopping router waits for its worker to exit before killing it.
STOP_TIMEOUT_S = 2.0
_READ_BYTES = 1 << 16
# A copy on the wire: its length after this prefix, then the lengths of its six parts.
_COPY_PREFIX = struct.Struct("<7I")

# One copy's outcome, as the worker reports it: primary, shadow, kind (`errors`, `agreements` or
# `disagreements`), and the largest float difference (None without float outputs or an answer).
Outcome = tuple[str, str, str, float | None]


@dataclass(frozen=True)
class MirrorSettings:
    """The bound on copies in the worker's hands, its timeouts, and the disagreement log."""

    queue_size: int
    timeout_s: float
    connect_timeout_s: float
    log_path: Path | None
    log_sample: float  # fraction of disagreements written
    log_max_bytes: int  # the file rotates to <path>.1 above this size

    def to_json(self) -> str:
        """The settings as the worker's command line carries them."""
        fields = asdict(self)
        fields["log_path"] = None if self.log_path is None else str(self.log_path)
        return orjson.dumps(fields).decode()

    @classmethod
    def from_json(cls, text: str) -> MirrorSettings:
        """The settings `to_json` wrote."""
        fields = orjson.loads(text)
        path = fields.pop("log_path")
        return cls(log_path=None if path is None else Path(path), **fields)


@dataclass(frozen=True, slots=True)
class MirroredRequest:
    """One user request and the primary's answer, waiting to be sent to the shadow."""

    primary: str
    shadow: ShadowConfig
    shadow_url: str
    method: bytes
    target: bytes
    head: bytes  # header lines and framing, ending with the blank line
    body: bytes
    answer: bytes


def encode_copy(request: MirroredRequest) -> bytes:
    """A copy as the router writes it to the worker."""
    shadow = request.shadow
    about = orjson.dumps(
        (request.primary, shadow.variant, shadow.percent, shadow.tolerance, request.shadow_url)
    )
    parts = (about, request.method, request.target, request.head, request.body, request.answer)
    lengths = [len(part) for part in parts]
    return b"".join((_COPY_PREFIX.pack(sum(lengths), *lengths), *parts))


class CopyDecoder:
    """The copies in a stream of bytes, as whole ones arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[MirroredRequest]:
        """The copies completed by `data`."""
        buffer = self._buffer
        buffer += data
        copies = []
        start = 0
        while len(buffer) - start >= _COPY_PREFIX.size:
            total, *lengths = _COPY_PREFIX.unpack_from(buffer, start)
            end = start + _COPY_PREFIX.size + total
            if len(buffer) < end:
                break
            parts = []
            position = start + _COPY_PREFIX.size
            for length in lengths:
                parts.append(bytes(buffer[position : position + length]))
                position += length
            about, method, target, head, body, answer = parts
            primary, variant, percent, tolerance, url = orjson.loads(about)
            shadow = ShadowConfig(variant, percent, tolerance)
            copies.append(MirroredRequest(primary, shadow, url, method, target, head, body, answer))
            start = end
        del buffer[:start]
        return copies


class _WorkerProcess:
    """The worker process and the router's end of its socket, driven by the event loop."""

    def __init__(
        self,
        settings: MirrorSettings,
        on_outcomes: Callable[[list[Outcome]], None],
        on_exit: Callable[[int | None], None],
    ) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            command = [sys.executable, "-m", "modeldeploy_server.shadow_worker"]
            self._process = subprocess.Popen(
                [*command, settings.to_json(), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        ours.setblocking(False)
        self._socket = ours
        self._on_outcomes = on_outcomes
        self._on_exit = on_exit
        self._unsent = bytearray()
        self._lines = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._readable)

    def send(self, copy: bytes) -> None:
        """Write a copy now, or after what is still waiting to be written."""
        if self._unsent:
            self._unsent += copy
            return
        try:
            sent = self._socket.send(copy)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the worker is gone; its end-of-file is read next
        if sent < len(copy):
            self._unsent += memoryview(copy)[sent:]
            self._loop.add_writer(self._socket.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self._socket.send(self._unsent)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._unsent)
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(self._socket.fileno())

    def _readable(self) -> None:
        try:
            data = self._socket.recv(_READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self._on_exit(self._reap())
            return
        lines = self._lines
        lines += data
        end = lines.rfind(b"\n") + 1
        if end:
            for line in bytes(lines[:end]).splitlines():
                self._on_outcomes(orjson.loads(line))
            del lines[:end]

    def _reap(self) -> int | None:
        """The exit code of a worker whose socket closed (it closes when the process ends)."""
        try:
            return self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return None

    def close(self) -> None:
        """Stop reading and writing; the worker sees the end of its input and exits."""
        fd = self._socket.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
            self._socket.close()

    async def stop(self) -> None:
        """Close, then wait for the worker to exit (killing it after STOP_TIMEOUT_S)."""
        self.close()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._process.poll() is None:
            if time.monotonic() > deadline:
                self._process.kill()
                self._process.wait()
                return
            await asyncio.sleep(0.02)


class Mirror:
    """Hands copies to the shadow worker and counts their outcomes; run inside `running()`."""

    def __init__(self, settings: MirrorSettings, metrics: RouterMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._worker: _WorkerProcess | None = None
        self._next_start = 0.0
        self._stopping = False
        # Copies in the worker's hands, by (primary, shadow).
        self._held: Counter[tuple[str, str]] = Counter()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Allow copies inside the block; stop the worker after it (what it holds is dropped)."""
        try:
            yield
        finally:
            self._stopping = True
            if self._worker is not None:
                await self._worker.stop()
                self._worker = None

    def offer(self, request: MirroredRequest) -> None:
        """Hand a copy to the shadow worker, or count it dropped if it holds enough already."""
        pair = (request.primary, request.shadow.variant)
        self._metrics.count_shadow(*pair, "requests")
        worker = self._worker
        if self._held.total() >= self._settings.queue_size or (
            worker is None and (worker := self._start_worker()) is None
        ):
            self._metrics.count_shadow(*pair, "dropped")
            return
        worker.send(encode_copy(request))
        self._held[pair] += 1

    def _start_worker(self) -> _WorkerProcess | None:
        now = time.monotonic()
        if self._stopping or now < self._next_start:
            return None
        self._next_start = now + RESTART_DELAY_S
        try:
            self._worker = _WorkerProcess(self._settings, self._counted, self._worker_exited)
        except OSError as exc:
            log.error("cannot start the shadow worker: %s", exc)
        return self._worker

    def _counted(self, outcomes: list[Outcome]) -> None:
        for primary, shadow, kind, difference in outcomes:
            if kind == "errors":
                self._metrics.count_shadow(primary, shadow, kind)
            else:
                self._metrics.observe_shadow(primary, shadow, kind == "agreements", difference)
            self._held[(primary, shadow)] -= 1

    def _worker_exited(self, code: int | None) -> None:
        self._worker = None
        lost = self._held.total()
        for (primary, shadow), count in self._held.items():
            if count:
                self._metrics.count_shadow(primary, shadow, "errors", count)
        self._held.clear()
        log.warning(
            "the shadow worker exited (code %s); %d copies it held are counted as errors; "
            "another starts with a copy after %g s",
            code,
            lost,
            RESTART_DELAY_S,
        )
