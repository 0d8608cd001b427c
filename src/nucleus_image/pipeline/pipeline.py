"""NucleusPipeline: text to image with the Nucleus MoE transformer.

Same keywords and same numbers as diffusers' `NucleusMoEImagePipeline`, and faster: classifier-free guidance
runs the conditional and unconditional rows in one batched forward, every distinct prompt is encoded once per
call, and the transformer's per-block text keys/values are computed once per call instead of on every step.

    pipe = NucleusPipeline.from_pretrained("path/to/pipeline")        # a diffusers folder or one we trained
    image = pipe("a red cube left of a blue sphere", aspect_ratio="16:9", generator=torch.Generator().manual_seed(0)).images[0]

On a GPU, `cuda_graph=True` replays each denoising step as one CUDA graph (cuda_graph.py) and `fp8_compute=True`
runs the experts' and attention projections' matmuls in fp8 on GPUs with fp8 tensor cores
(quantization/fp8_compute.py); both refuse devices that cannot run them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from numbers import Real

import numpy as np
import torch
from PIL import Image

from nucleus_image.diffusion.flow import FlowSchedule, validate_sigmas
from nucleus_image.diffusion.guidance import uses_cfg
from nucleus_image.diffusion.sampler_settings import SamplerSettings
from nucleus_image.encoders.autoencoder import Autoencoder
from nucleus_image.encoders.text import TextEncoder, check_prompts
from nucleus_image.kernels.runtime import check_can_run
from nucleus_image.model.latents import pack_latents, unpack_latents
from nucleus_image.pipeline.cuda_graph import StepGraphs, check_cuda_graph
from nucleus_image.pipeline.denoise import denoise_step
from nucleus_image.pipeline.folder import DIFFUSERS_SAMPLE_LATENTS, load_components, save_components
from nucleus_image.pipeline.presets import preset_size, resolve_size
from nucleus_image.pipeline.step_cache import resolve_cache
from nucleus_image.progress import progress as progress_bar
from nucleus_image.quantization.fp8_compute import check_fp8_compute, enable_fp8_compute, uses_fp8_compute

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class NucleusPipelineOutput:
    """`images`: PIL images, a (B, H, W, 3) float array in [0, 1], a (B, 3, H, W) tensor in [0, 1], or packed
    latents (B, tokens, channels) for output_type "latent", like diffusers' pipeline output. `step_cache`: with a
    step cache, per image its config and how many steps ran in full (see `step_cache.py`)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    step_cache: list[dict] | None = None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pad_text(states_BLD: torch.Tensor, mask_BL: torch.Tensor | None, length: int):
    """Right-pad text states with zeros (masked out) to `length` tokens; an absent mask means all valid."""
    B, L, _ = states_BLD.shape
    if mask_BL is None:
        mask_BL = torch.ones(B, L, dtype=torch.bool, device=states_BLD.device)
    if L < length:
        states_BLD = torch.nn.functional.pad(states_BLD, (0, 0, 0, length - L))
        mask_BL = torch.nn.functional.pad(mask_BL, (0, length - L), value=False)
    return states_BLD, mask_BL.bool()


class NucleusPipeline:
    def __init__(
        self,
        transformer,
        vae: Autoencoder,
        text_encoder: TextEncoder | None = None,
        schedule: FlowSchedule | None = None,
        sample_size: int | None = None,
        *,
        cuda_graph: bool = False,
        fp8_compute: bool = False,
    ):
        cfg = transformer.config
        if vae.latent_channels != cfg.in_channels // cfg.patch_size**2 or vae.latent_channels != cfg.out_channels:
            raise ValueError(
                f"autoencoder has {vae.latent_channels} latent channels but the transformer takes "
                f"in_channels={cfg.in_channels} (= channels x {cfg.patch_size}^2) and returns "
                f"out_channels={cfg.out_channels}"
            )
        if text_encoder is not None and text_encoder.dim != cfg.joint_attention_dim:
            raise ValueError(
                f"text encoder states are {text_encoder.dim} wide but the transformer's "
                f"joint_attention_dim is {cfg.joint_attention_dim}"
            )
        self.transformer = transformer
        self.lora = None  # the peft model of an adapter attached by load_lora
        # Steps, noise levels and guidance a call uses when it names none: the release's, or a loaded adapter's.
        self.sampler_defaults = SamplerSettings()
        self.vae = vae
        self.text_encoder = text_encoder
        self.schedule = schedule or FlowSchedule()
        self.sample_size = sample_size or DIFFUSERS_SAMPLE_LATENTS * vae.scale_factor
        if self.sample_size % self.granularity:
            raise ValueError(
                f"sample_size {self.sample_size} is not a multiple of the pixel granularity {self.granularity}"
            )
        self._graphs = StepGraphs()
        if cuda_graph:
            check_cuda_graph(self.device)
        self.cuda_graph = cuda_graph
        if fp8_compute:
            self.enable_fp8_compute()

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path,
        dtype: torch.dtype | None = None,
        device=None,
        load_text_encoder: bool = True,
        quantize: str | None = None,
        cuda_graph: bool = False,
        fp8_compute: bool = False,
        kernels: str = "eager",
    ) -> NucleusPipeline:
        """Load a diffusers NucleusMoEImagePipeline folder or one saved by `save_pretrained` (our training), from a
        local folder or a Hugging Face Hub model id ("owner/name[@revision]", through huggingface_hub's cache).

        Defaults: the GPU when there is one, in bfloat16; otherwise the CPU in float32. `quantize` ("int8" |
        "fp8") gives the transformer 8-bit weights, quantized tensor by tensor while loading; a folder saved
        quantized loads quantized, in the dtype it was saved in. `cuda_graph` and `fp8_compute`: see the class;
        a device that cannot run them is refused before anything loads. `kernels`: "eager" (PyTorch ops) or
        "triton" (the fused kernels of nucleus_image.kernels: CUDA, or the CPU under TRITON_INTERPRET=1)."""
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        check_can_run(kernels, device)
        if cuda_graph:
            check_cuda_graph(device)
        if fp8_compute:
            check_fp8_compute(device)
            if quantize is not None:
                raise ValueError(
                    f"fp8_compute computes with fp8 copies of high-precision weights; quantize="
                    f"{quantize!r} stores 8-bit weights computed in high precision: choose one"
                )
        components = load_components(path, dtype, device, load_text_encoder, quantize=quantize)
        components["transformer"].set_kernels(kernels)
        return cls(
            **components,
            cuda_graph=cuda_graph,
            fp8_compute=fp8_compute,
        )

    def save_pretrained(self, path) -> None:
        if self.fp8_compute:
            raise ValueError(
                "this pipeline computes in fp8 (fp8_compute): its transformer holds fp8 copies made "
                "for computing, not a checkpoint; save the pipeline before enabling fp8 compute"
            )
        save_components(path, self.transformer, self.vae, self.text_encoder, self.schedule, self.sample_size)

    @property
    def fp8_compute(self) -> bool:
        """Whether the transformer's experts and attention projections compute in fp8 (enable_fp8_compute)."""
        return uses_fp8_compute(self.transformer)

    def enable_fp8_compute(self) -> NucleusPipeline:
        """Swap the routed experts and the image-side attention projections for fp8-matmul versions, in place
        (quantization/fp8_compute.py). Needs a GPU with fp8 tensor cores; not with 8-bit weights or a LoRA adapter."""
        check_fp8_compute(self.device)
        if self.lora is not None:
            raise ValueError("fp8 compute converts plain weights; a LoRA adapter is loaded: merge_lora() first")
        if not self.fp8_compute:
            enable_fp8_compute(self.transformer)
            self._graphs.clear()
        return self

    def load_lora(self, path, scale: float = 1.0) -> NucleusPipeline:
        """Attach a LoRA adapter (peft's format, as `nucleus finetune` and `nucleus distill` write it) to the
        transformer, its update multiplied by `scale`. An adapter that carries sampler settings (a few-step
        student: steps, sigmas, guidance) makes them this pipeline's defaults; arguments a call passes still win."""
        from nucleus_image.adapters import load_lora, read_sampler_settings

        if self.lora is not None:
            raise ValueError("a LoRA adapter is already loaded; merge_lora() it first or load a fresh pipeline")
        if self.fp8_compute:
            raise ValueError(
                "a LoRA adapter cannot attach to fp8-compute layers: load it (and merge_lora()) before "
                "enabling fp8 compute"
            )
        settings = read_sampler_settings(path)
        self.lora = load_lora(self.transformer, path, scale)
        if settings is not None:
            self.sampler_defaults = settings
        self._graphs.clear()
        return self

    def merge_lora(self) -> NucleusPipeline:
        """Fold the loaded adapter into the transformer's weights, so generation costs what the base model does."""
        if self.lora is None:
            raise ValueError("no LoRA adapter is loaded: call load_lora(path) first")
        if self.transformer.quantization is not None:
            raise ValueError(
                f"cannot merge a LoRA adapter into {self.transformer.quantization} weights; load the "
                f"pipeline without quantize=, merge, then quantize"
            )
        self.transformer = self.lora.merge_and_unload()
        self.lora = None
        self._graphs.clear()
        return self

    def to(self, device=None, dtype: torch.dtype | None = None) -> NucleusPipeline:
        for module in (self.transformer, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        self._graphs.clear()
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def granularity(self) -> int:
        """Image sides must be multiples of this: autoencoder factor x transformer patch (16 px when released)."""
        return self.vae.scale_factor * self.transformer.config.patch_size

    def aspect_size(self, aspect_ratio: str) -> tuple[int, int]:
        """(width, height) of an aspect preset at this model's native resolution."""
        return preset_size(aspect_ratio, self.sample_size, self.granularity)

    def offload_text_encoder(self) -> None:
        """Move the text encoder to the CPU and release its accelerator memory for the denoising loop."""
        if self.text_encoder is not None and self.text_encoder.device.type != "cpu":
            self.text_encoder.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ---- input checks: everything is refused before any model work ---------------------------------------
    def resolve_size(self, height, width, aspect_ratio) -> tuple[int, int]:
        """(height, width) in pixels from explicit sizes or an aspect preset; the native size by default."""
        return resolve_size(height, width, aspect_ratio, self.sample_size, self.granularity)

    def _check_embeds(self, name: str, embeds, mask, batch: int | None) -> None:
        dim = self.transformer.config.joint_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != dim:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name} must be a (batch, tokens, {dim}) tensor, got {shape}")
        if batch is not None and embeds.shape[0] != batch:
            raise ValueError(f"{name} has batch {embeds.shape[0]}; expected {batch} (one row per prompt)")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}_mask has shape {shape}; expected {tuple(embeds.shape[:2])} to match {name}")

    def _check_inputs(
        self,
        prompt,
        negative_prompt,
        guidance_scale,
        num_inference_steps,
        sigmas,
        num_images_per_prompt,
        generator,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        output_type,
    ) -> tuple[list[str] | None, list[str] | None, int]:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not supported; accepted: {', '.join(OUTPUT_TYPES)}")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, Real)
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if sigmas is None and (
            isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if (
            isinstance(num_images_per_prompt, bool)
            or not isinstance(num_images_per_prompt, int)
            or num_images_per_prompt < 1
        ):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")

        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None:
            prompts = check_prompts([prompt] if isinstance(prompt, str) else prompt, "prompt")
            batch = len(prompts)
        else:
            prompts = None
            self._check_embeds("prompt_embeds", prompt_embeds, prompt_embeds_mask, None)
            batch = prompt_embeds.shape[0]

        negatives = None
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt is not None:
            # A single negative string applies to every prompt (the reference pipeline crashes on this).
            negatives = (
                [negative_prompt] * batch
                if isinstance(negative_prompt, str)
                else check_prompts(negative_prompt, "negative_prompt")
            )
            if len(negatives) != batch:
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries for {batch} prompts; pass one string "
                    f"or one per prompt"
                )
        if negative_prompt_embeds is not None:
            self._check_embeds("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask, batch)
        elif negative_prompt_embeds_mask is not None:
            raise ValueError("negative_prompt_embeds_mask was given without negative_prompt_embeds")
        guiding = uses_cfg(float(guidance_scale))
        if guiding and negative_prompt_embeds is None and negatives is None:
            negatives = [""] * batch  # the released default: guide away from the empty prompt
        needs_text = prompts is not None or (guiding and negative_prompt_embeds is None)
        if needs_text and self.text_encoder is None:
            raise ValueError(
                "this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds when "
                "guidance_scale > 1) instead of text prompts"
            )

        total = batch * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"got {len(generator)} generators for {total} images ({batch} prompts x "
                f"{num_images_per_prompt}); pass one generator or one per image"
            )
        return prompts, negatives, batch

    # ---- the pieces of a call ----------------------------------------------------------------------------
    def _text_states(
        self,
        prompts,
        negatives,
        prompt_embeds,
        prompt_embeds_mask,
        negative_prompt_embeds,
        negative_prompt_embeds_mask,
        cfg: bool,
        n: int,
        offload: bool,
    ):
        """(rows, L, D) states and (rows, L) mask (None when nothing is padding): conditional rows first,
        each prompt repeated n times; then the unconditional rows when guiding."""
        texts = (prompts or []) + (negatives if cfg and negatives is not None else [])
        encoded = None
        if texts:
            encoder = self.text_encoder
            assert encoder is not None  # _check_inputs refuses text to a pipeline without a text encoder
            if offload:
                encoder.to(self.device)  # encode where the transformer runs, then hand the memory back
            encoded = encoder.encode(texts)
            if offload:
                self.offload_text_encoder()

        def rows(encoded_rows, embeds, mask):
            if embeds is not None:
                return embeds, mask
            assert encoded is not None  # every row without given embeddings had its text encoded above
            states, text_mask = encoded
            return states[encoded_rows], (text_mask[encoded_rows] if text_mask is not None else None)

        num_pos = len(prompts) if prompts else 0
        parts = [rows(slice(0, num_pos), prompt_embeds, prompt_embeds_mask)]
        if cfg:
            parts.append(rows(slice(num_pos, None), negative_prompt_embeds, negative_prompt_embeds_mask))
        device, dtype = self.device, self.transformer.dtype
        length = max(states.shape[1] for states, _ in parts)
        padded = [
            _pad_text(states.to(device), None if mask is None else mask.to(device), length) for states, mask in parts
        ]
        states_RLD = torch.cat([s.repeat_interleave(n, dim=0) for s, _ in padded]).to(dtype)
        mask_RL = torch.cat([m.repeat_interleave(n, dim=0) for _, m in padded])
        return states_RLD, (None if bool(mask_RL.all()) else mask_RL)

    def _initial_latents(self, latents, generator, total: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """Packed float32 noise (total, tokens, channels*p*p); drawn like diffusers' randn_tensor so a CPU
        generator gives the same noise on any device."""
        cfg = self.transformer.config
        channels = cfg.in_channels // cfg.patch_size**2
        tokens, width = (grid_h // cfg.patch_size) * (grid_w // cfg.patch_size), cfg.in_channels
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (total, tokens, width):
                shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(
                    f"latents have shape {shape}; expected packed ({total}, {tokens}, {width}) for "
                    f"{total} images at this size"
                )
            return latents.to(self.device, torch.float32)
        shape = (1, channels, grid_h, grid_w)
        if isinstance(generator, list):
            noise = [torch.randn(shape, generator=g, device=g.device) for g in generator]
            noise_BCHW = torch.cat([x.to(self.device) for x in noise])
        else:
            rand_device = generator.device if generator is not None else self.device
            noise_BCHW = torch.randn((total, *shape[1:]), generator=generator, device=rand_device).to(self.device)
        return pack_latents(noise_BCHW, cfg.patch_size)

    def decode(self, latents_BSC: torch.Tensor, height: int, width: int, output_type: str = "pil"):
        """Packed latents -> images in the requested output type."""
        grid_h, grid_w = height // self.vae.scale_factor, width // self.vae.scale_factor
        latents_BCHW = unpack_latents(latents_BSC, grid_h, grid_w, self.transformer.config.patch_size)
        images = self.vae.decode(latents_BCHW.to(self.vae.dtype))
        images = (images.float() * 0.5 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [Image.fromarray(img) for img in (array * 255).round().astype("uint8")]

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        aspect_ratio: str | None = None,
        offload_text_encoder: bool = False,
        progress: bool = True,
        cache=None,
        callback_on_step_end=None,
    ):
        """Generate images. Keywords follow diffusers' NucleusMoEImagePipeline; in addition `aspect_ratio`
        picks a preset size (1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3), `offload_text_encoder` runs the text encoder
        on the pipeline's device and moves it back to the CPU once prompts are encoded (freeing its accelerator
        memory for the denoising loop), `progress` toggles the step progress bar, and `cache` reuses work across
        steps: "fbcache", "taylorseer" or a config from `nucleus_image.pipeline.step_cache` (None: every step in full;
        not with `cuda_graph`). `guidance_scale`, `num_inference_steps` and `sigmas` left out come from
        `self.sampler_defaults`: the release's 4.0 and 50 steps, or a loaded adapter's settings.
        `callback_on_step_end(pipe, i, t, {"latents": latents})` runs after each step, as diffusers calls it; a
        returned "latents" replaces the latents.

        Unlike the reference, guidance runs conditional and unconditional rows in one forward, a single
        negative string applies to every prompt, and bad input raises ValueError before any model work."""
        guidance_scale, num_inference_steps, sigmas = self.sampler_defaults.resolve(
            guidance_scale, num_inference_steps, sigmas
        )
        prompts, negatives, batch = self._check_inputs(
            prompt,
            negative_prompt,
            guidance_scale,
            num_inference_steps,
            sigmas,
            num_images_per_prompt,
            generator,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            output_type,
        )
        height, width = self.resolve_size(height, width, aspect_ratio)
        cache = resolve_cache(cache)
        if self.cuda_graph:
            if cache is not None:
                raise ValueError(
                    f"a step cache ({cache.policy}) changes each step's work, while a CUDA graph replays "
                    f"one fixed step: pass cache=None or set cuda_graph=False"
                )
            check_cuda_graph(self.device)
        sigma_list = validate_sigmas(sigmas) if sigmas is not None else None
        cfg, n, total = uses_cfg(guidance_scale), num_images_per_prompt, batch * num_images_per_prompt
        grid_h, grid_w = height // self.vae.scale_factor, width // self.vae.scale_factor
        latents = self._initial_latents(latents, generator, total, grid_h, grid_w)
        sigma_N1 = self.schedule.sigmas(num_inference_steps, latents.shape[1], sigma_list).to(self.device)

        states_RLD, mask_RL = self._text_states(
            prompts,
            negatives,
            prompt_embeds,
            prompt_embeds_mask,
            negative_prompt_embeds,
            negative_prompt_embeds_mask,
            cfg,
            n,
            offload_text_encoder,
        )
        patch = self.transformer.config.patch_size
        rows = states_RLD.shape[0]
        img_shapes = [(1, grid_h // patch, grid_w // patch)] * rows
        text_kv = self.transformer.encode_text(states_RLD, mask_RL, img_shapes)

        # The released pipeline hands the transformer t = (1000 * sigma) / 1000 in float32; doing the same keeps
        # our numbers bitwise comparable with it.
        steps = self.schedule.num_train_timesteps
        t_N = (sigma_N1[:-1] * steps / steps).to(self.transformer.dtype)
        step_cache = None if cache is None else cache.build(len(t_N), rows, self.transformer.config.num_layers)
        if self.cuda_graph:
            step = self._graphs.step(self.transformer, text_kv, img_shapes, guidance_scale, latents)
        else:
            step = partial(
                denoise_step, self.transformer, text_kv=text_kv, img_shapes=img_shapes, guidance_scale=guidance_scale
            )
        for i in progress_bar(range(len(t_N)), desc="denoising", disable=not progress, leave=False):
            seam = {} if step_cache is None else {"block_stack": step_cache.block_stack(i)}
            latents = step(latents, t_N[i].expand(rows), sigma_N1[i], sigma_N1[i + 1], **seam)
            if callback_on_step_end is not None:
                latents = (callback_on_step_end(self, i, t_N[i], {"latents": latents}) or {}).get("latents", latents)
        if self.cuda_graph:
            latents = latents.clone()  # the graph's output buffer: its next replay would overwrite these

        images = latents if output_type == "latent" else self.decode(latents, height, width, output_type)
        reports = None if step_cache is None else step_cache.image_reports(total)
        return NucleusPipelineOutput(images=images, step_cache=reports) if return_dict else (images,)
