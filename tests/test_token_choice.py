"""Token-choice routing (`router_type="token_choice"`) against loop references: which tokens each expert keeps
under its static capacity C, the renormalised gating, the layer's output, the empty-slot sentinel in every
routing consumer, the Switch-style load-balance loss; expert choice left bit-identical; and a token-choice model
trained by the real Trainer, saved and loaded back."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_helpers import inputs, micro_config, randomize
from training_helpers import micro_dataset

from nucleus_image.eval.routing import assigned_expert, jaccard_between_timesteps, load_statistics, token_sets
from nucleus_image.model import NucleusConfig, NucleusTransformer
from nucleus_image.model.moe import MoELayer, expert_capacity
from nucleus_image.training.config import TrainConfig
from nucleus_image.training.loss import FlowBatch, FlowObjective, load_balance_loss, noisy_latents
from nucleus_image.training.monitor import routing_stats

sys.path.insert(0, str(Path(__file__).parent / "process_hooks"))
import host_sync  # noqa: E402

torch.set_num_threads(1)


def layer(router_type="token_choice", top_k=2, cf=1.0, E=4, D=12, F_=8, seed=0, use_sigmoid=False, **kw):
    torch.manual_seed(seed)
    m = MoELayer(D, F_, E, cf, use_sigmoid=use_sigmoid, route_scale=2.5, router_type=router_type, top_k=top_k, **kw)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def layer_inputs(B=3, S=10, D=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in ((B, S, D), (B, S, D), (B, D)))


def scores_of(m: MoELayer, x, r, t) -> torch.Tensor:
    logits = m.gate(torch.cat([t.unsqueeze(1).expand(-1, x.shape[1], -1), r], dim=-1))
    return torch.sigmoid(logits) if m.use_sigmoid else F.softmax(logits, dim=-1)


def kept_slots_reference(scores_BSE: torch.Tensor, k: int, C: int) -> list[list[list[int]]]:
    """The GShard priority as a loop: every token's first choice in sequence order, then every second choice, ...;
    an expert keeps a pick while it has fewer than C."""
    B, S, E = scores_BSE.shape
    top = scores_BSE.topk(k, dim=-1).indices
    slots = [[[] for _ in range(E)] for _ in range(B)]
    for b in range(B):
        for rank in range(k):
            for s in range(S):
                e = int(top[b, s, rank])
                if len(slots[b][e]) < C:
                    slots[b][e].append(s)
    return slots


def padded(slots, S: int, C: int) -> torch.Tensor:
    return torch.tensor([[row + [S] * (C - len(row)) for row in per_b] for per_b in slots])


@pytest.mark.parametrize("cf,top_k", [(0.5, 2), (1.0, 2), (2.0, 2), (3.0, 3), (1.0, 1), (4.0, 4)])
def test_each_expert_keeps_its_first_c_picks_in_priority_order(cf, top_k):
    m = layer(cf=cf, top_k=top_k)
    x, r, t = layer_inputs()
    _, routing = m(x, r, t)
    S, E = 10, 4
    C = expert_capacity(cf, S, E)
    want = padded(kept_slots_reference(scores_of(m, x, r, t), top_k, C), S, C)
    assert routing.indices_BEC.shape == (3, E, C)
    assert torch.equal(routing.indices_BEC, want)
    # No token twice in one expert's slots; every kept token chose that expert.
    top = scores_of(m, x, r, t).topk(top_k, dim=-1).indices
    for b in range(3):
        for e in range(E):
            kept = [int(s) for s in routing.indices_BEC[b, e] if s < S]
            assert len(kept) == len(set(kept))
            assert all(e in top[b, s].tolist() for s in kept)


def test_shapes_are_static_whatever_the_routing():
    """Every expert computes on exactly B*C rows, also when all tokens want the same expert (most picks dropped,
    most slots empty) or the picks spread evenly."""
    B, S, D, E = 2, 12, 12, 4
    C = expert_capacity(1.0, S, E)
    x, r, t = layer_inputs(B, S, D)
    for skew in (0.0, 50.0):
        m = layer(cf=1.0)
        with torch.no_grad():
            m.gate.weight[0] += skew  # a huge logit for expert 0 on every token with positive features
        rows = []
        m.experts.register_forward_hook(lambda mod, args, out, rows=rows: rows.append(args[0].shape))
        out, routing = m(x, r, t)
        assert rows == [(E, B * C, D)] and out.shape == (B, S, D) and routing.indices_BEC.shape == (B, E, C)
    assert (routing.indices_BEC == S).any()  # the skewed router left slots empty


def moe_reference(m: MoELayer, x, r, t, slots) -> torch.Tensor:
    """The layer's output as a loop: each token sums route_scale * score_e / (sum of its kept picks' scores) *
    expert_e(token) over the experts that kept it, plus the shared expert."""
    scores = scores_of(m, x, r, t)
    B, S, _ = x.shape
    out = m.shared_expert(x).clone()
    for b in range(B):
        kept = {s: [e for e, row in enumerate(slots[b]) if s in row] for s in range(S)}
        for s, experts in kept.items():
            total = sum(scores[b, s, e] for e in experts)
            for e in experts:
                xe = x[b, s] @ m.experts.gate_up_proj[e]
                gate, up = xe.chunk(2)
                y = (F.silu(gate) * up) @ m.experts.down_proj[e]
                out[b, s] += m.route_scale * scores[b, s, e] / (total + 1e-12) * y
    return out


@pytest.mark.parametrize("use_sigmoid", [False, True])
def test_gating_is_renormalised_over_the_kept_picks(use_sigmoid):
    m = layer(cf=1.0, top_k=2, use_sigmoid=use_sigmoid)
    x, r, t = layer_inputs()
    out, routing = m(x, r, t)
    C = routing.indices_BEC.shape[-1]
    slots = kept_slots_reference(scores_of(m, x, r, t), 2, C)
    kept_per_token = [sum(s in row for row in per_b) for per_b in slots for s in range(x.shape[1])]
    assert any(len(row) < C for per_b in slots for row in per_b)  # empty slots
    assert min(kept_per_token) < 2  # and dropped picks: both happen here
    # The layer weights in float32 whatever its dtype, so float32 rounding is the tolerance.
    torch.testing.assert_close(out, moe_reference(m, x, r, t, slots), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_gate_and_the_experts():
    m = layer(cf=1.0, top_k=2)
    x, r, t = layer_inputs()
    x.requires_grad_()
    out, _ = m(x, r, t)
    out.pow(2).sum().backward()
    for p in (m.gate.weight, m.experts.gate_up_proj, m.experts.down_proj, x):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expert_choice_is_unchanged(dtype):
    """The default layer is expert choice, bit for bit the algorithm the released model runs (written out here)."""
    default = layer(router_type="expert_choice", cf=2.0).to(dtype)
    implicit = MoELayer(12, 8, 4, 2.0, use_sigmoid=False, route_scale=2.5).to(dtype)
    implicit.load_state_dict(default.state_dict())
    x, r, t = layer_inputs(dtype=dtype)
    got, got_routing = implicit(x, r, t)
    B, S, D = x.shape
    E, C = 4, expert_capacity(2.0, S, 4)
    logits = default.gate(torch.cat([t.unsqueeze(1).expand(-1, S, -1), r], dim=-1))
    scores = F.softmax(logits.float(), dim=-1).to(logits.dtype)
    gating_BEC, idx_BEC = torch.topk(scores.transpose(1, 2), k=C, dim=-1)
    flat_idx = (idx_BEC + torch.arange(B).view(B, 1, 1) * S).transpose(0, 1).reshape(-1)
    gating = gating_BEC.transpose(0, 1).reshape(-1)
    token_sums = torch.zeros(B * S, dtype=gating.dtype).scatter_add_(0, flat_idx, gating)
    gating = gating / (token_sums.index_select(0, flat_idx) + 1e-12) * 2.5
    routed = default.experts(x.reshape(B * S, D).index_select(0, flat_idx).view(E, B * C, D)).reshape(-1, D)
    routed = (routed.float() * gating.unsqueeze(-1)).to(dtype)
    want = default.shared_expert(x).reshape(B * S, D).scatter_add(0, flat_idx.unsqueeze(-1).expand(-1, D), routed)
    assert torch.equal(got_routing.indices_BEC, idx_BEC) and torch.equal(got_routing.logits_BSE, logits)
    assert torch.equal(got, want.view(B, S, D))


def test_config_option_validation_and_serialisation():
    with pytest.raises(ValueError, match="unknown router_type 'switch'; accepted: expert_choice, token_choice"):
        micro_config(router_type="switch")
    with pytest.raises(ValueError, match="router_top_k=5 must be >= 1 and, with token choice, <= num_experts=4"):
        micro_config(router_type="token_choice", router_top_k=5)
    with pytest.raises(ValueError, match="router_top_k=0"):
        micro_config(router_top_k=0)
    with pytest.raises(ValueError, match="unknown router_type 'x'"):
        MoELayer(8, 8, 4, 1.0, False, 1.0, router_type="x")
    # A released-style config is written as before (no keys diffusers does not know) and reads back as expert choice.
    released = NucleusConfig.preset("released").to_dict()
    assert not {"router_type", "router_top_k", "router_input", "kernels"} & set(released)
    assert NucleusConfig.from_dict(released).router_type == "expert_choice"
    tc = micro_config(router_type="token_choice", router_top_k=3)
    assert tc.to_dict()["router_type"] == "token_choice" and tc.to_dict()["router_top_k"] == 3
    assert NucleusConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc
    # The --set keys.
    cfg = TrainConfig.preset("tiny").override(
        ["model.router_type=token_choice", "model.router_top_k=1", "load_balance_weight=0.01"]
    )
    assert (cfg.model.router_type, cfg.model.router_top_k, cfg.load_balance_weight) == ("token_choice", 1, 0.01)
    with pytest.raises(ValueError, match="load_balance_weight must be >= 0, got -1"):
        TrainConfig.preset("tiny").override(["load_balance_weight=-1"])
    assert TrainConfig().load_balance_weight == 0.0


def test_empty_slots_are_skipped_by_every_routing_statistic():
    """The sentinel S marks nothing: the training monitor's counts and the routing analysis equal those of the
    same picks with the empty slots left out."""
    S = 6
    idx_BEC = torch.tensor([[[0, 1, S], [0, S, S], [2, 3, 4]]])  # expert 1 kept one token, expert 0 two
    logits = torch.randn(1, S, 3)
    stats = routing_stats((logits,), (idx_BEC,), S)[0]
    counts = torch.tensor([2, 1, 1, 1, 1, 0], dtype=torch.float32)  # picks per token
    assert stats[-2] == pytest.approx(float((counts == 0).float().mean()))
    assert stats[-1] == pytest.approx(float(counts.mean()))
    idx = idx_BEC.numpy()[None]  # (T=1, N=1, E, C)
    lg = logits.numpy()[None]
    st = load_statistics(lg, idx)[0]
    assert st["no_expert_share"] == pytest.approx(1 / 6) and st["max_experts_per_token"] == 2
    assert st["experts_per_token"] == pytest.approx(1.0)
    assert token_sets(idx, 0, 0, S) == [[0, 1], [0], [2, 3, 4]]
    a = assigned_expert(lg, idx)[0, 0]
    assert a[5] == 3 and a[1] == 0 and a[2] == 2  # nobody picked token 5: "E"
    two = np.concatenate([idx, idx])
    matrix, chance = jaccard_between_timesteps(two, S)
    assert matrix[0, 1] == 1.0
    m = 2.0  # the mean kept set size
    assert chance == pytest.approx((m * m / S) / (2 * m - m * m / S))


def test_load_balance_loss_against_a_hand_computation():
    # Layer 1: two tokens over three experts with softmax probabilities [.5 .3 .2] and [.6 .1 .3].
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]]])
    layer1 = probs.log()
    # top-1: both pick expert 0: f = [1, 0, 0], P = [.55, .2, .25] -> 3 * .55
    assert load_balance_loss((layer1,), 1).item() == pytest.approx(1.65)
    # top-2: picks {0, 1} and {0, 2}: f = [2/4, 1/4, 1/4] -> 3 * (.5 * .55 + .25 * .2 + .25 * .25)
    assert load_balance_loss((layer1,), 2).item() == pytest.approx(1.1625)
    # Layer 2 is uniform (loss 1 whatever the picks); layers are averaged.
    assert load_balance_loss((layer1, torch.zeros(1, 2, 3)), 2).item() == pytest.approx((1.1625 + 1.0) / 2)
    # Only P carries the gradient: it lowers the overloaded expert's logit.
    logits = layer1.clone().requires_grad_()
    load_balance_loss((logits,), 1).backward()
    assert (logits.grad[..., 0] > 0).all()


def test_load_balance_term_is_added_to_the_training_loss():
    cfg = micro_config(router_type="token_choice")
    model = randomize(NucleusTransformer(cfg))
    kw = inputs(cfg, batch=2, grid=(4, 6))
    g = torch.Generator().manual_seed(3)
    batch = FlowBatch(
        x0_BSC=torch.randn(kw["hidden_states"].shape, generator=g),
        noise_BSC=kw["hidden_states"],
        sigma_B=kw["timestep"],
        text_BLD=kw["encoder_hidden_states"],
        text_mask_BL=None,
        grid=(8, 12),
    )
    plain, logged = FlowObjective(cfg.patch_size)(model, batch)
    assert "load_balance" not in logged
    weighted, logged = FlowObjective(cfg.patch_size, load_balance_weight=0.25, load_balance_top_k=2)(model, batch)
    assert weighted.item() == pytest.approx(plain.item() + 0.25 * logged["load_balance"].item(), rel=1e-6)
    noisy = noisy_latents(batch.x0_BSC, batch.noise_BSC, batch.sigma_B)
    out = model(**{**kw, "hidden_states": noisy}, return_routing=True)
    assert logged["load_balance"].item() == pytest.approx(load_balance_loss(out.router_logits, 2).item(), rel=1e-6)


def test_fused_kernels_equal_eager_with_token_choice():
    pytest.importorskip("triton")
    pytest.importorskip("nucleus_image.kernels.expert_dispatch")
    eager = layer(cf=1.0, top_k=2)
    fused = layer(cf=1.0, top_k=2, kernels="triton")
    fused.load_state_dict(eager.state_dict())
    x, r, t = layer_inputs()
    x.requires_grad_()
    (want, want_routing), (got, got_routing) = eager(x, r, t), fused(x, r, t)
    assert torch.equal(got_routing.indices_BEC, want_routing.indices_BEC)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cot = torch.randn(want.shape)
    for a, b in zip(
        torch.autograd.grad(got, [x, *fused.parameters()], cot),
        torch.autograd.grad(want, [x, *eager.parameters()], cot),
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_token_choice_trains_saves_and_loads_back(tmp_path, monkeypatch):
    """The tiny preset with the --set keys of the token-choice arm trains a few steps with the load-balance loss,
    reading nothing back outside logging steps; its checkpoint names the router and loads into the same outputs."""
    from nucleus_image.training.checkpoint import list_checkpoints, load_model_state
    from nucleus_image.training.trainer import Trainer

    data = micro_dataset(tmp_path / "data")
    sets = [
        "model.router_type=token_choice",
        "model.router_top_k=2",
        "load_balance_weight=0.01",
        "stages.0.steps=2",
        "stages.1.steps=1",
        "stages.0.batch_size=4",
        "stages.1.batch_size=4",
        "optimizer.warmup_steps=1",
        "checkpoint_every=3",
        "log_every=3",
        "sample_every=0",
        "sample_steps=2",
        "cpu_threads=1",
        "alignment_weight=0",
    ]
    cfg = TrainConfig.preset("tiny").override(sets)
    host_sync.install(monkeypatch.setattr)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, data, tmp_path / "run", progress=False)
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert host_sync.BLOCKED == []
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    saved = TrainConfig.from_json(tmp_path / "run" / "train_config.json")
    assert saved.model.router_type == "token_choice" and saved.load_balance_weight == 0.01
    step, folder = list_checkpoints(tmp_path / "run")[-1]
    assert step == 3
    model_cfg = NucleusConfig.from_json(folder / "config.json")
    assert (model_cfg.router_type, model_cfg.router_top_k) == ("token_choice", 2)
    loaded = NucleusTransformer(model_cfg)
    loaded.load_state_dict(load_model_state(folder), strict=True)
    trained = trainer.model.eval()
    kw = inputs(model_cfg, batch=2, grid=(6, 6), text_len=5)
    with torch.no_grad():
        a = trained(**kw, return_routing=True)
        b = loaded.eval()(**kw, return_routing=True)
    assert torch.equal(a.sample, b.sample)
    for ia, ib in zip(a.expert_indices, b.expert_indices):
        assert torch.equal(ia, ib)
