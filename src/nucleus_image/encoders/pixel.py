"""`pixel`: the identity autoencoder for the small synthetic domain. Images in [-1, 1] are rearranged
space-to-depth (factor f: each f x f block of RGB pixels becomes 3*f*f channels), with no learned weights, so
a tiny model trains on pixels directly and every decoded image is exactly what the sampler produced.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F

from .autoencoder import Autoencoder

CONFIG_NAME = "config.json"


class PixelAutoencoder(Autoencoder):
    def __init__(self, factor: int = 2, channels: int = 3):
        super().__init__()
        if factor < 1 or channels < 1:
            raise ValueError(f"pixel autoencoder needs factor >= 1 and channels >= 1, got {factor} and {channels}")
        self.factor = factor
        self.channels = channels
        self.scale_factor = factor
        self.latent_channels = channels * factor * factor

    def encode(self, images_BCHW, generator=None, sample=False):
        self.check_images(images_BCHW)
        if images_BCHW.shape[1] != self.channels:
            raise ValueError(f"pixel autoencoder expects {self.channels}-channel images, got {images_BCHW.shape[1]}")
        return F.pixel_unshuffle(images_BCHW, self.factor)

    def decode(self, latents_BCHW):
        if latents_BCHW.ndim != 4 or latents_BCHW.shape[1] != self.latent_channels:
            raise ValueError(
                f"pixel latents must be (batch, {self.latent_channels}, h, w), got {tuple(latents_BCHW.shape)}"
            )
        return F.pixel_shuffle(latents_BCHW, self.factor).clamp(-1, 1)

    def config(self) -> dict:
        return {"_class_name": type(self).__name__, "factor": self.factor, "channels": self.channels}

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path) -> PixelAutoencoder:
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
        return cls(factor=int(config.get("factor", 2)), channels=int(config.get("channels", 3)))
