"""The batch scheduler in process, on the tiny pipeline: which images share a call, and a failing request
that does not take its batch mates down."""

import asyncio
import dataclasses

import pytest
from generation_fixtures import tiny_own_pipeline

from nucleus_image.serve.request import GenerationRequest
from nucleus_image.serve.scheduler import BatchScheduler, QueueFull, ShuttingDown


@pytest.fixture(scope="module")
def pipe():
    return tiny_own_pipeline()


def request(prompt="a red cube", n=1, steps=2, guidance=4.0, width=32, seed=0, negative=None) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        n=n,
        width=width,
        height=32,
        aspect_ratio=None,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        response_format="b64_json",
    )


def test_batches_group_compatible_images_oldest_first_up_to_max_batch(pipe):
    async def scenario():
        s = BatchScheduler(pipe, max_batch=3, max_queue=20)
        a1 = s.submit(request("a1", n=2))
        b1 = s.submit(request("b1", steps=3))  # other steps: another call
        a2 = s.submit(request("a2", n=2, seed=9))  # same settings as a1, other seed: shares a1's call
        c1 = s.submit(request("c1", guidance=2.0))  # other guidance: another call
        d1 = s.submit(request("d1", width=28))  # other size: another call
        batches = []
        while batch := s._take_batch():
            batches.append([(row.job, row.index) for row in batch])
        await s.close()
        return batches, (a1, b1, a2, c1, d1)

    batches, (a1, b1, a2, c1, d1) = asyncio.run(scenario())
    assert batches == [[(a1, 0), (a1, 1), (a2, 0)], [(b1, 0)], [(a2, 1)], [(c1, 0)], [(d1, 0)]]


def test_a_failing_request_fails_alone_and_its_batch_mates_get_their_images(pipe):
    async def scenario():
        s = BatchScheduler(pipe, max_batch=4, max_queue=8)
        worker = asyncio.create_task(s.run())
        good = s.submit(request("a red cube", n=2, seed=1))
        # Past the HTTP checks, a request the pipeline refuses: its ValueError must stay its own.
        bad = s.submit(dataclasses.replace(request("a blue sphere"), negative_prompt=["not", "a string"]))
        also_good = s.submit(request("a green star", seed=5))
        await asyncio.wait_for(asyncio.gather(*(j.finished.wait() for j in (good, bad, also_good))), 120)
        with pytest.raises(QueueFull):
            s.submit(request(n=9))
        await s.close(worker)
        with pytest.raises(ShuttingDown):
            s.submit(request())
        return good, bad, also_good, s.snapshot()

    good, bad, also_good, metrics = asyncio.run(scenario())
    assert good.status == also_good.status == "done" and all(good.images) and all(also_good.images)
    assert bad.status == "failed" and "generation failed: ValueError" in bad.error and bad.error_status == 500
    # One failed batch of 4, then one call per request: two of them succeed.
    assert metrics["batch_sizes"] == {"1": 1, "2": 1} and metrics["requests"] == {"failed": 1, "ok": 2, "rejected": 1}
    assert metrics["images_served"] == 3


def test_batch_wait_lets_a_request_arriving_just_after_join_the_batch(pipe):
    async def scenario(batch_wait):
        s = BatchScheduler(pipe, max_batch=4, max_queue=8, batch_wait=batch_wait)
        worker = asyncio.create_task(s.run())
        first = s.submit(request(seed=1))
        await asyncio.sleep(0.05)
        second = s.submit(request(seed=2))
        await asyncio.wait_for(asyncio.gather(first.finished.wait(), second.finished.wait()), 120)
        await s.close(worker)
        return first.batch_sizes + second.batch_sizes

    assert asyncio.run(scenario(0.0)) == [1, 1]
    assert asyncio.run(scenario(1.0)) == [2, 2]


def test_close_fails_queued_requests_with_503(pipe):
    async def scenario():
        s = BatchScheduler(pipe, max_batch=1, max_queue=8)
        queued = s.submit(request())
        await s.close()  # no worker ran: the queued request is failed, not dropped silently
        return queued

    queued = asyncio.run(scenario())
    assert queued.status == "failed" and queued.error_status == 503 and "shutting down" in queued.error
