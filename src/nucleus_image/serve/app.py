"""The HTTP app: an OpenAI-like image API, progress polling, metrics and the web page, over one BatchScheduler.

POST /v1/images/generations   {"prompt": ..., "n": 2, "aspect_ratio": "4:3", "seed": 7} -> PNGs + settings
POST /v1/images/jobs          same body -> 202 {"id": ...}; GET /v1/images/jobs/{id} -> progress, then result
GET  /v1/images/files/{name}  a PNG returned with response_format "url" (the last `keep_images` are kept)
GET  /v1/models, /health, /metrics (Prometheus text), /metrics.json, and / (the web page)

app = create_app(NucleusPipeline.from_pretrained(path), ServeConfig(model_path=path))
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nucleus_image.pipeline.command import generate_command
from nucleus_image.serve.metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text
from nucleus_image.serve.request import Defaults, GenerationRequest, Geometry, Limits, RequestError, parse_request
from nucleus_image.serve.scheduler import BatchScheduler, Job, QueueFull, ShuttingDown

STATIC = Path(str(resources.files("nucleus_image.serve") / "static"))


@dataclass(frozen=True)
class ServeConfig:
    model_path: str
    max_batch: int = 8
    max_queue: int = 32
    batch_wait: float = 0.0  # seconds a batch that is not full waits for more requests
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    dtype: str = "auto"  # as given to `nucleus serve`, repeated in each image's command
    device: str | None = None
    quantize: str | None = None  # as given to `nucleus serve`, repeated in each image's command
    cuda_graph: bool = False  # likewise
    fp8_compute: bool = False  # likewise
    lora: str | None = None  # the adapter folder loaded into the pipeline, repeated in each image's command
    lora_scale: float = 1.0
    keep_images: int = 512  # PNGs kept for response_format "url"
    keep_jobs: int = 256  # finished jobs kept for polling

    @property
    def model_id(self) -> str:
        return Path(self.model_path).resolve().name


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status, headers=headers)


class _Bounded(OrderedDict):
    """A dict that forgets its oldest entries beyond `capacity`."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > self.capacity:
            self.popitem(last=False)


def create_app(pipe, config: ServeConfig) -> FastAPI:
    geometry = Geometry(pipe.sample_size, pipe.granularity)
    files: _Bounded = _Bounded(config.keep_images)
    jobs: _Bounded = _Bounded(config.keep_jobs)
    results: _Bounded = _Bounded(config.keep_jobs)  # a finished job's response body, built once
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler = BatchScheduler(pipe, config.max_batch, config.max_queue, config.batch_wait)
        state["scheduler"], state["worker"] = scheduler, asyncio.create_task(scheduler.run())
        yield
        # uvicorn has stopped accepting connections and waited for open requests (up to its graceful timeout).
        await scheduler.close(state["worker"])

    app = FastAPI(title="Nucleus-Image", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    # Unknown paths (404), wrong methods (405) and FastAPI's own validation answer in the API's error shape too,
    # not FastAPI's {"detail": ...}.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {
            404: f"no such path {request.url.path!r}",
            405: f"{request.method} is not allowed on {request.url.path!r}",
        }.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error(400, first.get("msg", "invalid request"), param)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def scheduler() -> BatchScheduler:
        return state["scheduler"]

    def result(job: Job, request: Request) -> dict:
        r: GenerationRequest = job.request
        data = []
        for k, (png, seed) in enumerate(zip(job.images, job.seeds)):
            # The image's settings as `nucleus generate` flags (the server runs no step cache).
            command = generate_command(
                config.model_path,
                r.prompt,
                seed=seed,
                width=r.width,
                height=r.height,
                steps=r.steps,
                guidance=r.guidance_scale,
                negative=r.negative_prompt,
                dtype=config.dtype,
                device=config.device,
                quantize=config.quantize,
                cuda_graph=config.cuda_graph,
                fp8_compute=config.fp8_compute,
                lora=config.lora,
                lora_scale=config.lora_scale,
            )
            item = {"seed": seed, "batch_size": job.batch_sizes[k], "command": command}
            if r.response_format == "url":
                name = f"{job.id}-{k}.png"
                files[name] = png
                item["url"] = str(request.url_for("image_file", name=name))
            else:
                item["b64_json"] = base64.b64encode(png).decode()
            data.append(item)
        return {
            "created": int(time.time()),
            "model": config.model_id,
            "id": job.id,
            "data": data,
            "settings": r.settings(),
            "latency_seconds": round(job.latency, 4),
        }

    def submit(raw: bytes) -> Job | JSONResponse:
        try:
            request = parse_request(raw, config.limits, config.defaults, geometry, config.model_id)
            job = scheduler().submit(request)
        except RequestError as err:
            scheduler().metrics.requests["invalid"] += 1
            return error(400, str(err), err.param)
        except QueueFull as err:
            return error(429, str(err), headers={"Retry-After": str(err.retry_after)})
        except ShuttingDown as err:
            return error(503, str(err))
        jobs[job.id] = job
        return job

    def finished(job: Job, request: Request) -> tuple[int, dict]:
        if job.status == "failed":
            return job.error_status, {"error": {"message": job.error, "type": "server_error", "param": None}}
        if job.id not in results:
            results[job.id] = result(job, request)
        return 200, results[job.id]

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        job = submit(await request.body())
        if isinstance(job, JSONResponse):
            return job
        try:
            await job.finished.wait()
        except asyncio.CancelledError:
            scheduler().cancel(job)
            raise
        status, body = finished(job, request)
        return JSONResponse(body, status)

    @app.post("/v1/images/jobs", status_code=202)
    async def create_job(request: Request):
        job = submit(await request.body())
        if isinstance(job, JSONResponse):
            return job
        return JSONResponse(
            {"id": job.id, "status": job.status, "url": str(request.url_for("job_status", job_id=job.id))}, 202
        )

    @app.get("/v1/images/jobs/{job_id}", name="job_status")
    async def job_status(job_id: str, request: Request):
        job = jobs.get(job_id)
        if job is None:
            return error(404, f"no job {job_id!r} (unknown, or older than the last {config.keep_jobs})", "job_id")
        s = scheduler()
        body = {
            "id": job.id,
            "status": job.status,
            "progress": round(s.progress(job), 4),
            "queue_position": s.position(job),
            "n": job.request.n,
            "steps": job.request.steps,
        }
        if job.finished.is_set():
            status, outcome = finished(job, request)
            body.update({"http_status": status, **({"result": outcome} if status == 200 else outcome)})
        return body

    @app.get("/v1/images/files/{name}", name="image_file")
    async def image_file(name: str):
        png = files.get(name)
        if png is None:
            return error(404, f"no image {name!r} (unknown, or older than the last {config.keep_images})", "name")
        return Response(png, media_type="image/png")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": config.model_id,
                    "object": "model",
                    "owned_by": "nucleus-image",
                    "path": str(Path(config.model_path).resolve()),
                    "lora": None if config.lora is None else str(Path(config.lora).resolve()),
                    "sample_size": geometry.sample_size,
                    "granularity": geometry.granularity,
                    "aspect_sizes": {a: f"{w}x{h}" for a, (w, h) in geometry.aspect_sizes().items()},
                    "max_side": config.limits.max_side or 2 * geometry.sample_size,
                    "limits": asdict(config.limits),
                    "defaults": asdict(config.defaults),
                    "max_batch": config.max_batch,
                }
            ],
        }

    @app.get("/health")
    async def health():
        s = scheduler()
        status = "shutting_down" if s.closing else "ok"
        return JSONResponse(
            {"status": status, "model": config.model_id, "queue_images": s.queued_images}, 503 if s.closing else 200
        )

    @app.get("/metrics")
    async def metrics():
        s = scheduler()
        return Response(prometheus_text(s.snapshot(), s.metrics), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/metrics.json")
    async def metrics_json():
        return scheduler().snapshot()

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    return app
