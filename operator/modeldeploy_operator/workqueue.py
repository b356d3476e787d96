"""A fair work queue of ModelDeployments to reconcile (client-go's workqueue, in asyncio).

A key is at most once in the queue and runs on at most one worker at a time. A key asked for
while it runs is queued again once it is done, behind every key that was already waiting, so a
ModelDeployment whose children keep changing (a flapping Deployment) gets one turn in line like
any other and cannot starve them; bursts of events for one key collapse into one reconcile.
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
        self._again: set[K] = set()

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K) -> None:
        """Ask for one run of `key`, after the one in progress if any."""
        if key in self._running:
            self._again.add(key)
        elif key not in self._queued:
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
            self._again.discard(key)
            self.add(key)
