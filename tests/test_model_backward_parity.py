"""Backward parity with diffusers' NucleusMoEImageTransformer2DModel: the gradient of every parameter and of the
inputs (image tokens and text states) under the same loss, fp32, random weights; and the forward in bf16 on CPU,
which the README states is bitwise equal to the reference in bf16."""

import pytest
import torch
from model_helpers import inputs, micro_config, randomize, reference_twin, rel_err

from nucleus_image.model import NucleusTransformer

CASES = {
    "gqa-first-dense-padded": dict(cfg={}, batch=2, grid=(4, 6), pad=(0, 3)),
    "mha-all-moe-sigmoid": dict(
        cfg=dict(
            num_key_value_heads=4, dense_moe_strategy="all_moe", use_sigmoid=True, capacity_factors=(2.0, 4.0, 1.0, 2.5)
        ),
        batch=3,
        grid=(6, 4),
        pad=None,
    ),
}


def _grads(model, kw, target):
    kw = {
        k: (v.clone().requires_grad_(True) if k in ("hidden_states", "encoder_hidden_states") else v)
        for k, v in kw.items()
    }
    out = model(**kw, return_dict=False)[0] if not isinstance(model, NucleusTransformer) else model(**kw).sample
    ((out - target) ** 2).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["input:hidden_states"] = kw["hidden_states"].grad
    grads["input:encoder_hidden_states"] = kw["encoder_hidden_states"].grad
    return grads


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_reference(case):
    spec = CASES[case]
    torch.manual_seed(0)
    ours = randomize(NucleusTransformer(micro_config(**spec["cfg"])), seed=3).train()
    ref = reference_twin(ours).train()
    kw = inputs(ours.config, batch=spec["batch"], grid=spec["grid"], pad=spec["pad"])
    target = torch.randn(
        kw["hidden_states"].shape[0],
        kw["hidden_states"].shape[1],
        ours.config.out_channels * 4,
        generator=torch.Generator().manual_seed(5),
    )
    got, want = _grads(ours, kw, target), _grads(ref, kw, target)
    assert set(got) == set(want)
    missing = sorted(k for k in want if (want[k] is None) != (got[k] is None))
    assert not missing, f"gradient present on one side only: {missing}"
    errors = {k: rel_err(got[k], want[k]) for k in want if want[k] is not None and want[k].abs().max() > 0}
    assert len(errors) >= len(list(ours.parameters())) - 2  # (almost) every parameter gets a non-zero gradient
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, (worst, errors[worst])


def test_bf16_forward_is_bitwise_equal_to_reference_bf16():
    model = randomize(NucleusTransformer(micro_config()), scale=0.1).eval()
    ref = reference_twin(model)
    kw = inputs(model.config, pad=(0, 2))
    kw16 = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        got = model.to(torch.bfloat16)(**kw16).sample
        want = ref.to(torch.bfloat16)(**kw16, return_dict=False)[0]
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want), f"max abs difference {(got.float() - want.float()).abs().max().item()}"
