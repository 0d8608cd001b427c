"""NucleusTransformer is a drop-in for the diffusers transformer inside diffusers' own pipeline."""

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline
from model_helpers import micro_config, randomize, reference_twin

from nucleus_image.model import NucleusTransformer


def test_same_images_with_our_transformer_in_diffusers_pipeline(tmp_path):
    torch.manual_seed(0)
    ours = randomize(NucleusTransformer(micro_config()), scale=0.1).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 1.0],
    ).eval()
    pipe = NucleusMoEImagePipeline(
        transformer=reference_twin(ours),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=None,
        processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    kw = dict(
        prompt_embeds=torch.randn(2, 6, 24, generator=g),
        prompt_embeds_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
        negative_prompt_embeds=torch.randn(2, 6, 24, generator=g),
        negative_prompt_embeds_mask=torch.ones(2, 6, dtype=torch.long),
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=4.0,
    )
    latents = torch.randn(2, 16, 16, generator=g)
    results = []
    for transformer in (pipe.transformer, ours):
        pipe.transformer = transformer
        with torch.no_grad():
            lat = pipe(**kw, latents=latents.clone(), output_type="latent").images
            img = pipe(**kw, latents=latents.clone(), output_type="np").images
        results.append((lat, img))
    (ref_lat, ref_img), (our_lat, our_img) = results
    assert ref_lat.shape == (2, 16, 16) and ref_img.shape == (2, 16, 16, 3)
    assert ((our_lat - ref_lat).abs().max() / ref_lat.abs().max()) <= 1e-5
    assert abs(our_img - ref_img).max() <= 1e-4
