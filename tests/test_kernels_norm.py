"""The fused LayerNorm + modulation kernels (nucleus_image.kernels.norm_modulation) against their PyTorch references,
forward and backward, in float32 and bf16, under Triton's interpreter (conftest sets TRITON_INTERPRET=1); their
custom-op registration; and the tiny model with kernels="triton" equal to "eager", forward and backward.

Errors are max |kernel - reference| / max |reference| per output and per gradient. Targets: 1e-5 in float32; 2e-2 in
bf16, where the reference rounds every intermediate to bf16 and the kernels round each output once from fp32."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from model_helpers import inputs, randomize

from nucleus_image.model import NucleusConfig, NucleusTransformer

pytest.importorskip("triton")
norm_modulation = pytest.importorskip("nucleus_image.kernels.norm_modulation")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (batch, tokens, dim, shift): D not a power of two (48, 200), S not a multiple of the backward's 16-token blocks.
SHAPES = [(1, 19, 48, False), (3, 5, 200, True), (3, 7, 48, True), (1, 3, 200, False)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def per_sample(B, D, dtype, g, spread=1.0):
    return (torch.randn(B, 1, D, generator=g) * spread).to(dtype).requires_grad_()


def compare(op, reference, args, grad_inputs, dtype):
    """Forward outputs, then the gradients of every input under one random cotangent per output."""
    out, want = op(*args), reference(*args)
    g = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=g).to(dtype) for o in want]
    got_grads = torch.autograd.grad(out, grad_inputs, cotangents)
    want_grads = torch.autograd.grad(want, grad_inputs, cotangents)
    errors = [rel_err(a, b) for a, b in zip(out, want)] + [rel_err(a, b) for a, b in zip(got_grads, want_grads)]
    for a, b in zip((*out, *got_grads), (*want, *want_grads)):
        assert a.dtype == b.dtype and a.shape == b.shape
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,S,D,shift", SHAPES)
def test_ln_modulate_matches_reference(B, S, D, shift, dtype):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + D)
    x = (torch.randn(B, S, D, generator=g) * 3 + 1).to(dtype).requires_grad_()
    scale = per_sample(B, D, dtype, g)
    shift_ = per_sample(B, D, dtype, g) if shift else None
    grad_inputs = [x, scale] + ([shift_] if shift else [])
    errors = compare(
        torch.ops.nucleus.ln_modulate,
        norm_modulation.ln_modulate_reference,
        (x, scale, shift_, 1e-6),
        grad_inputs,
        dtype,
    )
    assert max(errors) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,S,D,shift", SHAPES)
def test_gated_residual_ln_modulate_matches_reference(B, S, D, shift, dtype):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + D + 1)
    x = torch.randn(B, S, D, generator=g).to(dtype).requires_grad_()
    y = torch.randn(B, S, D, generator=g).to(dtype).requires_grad_()
    gate = per_sample(B, D, dtype, g, spread=2.0)  # some gates past the clamp at +-2: their gradient is zero
    scale = per_sample(B, D, dtype, g)
    shift_ = per_sample(B, D, dtype, g) if shift else None
    grad_inputs = [x, y, gate, scale] + ([shift_] if shift else [])
    errors = compare(
        torch.ops.nucleus.gated_residual_ln_modulate,
        norm_modulation.gated_residual_ln_modulate_reference,
        (x, y, gate, scale, shift_, 1e-6),
        grad_inputs,
        dtype,
    )
    assert max(errors) <= TOLERANCE[dtype], errors


def test_one_unused_output_still_gives_the_right_gradients():
    """The block discards ln_modulate's norm; the decoupled router reads the gated op's norm, the MLP its mod."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 48, generator=g, requires_grad=True)
    scale = per_sample(2, 48, torch.float32, g)
    got = torch.autograd.grad(torch.ops.nucleus.ln_modulate(x, scale, None, 1e-6)[0].square().sum(), [x, scale])
    want = torch.autograd.grad(norm_modulation.ln_modulate_reference(x, scale)[0].square().sum(), [x, scale])
    assert max(rel_err(a, b) for a, b in zip(got, want)) <= 1e-5


def test_shapes_that_do_not_broadcast_per_sample_are_refused():
    x = torch.randn(2, 4, 48)
    with pytest.raises(ValueError, match=r"expected \(batch, 1, dim\) = \(2, 1, 48\)"):
        torch.ops.nucleus.ln_modulate(x, torch.randn(2, 4, 48), None, 1e-6)


@pytest.mark.parametrize("shift", [False, True])
def test_custom_op_registration(shift):
    """opcheck's schema and autograd-registration tests. Its fake-tensor tests (test_faketensor,
    test_aot_dispatch_dynamic) cannot run under the interpreter: there `wrap_triton` hands back the interpreted
    kernel itself, which launches on the fake tensors' (absent) data instead of being traced."""
    g = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 3, 48, generator=g, requires_grad=True) for _ in range(2))
    gate, scale = per_sample(2, 48, torch.float32, g), per_sample(2, 48, torch.float32, g)
    shift_ = per_sample(2, 48, torch.float32, g) if shift else None
    tests = ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.nucleus.ln_modulate.default, (x, scale, shift_, 1e-6), test_utils=tests)
    torch.library.opcheck(
        torch.ops.nucleus.gated_residual_ln_modulate.default, (x, y, gate, scale, shift_, 1e-6), test_utils=tests
    )


def _model_grads(model, kw):
    out = model(**kw).sample
    grads = torch.autograd.grad(out.square().mean(), [kw["hidden_states"], *model.parameters()], allow_unused=True)
    return out, grads


def test_tiny_model_with_triton_kernels_equals_eager_forward_and_backward():
    """Forward within 1e-5 of eager. Gradients pass through every block, where float32 itself strays by a few 1e-5
    from float64 (2e-5 to 4e-5 on the worst weight here): so each gradient of the kernels' model must be within
    1e-5 of the float64 model's on top of eager float32's own error to it."""
    cfg = NucleusConfig.preset("tiny")
    eager = randomize(NucleusTransformer(cfg), seed=11)
    fused = NucleusTransformer(cfg.replace(kernels="triton"))
    fused.load_state_dict(eager.state_dict())
    exact = NucleusTransformer(cfg).double()
    exact.load_state_dict(eager.state_dict())
    kw = inputs(cfg, batch=2, grid=(3, 5), pad=(0, 2))
    kw["hidden_states"].requires_grad_()
    kw64 = dict(kw, hidden_states=kw["hidden_states"].detach().double().requires_grad_())
    kw64.update(encoder_hidden_states=kw["encoder_hidden_states"].double(), timestep=kw["timestep"].double())
    want, want_grads = _model_grads(eager, kw)
    got, got_grads = _model_grads(fused, kw)
    _, exact_grads = _model_grads(exact, kw64)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)
    names = ["hidden_states"] + [n for n, _ in eager.named_parameters()]
    for name, a, b, c in zip(names, got_grads, want_grads, exact_grads):
        assert (a is None) == (b is None) == (c is None), name
        if c is not None and c.abs().max() > 0:
            assert rel_err(a, c) <= rel_err(b, c) + 1e-5, (name, rel_err(a, c), rel_err(b, c))


def test_set_kernels_switches_a_loaded_model_and_keeps_config_json_free_of_it():
    model = NucleusTransformer(NucleusConfig.preset("tiny"))
    model.set_kernels("triton")
    assert model.config.kernels == "triton" and model.norm_out.kernels == "triton"
    assert all(blk.kernels == "triton" and blk.img_mlp.kernels == "triton" for blk in model.blocks())
    assert "kernels" not in model.config.to_dict()
    with pytest.raises(ValueError, match="kernels=.cuda. is not one of eager, triton"):
        model.set_kernels("cuda")


def test_triton_kernels_where_triton_cannot_run_are_refused_naming_the_device(tmp_path):
    """A fresh process without TRITON_INTERPRET: the CPU cannot run Triton kernels, and the model, the pipeline and
    `nucleus generate --kernels triton` say so (the last two before loading anything)."""
    script = textwrap.dedent(
        """
        import torch
        from nucleus_image.model import NucleusConfig, NucleusTransformer
        model = NucleusTransformer(NucleusConfig.preset("tiny").replace(kernels="triton"))
        x = torch.randn(1, 4, 48)
        try:
            model(hidden_states=x, img_shapes=[(1, 2, 2)], encoder_hidden_states=torch.randn(1, 3, 384), timestep=0.5)
        except ValueError as err:
            print(err)
        try:
            NucleusTransformer(NucleusConfig.preset("tiny")).set_kernels("triton")
        except ValueError as err:
            print(err)
        from nucleus_image.pipeline import NucleusPipeline
        try:  # refused on the device: the folder is never read
            NucleusPipeline.from_pretrained("no_such_pipeline", device="cpu", kernels="triton")
        except ValueError as err:
            print(err)
        from nucleus_image.cli import main
        argv = ["generate", "--model", "no_such_pipeline", "--prompt", "a cube", "--device", "cpu", "--out", OUT]
        print("exit", main(argv + ["--kernels", "triton"]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = f"OUT = {str(tmp_path / 'samples')!r}\n" + script
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *lines, exit_line = done.stdout.strip().splitlines()
    assert len(lines) == 3 and exit_line == "exit 2", done.stdout
    errors = lines + done.stderr.strip().splitlines()[-1:]
    for line in errors:
        assert "kernels='triton' cannot run on device cpu" in line and "TRITON_INTERPRET=1" in line, line
        assert "kernels='eager'" in line
    assert errors[-1].startswith("nucleus generate: error: --kernels triton: "), errors[-1]
    assert not (tmp_path / "samples").exists()
