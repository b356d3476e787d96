"""Adaptive batching: a bounded queue of requests, merged into model runs on one worker thread.

While a run is in progress, arriving requests queue up; when it ends, everything queued (up to
max_batch_size rows) becomes the next run, so batches grow with load and a lone request never
waits. max_delay_s > 0 additionally holds a run back for stragglers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from modeldeploy_server.batching import Feed, merge_feeds, merge_key, plan_batches, split_outputs
from modeldeploy_server.errors import ModelExecutionError, Overloaded, ServerError

Outputs = dict[str, np.ndarray[Any, Any]]
RunModel = Callable[[Feed], Outputs]
# (requests merged, rows, seconds in the model) for each run.
BatchObserver = Callable[[int, int, float], None]


@dataclass
class _Pending:
    feed: Feed
    rows: int
    future: asyncio.Future[Outputs]


class Batcher:
    """Create inside the running event loop (the lifespan); `submit` from request handlers."""

    def __init__(
        self,
        run: RunModel,
        *,
        batchable: bool,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        observe: BatchObserver,
    ) -> None:
        self._run = run
        self._batchable = batchable
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._observe = observe
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task = self._loop.create_task(self._consume())

    def depth(self) -> int:
        """Requests waiting for a model run."""
        return self._queue.qsize()

    async def submit(self, feed: Feed, rows: int) -> Outputs:
        """Queue one validated request and wait for its outputs; raises Overloaded when full."""
        future: asyncio.Future[Outputs] = self._loop.create_future()
        try:
            self._queue.put_nowait(_Pending(feed, rows, future))
        except asyncio.QueueFull:
            raise Overloaded("the model's request queue is full; retry later") from None
        return await future

    async def close(self) -> None:
        """Stop after the current run; callers still waiting get an error."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(Overloaded("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def _collect(self) -> list[_Pending]:
        first = await self._queue.get()
        taken = [first]
        if not self._batchable:
            return taken
        rows = first.rows
        deadline = time.monotonic() + self._max_delay_s
        while rows < self._max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                pending = self._queue.get_nowait()
            taken.append(pending)
            rows += pending.rows
        return taken

    async def _consume(self) -> None:
        while True:
            taken = [p for p in await self._collect() if not p.future.done()]
            if not taken:
                continue
            if self._batchable:
                groups = plan_batches(
                    [merge_key(p.feed) for p in taken],
                    [p.rows for p in taken],
                    self._max_batch_size,
                )
            else:
                groups = [[index] for index in range(len(taken))]
            for group in groups:
                members = [taken[index] for index in group]
                results = await self._loop.run_in_executor(
                    self._executor,
                    self._execute,
                    [m.feed for m in members],
                    [m.rows for m in members],
                )
                for member, result in zip(members, results, strict=True):
                    if member.future.done():  # the caller timed out or went away
                        continue
                    if isinstance(result, BaseException):
                        member.future.set_exception(result)
                    else:
                        member.future.set_result(result)

    def _execute(self, feeds: list[Feed], rows: list[int]) -> list[Outputs | ServerError]:
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
