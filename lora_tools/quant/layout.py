"""Which stored tensors make up each quantized weight, found from config.json and tensor names (pure).

A quantized weight is one logical tensor to the planner: its fp32 shape in the
layout the model computes with, under the name adapters target. After planning,
each logical task becomes the stored tensors again (same names, shapes, dtypes),
or, with `--dtype`, one plain tensor with its scales (and input scales) dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..errors import CorruptFileError
from ..fp8 import comfy_scaled_fp8
from ..io.safetensors_io import TensorInfo
from ..plan import MergePlan, TensorTask, plan_shards
from .refuse import refuse_unsupported

__all__ = [
    "QuantizedWeight",
    "QuantLayout",
    "detect",
    "planning_view",
    "adapt_plan",
    "DequantizedCheckpoint",
    "dequantized",
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


def adapt_plan(
    plan: MergePlan, layout: QuantLayout | None, output_dtype: str | None, max_shard_size: int
) -> tuple[MergePlan, dict[str, tuple[QuantizedWeight, TensorTask]]]:
    """Turn logical tasks back into stored tensors, and say which tasks the quantized path produces.

    Returns:
        The plan to write, and for each output tensor produced by dequantizing (and
        requantizing) its weight and the logical task that computes the weight. That
        task reads "F32" when the format is kept (requantized), the stored dtype with `--dtype`.
    """
    if layout is None:
        return plan, {}
    dropped = {name for w in layout.weights.values() for name in w.drop} if output_dtype else set()
    tasks: list[TensorTask] = []
    produced: dict[str, tuple[QuantizedWeight, TensorTask]] = {}
    for task in plan.tasks:
        weight = layout.weights.get(task.source)
        if task.name in dropped:
            continue
        if weight is None:
            tasks.append(task)
        elif output_dtype is not None:
            logical = replace(task, in_dtype=weight.data.dtype, out_dtype=output_dtype)
            tasks.append(logical)
            produced[logical.name] = (weight, logical)
        else:
            logical = replace(task, in_dtype="F32", out_dtype="F32")
            for info, changes in ((weight.data, True), (weight.scale, False)):
                stored = TensorTask(info.name, info.name, info.shape, info.dtype, info.dtype)
                if changes:
                    stored = replace(stored, terms=task.terms, replacements=task.replacements)
                tasks.append(stored)
                if task.changed:
                    produced[info.name] = (weight, logical)
    shards = plan_shards([task.nbytes for task in tasks], max_shard_size)
    return replace(plan, tasks=tasks, shards=shards), produced


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

        from .execute import dequantize

        data, scale = self._checkpoint.read(weight.data.name), self._checkpoint.read(weight.scale.name)
        return dequantize(weight, data, scale, torch.empty(weight.shape, dtype=torch.float32))


def dequantized(checkpoint):
    """`checkpoint`, or a `DequantizedCheckpoint` over it when it holds quantized weights (packed ones refused)."""
    layout = detect(checkpoint.path, checkpoint.tensors, checkpoint.config)
    return checkpoint if layout is None else DequantizedCheckpoint(checkpoint, layout)
