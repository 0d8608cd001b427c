"""Muon: per-expert orthogonalisation of stacked (E, rows, cols) weights, parity with torch.optim.Muon on 2-D
weights, the grouped step equal to one matrix at a time, AdamW-matched update RMS, and the recipe's Muon/AdamW
split on the real model."""

import sys
from pathlib import Path

import pytest
import torch

from nucleus_image.model import NucleusConfig, NucleusTransformer
from nucleus_image.training.config import OptimizerConfig
from nucleus_image.training.muon import ExpertFactor, Muon, orthogonalize
from nucleus_image.training.optim import build_optimizers, describe_groups, split_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from muon_step import PerMatrixMuon  # noqa: E402  (the per-matrix reference, timed against in the benchmark)


def test_orthogonalize_acts_per_expert_and_keeps_singular_vectors():
    g = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[2] *= 100.0  # one expert with a much larger gradient must not shrink the others' updates
    o = orthogonalize(g, dtype=torch.float64)
    for e in range(4):
        assert torch.allclose(o[e], orthogonalize(g[e], dtype=torch.float64), atol=1e-12)
        u, s, vh = torch.linalg.svd(g[e], full_matrices=False)
        core = u.T @ o[e] @ vh.T  # diagonal iff o shares g's singular vectors (NS is a polynomial in g g^T g)
        diag = torch.diagonal(core)
        assert (core - torch.diag(diag)).abs().max() < 1e-8
        assert diag.min() > 0.6 and diag.max() < 1.25, diag  # ~orthogonal: singular values near 1
    flat = orthogonalize(g.reshape(96, 40), dtype=torch.float64).reshape(4, 24, 40)
    assert not torch.allclose(flat, o, atol=1e-3)  # treating the stack as one matrix would be a different update


def _pair(shape, seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(a.detach().clone())
    return a, b


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_matches_torch_muon_on_matrices(shape):
    ours, ref = _pair(shape)
    start = ours.detach().clone()
    opt = Muon([ours], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_dtype=torch.float32)
    ref_opt = torch.optim.Muon(
        [ref], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(shape, generator=gen)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    # torch runs the NS iteration in bf16 (~3% rounding noise per update); ours here in float32.
    moved, ref_moved = (ours - start).detach(), (ref - start).detach()
    assert (moved - ref_moved).norm() / ref_moved.norm() < 0.05
    assert torch.allclose(opt.state[ours]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"], atol=1e-6)


def test_expert_stack_equals_torch_muon_per_expert():
    E, rows, cols = 3, 16, 40
    ours, _ = _pair((E, rows, cols))
    start = ours.detach().clone()
    refs = [torch.nn.Parameter(ours.detach()[e].clone()) for e in range(E)]
    opt = Muon([ours], lr=0.01, momentum=0.95, ns_dtype=torch.float32)
    ref_opt = torch.optim.Muon(refs, lr=0.01, weight_decay=0.0, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        grad = torch.randn(E, rows, cols, generator=gen)
        grad[1] *= 50.0
        ours.grad = grad.clone()
        for e, r in enumerate(refs):
            r.grad = grad[e].clone()
        opt.step()
        ref_opt.step()
    for e in range(E):
        moved, ref_moved = (ours[e] - start[e]).detach(), (refs[e] - start[e]).detach()
        assert (moved - ref_moved).norm() / ref_moved.norm() < 0.05, e


def test_grouped_step_equals_one_matrix_at_a_time():
    """Matrices of one shape (transposed ones, experts of stacks and LoRA factors included) share one batched
    Newton-Schulz; on one thread the result is the per-matrix reference's bit for bit, whatever the batch cap."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = [(32, 64), (64, 32), (4, 32, 64), (3, 64, 32), (32, 32), (2, 32, 32), (8, 64), (64, 8), (12, 40)]
        gen = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=gen) for s in shapes]
        factors_at = {6: ExpertFactor(2, 0), 7: ExpertFactor(2, 1)}  # (2 experts x r=4, 64) and (64, r=4 x 2)
        for cap in (2**30, 3 * 32 * 64 * 4):  # everything in one call per shape; at most 3 matrices per call
            ours = [torch.nn.Parameter(t.clone()) for t in init]
            ref = [torch.nn.Parameter(t.clone()) for t in init]
            opt = Muon(
                ours,
                lr=0.02,
                weight_decay=0.1,
                ns_dtype=torch.float32,
                max_batch_bytes=cap,
                expert_factors={ours[i]: f for i, f in factors_at.items()},
            )
            reference = PerMatrixMuon(
                ref, lr=0.02, weight_decay=0.1, factors={ref[i]: f for i, f in factors_at.items()}
            )
            for _ in range(3):
                grads = [torch.randn(s, generator=gen) for s in shapes]
                for p, q, g in zip(ours, ref, grads):
                    p.grad, q.grad = g.clone(), g.clone()
                opt.step()
                reference.step()
            for p, q in zip(ours, ref):
                assert torch.equal(p, q), (tuple(p.shape), (p - q).abs().max().item())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(64, 16), (4, 32, 96)])
def test_update_rms_matches_adamw_scale(shape):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, ns_dtype=torch.float32)
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    opt.step()
    per_matrix_rms = p.detach().reshape(-1, *shape[-2:]).pow(2).mean(dim=(-2, -1)).sqrt()
    assert ((per_matrix_rms > 0.15) & (per_matrix_rms < 0.25)).all(), per_matrix_rms  # AdamW's typical ~0.2


def test_refuses_vectors():
    with pytest.raises(ValueError, match="2-D matrices or 3-D"):
        Muon([torch.nn.Parameter(torch.zeros(5))])


def test_grouping_follows_the_recipe_on_our_model_and_the_reference():
    from diffusers import NucleusMoEImageTransformer2DModel

    cfg = NucleusConfig.preset("tiny")
    model = NucleusTransformer(cfg)
    groups = split_params(model)
    where = {n: g for g, members in groups.items() for n, _ in members}
    assert set(where) == {n for n, _ in model.named_parameters()}  # every parameter, exactly once
    for name, p in model.named_parameters():
        if p.dim() < 2 or any(
            k in name for k in ("img_in", "time_text_embed", "img_mod", "norm_out", "proj_out", "img_mlp.gate.")
        ):
            assert where[name] == "adamw", name
        else:
            assert where[name] == "muon", name
            assert any(k in name for k in (".attn.", ".encoder_proj.", ".img_mlp.")), name
    expert_names = [n for n, _ in groups["muon"] if "experts" in n and "shared" not in n]
    assert expert_names and all(dict(model.named_parameters())[n].dim() == 3 for n in expert_names)
    table = describe_groups(groups)
    assert "routed experts (per expert)" in table and "router" in table and "patch embedding" in table

    # The diffusers reference uses the same key names, so the same rules split it the same way.
    ref = NucleusMoEImageTransformer2DModel(
        **{k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k != "router_input"}
    )
    ref_where = {n: g for g, members in split_params(ref).items() for n, _ in members}
    assert ref_where == where

    muon, adamw, _ = build_optimizers(model, OptimizerConfig(lr=1e-3, weight_decay=0.1), torch.float32)
    assert sum(len(g["params"]) for g in muon.param_groups) == len(groups["muon"])
    assert adamw.param_groups[1]["weight_decay"] == 0.0 and all(p.dim() < 2 for p in adamw.param_groups[1]["params"])


def test_unknown_matrix_is_refused_by_name():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mystery = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="mystery.weight"):
        split_params(Odd())
