"""`nucleus inspect-routing`: what a model's MoE routers do across the denoising trajectory.

    nucleus inspect-routing --model runs/tiny/merged --out routing/
    nucleus inspect-routing --model runs/tiny/merged --out routing/ --sigmas 0.1,0.5,0.9
    nucleus inspect-routing --model runs/tiny/merged --out routing/ --prompt "a red circle" --prompt "two blue squares"

Each prompt with GenEval-format metadata over the synthetic shapes (default: the synthetic held-out prompts) is
rendered once as ground truth; a plain prompt (--prompt, or a plain-text --prompts file) is sampled by the model
instead, and then only the timestep and token metrics apply (shape, colour and region need scenes). Each image is
noised to every sigma with one fixed noise draw and run through the transformer with its routing returned. Writes OUT/routing.json (statistics and metrics per layer and timestep, defined in
`nucleus_image.eval.routing`), OUT/expert_load.png and OUT/expert_map_layerNN.png, and prints the summary.
"""

from __future__ import annotations

from nucleus_image.cli.arguments import (
    EVAL_STEPS,
    add_prompt_args,
    add_threads_arg,
    check_device,
    check_out_folder,
    check_positive,
    prompt_records,
)
from nucleus_image.eval.routing import DEFAULT_SIGMAS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect-routing",
        help="routing statistics, metrics and pictures of a model",
        description="Measure how a model's MoE routers split tokens over timesteps and content.",
    )
    p.add_argument(
        "--model", required=True, help="pipeline folder (model_index.json, transformer/, vae/, text_encoder/)"
    )
    p.add_argument("--out", required=True, help="report folder")
    add_prompt_args(
        p,
        "; GenEval metadata over the synthetic shapes gives the shape/colour metrics too "
        "(default: the synthetic held-out prompts)",
    )
    p.add_argument("--per-task", type=int, default=4, help="held-out prompts per task when --prompts is not given")
    p.add_argument(
        "--sigmas",
        default=",".join(str(s) for s in DEFAULT_SIGMAS),
        help="comma-separated noise levels in [0, 1] (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the renderings and the noise")
    p.add_argument("--steps", type=int, default=EVAL_STEPS, help="denoising steps to sample plain prompts")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def parse_sigmas(text: str) -> list[float]:
    try:
        sigmas = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sigmas {text!r} is not a comma-separated list of numbers") from None
    if len(sigmas) < 2 or any(not 0.0 <= s <= 1.0 for s in sigmas):
        raise ValueError(f"--sigmas {text!r}: give at least two noise levels in [0, 1]")
    return sigmas


def run(args) -> int:
    from nucleus_image.data.synthetic import heldout_metadata
    from nucleus_image.eval.compositional import validate_records
    from nucleus_image.eval.routing import format_metrics, has_scenes, inspect_pipeline
    from nucleus_image.eval.routing_report import write_report
    from nucleus_image.pipeline import NucleusPipeline

    sigmas = parse_sigmas(args.sigmas)
    check_positive(args, "batch_size", "per_task", "steps")
    check_device(args.device)
    check_out_folder(args.out)
    records = prompt_records(args, required=False) or heldout_metadata(args.seed, args.per_task)
    if has_scenes(records):
        validate_records(records)
    pipeline = NucleusPipeline.from_pretrained(args.model, device=args.device)
    record, batch = inspect_pipeline(pipeline, records, sigmas, args.seed, args.batch_size, args.steps)
    cfg = pipeline.transformer.config
    report = write_report(
        record,
        batch,
        args.out,
        {"model": str(args.model), "router_input": cfg.router_input, "router_type": cfg.router_type},
    )
    print(format_metrics(report))
    print(f"report: {args.out}/routing.json; pictures: {args.out}/expert_load.png, {args.out}/expert_map_layer*.png")
    return 0
