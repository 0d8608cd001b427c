"""Nucleus-Image: a sparse mixture-of-experts diffusion transformer for text-to-image."""

__version__ = "0.1.0"
