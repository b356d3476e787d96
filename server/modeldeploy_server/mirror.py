"""Shadow traffic: copies of requests sent to a shadow variant after the user has their answer.

`offer` never waits: it puts the copy on a bounded queue, or counts it dropped when the queue is
full, so a slow or dead shadow variant can neither delay nor change what users get. A few worker
tasks send the copies through the same connection pools, compare the answers
(`modeldeploy_server.shadow`, pure), count the outcome per (primary, shadow), and write a sample
of the disagreements to a size-bounded, rotated JSON-lines file from a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import queue
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from modeldeploy_server.routing import ShadowConfig
from modeldeploy_server.shadow import compare_answers
from modeldeploy_server.upstream import Upstream, UpstreamError

if TYPE_CHECKING:
    from modeldeploy_server.router import RouterMetrics

log = logging.getLogger("modeldeploy.router")

WORKERS = 4


@dataclass(frozen=True)
class MirrorSettings:
    """The queue in front of the shadow variant and the disagreement log."""

    queue_size: int
    timeout_s: float
    log_path: Path | None
    log_sample: float  # fraction of disagreements written
    log_max_bytes: int  # the file rotates to <path>.1 above this size


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


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; drops them rather than wait when it lags."""

    def enqueue(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(record)


# The parts of a disagreement record that carry user data, left out of a line that would be longer
# than a quarter of the rotation size: each file then stays within 1.25 times that size.
PAYLOAD_KEYS = ("request", "primary_answer", "shadow_answer")


class DisagreementLog:
    """JSON lines of disagreeing request/answer pairs, written by a thread, rotated by size.

    At most `max_bytes` plus one line per file, and two files (`path`, `path.1`); a line is at
    most `max_bytes // 4` (longer ones lose their payloads and say so).
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self._max_line_bytes = max_bytes // 4
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=1, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        records: queue.Queue[logging.LogRecord] = queue.Queue(1024)
        self._listener = logging.handlers.QueueListener(records, handler)
        self._logger = logging.Logger("modeldeploy.router.shadow-disagreements")
        self._logger.addHandler(_DroppingQueueHandler(records))
        self._listener.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line (never blocks)."""
        line = orjson.dumps(record)
        if len(line) > self._max_line_bytes:
            kept = {key: value for key, value in record.items() if key not in PAYLOAD_KEYS}
            line = orjson.dumps({**kept, "payloads_omitted": True})
        self._logger.info(line.decode())

    def close(self) -> None:
        """Write what is queued, stop the thread and close the file."""
        self._listener.stop()
        self._handler.close()


def _payload(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


class Mirror:
    """The queue and the workers that send shadow copies; run inside `running()`."""

    def __init__(
        self, settings: MirrorSettings, upstream: Upstream, metrics: RouterMetrics
    ) -> None:
        self._settings = settings
        self._upstream = upstream
        self._metrics = metrics
        self._queue: asyncio.Queue[MirroredRequest] | None = None
        self._log: DisagreementLog | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the workers (and the log's thread); stop them, dropping what is queued."""
        self._queue = asyncio.Queue(self._settings.queue_size)
        if self._settings.log_path is not None:
            self._log = DisagreementLog(self._settings.log_path, self._settings.log_max_bytes)
        workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        try:
            yield
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._log is not None:
                self._log.close()

    def offer(self, request: MirroredRequest) -> None:
        """Queue a copy for the shadow variant, or count it dropped if the queue is full."""
        assert self._queue is not None, "the lifespan starts the mirror first"
        self._metrics.count_shadow(request.primary, request.shadow.variant, "requests")
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            self._metrics.count_shadow(request.primary, request.shadow.variant, "dropped")

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            request = await self._queue.get()
            try:
                await self._mirror(request)
            except Exception:  # one bad exchange must not stop the worker
                log.exception("shadow request to %r failed", request.shadow.variant)
                self._metrics.count_shadow(request.primary, request.shadow.variant, "errors")

    async def _mirror(self, request: MirroredRequest) -> None:
        primary, shadow = request.primary, request.shadow.variant
        pool = self._upstream.pool(request.shadow_url)
        line = pool.request_line(request.method, request.target)
        try:
            connection = await pool.acquire()
            answer = await connection.exchange(
                line + request.head,
                request.body,
                head_only=False,
                chunked=False,
                timeout_s=self._settings.timeout_s,
            )
            body = answer.body
            if body is None:  # too large to compare: read and drop it
                async for _ in connection.chunks(self._settings.timeout_s):
                    pass
                connection.release()
        except UpstreamError as exc:
            log.warning("shadow variant %r did not answer: %s", shadow, exc)
            self._metrics.count_shadow(primary, shadow, "errors")
            return
        if body is None or not 200 <= answer.status < 300:
            self._metrics.count_shadow(primary, shadow, "errors")
            return
        comparison = compare_answers(request.answer, body, request.shadow.tolerance)
        self._metrics.observe_shadow(
            primary, shadow, comparison.agree, comparison.max_abs_difference
        )
        sampled = random.random() < self._settings.log_sample
        if not comparison.agree and self._log is not None and sampled:
            self._log.write(
                {
                    "time": time.time(),
                    "primary": primary,
                    "shadow": shadow,
                    "detail": comparison.detail,
                    "max_abs_difference": comparison.max_abs_difference,
                    "request": _payload(request.body),
                    "primary_answer": _payload(request.answer),
                    "shadow_answer": _payload(body),
                }
            )
