"""Quantized test checkpoints, written by quantizers that follow the format specs in fp64.

These quantizers are the tests' own, written independently of lora_tools.quant:
rounding is "nearest representable value, ties to the even code" found by
searching a table of every representable value, in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
#: every finite positive e4m3 value, in code order (codes 0x00..0x7E), decoded by torch
E4M3_TABLE = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nearest_code(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Signed ordinal of the nearest table value to each x (|x| clamped to the largest), ties to the even code."""
    magnitude = x.abs().clamp(max=float(table[-1]))
    middles = (table[:-1] + table[1:]) / 2
    index = torch.searchsorted(middles, magnitude)  # first midpoint >= |x|: ties land on the lower code
    tie = (index < len(middles)) & (middles[index.clamp(max=len(middles) - 1)] == magnitude)
    index = torch.where(tie & (index % 2 == 1), index + 1, index)
    return torch.where(x < 0, -index - 1, index)  # negative codes keep the sign even for -0


def e4m3_bytes(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn tensor of the nearest-even e4m3 values of fp64 `x` (saturating at ±448)."""
    ordinal = nearest_code(x, E4M3_TABLE)
    code = torch.where(ordinal < 0, (-ordinal - 1) | 0x80, ordinal).to(torch.uint8)
    return code.view(torch.float8_e4m3fn)


def e4m3_ordinal(q: torch.Tensor) -> torch.Tensor:
    """Signed position of stored e4m3 values in value order (neighbours differ by one quantization step)."""
    code = q.view(torch.uint8).long()
    magnitude = code & 0x7F
    return torch.where(code >= 0x80, -magnitude, magnitude)


def fp8_block_fp64(weight: torch.Tensor, block=(128, 128), scale_dtype=torch.float32, pow2=False):
    """(e4m3 weight, weight_scale_inv) as DeepSeek-V3's quantizer makes them, from an fp64 [out, in] weight.

    `pow2`: UE8M0 scales (DeepSeek-V3.1), amax/448 rounded up to a power of two."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(grid, dtype=torch.float64)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            amax = float(tile.abs().max())
            scale[i, j] = amax / E4M3_MAX if amax > 0 else 1.0
            if pow2:
                scale[i, j] = 2.0 ** math.ceil(math.log2(scale[i, j]))
    scale = scale.to(scale_dtype)
    full = scale.double().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return e4m3_bytes(weight / full), scale


def fp8_scaled_fp64(weight: torch.Tensor, per_channel: bool, scale_dtype=torch.float32):
    """(e4m3 weight, weight_scale) for compressed-tensors' FP8 per-tensor ([1]) or per-channel ([out, 1]) scheme."""
    amax = weight.abs().amax(dim=1, keepdim=True) if per_channel else weight.abs().max().reshape(1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype)
    return e4m3_bytes(weight / (scale.double() if per_channel else scale.double().reshape(()))), scale


def dequantize_fp8_fp64(q: torch.Tensor, scale: torch.Tensor, scheme: str, block=(128, 128)) -> torch.Tensor:
    rows, cols = q.shape
    scale = scale.double()
    if scheme == "fp8-block":
        scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    elif scheme == "fp8-tensor":
        scale = scale.reshape(())
    return q.double() * scale


def mxfp4_fp64(parameter: torch.Tensor):
    """(blocks, scales) per the OCP MX spec for an fp64 [E, C, R] parameter, stored as gpt-oss does."""
    rows = parameter.transpose(-1, -2)  # [E, R, C]: 32-value groups run along C
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    ordinal = nearest_code(groups / torch.pow(2.0, exponent).unsqueeze(-1), E2M1_TABLE)
    codes = torch.where(ordinal < 0, (-ordinal - 1) | 8, ordinal).to(torch.uint8)
    pairs = codes.reshape(*codes.shape[:-1], 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), (exponent + 127).to(torch.uint8)


def dequantize_mxfp4_fp64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    signed = torch.cat([E2M1_TABLE, -E2M1_TABLE])
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32).long()
    values = signed[codes] * torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
    return values.reshape(*blocks.shape[:-2], -1).transpose(-1, -2)


def _rewrite(plain: Path, folder: Path, state: dict, quantization_config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def quantize_llama(plain: Path, folder: Path, scheme: str, scale_dtype=torch.float32, block=(16, 16), pow2=False):
    """A quantized copy of a plain Llama folder (linear projections FP8), and its dequantized twin.

    Returns (quantized folder, dequantized folder): the twin holds exactly the values the
    quantized weights stand for, in fp32, as a plain checkpoint PEFT and transformers load.
    """
    state = load_file(plain / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in state.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in LINEAR:
            quantized[name] = dequantized[name] = tensor
            continue
        weight = tensor.double()
        if scheme == "fp8-block":
            q, scale = fp8_block_fp64(weight, block, scale_dtype, pow2)
            quantized[name], quantized[f"{name}_scale_inv"] = q, scale
        else:
            q, scale = fp8_scaled_fp64(weight, scheme == "fp8-channel", scale_dtype)
            quantized[name], quantized[f"{name}_scale"] = q, scale
            quantized[name.replace(".weight", ".input_scale")] = torch.tensor([0.25])
        dequantized[name] = dequantize_fp8_fp64(q, scale, scheme, block).float()
    if scheme == "fp8-block":
        config = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": list(block),
        }
        if pow2:
            config["scale_fmt"] = "ue8m0"
    else:
        strategy = "channel" if scheme == "fp8-channel" else "tensor"
        weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
        config = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": {
                "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}}},
            "ignore": ["lm_head"],
        }  # fmt: skip
    return _rewrite(plain, folder, quantized, config), _rewrite(plain, Path(f"{folder}-dequantized"), dequantized, None)


def quantize_gpt_oss(plain: Path, folder: Path):
    """An MXFP4 copy of a plain gpt-oss folder (experts' gate_up_proj and down_proj), and its dequantized twin."""
    state = load_file(plain / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4_fp64(tensor.double())
            quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
            dequantized[name] = dequantize_mxfp4_fp64(blocks, scales).float().contiguous()
        else:
            quantized[name] = dequantized[name] = tensor
    config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                   "model.embed_tokens", "lm_head"]}  # fmt: skip
    return _rewrite(plain, folder, quantized, config), _rewrite(plain, Path(f"{folder}-dequantized"), dequantized, None)
