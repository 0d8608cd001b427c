"""The same parity on a GPU, where there is one (skipped on CPU-only machines such as CI)."""

import pytest
import torch
from model_helpers import inputs, micro_config, randomize, reference_twin, rel_err

from nucleus_image.model import NucleusConfig, NucleusTransformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(cfg, dtype):
    ours = randomize(NucleusTransformer(cfg), scale=0.1).eval()
    ref = reference_twin(ours)
    return ours.to("cuda", dtype), ref.to("cuda", dtype)


def _cuda(kw, dtype):
    return {
        k: (
            v.to("cuda", dtype)
            if torch.is_tensor(v) and v.is_floating_point()
            else v.to("cuda")
            if torch.is_tensor(v)
            else v
        )
        for k, v in kw.items()
    }


@pytest.mark.parametrize("pad", [None, (0, 3)])
def test_fp32_parity_on_gpu(pad):
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, ref = _pair(micro_config(), torch.float32)
    kw = _cuda(inputs(ours.config, pad=pad), torch.float32)
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw, return_dict=False)[0]) <= 1e-5


def test_bf16_small_preset_on_gpu_no_worse_than_reference_bf16():
    """bf16 against an fp32 oracle: our error (eager and compiled) must be no worse than the reference's own
    bf16 error, since both round the same way but take different attention kernels."""
    cfg = NucleusConfig.preset("small")
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, ref = _pair(cfg, torch.float32)
    # Timesteps exact in bf16: the reference rounds t to bf16 before its sinusoid, which alone would swamp
    # every other difference at random weights.
    kw = {**inputs(cfg, batch=2, grid=(32, 32), text_len=64), "timestep": torch.tensor([0.25, 0.75])}
    kw32, kw16 = _cuda(kw, torch.float32), _cuda(kw, torch.bfloat16)
    with torch.no_grad():
        oracle = ref(**kw32, return_dict=False)[0]
        ours.to(torch.bfloat16), ref.to(torch.bfloat16)
        ref_err = rel_err(ref(**kw16, return_dict=False)[0].float(), oracle)
        our_err = rel_err(ours(**kw16).sample.float(), oracle)
        text_kv = ours.encode_text(kw16["encoder_hidden_states"], None, kw16["img_shapes"])
        compiled = torch.compile(ours, fullgraph=True, dynamic=False)
        compiled_err = rel_err(
            compiled(**{**kw16, "encoder_hidden_states": None}, text_kv=text_kv).sample.float(), oracle
        )
    print(f"bf16 relative error vs fp32: reference {ref_err:.4f}, ours {our_err:.4f}, ours compiled {compiled_err:.4f}")
    assert our_err <= 1.5 * ref_err + 0.01
    assert compiled_err <= 1.5 * ref_err + 0.01
