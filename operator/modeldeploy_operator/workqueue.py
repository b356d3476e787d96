"""A fair work queue of ModelDeployments to reconcile (client-go's workqueue, in asyncio).

A key is at most once in the queue and runs on at most one worker at a time. A key asked for
while it runs is queued again once it is done, behind every key that was already waiting, so a
ModelDeployment whose children keep changing (a flapping Deployment) gets one turn in line like
any other and cannot starve them; bursts of events for one key collapse into one reconcile.
An add may ask to wait a moment first (client-go's AddAfter), so that news which comes in bursts
(a Deployment's ready replicas, then its router's, then each router pod's ack) is taken in one
run rather than one run per piece.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._running: set[K] = set()
        self._again: dict[K, float] = {}  # key -> the delay its next run was asked with
        self._delayed: dict[K, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K, delay: float = 0.0) -> None:
        """Ask for one run of `key`, after the one in progress if any, and not before `delay`
        seconds from now (asks meanwhile join it; one without delay moves it in line now)."""
        if key in self._running:
            self._again[key] = min(delay, self._again.get(key, delay))
        elif key in self._queued:
            return
        elif delay > 0:
            if key not in self._delayed:
                self._delayed[key] = asyncio.get_running_loop().call_later(delay, self._due, key)
        else:
            timer = self._delayed.pop(key, None)
            if timer is not None:
                timer.cancel()
            self._queued.add(key)
            self._queue.put_nowait(key)

    async def get(self) -> K:
        """The next key to run; call `done(key)` when its run is over."""
        key = await self._queue.get()
        self._queued.discard(key)
        self._running.add(key)
        return key

    def done(self, key: K) -> None:
        self._running.discard(key)
        if key in self._again:
            self.add(key, self._again.pop(key))

    def _due(self, key: K) -> None:
        del self._delayed[key]
        self.add(key)
