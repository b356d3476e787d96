"""WorkQueue: one run at a time per key, bursts coalesced, a busy key waits its turn in line."""

from __future__ import annotations

import asyncio

from modeldeploy_operator.workqueue import WorkQueue


def test_a_key_asked_for_while_it_runs_goes_behind_the_keys_already_waiting() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        for key in ("noisy", "a", "b"):
            queue.add(key)
        order = [await queue.get()]  # noisy runs
        for _ in range(5):
            queue.add("noisy")  # a burst while it runs: one more run, at the back
        queue.add("a")  # already waiting: still once
        assert len(queue) == 2
        queue.done("noisy")
        while len(queue):
            key = await queue.get()
            order.append(key)
            queue.done(key)
        return order

    assert asyncio.run(scenario()) == ["noisy", "a", "b", "noisy"]


def test_a_key_never_runs_twice_at_once() -> None:
    async def scenario() -> tuple[bool, str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("k")
        first = await queue.get()
        queue.add("k")
        waiting = asyncio.create_task(queue.get())
        await asyncio.sleep(0.01)
        blocked = not waiting.done()  # not handed out again while running
        queue.done(first)
        return blocked, await waiting

    assert asyncio.run(scenario()) == (True, "k")
