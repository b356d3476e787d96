"""The router's shadow worker: a process of its own, at the lowest CPU priority, that sends the
shadow copies and compares their answers, so that none of that work runs on the router's event
loop between users' requests.

`python -m modeldeploy_server.shadow_worker SETTINGS_JSON FD`: FD is one end of a socket pair
whose other end the router holds. Copies arrive on it (`mirror.CopyDecoder`); one JSON line per
round goes back with each copy's outcome, which the router counts in its metrics. The worker
sends copies in rounds through its own connection pools: it lets copies gather for
`ROUND_INTERVAL_S`, sends up to `ROUND_MAX` of them at once, leaves their answers unread for
`ANSWERS_WAIT_S` and then reads them together (one wake-up per round rather than per copy),
compares them (`modeldeploy_server.shadow`, pure), and writes a sample of the disagreements to a
size-bounded, rotated JSON-lines file from a background thread. It exits when the router closes
its end (or dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import logging.handlers
import os
import queue
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from modeldeploy_server.mirror import CopyDecoder, MirroredRequest, MirrorSettings, Outcome
from modeldeploy_server.shadow import compare_answers
from modeldeploy_server.upstream import Answer, Connection, Upstream, UpstreamError

log = logging.getLogger("modeldeploy.router.shadow")

# Copies sent together at most, and how long the first copy of a round waits for others.
ROUND_MAX = 64
ROUND_INTERVAL_S = 0.05
# How long a round's answers are left unread after its copies went out, so that they are read
# together (answers arriving one by one would each wake the worker).
ANSWERS_WAIT_S = 0.02
_READ_BYTES = 1 << 18


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


class ShadowWorker:
    """Sends the copies read from the router in rounds, and reports their outcomes to it."""

    def __init__(self, settings: MirrorSettings, report: asyncio.StreamWriter) -> None:
        self._settings = settings
        self._report = report
        self._upstream = Upstream(settings.connect_timeout_s)
        self._queue: asyncio.Queue[MirroredRequest] = asyncio.Queue()
        self._log = (
            DisagreementLog(settings.log_path, settings.log_max_bytes)
            if settings.log_path is not None
            else None
        )

    async def serve(self, copies: asyncio.StreamReader) -> None:
        """Read copies until the router closes its end; the rounds run meanwhile."""
        rounds = asyncio.create_task(self._rounds())
        decoder = CopyDecoder()
        try:
            while data := await copies.read(_READ_BYTES):
                for request in decoder.feed(data):
                    self._queue.put_nowait(request)
        finally:
            rounds.cancel()
            await asyncio.gather(rounds, return_exceptions=True)
            self._upstream.close()
            if self._log is not None:
                self._log.close()

    async def _rounds(self) -> None:
        waiting = self._queue
        while True:
            first = await waiting.get()
            if waiting.qsize() < ROUND_MAX - 1:
                await asyncio.sleep(ROUND_INTERVAL_S)  # others come meanwhile
            batch = [first]
            while len(batch) < ROUND_MAX and not waiting.empty():
                batch.append(waiting.get_nowait())
            results = await self._send_round(batch)
            outcomes: list[Outcome] = []
            for index, request in enumerate(batch):
                try:
                    outcomes.append(self._compare(request, results[index]))
                except Exception:  # one bad answer must not stop the worker
                    log.exception("shadow answer from %r failed", request.shadow.variant)
                    outcomes.append((request.primary, request.shadow.variant, "errors", None))
            self._report.write(orjson.dumps(outcomes) + b"\n")

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

    def _compare(self, request: MirroredRequest, result: Answer | UpstreamError) -> Outcome:
        """One copy's outcome; its line in the disagreement log if it disagrees (sampled)."""
        primary, shadow = request.primary, request.shadow.variant
        if isinstance(result, UpstreamError):
            log.warning("shadow variant %r did not answer: %s", shadow, result)
            return (primary, shadow, "errors", None)
        body = result.body
        if body is None:  # too large to compare: not read further
            result.connection.close()
        if body is None or not 200 <= result.status < 300:
            return (primary, shadow, "errors", None)
        comparison = compare_answers(request.answer, body, request.shadow.tolerance)
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
        kind = "agreements" if comparison.agree else "disagreements"
        return (primary, shadow, kind, comparison.max_abs_difference)


def _lowest_priority() -> None:
    """SCHED_IDLE: the worker runs only on CPU time nothing else wants (entering it needs no
    privilege); where it is refused, the highest nice value."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(19)


async def _run(settings: MirrorSettings, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    copies, report = await asyncio.open_unix_connection(sock=sock, limit=_READ_BYTES)
    try:
        await ShadowWorker(settings, report).serve(copies)
    finally:
        report.close()


def main(argv: list[str]) -> int:
    """Run until the router closes its end of the socket."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings_json, fd = argv
    # Its life is the router's: it ends when the router's end of the socket closes, not on the
    # terminal's Ctrl-C, which the router answers by draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lowest_priority()
    asyncio.run(_run(MirrorSettings.from_json(settings_json), int(fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
