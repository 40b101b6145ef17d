"""Quantized bases lora_tools will not do arithmetic on: packed integer formats, named in the refusal.

Adding ΔW to packed integers (bitsandbytes, GPTQ, AWQ, HQQ, GGUF, …) would need
each format's exact dequantizer and quantizer, and would silently lose or
corrupt the adapter when any detail differed. So they are refused with the
method named and the way out: merge into the unquantized base, then quantize.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import UnsupportedError

__all__ = ["SUPPORTED_METHODS", "refuse_unsupported", "refuse_gguf"]

#: `quantization_config.quant_method` values whose weights lora_tools dequantizes and requantizes.
SUPPORTED_METHODS = frozenset({"fp8", "compressed-tensors", "mxfp4", "fbgemm_fp8"})

_NAMES = {
    "bitsandbytes": "bitsandbytes", "gptq": "GPTQ", "awq": "AWQ", "hqq": "HQQ", "gguf": "GGUF", "aqlm": "AQLM",
    "eetq": "EETQ", "quanto": "quanto", "exl2": "EXL2", "higgs": "HIGGS", "vptq": "VPTQ", "torchao": "torchao",
    "bitnet": "BitNet", "spqr": "SpQR", "auto-round": "AutoRound", "nvfp4": "NVFP4", "quark": "Quark",
}  # fmt: skip

#: Tensor-name suffixes that give a packed format away even without a config.
_SIGNATURES = (
    (".weight.quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit (nf4)"),
    (".weight.quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit (fp4)"),
    (".weight.absmax", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes 8-bit"),
    (".weight_format", "bitsandbytes 8-bit"),
    (".qzeros", "GPTQ/AWQ"),
    (".qweight", "GPTQ/AWQ"),
    (".g_idx", "GPTQ"),
    (".W_q", "HQQ"),
    (".weight_scale_2", "NVFP4 (ModelOpt)"),
    (".weight_global_scale", "NVFP4 (compressed-tensors)"),
)

_ADVICE = "merge into the unquantized base model, then quantize the merged model"


def _described(config: Mapping) -> str:
    method = str(config.get("quant_method", "")).lower()
    name = _NAMES.get(method, method or "an unknown method")
    if method == "bitsandbytes":
        if config.get("load_in_4bit"):
            return f"bitsandbytes 4-bit ({config.get('bnb_4bit_quant_type', 'fp4')})"
        if config.get("load_in_8bit"):
            return "bitsandbytes 8-bit"
    if method in ("gptq", "awq") and "bits" in config:
        return f"{name} {config['bits']}-bit"
    if method == "modelopt":  # NVIDIA ModelOpt names its scheme in quant_algo (NVFP4, FP8, W4A8_AWQ, …)
        algo = config.get("quant_algo") or (config.get("quantization") or {}).get("quant_algo")
        return f"ModelOpt {algo}" if algo else "ModelOpt"
    return name


def refuse_unsupported(where: Path, config: dict | None, names: Mapping[str, object]) -> None:
    """Raise `UnsupportedError` (exit 3) when the base is quantized in a format lora_tools cannot merge into.

    Args:
        where: the checkpoint, for the message.
        config: its config.json (or None).
        names: its tensor names.
    """
    quant = (config or {}).get("quantization_config")
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "")).lower()
        if method == "compressed-tensors" and str(quant.get("format", "")).startswith("nvfp4"):
            _refuse(where, f"compressed-tensors NVFP4 ({quant.get('format')})")
        if method == "compressed-tensors" and _compressed_integers(quant):
            _refuse(where, f"compressed-tensors ({quant.get('format')}, integer weights)")
        if method not in SUPPORTED_METHODS:
            _refuse(where, _described(quant))
    for name in names:
        for suffix, method in _SIGNATURES:
            if name.endswith(suffix):
                _refuse(where, f"{method} (tensor {name!r})")


def _compressed_integers(quant: dict) -> bool:
    """compressed-tensors stores int4/int8 (pack-quantized, int-quantized) as well as FP8 (float-quantized)."""
    if str(quant.get("format", "")) in ("pack-quantized", "int-quantized", "marlin-24"):
        return True
    groups = quant.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    return any(w.get("type") not in (None, "float") or w.get("num_bits") not in (None, 8) for w in weights)


def refuse_gguf(path: Path) -> None:
    """A GGUF file (or a folder holding only GGUF files) as the base is refused with the way out."""
    path = Path(path)
    if path.suffix == ".gguf" or (
        path.is_dir()
        and any(path.glob("*.gguf"))
        and not any(path.glob("*.safetensors"))
        and not any(path.glob("*.bin"))
    ):
        _refuse(path, "GGUF")


def _refuse(where: Path, method: str) -> None:
    raise UnsupportedError(
        f"{where}: the base is quantized with {method}, which loratool does not merge into "
        f"(adding ΔW to its packed values would corrupt them): {_ADVICE}"
    )
