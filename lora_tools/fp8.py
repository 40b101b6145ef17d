"""FP8 single files (Flux / SD3 `…fp8_e4m3fn.safetensors`): plain casts, and ComfyUI's "scaled fp8".

A plain-cast file keeps each weight as float8 with no scale: the merge reads W in fp32, adds ΔW,
and rounds once back to the same float8 format (torch saturates at the format's largest finite
value), so the only new error is that one rounding, which the report gives per tensor.

ComfyUI's "scaled fp8" files (a `scaled_fp8` marker tensor; per layer a float8_e4m3fn `X.weight`
and an fp32 `X.scale_weight`, optionally `X.scale_input`) compute with W = weight · scale_weight
(comfy/ops.py). They are the per-tensor case of `lora_tools.quant`: dequantised, merged in fp32,
requantised with a fresh scale amax|W'|/448 (as ComfyUI's "recalculate" does) so ΔW never
saturates, same names and dtypes, with the requantisation error in the report. `--dtype bf16`
writes a plain file without the scales, `scale_input`s or the marker.

How this relates to `lora_tools/quant/` (FP8 transformers checkpoints with block scales): both
dequantise to fp32, add ΔW, and requantise; a plain cast is the block-scale case with one block of
scale 1, so the two can share one "dequantise → add → requantise with the same scales" step once
both are merged.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "FP8_DTYPES",
    "COMFY_MARKER",
    "mergeable_dtype",
    "fp8_problems",
    "is_fp8",
    "rounding_error",
    "comfy_scaled_fp8",
]

#: the empty tensor ComfyUI writes into scaled-fp8 files; its dtype is the weights' float8 format.
COMFY_MARKER = "scaled_fp8"

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


def comfy_scaled_fp8(name: str, data, tensors: Mapping):
    """A ComfyUI scaled-fp8 weight as `quant` sees it: per-tensor fp8, `X.scale_input` and the marker dropped by --dtype."""
    from .errors import CorruptFileError
    from .quant.layout import QuantizedWeight

    module = name[: -len(".weight")]
    scale = tensors[f"{module}.scale_weight"]
    if scale.numel != 1:
        raise CorruptFileError(scale.file, f"{scale.name} has shape {list(scale.shape)}; ComfyUI scales are one number")
    drop = tuple(n for n in (f"{module}.scale_input", COMFY_MARKER) if n in tensors)
    return QuantizedWeight(name, "fp8-tensor", data, scale, tuple(data.shape), drop=drop)


def is_fp8(tensor) -> bool:
    import torch

    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def rounding_error(stored, exact) -> float:
    """The largest |cast(W + ΔW) − (W + ΔW)|: what rounding back to float8 added."""
    return float((stored.float() - exact.float()).abs().max()) if stored.numel() else 0.0
