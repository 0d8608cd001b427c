"""8-bit weights for the Nucleus transformer: torchao for the linears, per-expert-column scaled stacked experts,
quantized checkpoints and quantize-while-loading. See apply.py for what stays in high precision."""

from .apply import HIGH_PRECISION, quantize_transformer
from .experts import METHODS, QuantizedSwiGLUExperts, dequantize_columns, quantize_columns

__all__ = ["HIGH_PRECISION", "METHODS", "QuantizedSwiGLUExperts", "dequantize_columns", "quantize_columns",
           "quantize_transformer"]
