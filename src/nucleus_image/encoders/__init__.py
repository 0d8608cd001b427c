"""Text encoders (Qwen3-VL, MiniLM) and autoencoders (Qwen-Image VAE, pixel) behind two small interfaces."""

from nucleus_image.encoders.autoencoder import Autoencoder
from nucleus_image.encoders.pixel import PixelAutoencoder
from nucleus_image.encoders.text import TextEncoder

__all__ = ["Autoencoder", "PixelAutoencoder", "TextEncoder"]
