"""`nucleus serve`: an HTTP API with request batching and a web page for a pipeline folder.

    nucleus serve --model runs/demo/merged            # then open http://127.0.0.1:8000/
    nucleus serve --model runs/demo/merged --lora runs/distill/adapter     # a few-step student at its own steps
    curl -s 127.0.0.1:8000/v1/images/generations -d '{"prompt": "a red circle", "n": 2, "steps": 16}'

Queued images with the same size, steps and guidance run together, up to --max-batch per pipeline call
(--max-batch 1 turns batching off). On SIGINT/SIGTERM the server stops accepting connections, lets running
requests finish for up to --shutdown-timeout seconds, answers queued ones 503 and exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys

from nucleus_image.cli.arguments import add_acceleration_args, add_threads_arg, check_acceleration, load_pipeline
from nucleus_image.cli.generate import DTYPES, sampler_defaults
from nucleus_image.serve.request import Limits


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a pipeline over HTTP (API with batching, and a web page)",
        description="Serve a Nucleus pipeline folder: POST /v1/images/generations, "
        "GET /v1/models, /health, /metrics, and a web page at /.",
    )
    p.add_argument("--model", required=True, help="pipeline folder (model_index.json, transformer/, vae/, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="images per pipeline call (1 turns batching off)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="milliseconds a batch that is not full waits for more requests (default 0)",
    )
    p.add_argument("--max-queue", type=int, default=32, help="queued images before requests get 429")
    p.add_argument("--max-images", type=int, default=4, help="most images (n) one request may ask for")
    p.add_argument("--max-steps", type=int, default=100, help="most denoising steps a request may ask for")
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="longest prompt, in characters")
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="largest image side in pixels (default: twice the model's native size)",
    )
    p.add_argument(
        "--default-steps",
        type=int,
        default=None,
        help="steps when a request names none (default: 50); a --lora adapter with sampler settings sets its own",
    )
    p.add_argument(
        "--default-guidance",
        type=float,
        default=None,
        help="guidance when a request names none (default: 4.0); a --lora adapter with sampler settings sets its own",
    )
    p.add_argument(
        "--lora",
        metavar="ADAPTER",
        default=None,
        help="LoRA adapter folder to serve with (peft's format); its sampler settings, if it carries any, "
        "become the default steps and guidance",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplier of the adapter's update")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument(
        "--quantize",
        choices=("int8", "fp8"),
        default=None,
        help="8-bit transformer weights, as `nucleus generate --quantize` (default: none, full precision)",
    )
    add_acceleration_args(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level",
    )
    add_threads_arg(p)
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Everything checkable before the model loads."""
    from nucleus_image.pipeline.folder import read_geometry

    args.default_guidance, args.default_steps, _ = sampler_defaults(args.lora).resolve(
        args.default_guidance, args.default_steps, None
    )
    for name in ("max_batch", "max_queue", "max_images", "max_steps", "max_prompt_chars", "default_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.default_guidance <= Limits.max_guidance:
        raise ValueError(f"--default-guidance must be in [0, {Limits.max_guidance}], got {args.default_guidance}")
    if args.batch_wait_ms < 0:
        raise ValueError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if args.default_steps > args.max_steps:
        raise ValueError(f"--default-steps {args.default_steps} exceeds --max-steps {args.max_steps}")
    if args.max_images > args.max_queue:
        raise ValueError(
            f"--max-images {args.max_images} exceeds --max-queue {args.max_queue}: such a request could never be queued"
        )
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    check_acceleration(args)
    sample_size, granularity = read_geometry(args.model)
    if args.max_side is not None and (args.max_side < granularity or args.max_side % granularity):
        raise ValueError(f"--max-side {args.max_side} must be a positive multiple of {granularity} px")
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None


def run(args) -> int:
    try:
        import uvicorn

        from nucleus_image.serve.app import ServeConfig, create_app
        from nucleus_image.serve.request import Defaults
    except ImportError as err:
        raise ValueError(
            f"nucleus serve needs FastAPI and uvicorn ({err.name} is missing): pip install 'nucleus-image[serve]'"
        ) from None

    check_args(args)
    pipe = load_pipeline(args)
    config = ServeConfig(
        model_path=str(args.model),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait=args.batch_wait_ms / 1000,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        cuda_graph=args.cuda_graph,
        fp8_compute=args.fp8_compute,
        lora=args.lora,
        lora_scale=args.lora_scale,
        limits=Limits(
            max_prompt_chars=args.max_prompt_chars,
            max_images=args.max_images,
            max_steps=args.max_steps,
            max_side=args.max_side,
        ),
        defaults=Defaults(steps=args.default_steps, guidance_scale=args.default_guidance),
    )
    # uvicorn stops on SIGINT/SIGTERM by itself: it stops listening, lets running requests finish (up to
    # --shutdown-timeout), the app answers queued ones 503, and then uvicorn raises the signal again for the
    # handlers it found. A server asked to stop that has drained has done its job: it exits 0, as service managers
    # (systemd, Kubernetes) expect of a clean stop; 130 is for commands an interrupt left with work unfinished.
    stopped: list[int] = []
    handlers = {
        s: signal.signal(s, lambda signum, frame: stopped.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        uvicorn.run(
            create_app(pipe, config),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"nucleus serve: stopped on {signal.Signals(stopped[0]).name}", file=sys.stderr)
    return 0
