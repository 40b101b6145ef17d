"""Quantized bases: FP8 (block, per-channel, per-tensor) and MXFP4 weights, dequantized, merged, requantized.

`detect` finds the quantized weights of a checkpoint (and refuses packed
integer formats, naming them); `planning_view` and `adapt_plan` let the pure
planner see each as one fp32 tensor; `quant.execute.QuantizedTensors` is the
executor hook; `dequantized` gives `extract` a checkpoint that reads them as
fp32. `fp8` and `mxfp4` hold the pure dequantize / quantize functions.
"""

from __future__ import annotations

from . import layout, refuse
from .layout import *  # noqa: F403 (the public names are listed in layout.__all__)
from .refuse import *  # noqa: F403

__all__ = [*layout.__all__, *refuse.__all__]
