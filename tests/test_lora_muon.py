"""Muon on LoRA adapters of routed experts: peft keeps each expert stack's factors as 2-D (r*E, out) / (in, r*E)
tensors; the optimizer split sees them as per-expert views, so every expert's factor update equals the update of
that expert trained alone, and an 8-bit base (whose factors are (E, r, out) / (E, in, r) tensors) trains the same
adapter with the same optimizer as a high-precision base holding the same weights."""

import copy

import pytest
import torch
import torch.nn as nn
from model_helpers import inputs, micro_config, randomize

from nucleus_image.adapters import add_lora
from nucleus_image.model import NucleusTransformer
from nucleus_image.model.moe import SwiGLUExperts
from nucleus_image.training.config import OptimizerConfig
from nucleus_image.training.muon import ExpertFactor, Muon
from nucleus_image.training.optim import build_optimizers, expert_factors

pytest.importorskip("peft")
torch.set_num_threads(1)
RANK = 4


def optimizers(model):
    return build_optimizers(model, OptimizerConfig(lr=2e-2, weight_decay=0.1), torch.float32)


def lora_model(seed=0):
    return add_lora(randomize(NucleusTransformer(micro_config()), seed=seed, scale=0.1), rank=RANK)


def expert_wrappers(peft_model):
    """(layer name, outer ParamWrapper) of each MoE layer: the outer wraps down_proj, its base_layer gate_up_proj."""
    from peft.tuners.lora.layer import ParamWrapper

    return [
        (n, m) for n, m in peft_model.named_modules() if isinstance(m, ParamWrapper) and m.parameter_name == "down_proj"
    ]


def test_the_split_sees_per_expert_views_of_the_expert_factors():
    model = lora_model()
    muon, _, groups = optimizers(model)
    factors = expert_factors(model)
    wrappers = expert_wrappers(model)
    assert len(factors) == 4 * len(wrappers) > 0  # lora_A and lora_B of gate_up and down, per MoE layer
    E = model.base_model.model.config.num_experts
    for _, outer in wrappers:
        for wrapper in (outer, outer.base_layer):
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            assert factors[a] == ExpertFactor(E, 0) and factors[b] == ExpertFactor(E, 1)
            va, vb = factors[a].matrices(a), factors[b].matrices(b)
            assert va.shape == (E, RANK, a.shape[1]) and vb.shape == (E, b.shape[0], RANK)
            assert va.data_ptr() == a.data_ptr() and vb.data_ptr() == b.data_ptr()  # views: no copy
            # The views are peft's own split of the factors into per-expert (rows, r) @ (r, cols) products.
            lhs, rhs, _ = wrapper.get_delta_factors("default")
            assert torch.equal(lhs, vb) and torch.equal(rhs, va)
    assert all(id(p) in muon.expert_factors for p in factors)
    assert sum(len(g["params"]) for g in muon.param_groups) == len(groups["muon"])


class _OneExpert(nn.Module):
    """One expert under the same module path as in the model, for peft's target_parameters."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.img_mlp = nn.Module()
        self.img_mlp.experts = SwiGLUExperts(gate_up.shape[1], down.shape[1], 1)
        self.img_mlp.experts.load_state_dict({"gate_up_proj": gate_up, "down_proj": down})

    def forward(self, x):
        return self.img_mlp.experts(x)


def test_each_expert_factor_update_equals_that_expert_trained_alone():
    """Three Muon steps of the full model's adapters; every expert of every MoE layer then replays its own
    tokens and output gradients alone (a one-expert peft adapter, plain 2-D factors) and must take the same
    steps. Treating the (r*E, out) factor as one matrix (the optimizer without the views) would not."""
    from peft import LoraConfig, get_peft_model

    model = lora_model()
    cfg = model.base_model.model.config
    wrappers = expert_wrappers(model)
    captured = {name: [] for name, _ in wrappers}

    def capture(name):
        def hook(module, args, out):
            record = {"x": args[0].detach().clone()}
            out.register_hook(lambda g: record.__setitem__("g", g.detach().clone()))
            captured[name].append(record)

        return hook

    for name, outer in wrappers:
        outer.register_forward_hook(capture(name))
    muon, adamw, _ = optimizers(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(3):
        for opt in (muon, adamw):
            opt.zero_grad(set_to_none=True)
        model(**inputs(cfg, seed=step)).sample.square().mean().backward()
        muon.step()
        adamw.step()

    for name, outer in wrappers:
        inner = outer.base_layer
        base = inner.base_layer
        params = {
            "gate_up": (inner.lora_A["default"].weight, inner.lora_B["default"].weight),
            "down": (outer.lora_A["default"].weight, outer.lora_B["default"].weight),
        }
        for e in range(cfg.num_experts):
            alone = get_peft_model(
                _OneExpert(base.gate_up_proj[e : e + 1].detach(), base.down_proj[e : e + 1].detach()),
                LoraConfig(
                    r=RANK,
                    lora_alpha=RANK,
                    target_parameters=["img_mlp.experts.gate_up_proj", "img_mlp.experts.down_proj"],
                ),
            )
            one = alone.base_model.model.img_mlp.experts  # outer wrapper (down_proj)
            mine = {
                "gate_up": (one.base_layer.lora_A["default"].weight, one.base_layer.lora_B["default"].weight),
                "down": (one.lora_A["default"].weight, one.lora_B["default"].weight),
            }
            with torch.no_grad():
                for key, (a, b) in params.items():
                    a0 = start[_name(model, a)]
                    b0 = start[_name(model, b)]
                    mine[key][0].copy_(ExpertFactor(cfg.num_experts, 0).matrices(a0)[e])
                    mine[key][1].copy_(ExpertFactor(cfg.num_experts, 1).matrices(b0)[e])
            solo, _, _ = optimizers(alone)
            assert not expert_factors(alone)  # one expert: plain matrices
            for record in captured[name]:
                solo.zero_grad(set_to_none=True)
                alone(record["x"][e : e + 1]).backward(record["g"][e : e + 1])
                solo.step()
            for key, (a, b) in params.items():
                where = f"{name} expert {e} {key}"
                torch.testing.assert_close(
                    mine[key][0],
                    ExpertFactor(cfg.num_experts, 0).matrices(a)[e].detach(),
                    rtol=0,
                    atol=2e-6,
                    msg=lambda m, where=where: f"{where} A: {m}",
                )
                torch.testing.assert_close(
                    mine[key][1],
                    ExpertFactor(cfg.num_experts, 1).matrices(b)[e].detach(),
                    rtol=0,
                    atol=2e-6,
                    msg=lambda m, where=where: f"{where} B: {m}",
                )
    # The same step with each factor taken as one matrix (no views) is a different update.
    factors = expert_factors(model)
    grads = {p: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(factors)}
    with_views, as_one = (_one_step(grads, views) for views in (factors, {}))
    assert max((w - o).abs().max().item() for w, o in zip(with_views, as_one)) > 1e-3


def _one_step(grads: dict, factors: dict) -> list[torch.Tensor]:
    """One Muon step from fresh state on copies of the parameters in `grads`."""
    copies = {p: nn.Parameter(p.detach().clone()) for p in grads}
    for p, c in copies.items():
        c.grad = grads[p].clone()
    Muon(
        list(copies.values()),
        lr=2e-2,
        weight_decay=0.1,
        ns_dtype=torch.float32,
        expert_factors={copies[p]: f for p, f in factors.items()},
    ).step()
    return [c.detach() for c in copies.values()]


def _name(model, param) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_8bit_base_trains_the_same_adapter_as_a_high_precision_base():
    """QLoRA on int8 weights vs LoRA on a float32 twin holding exactly the weights the int8 codes stand for: the
    8-bit experts' (E, r, out) / (E, in, r) factors are the same per-expert matrices as peft's 2-D factors (same
    names, shapes per expert, init), and three Muon + AdamW steps move them the same way."""
    from nucleus_image.quantization import dequantize_columns, quantize_transformer

    base = randomize(NucleusTransformer(micro_config()), scale=0.1)
    quantized = quantize_transformer(copy.deepcopy(base), "int8")
    twin = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if type(module).__name__ == "QuantizedSwiGLUExperts":
                target = twin.get_submodule(name)
                for w in ("gate_up_proj", "down_proj"):
                    getattr(target, w).copy_(
                        dequantize_columns(getattr(module, w), getattr(module, f"{w}_scale"), "int8", torch.float32)
                    )
            elif isinstance(module, nn.Linear) and hasattr(module.weight, "dequantize"):
                twin.get_submodule(name).weight.copy_(module.weight.dequantize())
    q_model, t_model = add_lora(quantized, rank=RANK), add_lora(twin, rank=RANK)
    E = twin.config.num_experts
    q_params = dict(q_model.named_parameters())
    pairs = []  # (8-bit factor, its float32 twin seen per expert), every trainable tensor of both
    for name, p in t_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".experts." in name:
            weight = "down_proj" if ".experts.lora_" in name else "gate_up_proj"
            kind = "lora_A" if ".lora_A." in name else "lora_B"
            layer = name.split(".experts.")[0]
            pairs.append(
                (
                    q_params[f"{layer}.experts.{kind}.default.{weight}"],
                    lambda t, p=p, k=kind: ExpertFactor(E, 0 if k == "lora_A" else 1).matrices(t),
                )
            )
        else:
            pairs.append((q_params[name], lambda t: t))
        pairs[-1] = (*pairs[-1], p)
    assert len(pairs) == sum(p.requires_grad for p in q_model.parameters())
    with torch.no_grad():
        for q, view, t in pairs:
            t.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(t.shape) + t.numel()))
            assert view(t).shape == q.shape
            q.copy_(view(t))
    runs = []
    for model in (q_model, t_model):
        muon, adamw, _ = optimizers(model)
        for step in range(3):
            for opt in (muon, adamw):
                opt.zero_grad(set_to_none=True)
            model(**inputs(twin.config, seed=step)).sample.square().mean().backward()
            muon.step()
            adamw.step()
        runs.append(muon)
    for q, view, t in pairs:
        torch.testing.assert_close(q.detach(), view(t.detach()), rtol=0, atol=2e-5)
    # Both optimizers hold one momentum per tensor, and the 8-bit expert factors are plain 3-D stacks.
    assert len(runs[0].state) == len(runs[1].state) and not expert_factors(q_model)
