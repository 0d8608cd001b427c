"""Nucleus-Image: a sparse mixture-of-experts diffusion transformer for text-to-image."""

from nucleus_image.library_messages import quiet_library_messages

__version__ = "0.1.0"

quiet_library_messages()
