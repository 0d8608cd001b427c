"""NucleusPipeline: text to image, loading diffusers pipeline folders and our own."""

from nucleus_image.pipeline.pipeline import NucleusPipeline, NucleusPipelineOutput
from nucleus_image.pipeline.presets import ASPECT_RATIOS, preset_size, preset_sizes

__all__ = ["ASPECT_RATIOS", "NucleusPipeline", "NucleusPipelineOutput", "preset_size", "preset_sizes"]
