"""Adaptive batching: a bounded queue of requests, merged into model runs on one worker thread.

While a run is in progress, arriving requests queue up; when it ends, everything queued (up to
max_batch_size rows) becomes the next run, so batches grow with load and a lone request never
waits. Under concurrency a forming run also waits up to max_delay_s for stragglers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from modeldeploy_server.batching import Feed, merge_feeds, merge_key, plan_batches, split_outputs
from modeldeploy_server.errors import ModelExecutionError, Overloaded, ServerError

QUEUE_FULL = "the model's request queue is full; retry later"

Outputs = dict[str, np.ndarray[Any, Any]]
RunModel = Callable[[Feed], Outputs]
# (requests merged, rows, seconds in the model) for each run.
BatchObserver = Callable[[int, int, float], None]
Results = list[Outputs | ServerError]


@dataclass(slots=True)
class _Pending:
    feed: Feed
    rows: int
    future: asyncio.Future[Outputs]


class Batcher:
    """Create inside the running event loop (the lifespan); `submit` from request handlers.

    The model runs on one dedicated thread fed through a SimpleQueue, and each batch's results
    come back in one `call_soon_threadsafe`: cheaper than an executor future per run.
    """

    def __init__(
        self,
        run: RunModel,
        *,
        batchable: bool,
        uniform: bool,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        observe: BatchObserver,
        in_flight: Callable[[], int],
    ) -> None:
        self._run = run
        self._in_flight = in_flight
        self._last_merged = 1
        self._batchable = batchable
        # Validated requests of a model without dynamic non-batch dimensions always merge.
        self._uniform = uniform
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._observe = observe
        self._loop = asyncio.get_running_loop()
        self._waiting: collections.deque[_Pending] = collections.deque()
        # Requests admitted and still being decoded and validated: each holds a place in the queue.
        self._reserved: set[asyncio.Task[Any]] = set()
        self._wakeup: asyncio.Future[None] | None = None
        self._jobs: queue.SimpleQueue[tuple[list[Feed], list[int], asyncio.Future[Results]] | None]
        self._jobs = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="model", daemon=True)
        self._worker.start()
        self._task = self._loop.create_task(self._consume())

    def depth(self) -> int:
        """Requests waiting for a model run."""
        return len(self._waiting)

    def check_room(self) -> None:
        """Raise Overloaded if the queue is full now (before a body is even read)."""
        if len(self._waiting) + len(self._reserved) >= self._max_queue:
            raise Overloaded(QUEUE_FULL)

    def reserve(self, task: asyncio.Task[Any]) -> None:
        """Hold a place in the queue for `task`'s request before its body is decoded, so that a
        full queue refuses it before that work; raises Overloaded when full."""
        reserved = self._reserved
        if len(self._waiting) + len(reserved) >= self._max_queue:
            raise Overloaded(QUEUE_FULL)
        reserved.add(task)

    def release(self, task: asyncio.Task[Any]) -> None:
        """Give back `task`'s place if it never reached `submit` (it failed or was refused)."""
        self._reserved.discard(task)

    async def submit(self, feed: Feed, rows: int) -> Outputs:
        """Queue one validated request (in the place its task reserved, if it did) and wait for
        its outputs; raises Overloaded when full."""
        task = asyncio.current_task()
        if task in self._reserved:
            self._reserved.discard(task)
        else:
            self.check_room()
        future: asyncio.Future[Outputs] = self._loop.create_future()
        self._waiting.append(_Pending(feed, rows, future))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        return await future

    async def close(self) -> None:
        """Stop after the current run; callers still waiting get an error."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for pending in self._waiting:
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the server is shutting down"))
        self._waiting.clear()
        self._jobs.put(None)
        await asyncio.to_thread(self._worker.join)

    async def _arrival(self, timeout_s: float | None) -> bool:
        """Wait until something is queued; False on timeout."""
        self._wakeup = self._loop.create_future()
        try:
            await asyncio.wait_for(self._wakeup, timeout_s)
        except TimeoutError:
            return False
        finally:
            self._wakeup = None
        return True

    async def _collect(self) -> list[_Pending]:
        while not self._waiting:
            await self._arrival(None)
        waiting = self._waiting
        taken = [waiting.popleft()]
        if not self._batchable:
            return taken
        rows = taken[0].rows
        # Wait for stragglers only under concurrency (the last run merged requests, or others
        # are being read or answered): a lone client never waits, a busy server trades a
        # fraction of a millisecond for fewer model runs (each costs a thread hop).
        busy = self._last_merged > 1 or self._in_flight() > 1 + len(waiting)
        delay_s = self._max_delay_s if busy else 0.0
        deadline = time.monotonic() + delay_s
        while rows < self._max_batch_size:
            if not waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not await self._arrival(remaining):
                    break
                continue
            pending = waiting.popleft()
            taken.append(pending)
            rows += pending.rows
        self._last_merged = len(taken)
        return taken

    async def _consume(self) -> None:
        while True:
            taken = [p for p in await self._collect() if not p.future.done()]
            if not taken:
                continue
            if self._batchable:
                keys: list[Hashable] = (
                    [None] * len(taken) if self._uniform else [merge_key(p.feed) for p in taken]
                )
                groups = plan_batches(keys, [p.rows for p in taken], self._max_batch_size)
            else:
                groups = [[index] for index in range(len(taken))]
            for group in groups:
                members = [taken[index] for index in group]
                done: asyncio.Future[Results] = self._loop.create_future()
                self._jobs.put(([m.feed for m in members], [m.rows for m in members], done))
                try:
                    results = await done
                except asyncio.CancelledError:
                    for member in members:
                        if not member.future.done():
                            member.future.set_exception(Overloaded("the server is shutting down"))
                    raise
                for member, result in zip(members, results, strict=True):
                    if member.future.done():  # the caller timed out or went away
                        continue
                    if isinstance(result, ServerError):
                        member.future.set_exception(result)
                    else:
                        member.future.set_result(result)

    def _work(self) -> None:
        """The model thread: run jobs until the None sentinel."""
        while (job := self._jobs.get()) is not None:
            feeds, rows, done = job
            results = self._execute(feeds, rows)
            self._loop.call_soon_threadsafe(_resolve, done, results)

    def _execute(self, feeds: list[Feed], rows: list[int]) -> Results:
        """Worker thread: merge, run, split. If a merged run fails, each request runs alone so
        that one bad request cannot fail its neighbours."""
        started = time.perf_counter()
        try:
            outputs = split_outputs(self._run(merge_feeds(feeds)), rows)
        except Exception as exc:  # a model failure must fail requests, never the worker
            if len(feeds) > 1:
                return [self._execute([f], [n])[0] for f, n in zip(feeds, rows, strict=True)]
            if isinstance(exc, ServerError):
                return [exc]
            return [ModelExecutionError(f"model execution failed: {exc}")]
        self._observe(len(feeds), sum(rows), time.perf_counter() - started)
        return list(outputs)


def _resolve(done: asyncio.Future[Results], results: Results) -> None:
    if not done.done():
        done.set_result(results)
