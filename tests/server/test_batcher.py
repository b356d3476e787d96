"""Batcher admission: a place in the queue is reserved before decoding and never counted twice."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from modeldeploy_server.batcher import Batcher, Outputs
from modeldeploy_server.batching import Feed
from modeldeploy_server.errors import Overloaded

FEED = {"x": np.zeros((1, 1), dtype=np.float32)}


def test_a_full_queue_refuses_reservations_and_reserved_requests_take_their_place() -> None:
    release = threading.Event()

    def run(feed: Feed) -> Outputs:
        release.wait(60)
        return {"y": feed["x"]}

    async def request(batcher: Batcher, reserve: bool) -> Outputs:
        task = asyncio.current_task()
        assert task is not None
        if reserve:
            batcher.reserve(task)
        return await batcher.submit(FEED, 1)

    async def scenario() -> list[Outputs]:
        batcher = Batcher(
            run, batchable=True, uniform=True, max_batch_size=1, max_delay_s=0, max_queue=2,
            observe=lambda *_: None, in_flight=lambda: 1,
        )  # fmt: skip
        try:
            running = asyncio.create_task(request(batcher, reserve=False))
            await asyncio.sleep(0.1)  # taken into the model run, which blocks
            queued = asyncio.create_task(request(batcher, reserve=True))
            await asyncio.sleep(0.1)
            assert batcher.depth() == 1  # reserved, then submitted: one place, not two
            decoding = asyncio.create_task(asyncio.sleep(0))
            batcher.reserve(decoding)  # the second place, held while a body is decoded
            with pytest.raises(Overloaded, match="queue is full"):
                batcher.reserve(asyncio.create_task(asyncio.sleep(0)))
            with pytest.raises(Overloaded, match="queue is full"):
                await request(batcher, reserve=False)
            batcher.release(decoding)  # decoding failed: its place is free again
            late = asyncio.create_task(request(batcher, reserve=True))
            await asyncio.sleep(0.1)
            assert batcher.depth() == 2
        finally:
            release.set()
        outputs = await asyncio.gather(running, queued, late)
        await batcher.close()
        return outputs

    outputs = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [o["y"].tolist() for o in outputs] == [[[0.0]]] * 3
