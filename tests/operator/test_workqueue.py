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


def test_delayed_asks_for_one_key_collapse_into_one_run_and_an_undelayed_ask_goes_at_once() -> None:
    async def scenario() -> tuple[int, str, int, str, int]:
        queue: WorkQueue[str] = WorkQueue()
        for _ in range(3):
            queue.add("burst", delay=0.05)  # news in a burst: waits for the rest of it
        held = len(queue)  # nothing in line yet (the loop has not run since)
        first = await queue.get()  # once the delay is over: one run for the whole burst
        queue.done(first)
        queue.add("spec", delay=60)
        queue.add("spec")  # a spec change does not wait for news that asked to
        in_line = len(queue)
        second = await queue.get()
        queue.done(second)
        return held, first, in_line, second, len(queue)

    assert asyncio.run(scenario()) == (0, "burst", 1, "spec", 0)


def test_a_delayed_ask_while_the_key_runs_gives_one_more_run_after_it() -> None:
    async def scenario() -> tuple[int, int, str]:
        queue: WorkQueue[str] = WorkQueue()
        queue.add("k")
        running = await queue.get()
        queue.add("k", delay=0.05)
        queue.add("k", delay=0.05)
        while_running = len(queue)
        queue.done(running)
        right_after = len(queue)  # it still waits for the rest of its burst
        return while_running, right_after, await queue.get()

    assert asyncio.run(scenario()) == (0, 0, "k")
