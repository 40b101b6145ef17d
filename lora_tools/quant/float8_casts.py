"""Float8 weights stored as plain casts (Flux / SD3 `…fp8_e4m3fn.safetensors`): merged through fp32.

A plain-cast file keeps each weight as float8 with no scale: the merge reads W in fp32, adds ΔW,
and rounds once back to the same float8 format (torch saturates at the format's largest finite
value), so the only new error is that one rounding, which the report gives per tensor.

ComfyUI's "scaled fp8" files (a `scaled_fp8` marker tensor; per layer a float8_e4m3fn `X.weight`
and an fp32 `X.scale_weight`) are not plain casts: `quant.layout` finds them and they are merged as
per-tensor FP8 (dequantised, merged in fp32, requantised with a fresh scale); `fp8_problems` refuses
a scaled weight that reaches the plain-cast path.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "FP8_DTYPES",
    "mergeable_dtype",
    "fp8_problems",
    "is_fp8",
    "rounding_error",
]


#: safetensors dtypes of plain float8 casts, merged through fp32.
FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})


def mergeable_dtype(dtype: str) -> bool:
    """A float8 dtype a plain-cast merge can round back into."""
    return dtype in FP8_DTYPES


def fp8_problems(name: str, target: str, base: Mapping) -> list[str]:
    """A float8 weight with a `scale_weight` sibling is a scaled file: adding ΔW to the raw values would be wrong."""
    scale = f"{target}.scale_weight"
    if scale in base:
        return [f"{name}: base {target}.weight is scaled float8 ({scale}); merge into the bf16/fp16 original instead"]
    return []


def is_fp8(tensor) -> bool:
    import torch

    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def rounding_error(stored, exact) -> float:
    """The largest |cast(W + ΔW) − (W + ΔW)|: what rounding back to float8 added."""
    return float((stored.float() - exact.float()).abs().max()) if stored.numel() else 0.0
