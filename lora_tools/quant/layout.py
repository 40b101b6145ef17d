"""Which stored tensors make up each quantized weight, found from config.json and tensor names (pure).

A quantized weight is one logical tensor to the planner: its fp32 shape in the
layout the model computes with, under the name adapters target. After planning,
each logical task becomes the stored tensors again (same names, shapes, dtypes),
or, with `--dtype`, one plain tensor with its scales (and input scales) dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import CorruptFileError
from ..io.safetensors_header import TensorInfo
from .refuse import refuse_unsupported

__all__ = [
    "QuantizedWeight",
    "QuantLayout",
    "detect",
    "planning_view",
    "COMFY_MARKER",
    "comfy_scaled_fp8",
]

_DEFAULT_BLOCK = (128, 128)


@dataclass(frozen=True)
class QuantizedWeight:
    """One logical weight stored as `data` (e4m3 values or MXFP4 blocks) and `scale`.

    `scheme` is "fp8-block", "fp8-channel", "fp8-tensor" or "mxfp4"; `drop` names
    tensors that only the quantized model reads (activation scales).
    """

    name: str
    scheme: str
    data: TensorInfo
    scale: TensorInfo
    shape: tuple[int, ...]
    block: tuple[int, int] | None = None
    drop: tuple[str, ...] = ()
    pow2_scales: bool = False  # FP8 block scales kept as powers of two (`scale_fmt: ue8m0`, DeepSeek-V3.1)

    @property
    def format(self) -> str:
        """The format as the report names it, e.g. 'fp8 block 128×128, F32 scales'."""
        if self.scheme == "fp8-block":
            kind = f"{self.scale.dtype} UE8M0" if self.pow2_scales else self.scale.dtype
            return f"fp8 block {self.block[0]}×{self.block[1]}, {kind} scales"
        if self.scheme == "mxfp4":
            return "mxfp4"
        return f"{self.scheme.replace('-', ' per-')}, {self.scale.dtype} scales"

    @property
    def stored(self) -> tuple[str, str]:
        return self.data.name, self.scale.name


#: the empty tensor ComfyUI writes into scaled-fp8 files; its dtype is the weights' float8 format.
COMFY_MARKER = "scaled_fp8"


def comfy_scaled_fp8(name: str, data, tensors: Mapping):
    """A ComfyUI scaled-fp8 weight as `quant` sees it: per-tensor fp8, `X.scale_input` and the marker dropped by --dtype."""
    module = name[: -len(".weight")]
    scale = tensors[f"{module}.scale_weight"]
    if scale.numel != 1:
        raise CorruptFileError(scale.file, f"{scale.name} has shape {list(scale.shape)}; ComfyUI scales are one number")
    drop = tuple(n for n in (f"{module}.scale_input", COMFY_MARKER) if n in tensors)
    return QuantizedWeight(name, "fp8-tensor", data, scale, tuple(data.shape), drop=drop)


@dataclass(frozen=True)
class QuantLayout:
    """A quantized checkpoint: its method (from config.json) and every quantized weight by logical name."""

    method: str
    weights: dict[str, QuantizedWeight]

    def describe(self) -> dict:
        """A summary for `inspect`: method, formats with their tensor counts, the weights' names."""
        formats: dict[str, int] = {}
        for weight in self.weights.values():
            formats[weight.format] = formats.get(weight.format, 0) + 1
        return {"method": self.method, "formats": formats, "tensors": sorted(self.weights)}


def _block_size(config: dict | None) -> tuple[int, int] | None:
    quant = (config or {}).get("quantization_config") or {}
    size = quant.get("weight_block_size")
    if size is None:
        for group in (quant.get("config_groups") or {}).values():
            size = size or ((group or {}).get("weights") or {}).get("block_structure")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return None


def _fp8_weight(name: str, data: TensorInfo, scale: TensorInfo, block, tensors, pow2: bool) -> QuantizedWeight:
    """Classify a float8 weight by its scale's shape: one value, one per output row, or a block grid."""
    shape = data.shape
    module = name[: -len(".weight")]
    drop = tuple(n for n in (f"{module}.input_scale", f"{module}.activation_scale") if n in tensors)
    if len(shape) != 2:
        raise CorruptFileError(data.file, f"{name}: a float8 weight of shape {list(shape)}; expected [out, in]")
    if scale.numel == 1:
        return QuantizedWeight(name, "fp8-tensor", data, scale, shape, drop=drop)
    if tuple(scale.shape) in ((shape[0], 1), (shape[0],)) and not scale.name.endswith("_inv"):
        return QuantizedWeight(name, "fp8-channel", data, scale, shape, drop=drop)
    block = block or _DEFAULT_BLOCK
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    if tuple(scale.shape) != grid:
        raise CorruptFileError(
            scale.file,
            f"{scale.name} is {list(scale.shape)} but {name} {list(shape)} in {block[0]}×{block[1]} blocks "
            f"needs {list(grid)} (check weight_block_size in config.json)",
        )
    return QuantizedWeight(name, "fp8-block", data, scale, shape, block, drop, pow2)


def _mxfp4_weight(stem: str, data: TensorInfo, scale: TensorInfo) -> QuantizedWeight:
    if len(data.shape) < 3 or data.shape[-1] != 16 or tuple(scale.shape) != tuple(data.shape[:-1]):
        raise CorruptFileError(
            data.file,
            f"{data.name} {list(data.shape)} and {scale.name} {list(scale.shape)} are not MXFP4 blocks "
            "[…, rows, columns/32, 16] with scales [..., rows, columns/32]",
        )
    *experts, rows, groups, _ = data.shape  # the model's parameter is [E, columns, rows] (see mxfp4)
    return QuantizedWeight(stem, "mxfp4", data, scale, (*experts, groups * 32, rows))


def detect(path, tensors: Mapping[str, TensorInfo], config: dict | None) -> QuantLayout | None:
    """The quantized weights of a checkpoint, or None for a plain one.

    Raises:
        UnsupportedError: packed integer formats (bitsandbytes, GPTQ, AWQ, HQQ, …), named.
        CorruptFileError: a scale whose shape does not fit its weight.
    """
    refuse_unsupported(path, config, tensors)
    block = _block_size(config)
    pow2 = str(((config or {}).get("quantization_config") or {}).get("scale_fmt", "")).lower() == "ue8m0"
    weights: dict[str, QuantizedWeight] = {}
    for name, info in tensors.items():
        if info.dtype == "F8_E4M3" and name.endswith(".weight"):
            scale = tensors.get(f"{name}_scale_inv") or tensors.get(f"{name}_scale")
            if scale is not None:
                weights[name] = _fp8_weight(name, info, scale, block, tensors, pow2)
            elif f"{name[: -len('weight')]}scale_weight" in tensors:  # ComfyUI "scaled fp8" (see lora_tools.fp8)
                weights[name] = comfy_scaled_fp8(name, info, tensors)
        elif info.dtype == "U8" and name.endswith("_blocks") and f"{name[: -len('_blocks')]}_scales" in tensors:
            stem = name[: -len("_blocks")]
            weights[stem] = _mxfp4_weight(stem, info, tensors[f"{stem}_scales"])
    if not weights:
        return None
    quant = (config or {}).get("quantization_config") or {}
    method = str(quant.get("quant_method") or next(iter(weights.values())).scheme)
    return QuantLayout(method, weights)


def planning_view(tensors: Mapping[str, TensorInfo], layout: QuantLayout | None) -> Mapping[str, TensorInfo]:
    """The tensors as the planner should see them: each quantized weight one fp32 tensor, scales hidden."""
    if layout is None:
        return tensors
    data = {w.data.name: w for w in layout.weights.values()}
    scales = {w.scale.name for w in layout.weights.values()}
    view: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name in data:
            weight = data[name]
            view[weight.name] = TensorInfo(weight.name, "F32", weight.shape, info.file)
        elif name not in scales:
            view[name] = info
    return view
