"""Request batching: queued images that can share a pipeline call (same size, steps and guidance) run as one
batched call of up to `max_batch` images, on one worker thread so the event loop stays free.

Routing is per sample and attention never mixes samples, so an image generated in a batch is the image the same
request gives alone (equal up to float summation order: at most one level in 8-bit pixels). The oldest queued
image always goes in the next batch, so no request waits behind a stream of others with different settings.

    scheduler = BatchScheduler(pipe, max_batch=8, max_queue=32)
    worker = asyncio.create_task(scheduler.run())
    job = scheduler.submit(request); await job.finished.wait(); job.images  # PNG bytes, one per image
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from nucleus_image.serve.metrics import Metrics
from nucleus_image.serve.request import GenerationRequest

log = logging.getLogger("nucleus_image.serve")


class QueueFull(Exception):
    def __init__(self, queued: int, capacity: int, retry_after: int):
        super().__init__(f"the queue holds {queued} of at most {capacity} images; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request's images on their way through the queue; `finished` is set once they are all done, or the
    request failed (`error`, `error_status`)."""

    request: GenerationRequest
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted: float = field(default_factory=time.perf_counter)
    status: str = "queued"  # queued -> running -> done | failed
    images: list = field(default_factory=list)  # PNG bytes per image, None until generated
    batch_sizes: list = field(default_factory=list)  # the size of the batch each image ran in
    error: str | None = None
    error_status: int = 500
    latency: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self.images = [None] * self.request.n
        self.batch_sizes = [None] * self.request.n

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + k for k in range(self.request.n)]

    def fail(self, message: str, status: int = 500) -> None:
        if not self.finished.is_set():
            self.status, self.error, self.error_status = "failed", message, status
            self.latency = time.perf_counter() - self.submitted
            self.finished.set()


@dataclass(frozen=True, eq=False)
class _Row:
    """One image of a job: the unit the scheduler batches."""

    job: Job
    index: int

    @property
    def seed(self) -> int:
        return self.job.request.seed + self.index


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class BatchScheduler:
    def __init__(self, pipe, max_batch: int = 8, max_queue: int = 32, batch_wait: float = 0.0):
        if max_batch < 1 or max_queue < 1 or batch_wait < 0:
            raise ValueError(
                f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1 and batch_wait ({batch_wait}) >= 0"
            )
        self.pipe, self.max_batch, self.max_queue = pipe, max_batch, max_queue
        # Seconds a batch that is not full waits for more requests: clients that just got their images are
        # usually a round trip away from sending the next one.
        self.batch_wait = batch_wait
        self.metrics = Metrics()
        self._pending: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._steps_done = 0
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nucleus-generate")
        # The pipeline runs the transformer once per denoising step (all rows together): counting forwards is
        # the progress of the running batch, without touching the pipeline's code.
        self._hook = pipe.transformer.register_forward_hook(self._count_step)

    def _count_step(self, *_):
        self._steps_done += 1

    # ---- the queue -----------------------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return len(self._pending)

    @property
    def queued_requests(self) -> int:
        return len({row.job for row in self._pending})

    def submit(self, request: GenerationRequest) -> Job:
        if self._closing:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        if len(self._pending) + request.n > self.max_queue:
            batches_ahead = len(self._pending) / self.max_batch + 1
            retry = max(1, math.ceil(batches_ahead * self.metrics.mean_batch_seconds()))
            self.metrics.requests["rejected"] += 1
            raise QueueFull(len(self._pending), self.max_queue, retry)
        job = Job(request)
        self._pending.extend(_Row(job, k) for k in range(request.n))
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job's queued images (its client went away); images already running finish unused."""
        self._pending = deque(row for row in self._pending if row.job is not job)
        job.fail("the request was cancelled", 499)

    def position(self, job: Job) -> int | None:
        """Images queued ahead of this job's first queued image (None when none of its images is queued)."""
        for ahead, row in enumerate(self._pending):
            if row.job is job:
                return ahead
        return None

    def progress(self, job: Job) -> float:
        """Fraction of the job's denoising work done, counting its running images by the batch's step."""
        done = sum(image is not None for image in job.images)
        running = sum(row.job is job for row in self._running)
        step_fraction = min(1.0, self._steps_done / job.request.steps) if running else 0.0
        return 1.0 if job.status == "done" else (done + running * step_fraction) / job.request.n

    def _take_batch(self) -> list[_Row]:
        if not self._pending:
            return []
        key = self._pending[0].job.request.batch_key
        batch = [row for row in self._pending if row.job.request.batch_key == key][: self.max_batch]
        chosen = set(map(id, batch))
        self._pending = deque(row for row in self._pending if id(row) not in chosen)
        return batch

    # ---- the worker ----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """The worker loop: run batches until close() and the queue is empty."""
        while True:
            if self.batch_wait and 0 < len(self._pending) < self.max_batch and not self._closing:
                await asyncio.sleep(self.batch_wait)
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)
                continue
            if self._closing:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _run_batch(self, rows: list[_Row]) -> None:
        rows = [row for row in rows if not row.job.finished.is_set()]  # cancelled meanwhile
        if not rows:
            return
        for row in rows:
            row.job.status = "running"
        self._running, self._steps_done = rows, 0
        start = time.perf_counter()
        try:
            pngs = await asyncio.get_running_loop().run_in_executor(self._executor, self._generate, rows)
        except Exception as err:  # noqa: BLE001 - one request's failure must not reach the others
            self._running = []
            jobs = list(dict.fromkeys(row.job for row in rows))
            if len(jobs) > 1:
                # Rerun each request on its own, so only the one that fails gets the error.
                for job in jobs:
                    await self._run_batch([row for row in rows if row.job is job])
                return
            log.exception("generation failed for request %s", jobs[0].id)
            jobs[0].fail(f"generation failed: {type(err).__name__}: {err}")
            self.metrics.requests["failed"] += 1
            return
        self._running = []
        self.metrics.batch_sizes[len(rows)] += 1
        self.metrics.batch_seconds.append(time.perf_counter() - start)
        for row, png in zip(rows, pngs):
            job = row.job
            job.images[row.index], job.batch_sizes[row.index] = png, len(rows)
            if all(image is not None for image in job.images) and not job.finished.is_set():
                job.status, job.latency = "done", time.perf_counter() - job.submitted
                self.metrics.record_latency(job.latency)
                self.metrics.images_served += job.request.n
                self.metrics.requests["ok"] += 1
                job.finished.set()

    def _generate(self, rows: list[_Row]) -> list[bytes]:
        """One pipeline call for the batch (worker thread); returns PNG bytes per row."""
        request = rows[0].job.request
        guided = request.guidance_scale > 1
        images = self.pipe(
            prompt=[row.job.request.prompt for row in rows],
            negative_prompt=[row.job.request.negative_prompt or "" for row in rows] if guided else None,
            guidance_scale=request.guidance_scale,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            generator=[torch.Generator("cpu").manual_seed(row.seed) for row in rows],
            progress=False,
        ).images
        return [png_bytes(image) for image in images]

    async def close(self, worker: asyncio.Task | None = None) -> None:
        """Take no new requests, fail the queued ones (503), let the running batch finish, stop the worker."""
        self._closing = True
        for row in list(self._pending):
            row.job.fail("the server is shutting down; the request was not started", 503)
        self._pending.clear()
        self._wakeup.set()
        if worker is not None:
            await worker
        self._executor.shutdown(wait=True)
        self._hook.remove()

    @property
    def closing(self) -> bool:
        return self._closing

    def snapshot(self) -> dict:
        m = self.metrics
        total_batches = sum(m.batch_sizes.values())
        return {
            "queue_images": self.queued_images,
            "queue_requests": self.queued_requests,
            "running_images": len(self._running),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "batches": total_batches,
            "batch_sizes": {str(size): count for size, count in sorted(m.batch_sizes.items())},
            "mean_batch_size": round(sum(s * c for s, c in m.batch_sizes.items()) / total_batches, 3)
            if total_batches
            else None,
            "latency_seconds": m.latency_percentiles(),
            "images_served": m.images_served,
            "requests": dict(m.requests),
            "uptime_seconds": round(time.time() - m.started, 1),
        }
