"""Quantized bases: FP8 (block, per-channel, per-tensor) and MXFP4 weights, dequantized, merged, requantized.

`detect` finds the quantized weights of a checkpoint (and refuses packed
integer formats, naming them); `planning_view` and `adapt_plan` let the pure
planner see each as one fp32 tensor; `QuantizedTensors` is the executor hook.
`fp8` and `mxfp4` hold the pure dequantize / quantize functions.
"""

from __future__ import annotations

from .layout import DequantizedCheckpoint, QuantizedWeight, QuantLayout, adapt_plan, dequantized, detect, planning_view
from .refuse import SUPPORTED_METHODS, refuse_gguf, refuse_unsupported

__all__ = [
    "QuantizedWeight",
    "QuantLayout",
    "detect",
    "planning_view",
    "adapt_plan",
    "DequantizedCheckpoint",
    "dequantized",
    "SUPPORTED_METHODS",
    "refuse_gguf",
    "refuse_unsupported",
]
