"""Quantized weights read as their fp32 values: a chunk of rows at a time, or a whole checkpoint's view.

`dequantize` decodes one weight from its stored tensors (FP8 with block, channel or
tensor scales; MXFP4); `dequantized` wraps a checkpoint so that `extract` and the
statistics read its quantized weights as plain fp32 tensors under their logical names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .layout import QuantizedWeight, QuantLayout, detect, planning_view

if TYPE_CHECKING:
    import torch

    from .chunks import Chunk

__all__ = ["dequantize", "dequantize_chunk", "DequantizedCheckpoint", "dequantized"]


def dequantize_chunk(weight: QuantizedWeight, data, scale, chunk: Chunk, out: torch.Tensor, folded=None) -> None:
    """A chunk's fp32 values into `out`; `folded`: `fp8_codec.fold` of the whole scale tensor (FP8), done once."""
    from . import fp8_codec, mxfp4  # torch: only once a weight is decoded

    index = chunk.scales(weight)
    part = scale if index is None else scale[index]
    if folded is not None:
        folded = folded if index is None else folded[index]
    if weight.scheme == "fp8-block":
        fp8_codec.dequantize_blocks(chunk.of(data), part, weight.block, out=out, folded=folded)
    elif weight.scheme == "mxfp4":
        out.copy_(mxfp4.dequantize(chunk.of(data), part))
    else:
        fp8_codec.dequantize_scaled(chunk.of(data), part, out=out, folded=folded)


def dequantize(weight: QuantizedWeight, data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 logical weight (in `out`) from its stored tensors, a chunk at a time."""
    from .chunks import chunks

    for chunk in chunks(weight, whole=False):
        dequantize_chunk(weight, data, scale, chunk, chunk.of(out))
    return out


class DequantizedCheckpoint:
    """A checkpoint whose quantized weights read as their fp32 values (for `extract`), everything else as is.

    `tensors` is the planning view; `read(name)` dequantizes a quantized weight; other
    attributes are the wrapped checkpoint's.
    """

    def __init__(self, checkpoint, layout: QuantLayout) -> None:
        self._checkpoint, self.layout = checkpoint, layout
        self.tensors = planning_view(checkpoint.tensors, layout)

    def __getattr__(self, name: str):
        return getattr(self._checkpoint, name)

    def read(self, name: str):
        weight = self.layout.weights.get(name)
        if weight is None:
            return self._checkpoint.read(name)
        import torch

        data, scale = self._checkpoint.read(weight.data.name), self._checkpoint.read(weight.scale.name)
        return dequantize(weight, data, scale, torch.empty(weight.shape, dtype=torch.float32))


def dequantized(checkpoint):
    """`checkpoint`, or a `DequantizedCheckpoint` over it when it holds quantized weights (packed ones refused)."""
    layout = detect(checkpoint.path, checkpoint.tensors, checkpoint.config)
    return checkpoint if layout is None else DequantizedCheckpoint(checkpoint, layout)
