"""Request deadlines with one shared timer instead of one timer per request.

`asyncio.timeout` costs a timer handle per request; here a request registers its task with a
deadline (a dict insert), and a sweeper task that wakes every `tick_s` cancels the tasks past
their deadline. A request unregisters before it starts sending its response, so a cancellation
always lands on an await inside the guarded part (asyncio delivers it where the task is suspended).
"""

from __future__ import annotations

import asyncio
import contextlib


class Deadlines:
    """Create inside the running loop; `close` stops the sweeper."""

    def __init__(self, timeout_s: float, tick_s: float = 0.05) -> None:
        self.timeout_s = timeout_s
        self._tick_s = min(tick_s, timeout_s / 4)
        self._loop = asyncio.get_running_loop()
        self._pending: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper = self._loop.create_task(self._sweep())

    def start(self, task: asyncio.Task[object]) -> None:
        """Guard `task` from now for timeout_s."""
        self._pending[task] = self._loop.time() + self.timeout_s

    def finish(self, task: asyncio.Task[object]) -> None:
        """Stop guarding `task` (call before the first await after the guarded part)."""
        self._pending.pop(task, None)

    def in_flight(self) -> int:
        """Requests started and not finished."""
        return len(self._pending)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """True once, after the sweeper cancelled `task` for its deadline; undoes the cancel."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    async def close(self) -> None:
        """Stop the sweeper."""
        self._sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sweeper

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            now = self._loop.time()
            late = [task for task, deadline in self._pending.items() if deadline <= now]
            for task in late:
                del self._pending[task]
                self._expired.add(task)
                task.cancel()
