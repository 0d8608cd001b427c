"""The autoencoder interface: images in [-1, 1] to normalised latents and back.

Latents are (B, C, H/f, W/f) with `latent_channels` = C and `scale_factor` = f; the transformer packs them
2x2 further, so a model's pixel granularity is f * patch_size (16 px for the released model).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn as nn


class Autoencoder(nn.Module):
    latent_channels: int
    scale_factor: int

    @abstractmethod
    def encode(
        self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents; `sample` draws from the posterior instead of its mode."""

    @abstractmethod
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1]."""

    @abstractmethod
    def config(self) -> dict:
        """The JSON-able description `save_pretrained` records (class name and settings)."""

    @abstractmethod
    def save_pretrained(self, path) -> None:
        """Write what `from_pretrained` needs into the folder `path`."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters(), torch.empty(0)).dtype

    def check_images(self, images_BCHW: torch.Tensor) -> None:
        if images_BCHW.ndim != 4:
            raise ValueError(f"images must be (batch, channels, height, width), got shape {tuple(images_BCHW.shape)}")
        h, w = images_BCHW.shape[-2:]
        if h % self.scale_factor or w % self.scale_factor:
            raise ValueError(f"image size {w}x{h} is not a multiple of the autoencoder's factor {self.scale_factor}")
