"""The planner's figures against measurements of real CPU runs of a small model: optimizer states, gradients and
parameters exactly (bytes of the tensors the real optimizers hold after a step), activations within 5% (the
same forward/backward on CPU, its live tensor bytes counted; the meta run stands in flash attention's saved
tensors for the CPU kernel's, which differ by the log-sum-exp layout), Muon's step within 5% (one process here;
sharded, with its all-to-alls, in test_muon_distributed.py), the all-to-all buffers as the model's MoE layers
size them, and weight bytes of each format exactly (8-bit: the layers kept in bf16 at 2 bytes)."""

import pytest
import torch
from training_helpers import MICRO_MODEL, run_cli

from nucleus_image.model import NucleusTransformer
from nucleus_image.model.moe import SwiGLUExperts
from nucleus_image.planning import Layout, plan_generation, plan_layout, transformer_weight_bytes
from nucleus_image.planning.activations import training_activations
from nucleus_image.planning.measure import LiveBytes
from nucleus_image.planning.shapes import forward_inputs
from nucleus_image.training.config import OptimizerConfig
from nucleus_image.training.optim import build_optimizers

GB = 2**30


def test_states_match_the_real_optimizers_after_a_step():
    torch.manual_seed(0)
    model = NucleusTransformer(MICRO_MODEL)
    muon, adamw, _ = build_optimizers(model, OptimizerConfig(lr=1e-3), torch.float32)
    kw = forward_inputs(MICRO_MODEL, 2, (4, 4), 8, "cpu", torch.float32)
    kw["hidden_states"].normal_()
    model(**kw).sample.square().mean().backward()
    muon.step()
    adamw.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    plan = plan_layout(
        MICRO_MODEL, Layout(1, 1, 1), global_batch=2, height=16, width=16, gpu_memory=GB, text_tokens=8, vae_factor=4
    )
    assert plan.muon_momentum == nbytes(s["momentum_buffer"] for s in muon.state.values())
    # The text-query norms (kept for checkpoint compatibility: text makes no queries) get no gradient, so AdamW
    # never allocates their moments; the plan counts them, an upper bound by exactly that much.
    unused = [p for p in model.parameters() if p.grad is None]
    assert plan.adamw_moments == nbytes(
        t for s in adamw.state.values() for k, t in s.items() if k.startswith("exp_avg")
    ) + 2 * nbytes(unused)
    assert (
        plan.gradients
        == plan.parameters
        == nbytes(p.grad for p in model.parameters() if p.grad is not None) + nbytes(unused)
    )
    # One process: no FSDP, autocast's bf16 copy of every weight instead.
    assert plan.micro_batch == 2 and plan.fsdp_buffers == plan.parameters // 2 and plan.all_to_all == 0
    # Sharding over 2 ranks halves every state (rounded up per rank).
    half = plan_layout(
        MICRO_MODEL, Layout(1, 2, 2), global_batch=2, height=16, width=16, gpu_memory=GB, text_tokens=8, vae_factor=4
    )
    assert abs(half.muon_momentum - plan.muon_momentum / 2) <= 4 and half.micro_batch == 1 and half.all_to_all > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_from_shapes_match_a_cpu_run(checkpointing):
    meta = training_activations(MICRO_MODEL, (6, 6), 8, checkpointing, torch.float32, "meta")
    cpu = training_activations(MICRO_MODEL, (6, 6), 8, checkpointing, torch.float32, "cpu")
    assert abs(meta.peak - cpu.peak) <= 0.05 * cpu.peak, (meta, cpu)
    assert abs(meta.held - cpu.held) <= 0.05 * cpu.held, (meta, cpu)
    if checkpointing:  # checkpointing keeps only block inputs: far less than the full graph
        full = training_activations(MICRO_MODEL, (6, 6), 8, False, torch.float32, "cpu")
        assert cpu.held < full.held / 3


def test_live_bytes_counts_new_tensors_once_and_frees_them():
    a = torch.zeros(1000)  # from before: not counted, nor its views
    with LiveBytes() as live:
        b = a * 2
        c = b.view(10, 100)  # a view: counted once
        d = a.t()
        del b
        assert live.live == 4000 and live.peak == 4000
        del c, d
    assert live.live == 0


def test_generation_weight_bytes_and_offload():
    model = NucleusTransformer(MICRO_MODEL).to(torch.bfloat16)
    assert transformer_weight_bytes(MICRO_MODEL, "bf16") == sum(p.numel() * 2 for p in model.parameters())
    assert transformer_weight_bytes(MICRO_MODEL, "int8") < 0.6 * transformer_weight_bytes(MICRO_MODEL, "bf16")
    kept = plan_generation(
        MICRO_MODEL, height=32, width=32, text_encoder_bytes=10**6, offload_text_encoder=False, vae_factor=4
    )
    freed = plan_generation(
        MICRO_MODEL, height=32, width=32, text_encoder_bytes=10**6, offload_text_encoder=True, vae_factor=4
    )
    assert kept.peak == freed.peak + 10**6 == kept.transformer_weights + kept.activations + 10**6
    assert [r[0] for r in kept.rows()][:3] == ["transformer weights", "activations", "text encoder"]
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        plan_generation(MICRO_MODEL, weights="int4")


def test_plan_cli_recommends_a_layout_and_refuses_bad_input(capsys):
    from nucleus_image.cli import main

    done = run_cli("plan", "--task", "train", "--preset", "tiny", "--gpus", "2", "--gpu-memory", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dp_replicate=1 dp_shard=2 ep=2" in done.stdout and "recommended: dp_replicate=1 dp_shard=2" in done.stdout
    assert "fits: peak <= 0.9 GiB, the card less a 0.1 GiB margin" in done.stdout
    assert main(["plan", "--gpus", "0"]) == 2  # the same entry point, in-process: the refusal comes before any work
    assert "nucleus plan: error: --gpus must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_muon_step_peak_matches_a_cpu_step(ns_dtype):
    torch.manual_seed(0)
    model = NucleusTransformer(MICRO_MODEL)
    muon, _, _ = build_optimizers(model, OptimizerConfig(lr=1e-3, weight_decay=0.1), ns_dtype)
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if step:  # the momentum exists from the first step: what the step itself allocates
            with LiveBytes() as live:
                muon.step()
        else:
            muon.step()
    plan = plan_layout(
        MICRO_MODEL,
        Layout(1, 1, 1),
        global_batch=2,
        height=16,
        width=16,
        gpu_memory=GB,
        text_tokens=8,
        vae_factor=4,
        ns_dtype=ns_dtype,
    )
    assert abs(plan.muon_step - live.peak) <= 0.05 * live.peak, (plan.muon_step, live.peak)


def test_all_to_all_buffers_are_the_model_s_expert_buffers():
    """C = ceil(CF * S / E) from the model's own function: CF * S = 20.5 tokens here, where ceil(int(CF * S) / E)
    would give 5 per expert instead of 6."""
    cfg = MICRO_MODEL.replace(capacity_factors=(0.0, 0.82))
    plan = plan_layout(
        cfg,
        Layout(1, 2, 2),
        global_batch=4,
        height=40,
        width=40,
        gpu_memory=GB,
        text_tokens=8,
        vae_factor=4,
        grad_accum=1,
    )
    seen = []
    model = NucleusTransformer(cfg)
    for m in model.modules():
        if isinstance(m, SwiGLUExperts):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].numel()))
    with torch.no_grad():
        model(**forward_inputs(cfg, plan.micro_batch, (5, 5), 8, "cpu", torch.float32))
    assert plan.micro_batch == 2 and not plan.checkpointing and len(seen) == len(cfg.moe_layers)
    assert plan.all_to_all == sum(2 * 2 * n for n in seen)  # out and back, in bf16
    assert seen[0] == cfg.num_experts * 2 * 6 * cfg.hidden_size


def test_8bit_weight_bytes_are_the_quantized_model_s():
    pytest.importorskip("torchao")
    from nucleus_image.quantization import quantize_transformer

    def nbytes(t):
        names = getattr(t, "tensor_data_names", None)
        return t.numel() * t.element_size() if names is None else sum(nbytes(getattr(t, n)) for n in names)

    for method in ("int8", "fp8"):
        model = quantize_transformer(NucleusTransformer(MICRO_MODEL).to(torch.bfloat16), method)
        assert transformer_weight_bytes(MICRO_MODEL, method) == sum(nbytes(t) for t in model.state_dict().values())


def test_plan_recommendation_pastes_as_a_working_train_command(capsys):
    """The printed command goes through the real parser, and its layout through the trainer's own checks."""
    import shlex

    from nucleus_image.cli import build_parser, main
    from nucleus_image.parallel.config import check_layout
    from nucleus_image.training.config import TrainConfig

    assert (
        main(["plan", "--task", "train", "--preset", "tiny", "--gpus", "4", "--gpu-memory", "1", "--margin", "0.5"])
        == 0
    )
    out = capsys.readouterr().out
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith("nucleus train "))
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.nproc == 4 and args.data == "DATA" and args.out == "RUN"
    cfg = TrainConfig.preset(args.preset).override(args.overrides)
    check_layout(
        cfg.parallel.resolve(args.nproc),
        cfg.model.num_experts,
        {s.name: s.batch_size for s in cfg.stages},
        cfg.grad_accum_steps,
    )
    peak = float(out.split("recommended:")[1].split("(peak ")[1].split(" of")[0])
    assert peak <= 0.5  # within the card less the margin
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["train", "--data", "D", "--out", "O", "--set", "parallel.dp_shard=2", "parallel.ep=1"]
        )
