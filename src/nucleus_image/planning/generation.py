"""Peak GPU memory of generation: transformer weights in bf16, int8 or fp8 (weight-only; one scale per output
column, and per expert for expert tensors; the layers quantization keeps in bf16, router gates, img_in and
proj_out, counted at 2 bytes, from the same list `quantize_transformer` converts), the text encoder resident or
offloaded, the autoencoder, and the activations of a batch at an image size, measured on the meta device
(`activations.py`).

Order of work in the pipeline: prompts are encoded first, then denoised. With `offload_text_encoder` the encoder
leaves the GPU after encoding, before the transformer is placed there, so the two never share it; without it
both stay resident throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import NucleusConfig
from .activations import inference_activations
from .shapes import count_params, latent_tokens

GIB = 2**30
WEIGHT_FORMATS = {"bf16": 2, "int8": 1, "fp8": 1}
SCALE_BYTES = 4  # fp32 scales


@dataclass(frozen=True)
class GenerationPlan:
    weights: str
    height: int
    width: int
    batch: int
    transformer_weights: int
    activations: int
    text_encoder: int
    vae: int
    offload_text_encoder: bool
    peak: int

    def rows(self) -> list[tuple[str, str]]:
        g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        return [
            ("transformer weights", f"{g(self.transformer_weights)} ({self.weights})"),
            ("activations", f"{g(self.activations)} (batch {self.batch}, {self.width}x{self.height})"),
            (
                "text encoder",
                f"{g(self.text_encoder)} ({'offloaded after encoding' if self.offload_text_encoder else 'resident'})",
            ),
            ("autoencoder", g(self.vae)),
            ("peak", g(self.peak)),
        ]


def transformer_weight_bytes(config: NucleusConfig, weights: str = "bf16") -> int:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {weights!r}; accepted: {', '.join(WEIGHT_FORMATS)}")
    counts = count_params(config)
    if weights == "bf16":
        return 2 * counts.total
    # Quantized weights in one byte plus their fp32 scales; kept layers, biases and norm weights stay bf16.
    return counts.quantizable + SCALE_BYTES * counts.quant_scales + 2 * (counts.total - counts.quantizable)


def plan_generation(
    config: NucleusConfig,
    *,
    weights: str = "bf16",
    height: int = 1024,
    width: int = 1024,
    batch: int = 2,
    text_encoder_bytes: int = 0,
    offload_text_encoder: bool = True,
    vae_bytes: int = 0,
    text_tokens: int = 128,
    vae_factor: int = 8,
) -> GenerationPlan:
    """Peak memory of generating `batch` images (2 = one image with classifier-free guidance) of height x width."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if text_encoder_bytes < 0 or vae_bytes < 0:
        raise ValueError(f"text_encoder_bytes and vae_bytes must be >= 0, got {text_encoder_bytes} and {vae_bytes}")
    grid = latent_tokens(config, height, width, vae_factor)
    transformer = transformer_weight_bytes(config, weights)
    activations = inference_activations(config, batch, grid, text_tokens).peak
    if weights != "bf16":
        # A quantized weight is widened to bf16 for its matmul: one tensor's bf16 copy is live at a time.
        activations += 2 * count_params(config).largest_quantizable
    denoise = transformer + activations + vae_bytes
    peak = max(text_encoder_bytes, denoise) if offload_text_encoder else text_encoder_bytes + denoise
    return GenerationPlan(
        weights=weights,
        height=height,
        width=width,
        batch=batch,
        transformer_weights=transformer,
        activations=activations,
        text_encoder=text_encoder_bytes,
        vae=vae_bytes,
        offload_text_encoder=offload_text_encoder,
        peak=peak,
    )
