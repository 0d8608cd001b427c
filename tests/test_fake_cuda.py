"""Every GPU path, one call each, on fake `cuda` tensors in bf16 at the released model's shapes (tests/fake_cuda.py):
a CPU tensor meeting a cuda one, a host read or copy inside the step, a generator on the wrong device or a dtype
the op refuses fails the test. Then the same paths on real bf16 tensors on the CPU, at tiny shapes, where the
arithmetic runs (dtype bugs the meta rules let through) and host reads are counted.

Not covered, and why: FSDP2 and expert parallelism (a sharded step needs a process group whose collectives run on
cuda tensors, NCCL's; the gloo-free "fake" process group cannot carry FakeTensors through FSDP2's CUDA streams and
events, and its reduce-scatters run inside the backward, which a CPU build cannot run on cuda tensors, see
fake_cuda.fake_backward); CUDA graph capture (torch.cuda.CUDAGraph needs the driver); kernel speed and numerics
on a GPU.
"""

from __future__ import annotations

# peft is imported here, on the real CPU build: its import chain (transformers -> torchao) queries the CUDA
# device, which the fake CUDA device guard answers with an error if the first import happens inside a test.
import peft  # noqa: F401
import pytest
import torch
from fake_cuda import REAL_GENERATOR, HostSync, count_host_reads, fake_cuda, on_cuda

from nucleus_image.adapters import add_lora
from nucleus_image.distill.distribution_matching import (
    MatchingConfig,
    MatchingDraws,
    MatchingObjective,
    add_fake_score,
    draw,
    fake_score_optimizers,
)
from nucleus_image.distill.objective import TrajectoryBatch, TrajectoryObjective
from nucleus_image.model import NucleusTransformer
from nucleus_image.model.config import NucleusConfig
from nucleus_image.pipeline.denoise import denoise_step
from nucleus_image.pipeline.step_cache import FBCacheConfig, TaylorSeerConfig
from nucleus_image.quantization import quantize_transformer
from nucleus_image.quantization.fp8_compute import check_fp8_compute, enable_fp8_compute
from nucleus_image.training.config import OptimizerConfig, TimestepConfig
from nucleus_image.training.loss import FlowBatch, FlowObjective, contrastive_negatives
from nucleus_image.training.noise import row_noise
from nucleus_image.training.optim import build_optimizers
from nucleus_image.training.state import TrainState
from nucleus_image.training.step import train_step

BF16 = torch.bfloat16
RELEASED = NucleusConfig.preset("released")
GRID = 64  # 1024 x 1024 pixels: 64 x 64 patches, the released native size
TEXT = 128  # text tokens per prompt


def shrunk(cfg: NucleusConfig, layers: int) -> NucleusConfig:
    """The released widths with fewer blocks (MoE and dense blocks both kept), for the training paths."""
    return cfg.replace(num_layers=layers, capacity_factors=(0.0,) + cfg.capacity_factors[-(layers - 1) :])


def text_inputs(cfg, rows: int, device, masked: bool = True):
    states = torch.randn(rows, TEXT, cfg.joint_attention_dim, device=device, dtype=BF16)
    mask = torch.ones(rows, TEXT, dtype=torch.bool, device=device) if masked else None
    return states, mask


def generation_step(model, cfg, device, cache=None, steps: int = 2, masked: bool = True, grid: int = GRID):
    """`steps` denoising steps of one guided image, as the pipeline runs them after text encoding."""
    rows, shapes = 2, [(1, grid, grid)] * 2
    states, mask = text_inputs(cfg, rows, device, masked)
    with torch.no_grad():
        kv = model.encode_text(states, mask, shapes)
        latents = torch.randn(1, grid * grid, cfg.in_channels, device=device)
        sigma = torch.linspace(1.0, 0.0, steps + 1, device=device)
        t = sigma[:-1].to(model.dtype)
        stack = None if cache is None else cache.build(steps, rows, cfg.num_layers)
        for i in range(steps):
            seam = {} if stack is None else {"block_stack": stack.block_stack(i)}
            latents = denoise_step(
                model,
                latents,
                t[i].expand(rows),
                sigma[i],
                sigma[i + 1],
                text_kv=kv,
                img_shapes=shapes,
                guidance_scale=4.0,
                **seam,
            )
    return latents


def flow_batch(cfg, device, batch: int, grid: int):
    tokens = grid * grid
    x0 = torch.randn(batch, tokens, cfg.in_channels, device=device)
    noise, sigma = row_noise(0, 3, range(batch), (tokens, cfg.in_channels), TimestepConfig(), device)
    states, mask = text_inputs(cfg, batch, device)
    patch = cfg.patch_size
    return FlowBatch(x0, noise, sigma, states, mask, (grid * patch, grid * patch))


def flow_step(
    model, cfg, device, grid: int, batch: int = 1, input_dtype=None, trainable=None, autocast=False, negatives=None
):
    """One training step of the flow objective with the recipe's terms on (z-loss, routing statistics, and the
    contrastive term when `negatives` are given). The batch is made before the step (the data loader's work)."""
    opt_cfg = OptimizerConfig(lr=1e-4, warmup_steps=2)
    muon, adamw, _ = build_optimizers(model, opt_cfg, BF16)
    optimizers = [o for o in (muon, adamw) if o is not None]
    objective = FlowObjective(
        cfg.patch_size,
        z_loss_weight=1e-3,
        routing_stats=True,
        input_dtype=input_dtype,
        autocast=autocast,
        contrastive_weight=0.05 if negatives is not None else 0.0,
    )
    flow = flow_batch(cfg, device, batch, grid)
    flow.negatives = negatives
    return lambda: train_step(model, optimizers, [flow], objective, opt_cfg, 5, params=trainable)


def distill_step(model, cfg, device, grid: int, student_steps: int = 2, fake: list | None = None):
    """One distillation step; `fake`: the parameters of a fake-score adapter added to `model` (`add_fake_score`),
    for a step with the distribution-matching term (the fake score's optimizers stepped inside the loss, the guided
    real score on 2 rows)."""
    opt_cfg = OptimizerConfig(lr=1e-4, warmup_steps=2)
    muon, adamw, _ = build_optimizers(model, opt_cfg, BF16)
    sigma = torch.linspace(1.0, 0.0, student_steps + 1, device=device)
    objective = TrajectoryObjective(sigma, sigma[:-1] * 1000 / 1000)
    states, mask = text_inputs(cfg, 1, device)
    teacher = torch.randn(1, student_steps + 1, grid * grid, cfg.in_channels, device=device)
    batch = TrajectoryBatch(teacher, states, mask, [(1, grid, grid)])
    trainable = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in fake or ())]
    if fake is not None:
        matching_cfg = MatchingConfig(weight=0.5, fake_updates=2)
        objective = MatchingObjective(
            objective, matching_cfg, 4.0, fake, fake_score_optimizers(model, fake, opt_cfg, BF16), opt_cfg
        )
        drawn = draw(0, matching_cfg, 1, student_steps, tuple(teacher.shape[2:]), device)
        batch.matching = MatchingDraws(
            **drawn,
            guided_text_RLD=torch.cat([states, states]),
            guided_mask_RL=None if mask is None else torch.cat([mask, mask]),
            step=5,
        )
    return train_step(
        model, [o for o in (muon, adamw) if o is not None], [batch], objective, opt_cfg, 5, params=trainable
    )


def check_step_output(out) -> None:
    """The step's numbers are device scalars, and recording them (every step of a run) reads nothing back."""
    TrainState().record(out.loss, out.applied, out.grad_norm)
    assert out.loss.shape == () and out.grad_norm.shape == () and out.applied.dtype == torch.bool
    assert out.loss.device == out.grad_norm.device == out.applied.device


# ---- fake cuda, released shapes --------------------------------------------------------------------------------
# The released widths (hidden 2048, 64 experts, 16 heads of 128, GQA, text width 4096) at the native 1024 x 1024;
# the generation paths run all 32 blocks once (bf16) and 4 of them otherwise (a dense block, an MoE block at each
# released capacity factor): every block has the shapes of one of those.
BLOCKS = shrunk(RELEASED, 4)


@pytest.fixture
def gpu():
    with fake_cuda() as fake:
        yield fake


def test_fake_cuda_refuses_what_a_gpu_refuses(gpu):
    """The harness itself: each kind of mistake it is there to catch is caught."""
    x = torch.randn(4, 4, device="cuda", dtype=BF16)
    with pytest.raises(RuntimeError, match="devices"):
        x + torch.randn(4, 4, dtype=BF16)
    with gpu.step():
        for read in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.tolist(), lambda: x.cpu()):
            with pytest.raises(HostSync):
                read()
        with pytest.raises(HostSync):
            torch.ones(4).to("cuda")
    assert torch.Generator("cuda").manual_seed(0).device == torch.device("cuda", 0)
    a8 = torch.randn(16, 32, device="cuda").to(torch.float8_e4m3fn)
    b8 = torch.randn(32, 16, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="col_major"):
        torch._scaled_mm(a8, b8, one, one, out_dtype=BF16)
    assert torch._scaled_mm(a8, b8.t().contiguous().t(), one, one, out_dtype=BF16).shape == (16, 16)


def test_fake_cuda_restores_the_cpu_build():
    with fake_cuda():
        assert torch.cuda.is_available()
    assert not torch.cuda.is_available() and torch.Generator is REAL_GENERATOR


def _check_latents(out, grid: int = GRID, device: str = "cuda", channels: int = 64) -> None:
    assert out.device.type == device and out.dtype == torch.float32 and out.shape == (1, grid * grid, channels)


def test_generation_step_bf16_released(gpu):
    model = on_cuda(lambda: NucleusTransformer(RELEASED)).eval()
    for masked in (True, False):  # a padded prompt takes the masked attention, an unpadded one SDPA with GQA
        with gpu.step():
            _check_latents(generation_step(model, RELEASED, "cuda", masked=masked, steps=1))


def test_generation_step_int8(gpu):
    model = quantize_transformer(on_cuda(lambda: NucleusTransformer(BLOCKS)).eval(), "int8")
    with gpu.step():
        _check_latents(generation_step(model, BLOCKS, "cuda"))


def test_generation_step_fp8_compute(gpu):
    check_fp8_compute("cuda")  # the fake device reports compute capability 9.0
    model = enable_fp8_compute(on_cuda(lambda: NucleusTransformer(BLOCKS)).eval())
    with gpu.step():
        _check_latents(generation_step(model, BLOCKS, "cuda"))


def test_generation_step_taylorseer(gpu):
    """Full steps, then forecast ones: no host sync on any (the schedule is fixed in advance)."""
    model = on_cuda(lambda: NucleusTransformer(BLOCKS)).eval()
    with gpu.step():
        _check_latents(generation_step(model, BLOCKS, "cuda", cache=TaylorSeerConfig(order=1, interval=3), steps=5))


def test_generation_step_fbcache_syncs_only_to_decide(gpu):
    """First-Block-Cache's first step runs in full without a host read; its next step reads back exactly the
    documented per-step decision (which rows run the remaining blocks), nothing before it."""
    model = on_cuda(lambda: NucleusTransformer(BLOCKS)).eval()
    with gpu.step():
        _check_latents(generation_step(model, BLOCKS, "cuda", cache=FBCacheConfig(), steps=1))
        with pytest.raises(HostSync) as err:
            generation_step(model, BLOCKS, "cuda", cache=FBCacheConfig(), steps=3)
    frames = [(frame.name, frame.path.name) for frame in err.traceback]
    assert ("stack", "step_cache.py") in frames and frames[-1][1] == "fake_cuda.py"


def test_generation_step_lora(gpu):
    model = add_lora(on_cuda(lambda: NucleusTransformer(BLOCKS)), rank=16).eval()
    with gpu.step():
        _check_latents(generation_step(model, BLOCKS, "cuda"))


def test_training_step_plain(gpu):
    """A single-GPU training step as the trainer runs it there: float32 weights under bf16 autocast."""
    model = on_cuda(lambda: NucleusTransformer(BLOCKS), dtype=torch.float32).train()
    captions = ["a red circle", "a blue square"]
    step = flow_step(
        model, BLOCKS, "cuda", grid=32, batch=2, autocast=True, negatives=contrastive_negatives(captions, "cuda")
    )
    with gpu.step():
        out = step()
        check_step_output(out)
    # Every parameter but the text-query norm the checkpoint format carries unused gets a gradient, on the device.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing and all(n.endswith("norm_added_q.weight") for n in missing)
    assert all(p.grad.device.type == "cuda" for p in model.parameters() if p.grad is not None)


def test_training_step_refuses_host_made_contrastive_pairs(gpu):
    """Contrastive pairs made on the host would be copied to the device inside the loss, in the middle of the step
    (the trainer once did this): the step refuses it."""
    model = on_cuda(lambda: NucleusTransformer(BLOCKS), dtype=torch.float32).train()
    step = flow_step(
        model,
        BLOCKS,
        "cuda",
        grid=32,
        batch=2,
        autocast=True,
        negatives=contrastive_negatives(["a red circle", "a blue square"]),
    )
    with gpu.step(), pytest.raises((HostSync, RuntimeError)):
        step()


def test_distillation_step(gpu):
    model = add_lora(on_cuda(lambda: NucleusTransformer(BLOCKS)), rank=8).train()
    with gpu.step():
        out = distill_step(model, BLOCKS, "cuda", grid=32)
        check_step_output(out)
    assert out.logged["per_step"].shape == (2,) and out.logged["per_step"].device.type == "cuda"


def test_distillation_step_with_distribution_matching(gpu):
    model = add_lora(on_cuda(lambda: NucleusTransformer(BLOCKS)), rank=8).train()
    fake = add_fake_score(model, rank=4, alpha=None)
    with gpu.step():
        out = distill_step(model, BLOCKS, "cuda", grid=32, fake=fake)
        check_step_output(out)
    assert out.logged["matching_grad"].device.type == out.logged["fake_loss"].device.type == "cuda"


def test_qlora_step(gpu):
    base = quantize_transformer(on_cuda(lambda: NucleusTransformer(BLOCKS)), "int8")
    model = add_lora(base, rank=8).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = flow_step(model, BLOCKS, "cuda", grid=32, input_dtype=BF16, trainable=trainable)
    with gpu.step():
        out = step()
        check_step_output(out)
    assert all(p.device.type == "cuda" and p.grad is not None for p in trainable)


# ---- real bf16 tensors on the CPU, tiny shapes -----------------------------------------------------------------
# The same calls with arithmetic: a dtype the meta rules accept but a kernel refuses (e.g. a float32 input to a
# bf16 linear) fails here, the results must be finite, and no step reads a tensor back to the host.
TINY = NucleusConfig.preset("tiny")
TINY_GRID = 8


def tiny_model(dtype=BF16, seed: int = 0) -> NucleusTransformer:
    torch.manual_seed(seed)
    model = NucleusTransformer(TINY).to(dtype)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity; give the modulation weight to use
        for blk in model.blocks():
            blk.img_mod[1].weight.normal_(0.0, 0.02)
        model.proj_out.weight.normal_(0.0, 0.02)
    return model


def _real_generation(model, cache=None, steps: int = 2, masked: bool = True):
    with count_host_reads() as reads:
        out = generation_step(model, TINY, "cpu", cache=cache, steps=steps, masked=masked, grid=TINY_GRID)
    _check_latents(out, TINY_GRID, "cpu", TINY.in_channels)
    assert torch.isfinite(out).all()
    return out, reads.reads


@pytest.mark.parametrize("path", ["bf16", "int8", "fp8_compute", "taylorseer", "lora"])
def test_generation_step_real_bf16_cpu(path):
    model = tiny_model().eval()
    if path == "int8":
        quantize_transformer(model, "int8")
    elif path == "fp8_compute":
        enable_fp8_compute(model)  # _scaled_mm runs on the CPU too
    elif path == "lora":
        model = add_lora(model, rank=4).eval()
    cache = TaylorSeerConfig(order=1, interval=2) if path == "taylorseer" else None
    for masked in (True, False):
        _, reads = _real_generation(model, cache, steps=4, masked=masked)
        assert reads == 0


def test_generation_step_real_bf16_cpu_fbcache():
    """fbcache's decision is its only read: once per step after the first, never more."""
    model = tiny_model().eval()
    _real_generation(model, FBCacheConfig(threshold=0.5), steps=4)


def test_count_host_reads_counts_them():
    x = torch.ones(3)
    with count_host_reads() as reads:
        x.sum().item()
        bool(x.any())
    assert reads.reads == 2


def _real_step(run):
    with count_host_reads() as reads:
        out = run()
    assert reads.reads == 0, f"{reads.reads} host reads in one training step"
    assert torch.isfinite(out.loss) and bool(out.applied)
    return out


def test_training_step_real_bf16_cpu():
    model = tiny_model(torch.float32).train()
    negatives = contrastive_negatives(["a red circle", "a blue square"])
    _real_step(flow_step(model, TINY, "cpu", grid=TINY_GRID, batch=2, autocast=True, negatives=negatives))
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_distillation_step_real_bf16_cpu():
    model = add_lora(tiny_model(), rank=4).train()
    out = _real_step(lambda: distill_step(model, TINY, "cpu", grid=TINY_GRID))
    assert out.logged["per_step"].shape == (2,) and torch.isfinite(out.logged["per_step"]).all()


def test_distribution_matching_step_real_bf16_cpu():
    model = add_lora(tiny_model(), rank=4).train()
    fake = add_fake_score(model, rank=4, alpha=None)
    out = _real_step(lambda: distill_step(model, TINY, "cpu", grid=TINY_GRID, fake=fake))
    assert torch.isfinite(out.logged["matching_grad"]) and torch.isfinite(out.logged["fake_loss"])


def test_qlora_step_real_bf16_cpu():
    model = add_lora(quantize_transformer(tiny_model(), "int8"), rank=4).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    _real_step(flow_step(model, TINY, "cpu", grid=TINY_GRID, input_dtype=BF16, trainable=trainable))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))  # the adapters moved
