"""Flags several subcommands share, spelled and checked one way: prompts, devices, dtypes, step counts, sizes,
GPU acceleration.

Every check here runs before a model is loaded and raises ValueError naming the flag as the user types it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
# One default number of denoising steps per purpose: final pictures (generate, the GenEval benchmark) use the
# release's 50; evaluation samples (eval, ablate), where many images are scored, use 20.
GENERATE_STEPS = 50
EVAL_STEPS = 20


def add_prompt_args(parser, what: str = "") -> None:
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for several")
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file: plain text, one prompt per line, or JSONL objects with a 'prompt' key" + what,
    )


def add_overrides_arg(parser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable, collected in `args.overrides` (config fields, dotted for sections)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_threads_arg(parser) -> None:
    """`--threads`, applied by `nucleus_image.cli.main` before the command runs (`nucleus_image.threads`)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: every core this process may use, or OMP_NUM_THREADS when set; "
        "waiting threads sleep, so a busy machine does not collapse them)",
    )


def read_prompt_file(path: str, flag: str = "--prompts") -> list[dict]:
    """Records {"prompt": ..., ...} from plain text (one prompt per line) or JSONL (a file whose first non-blank
    line starts with `{`, or named .jsonl). Undecodable bytes and bad JSON are reported with file and line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{flag} {path!r} does not exist" + (" (it is a folder)" if file.is_dir() else ""))
    records = []
    with file.open("rb") as f:
        lines = f.read().split(b"\n")
    jsonl = file.suffix == ".jsonl"
    for number, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{flag} {path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                f"{err.start + 1}); save the file as UTF-8"
            ) from None
        if not line:
            continue
        if not records and line.startswith("{"):
            jsonl = True
        if not jsonl:
            records.append({"prompt": line})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{flag} {path}:{number}: not JSON ({err.msg}); a .jsonl file holds one object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{flag} {path}:{number}: needs a string 'prompt' field")
        records.append(record)
    return records


def prompt_records(args, required: bool = True) -> list[dict]:
    """--prompt values, then the --prompts file's records."""
    records = [{"prompt": text} for text in args.prompt]
    if args.prompts:
        records += read_prompt_file(args.prompts)
    if required and not records:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE with at least one prompt")
    return records


def check_device(value: str | None, flag: str = "--device") -> None:
    """Refuse a device this torch cannot use before anything is loaded (instead of a traceback mid-load)."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{flag} {value!r} is not a torch device; accepted: cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "built for CUDA but sees no GPU"
            raise ValueError(f"{flag} {value}: this torch {torch.__version__} is {built}; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {value}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {value}: MPS is not available here; use {flag} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {value!r}: accepted: cpu, cuda, cuda:N, mps")


def add_acceleration_args(parser) -> None:
    parser.add_argument(
        "--fp8-compute",
        action="store_true",
        help="expert and attention matmuls in fp8 (GPUs of compute capability >= 8.9; not with --quantize)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each denoising step as one CUDA graph (GPU only; not with --cache)",
    )
    parser.add_argument(
        "--kernels",
        choices=("eager", "triton"),
        default="eager",
        help="the blocks' LayerNorm + modulation on PyTorch ops (eager, default) or fused Triton kernels (GPU)",
    )


def check_acceleration(args) -> None:
    """--cuda-graph, --fp8-compute and --kernels: refuse combinations and devices that cannot run them, before
    loading."""
    if not (args.cuda_graph or args.fp8_compute or args.kernels != "eager"):
        return
    import torch

    from nucleus_image.kernels.runtime import check_can_run
    from nucleus_image.pipeline.cuda_graph import check_cuda_graph
    from nucleus_image.pipeline.pipeline import default_device
    from nucleus_image.quantization.fp8_compute import check_fp8_compute

    cache = getattr(args, "cache", None)
    if args.cuda_graph and cache is not None:
        raise ValueError(f"--cuda-graph replays one fixed step; --cache {cache} changes each step's work: choose one")
    if args.fp8_compute and args.quantize is not None:
        raise ValueError(
            f"--fp8-compute computes with fp8 copies of high-precision weights; --quantize "
            f"{args.quantize} stores 8-bit weights computed in high precision: choose one"
        )
    device = torch.device(args.device) if args.device is not None else default_device()
    for flag, check, wanted in (
        ("--cuda-graph", check_cuda_graph, args.cuda_graph),
        ("--fp8-compute", check_fp8_compute, args.fp8_compute),
        (f"--kernels {args.kernels}", lambda device: check_can_run(args.kernels, device), args.kernels != "eager"),
    ):
        if wanted:
            try:
                check(device)
            except ValueError as err:
                raise ValueError(f"{flag}: {err}") from None


def check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be >= 1")


def check_guidance(value: float, flag: str = "--guidance") -> None:
    import math

    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")


def check_out_folder(path: str, flag: str = "--out") -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {path!r} is a file; give a folder (it is created if missing)")
    return out


@contextmanager
def resumable(folder, what: str = "samples"):
    """Ctrl-C inside says where the work so far is and that the same command continues it (exit 130, no trace)."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the {what} written so far are in {folder}; rerun the same command to continue"
        ) from None


def load_pipeline(args):
    """The pipeline that `generate` and `serve` run: --model with --dtype, --device, --quantize, --cuda-graph,
    --fp8-compute, --kernels, and --lora (its sampler settings become the pipeline's defaults) at --lora-scale."""
    import torch

    from nucleus_image.pipeline import NucleusPipeline

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    pipe = NucleusPipeline.from_pretrained(
        args.model,
        dtype=dtype,
        device=args.device,
        quantize=args.quantize,
        cuda_graph=args.cuda_graph,
        fp8_compute=args.fp8_compute,
        kernels=args.kernels,
    )
    if args.lora is not None:
        pipe.load_lora(args.lora, scale=args.lora_scale)
    return pipe
