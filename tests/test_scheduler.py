"""The scheduler's policies over a stand-in engine: continuous batching lets a short request join a
running long one and finish first, and keeps the live rows in the lowest slots; the static policy
(the older batcher) admits a batch only when the previous one has ended, groups identical
settings and delivers every answer when its batch ends."""

from __future__ import annotations

import asyncio
import time

from megatron_yuyuan.sampling import SamplingConfig
from megatron_yuyuan.serve.scheduler import Request, Scheduler
from slow_server import StepEngine


async def _finish_times(policy: str, requests: list[tuple[float, Request]], engine) -> list:
    scheduler = Scheduler(engine, max_batch_size=4, policy=policy, wait_ms=0)
    scheduler.start()
    start = time.monotonic()

    async def one(delay: float, request: Request):
        await asyncio.sleep(delay)
        scheduler.submit(request)
        while (event := await request.events.get())[0] != "done":
            pass
        return time.monotonic() - start, event[1]

    try:
        return await asyncio.gather(*(one(d, r) for d, r in requests))
    finally:
        await scheduler.stop()


def _request(tokens: int, seed: int = 1234, do_sample: bool = False) -> Request:
    return Request(
        [1, 2], SamplingConfig(max_new_tokens=tokens, seed=seed, do_sample=do_sample), False
    )


def test_continuous_lets_a_short_request_finish_before_a_long_one():
    engine = StepEngine(0.01)
    (long_at, long_ids), (short_at, short_ids) = asyncio.run(
        _finish_times("continuous", [(0.0, _request(60)), (0.1, _request(3))], engine)
    )
    assert len(long_ids) == 60 and len(short_ids) == 3
    assert short_at < long_at / 2


def test_static_waits_for_the_batch_and_groups_identical_settings():
    engine = StepEngine(0.01)
    requests = [
        (0.0, _request(30)),
        (0.0, _request(5, seed=9, do_sample=True)),  # other settings: the next batch
        (0.05, _request(3, seed=9, do_sample=True)),  # the second's settings: its batch
    ]
    (a, ids_a), (b, ids_b), (c, ids_c) = asyncio.run(_finish_times("static", requests, engine))
    assert [len(ids_a), len(ids_b), len(ids_c)] == [30, 5, 3]
    assert b > a and c > a  # neither joined the running batch
    assert abs(b - c) < 0.005  # batched together, answered together when the batch ended


def test_continuous_moves_live_rows_down_into_freed_slots():
    engine = StepEngine(0.005)
    requests = [(0.0, _request(n)) for n in (5, 40, 5, 40)] + [(0.2, _request(10))]
    asyncio.run(_finish_times("continuous", requests, engine))
    # after the two short ones ended, two rows were live: a step computed two, not four
    assert 2 in engine.widths and max(engine.widths) == 4
