"""FP8 (e4m3) weights with block, per-channel or per-tensor scales: dequantize and quantize.

The real weight is each stored float8_e4m3fn value times its scale. Quantizing
computes fresh scales the way the producers do (DeepSeek-V3's block quantizer,
llm-compressor's FP8 schemes): scale = amax / 448 over the block, row or tensor,
rounded to the stored scale dtype, then value / scale clamped to ±448 and
rounded to the nearest e4m3 value (ties to even), all in fp32.

Decoding e4m3 is a bit shuffle (`decode`), several times faster than torch's
element-by-element conversion; every result is bit-identical to it.
"""

from __future__ import annotations

import math

import torch

from ..compute.extremes import extremes

__all__ = [
    "FP8_MAX",
    "decode",
    "dequantize_blocks",
    "quantize_blocks",
    "dequantize_scaled",
    "quantize_scaled",
    "requantize_blocks",
    "requantize_scaled",
    "block_grid",
    "block_amax",
    "scale_from_amax",
    "within_range",
    "fold",
    "DECODE_FACTOR",
]

FP8_MAX = 448.0
_FP8 = torch.float8_e4m3fn
#: `decode` gives each value times 2^-120: e4m3's exponent bias is 7, fp32's 127.
DECODE_FACTOR = 2.0**120
_SIGN_EXPONENT_MANTISSA = -0x78100000  # 0x87F00000 as int32: fp32's sign, the low 4 exponent bits, 3 mantissa bits


def block_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The scale tensor's shape for a [rows, cols] weight cut into `block` tiles (edge tiles partial)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def decode(weight: torch.Tensor, out: torch.Tensor, check: bool = True) -> bool:
    """`out` (fp32) = the e4m3 values × 2^-120, exactly; False (and `out` untouched) when `weight` holds a NaN code.

    The byte's sign, 4 exponent and 3 mantissa bits move into fp32's sign, low exponent and high mantissa bits:
    that reads the exponent with bias 127 instead of 7, and e4m3's subnormals become fp32 subnormals of the same
    scaled value. Multiplying by 2^120 (folded into the scale) is then exact. `check=False`: the caller knows
    there is no NaN code (one would decode as ±480).
    """
    codes = weight.view(torch.int8)
    if check and codes.numel() and (int(codes.max()) == 0x7F or int(codes.view(torch.uint8).max()) == 0xFF):
        return False  # NaN codes are the largest as int8 (0x7F) or as uint8 (0xFF): two passes, nothing allocated
    bits = out.view(torch.int32)
    bits.copy_(codes)  # sign-extended: shifted left 20, the sign lands in bit 31 and fills bits 27-30, cleared below
    bits.bitwise_left_shift_(20).bitwise_and_(_SIGN_EXPONENT_MANTISSA)
    return True


def fold(scale: torch.Tensor) -> torch.Tensor | None:
    """`scale`·2^120 in fp32, which makes `decode`'s values real; None where that overflows (a huge scale)."""
    folded = scale.float() * DECODE_FACTOR
    return folded if bool(torch.isfinite(folded).all()) else None


def _decoded(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, folded=None) -> torch.Tensor:
    """The values to multiply by in `out` and the factor that makes them real: `scale`·2^120 (`folded`, when the
    caller folded every scale of the weight at once), or `scale` itself."""
    folded = fold(scale) if folded is None else folded
    if folded is not None and decode(weight, out):
        return folded
    out.copy_(weight)  # a NaN code, or a scale so large that scale·2^120 overflows: torch's own conversion
    return scale.float()


def _regions(rows: int, cols: int, block: tuple[int, int]):
    """(row slice, col slice, scale row slice, scale col slice) of the full tiles and the partial edge tiles."""
    row_parts, col_parts = _split(rows, block[0]), _split(cols, block[1])
    for r, gr in row_parts:
        for c, gc in col_parts:
            yield r, c, gr, gc


def _split(count: int, size: int) -> list[tuple[slice, slice]]:
    """(values, tiles) of the whole tiles along one axis, then of the partial tile (each only when not empty)."""
    full, tiles = count - count % size, count // size
    parts = [(slice(0, full), slice(0, tiles)), (slice(full, count), slice(tiles, tiles + 1))]
    return [(values, grid) for values, grid in parts if values.stop > values.start]


def _tiles(x: torch.Tensor, rows: slice, cols: slice, tiles: tuple[int, int]) -> torch.Tensor:
    """x[rows, cols] as [row tiles, tile rows, col tiles, tile cols] (a view)."""
    part = x[rows, cols]
    return part.unflatten(1, (tiles[1], -1)).unflatten(0, (tiles[0], -1))


def _scale_blocks(x: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], divide: bool, out: torch.Tensor):
    """x × (or ÷) each block's scale, into `out` (which may be x); edge tiles in their own calls, nothing expanded."""
    op = torch.div if divide else torch.mul
    # one row of tiles, as every chunk of a merge: a call for the whole tiles, one for the edge
    if x.shape[0] <= block[0]:
        for cols, tiles in _split(x.shape[1], block[1]):
            factor = scale[0, tiles, None]
            count = factor.shape[0]
            op(x[:, cols].unflatten(1, (count, -1)), factor, out=out[:, cols].unflatten(1, (count, -1)))
        return out
    for rows, cols, scale_rows, scale_cols in _regions(*x.shape, block):
        factor = scale[scale_rows, scale_cols]
        tiles = tuple(factor.shape)
        op(_tiles(x, rows, cols, tiles), factor[:, None, :, None], out=_tiles(out, rows, cols, tiles))
    return out


def dequantize_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor | None = None, folded=None
) -> torch.Tensor:
    """fp32 weight = e4m3 value × its block's scale (`weight_scale_inv`, fp32 or bf16); `folded`: `fold(scale_inv)`."""
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    return _scale_blocks(out, _decoded(weight, scale_inv, out, folded), block, divide=False, out=out)


def block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |x| per block, as max(max x, −min x): two reading passes, no |x| written (NaN wherever a block has one).

    Each pass reduces along a tile's contiguous rows first, then across the tile's rows (a quarter
    faster than one reduction over both axes; max and min are exact in any order).
    """
    amax = torch.empty(block_grid(tuple(x.shape), block), dtype=torch.float32)
    if x.shape[0] <= block[0]:  # one row of tiles (see `_scale_blocks`)
        for cols, tiles in _split(x.shape[1], block[1]):
            part = x[:, cols].unflatten(1, (tiles.stop - tiles.start, -1))
            torch.maximum(part.amax(dim=2).amax(dim=0), part.amin(dim=2).amin(dim=0).neg_(), out=amax[0, tiles])
        return amax
    for rows, cols, scale_rows, scale_cols in _regions(*x.shape, block):
        tiles = _tiles(x, rows, cols, (scale_rows.stop - scale_rows.start, scale_cols.stop - scale_cols.start))
        highest, lowest = tiles.amax(dim=3).amax(dim=1), tiles.amin(dim=3).amin(dim=1)
        torch.maximum(highest, lowest.neg_(), out=amax[scale_rows, scale_cols])
    return amax


def scale_from_amax(amax: torch.Tensor, scale_dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """amax / 448 in the stored scale dtype; an all-zero group gets scale 1 (any scale stores zeros).

    `pow2` (UE8M0 scales): amax / 448 rounded up to a power of two, so no value saturates.
    """
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    if pow2:
        mantissa, exponent = torch.frexp(scale)  # scale = m·2^e, m in [0.5, 1): the next power of two is 2^e
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))
        scale = torch.where(amax > scale * FP8_MAX, scale * 2, scale)  # amax / 448 may have rounded down onto 2^k
    return scale.to(scale_dtype)


def _to_e4m3(scaled: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    scaled.clamp_(-FP8_MAX, FP8_MAX)
    if out is None:
        return scaled.to(_FP8)
    return out.copy_(scaled)


def quantize_blocks(
    x: torch.Tensor,
    block: tuple[int, int],
    scale_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    pow2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, block scales) for an fp32 [rows, cols] weight; `out` receives the e4m3 values.

    `scratch`: an fp32 buffer of x's shape for the scaled values (else one is allocated); `pow2`: UE8M0 scales.
    """
    scratch = torch.empty(x.shape, dtype=torch.float32) if scratch is None else scratch
    scale = scale_from_amax(block_amax(x, block), scale_dtype, pow2)
    scaled = _scale_blocks(x, scale.float(), block, divide=True, out=scratch)
    return _to_e4m3(scaled, out), scale


def within_range(amax: torch.Tensor, factor: torch.Tensor, scale_dtype: torch.dtype) -> bool:
    """Whether no value / scale can round past ±448, so the values need no clamp before their conversion.

    A scale that is its group's finite amax / 448, rounded to a normal number of a dtype with at least 8
    significant bits (bf16 moves it by at most 2^-9), leaves every |value / scale| ≤ 448·(1 + 2^-8) < 464,
    the midpoint between 448 and the NaN code above it: the conversion rounds them to at most ±448. A NaN or
    Inf amax, or a scale that rounded to a subnormal or zero, keep the clamp.
    """
    return math.isfinite(float(amax.sum())) and float(factor.min()) >= torch.finfo(scale_dtype).tiny


def _store_with_residual(scaled: torch.Tensor, out: torch.Tensor, spare: torch.Tensor, bounded=False) -> torch.Tensor:
    """Round `scaled` (value / scale) into the e4m3 `out`; leave scaled − stored in `scaled` (spare: a buffer).

    `bounded`: no |value| can round past 448 (see `within_range`), so no clamp is needed.
    """
    out.copy_(scaled if bounded else torch.clamp(scaled, -FP8_MAX, FP8_MAX, out=spare))
    if decode(out, spare, check=False):  # a NaN here came from a NaN value, and leaves the residual NaN anyway
        return scaled.sub_(spare, alpha=DECODE_FACTOR)
    return scaled.sub_(spare.copy_(out))


def requantize_blocks(
    x: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype, out, scratch, spare, pow2: bool = False
) -> tuple[torch.Tensor, float]:
    """`quantize_blocks` into `out`, and ‖dequantized(out) − x‖², taken as ‖(x/s − q)·s‖² per block.

    `scratch` and `spare`: fp32 buffers of x's shape; `pow2`: UE8M0 scales.
    """
    amax = block_amax(x, block)
    scale = scale_from_amax(amax, scale_dtype, pow2)
    factor = scale.float()
    bounded = within_range(amax, factor, scale_dtype)
    residual = _store_with_residual(_scale_blocks(x, factor, block, divide=True, out=scratch), out, spare, bounded)
    error = _scale_blocks(residual, factor, block, divide=False, out=residual)
    return scale, float(torch.linalg.vector_norm(error)) ** 2


def dequantize_scaled(
    weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None, folded=None
) -> torch.Tensor:
    """fp32 weight = e4m3 value × a per-tensor ([] or [1]) or per-output-channel ([out, 1] or [out]) scale."""
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    factor = _decoded(weight, scale, out, folded)
    return out.mul_(_broadcast(factor, weight.dim()))


def _broadcast(scale: torch.Tensor, dims: int) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(-1, *([1] * (dims - 1)))


def _row_scales(x: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    rows = x.reshape(x.shape[0], -1)
    return scale_from_amax(torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()), scale_dtype)


def quantize_scaled(
    x: torch.Tensor,
    scale_shape: tuple[int, ...],
    scale_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scale of `scale_shape`): one scale for the tensor, or one per output row."""
    if math.prod(scale_shape) == 1:
        low, high = extremes(x)
        scale = scale_from_amax(torch.maximum(high, low.neg()), scale_dtype)
    else:
        scale = _row_scales(x, scale_dtype)
    scratch = torch.empty(x.shape, dtype=torch.float32) if scratch is None else scratch
    scaled = torch.div(x, _broadcast(scale.float(), x.dim()), out=scratch)
    return _to_e4m3(scaled, out), scale.reshape(scale_shape)


def requantize_scaled(
    x: torch.Tensor, scale: torch.Tensor | None, scale_dtype: torch.dtype, out, scratch, spare
) -> tuple[torch.Tensor, float]:
    """Quantize into `out` with `scale` (per tensor), or fresh per-row scales when None; ‖dequantized − x‖².

    Returns the scales (one per row when computed here) and the squared error, as `requantize_blocks`.
    """
    scale = _row_scales(x, scale_dtype) if scale is None else scale
    factor = _broadcast(scale.float(), x.dim())
    residual = _store_with_residual(torch.div(x, factor, out=scratch), out, spare)
    return scale, float(torch.linalg.vector_norm(residual.mul_(factor))) ** 2
