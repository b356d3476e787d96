"""Shadow traffic: copies of requests sent to a shadow variant after the user has their answer.

`offer` never waits: it puts the copy on a bounded queue, or counts it dropped when the queue is
full, so a slow or dead shadow variant can neither delay nor change what users get. One worker
task sends the copies in rounds through the same connection pools: it lets copies gather for
`ROUND_INTERVAL_S`, sends up to `ROUND_MAX` of them at once, leaves their answers unread for
`ANSWERS_WAIT_S` and then reads them together (in one turn of the loop rather than one wake-up
each), waits for all (one wake-up of the worker per round), then compares them
(`modeldeploy_server.shadow`, pure), counts the outcomes per (primary, shadow), and writes a
sample of the disagreements to a size-bounded, rotated JSON-lines file from a background thread.
Below saturation a copy answered on its own costs the router a wake-up of its own, several times
the copy's instructions; in rounds, those wake-ups are shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from modeldeploy_server.upstream import Answer, Connection, Upstream, UpstreamError

if TYPE_CHECKING:
    from modeldeploy_server.router import RouterMetrics

log = logging.getLogger("modeldeploy.router")

# Copies sent together at most, and how long the first copy of a round waits for others.
ROUND_MAX = 64
ROUND_INTERVAL_S = 0.05
# How long a round's answers are left unread after its copies went out, so that they are read
# together (answers arriving one by one would each wake the router).
ANSWERS_WAIT_S = 0.02


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
        """Start the worker (and the log's thread); stop them, dropping what is queued."""
        self._queue = asyncio.Queue(self._settings.queue_size)
        if self._settings.log_path is not None:
            self._log = DisagreementLog(self._settings.log_path, self._settings.log_max_bytes)
        worker = asyncio.create_task(self._work())
        try:
            yield
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
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
        queue = self._queue
        assert queue is not None
        while True:
            first = await queue.get()
            if queue.qsize() < ROUND_MAX - 1:
                await asyncio.sleep(ROUND_INTERVAL_S)  # others come meanwhile
            batch = [first]
            while len(batch) < ROUND_MAX and not queue.empty():
                batch.append(queue.get_nowait())
            results = await self._send_round(batch)
            for index, request in enumerate(batch):
                try:
                    self._compare(request, results[index])
                except Exception:  # one bad answer must not stop the worker
                    log.exception("shadow answer from %r failed", request.shadow.variant)
                    self._metrics.count_shadow(request.primary, request.shadow.variant, "errors")

    async def _send_round(self, batch: list[MirroredRequest]) -> dict[int, Answer | UpstreamError]:
        """Send every copy of a round at once (each on its own connection); their answers by
        index in `batch`."""
        loop = asyncio.get_running_loop()
        results: dict[int, Answer | UpstreamError] = {}
        sent: list[Connection] = []
        pending = len(batch)
        finished = loop.create_future()

        def collect(index: int, connection: Connection) -> None:
            nonlocal pending
            try:
                results[index] = connection.result()
            except UpstreamError as exc:
                results[index] = exc
            pending -= 1
            if not pending and not finished.done():
                finished.set_result(None)

        for index, request in enumerate(batch):
            pool = self._upstream.pool(request.shadow_url)
            try:
                connection = await pool.acquire()
            except UpstreamError as exc:
                results[index] = exc
                pending -= 1
                continue
            connection.start(
                pool.request_line(request.method, request.target) + request.head + request.body,
                head_only=False,
                timeout_s=self._settings.timeout_s,
                done=functools.partial(collect, index),
            )
            connection.hold_reading(True)
            sent.append(connection)
        if pending:
            await asyncio.sleep(ANSWERS_WAIT_S)
            for connection in sent:
                connection.hold_reading(False)
            await finished
        return results

    def _compare(self, request: MirroredRequest, result: Answer | UpstreamError) -> None:
        """Count one copy's outcome; log it if it disagrees (sampled)."""
        primary, shadow = request.primary, request.shadow.variant
        if isinstance(result, UpstreamError):
            log.warning("shadow variant %r did not answer: %s", shadow, result)
            self._metrics.count_shadow(primary, shadow, "errors")
            return
        body = result.body
        if body is None:  # too large to compare: not read further
            result.connection.close()
        if body is None or not 200 <= result.status < 300:
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
