"""FP8 (e4m3) weights with block, per-channel or per-tensor scales: dequantize and quantize.

The real weight is each stored float8_e4m3fn value times its scale. Quantizing
computes fresh scales the way the producers do (DeepSeek-V3's block quantizer,
llm-compressor's FP8 schemes): scale = amax / 448 over the block, row or tensor,
rounded to the stored scale dtype, then value / scale clamped to ±448 and
rounded to the nearest e4m3 value (ties to even), all in fp32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FP8_MAX", "dequantize_blocks", "quantize_blocks", "dequantize_scaled", "quantize_scaled", "block_grid"]

FP8_MAX = 448.0
_FP8 = torch.float8_e4m3fn


def block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale tensor's shape for a [rows, cols] weight cut into `block` tiles (edge tiles partial)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over the block, cropped at the edges."""
    rows, cols = shape
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def _tiled(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    """A [row blocks, b0, column blocks, b1] view of x when the blocks tile it exactly, else None."""
    rows, cols = x.shape
    if rows % block[0] or cols % block[1] or not x.is_contiguous():
        return None
    return x.view(rows // block[0], block[0], cols // block[1], block[1])


def _scale_blocks(
    x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], divide: bool, out: torch.Tensor
) -> torch.Tensor:
    """x × (or ÷) each block's scale, into `out` (which may be x)."""
    tiles, target = _tiled(x, block), _tiled(out, block)
    if tiles is None or target is None:
        tiles, target, factor = x, out, _expand(scale.float(), tuple(x.shape), block)
    else:
        factor = scale.float()[:, None, :, None]
    (torch.div if divide else torch.mul)(tiles, factor, out=target)
    return out


def dequantize_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 weight = e4m3 value × its block's scale (`weight_scale_inv`, fp32 or bf16)."""
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    return _scale_blocks(out.copy_(weight), scale_inv, block, divide=False, out=out)


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    tiles = _tiled(x, block)
    if tiles is not None:
        return torch.maximum(tiles.amax(dim=(1, 3)), tiles.amin(dim=(1, 3)).neg_())
    rows, cols = x.shape
    grid = block_grid((rows, cols), block)
    padded = x.abs()
    pad_rows, pad_cols = grid[0] * block[0] - rows, grid[1] * block[1] - cols
    if pad_rows or pad_cols:
        padded = torch.nn.functional.pad(padded, (0, pad_cols, 0, pad_rows))
    return padded.view(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))


def _scale_from_amax(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """amax / 448 in the stored scale dtype; an all-zero group gets scale 1 (any scale stores zeros)."""
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return scale.to(scale_dtype)


def _to_e4m3(scaled: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    scaled.clamp_(-FP8_MAX, FP8_MAX)
    if out is None:
        return scaled.to(_FP8)
    return out.copy_(scaled)


def quantize_blocks(
    x: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, block scales) for an fp32 [rows, cols] weight; `out` receives the e4m3 values."""
    scale = _scale_from_amax(_block_amax(x, block), scale_dtype)
    scaled = _scale_blocks(x, scale, block, divide=True, out=torch.empty(x.shape, dtype=torch.float32))
    return _to_e4m3(scaled, out), scale


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weight = e4m3 value × a per-tensor ([] or [1]) or per-output-channel ([out, 1] or [out]) scale."""
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    out.copy_(weight)
    return out.mul_(_broadcast(scale.float(), weight.dim()))


def _broadcast(scale: torch.Tensor, dims: int) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(-1, *([1] * (dims - 1)))


def quantize_scaled(
    x: torch.Tensor, scale_shape: tuple[int, ...], scale_dtype: torch.dtype, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scale of `scale_shape`): one scale for the tensor, or one per output row."""
    per_tensor = math.prod(scale_shape) == 1
    amax = x.abs().amax() if per_tensor else x.abs().reshape(x.shape[0], -1).amax(dim=1)
    scale = _scale_from_amax(amax, scale_dtype)
    scaled = x / _broadcast(scale.float(), x.dim())
    return _to_e4m3(scaled, out), scale.reshape(scale_shape)
