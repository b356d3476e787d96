"""Serializer: one reconcile at a time per ModelDeployment, bursts coalesced."""

from __future__ import annotations

import asyncio

from modeldeploy_operator.handlers import Serializer


def test_runs_for_one_key_never_overlap_and_other_keys_do_not_wait() -> None:
    async def scenario() -> list[str]:
        serializer = Serializer()
        log: list[str] = []
        gate = asyncio.Event()

        async def work(tag: str, wait: bool) -> str:
            log.append(f"start {tag}")
            if wait:
                await gate.wait()
            log.append(f"end {tag}")
            return tag

        first = asyncio.create_task(serializer.run(("ns", "a"), lambda: work("a1", True)))
        await asyncio.sleep(0)
        second = asyncio.create_task(serializer.run(("ns", "a"), lambda: work("a2", False)))
        other = asyncio.create_task(serializer.run(("ns", "b"), lambda: work("b", False)))
        assert await other == "b"  # a different ModelDeployment is not held up
        assert serializer.is_waiting(("ns", "a")) and not serializer.is_waiting(("ns", "b"))
        gate.set()
        assert (await first, await second) == ("a1", "a2")
        assert not serializer.is_waiting(("ns", "a"))
        return log

    log = asyncio.run(scenario())
    assert log.index("end a1") < log.index("start a2")
    assert log.index("end b") < log.index("end a1")
