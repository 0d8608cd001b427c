"""8-bit weights for the Nucleus transformer: torchao for the linears, per-expert-column scaled stacked experts,
quantized checkpoints and quantize-while-loading, applied from outside the model. See apply.py for what stays in
high precision.

    model = load_transformer("path/to/transformer", dtype=torch.bfloat16, quantize="int8")  # while loading
    quantize_transformer(high_precision_model, "fp8")                                       # or in place
    save_transformer(model, "path/to/int8")                                                 # reloads as saved
"""

from .apply import HIGH_PRECISION, quantize_transformer
from .checkpoint import load_transformer, save_transformer
from .experts import METHODS, QuantizedSwiGLUExperts, dequantize_columns, quantize_columns

__all__ = [
    "HIGH_PRECISION",
    "METHODS",
    "QuantizedSwiGLUExperts",
    "dequantize_columns",
    "load_transformer",
    "quantize_columns",
    "quantize_transformer",
    "save_transformer",
]
