"""`qwen-image`: the released autoencoder, diffusers' `AutoencoderKLQwenImage` (16 channels, 8x).

It is a video VAE, so images travel with a frame axis of length 1; its latents are normalised per channel with
the config's latents_mean / latents_std (encode subtracts and divides, decode undoes it exactly as the released
pipeline does).
"""

from __future__ import annotations

import torch

from .autoencoder import Autoencoder


class QwenImageAutoencoder(Autoencoder):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.latent_channels = vae.config.z_dim
        self.scale_factor = 2 ** len(vae.config.temperal_downsample)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> QwenImageAutoencoder:
        from diffusers import AutoencoderKLQwenImage

        return cls(AutoencoderKLQwenImage.from_pretrained(str(path), torch_dtype=dtype).to(device))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def encode(self, images_BCHW, generator=None, sample=False):
        self.check_images(images_BCHW)
        posterior = self.vae.encode(images_BCHW.to(self.vae.dtype)[:, :, None]).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        mean, inv_std = self._stats(z)
        return ((z - mean) * inv_std)[:, :, 0]

    def decode(self, latents_BCHW):
        z = latents_BCHW.to(self.vae.dtype)[:, :, None]
        mean, inv_std = self._stats(z)
        # Same operation order as the released pipeline (divide by the inverse std), so decodes match bitwise.
        return self.vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

    def config(self) -> dict:
        return {"_class_name": "AutoencoderKLQwenImage"}

    def save_pretrained(self, path) -> None:
        self.vae.save_pretrained(str(path))
