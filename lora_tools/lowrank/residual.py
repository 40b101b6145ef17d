"""The residual base W_res = W − s·B₀A₀ that PiSSA and OLoRA leave in place of W, computed exactly.

PiSSA (`init_lora_weights="pissa"`) takes B₀A₀ from the full SVD of W, OLoRA
(`"olora"`) from its QR factorisation; both subtract s·B₀A₀ from the base before
training, and PEFT's `PeftModel.from_pretrained` redoes that subtraction from W on
load, so the adapter means W_res + s·B·A. For PiSSA s·B₀A₀ is the rank-r truncated
SVD V_r·S_r·U_rᵀ (s cancels); for OLoRA it is s·Q_r·R_r (B₀ = Q_r, A₀ = R_r).

PEFT 0.21 (`LoraLayer.pissa_init`, `olora_init`) factorises in fp32, so its W_res
carries a few fp32 ulps of factorisation noise that change with the thread count and
the device (the same PEFT on 1 or 2 CPU threads gives different bits). Here the
factorisation and the subtraction run in fp64 and W_res is rounded once to the base
dtype: the value PEFT approximates, the same on every machine. For bf16 bases that is
nearly always PEFT's own tensor; for fp32 bases it is closer to the exact residual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["RESIDUALS", "REWRITABLE_DTYPES", "pissa_residual", "olora_residual"]

#: Base dtypes PEFT initialises PiSSA and OLoRA in (it raises a TypeError for the others).
REWRITABLE_DTYPES = ("float32", "float16", "bfloat16")


def pissa_residual(weight: torch.Tensor, rank: int, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W − V_r·S_r·U_rᵀ (PEFT: W − s·B₀A₀, B₀ = V_r·√(S_r/s), A₀ = √(S_r/s)·U_rᵀ), in W's dtype.

    `weight` is laid out as stored (in×out when `fan_in_fan_out`, as GPT-2's Conv1D); the SVD is of
    the out×in matrix, as PEFT takes it. `scale` cancels; it is taken to mirror PEFT's signature.
    """
    import torch

    del scale
    matrix = weight.to(torch.float64)
    if fan_in_fan_out:
        matrix = matrix.T
    left, values, right = torch.linalg.svd(matrix, full_matrices=False)
    residual = _round_once(matrix - (left[:, :rank] * values[:rank]) @ right[:rank], weight.dtype)
    return residual.T.contiguous() if fan_in_fan_out else residual


def olora_residual(weight: torch.Tensor, rank: int, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W − s·Q_r·R_r from the QR factorisation of W as stored (PEFT: B₀ = Q_r, A₀ = R_r), in W's dtype.

    PEFT's OLoRA factorises the weight as stored, whatever `fan_in_fan_out` says; its factors
    then do not fit a transposed layer, so callers refuse that case first.
    """
    import torch

    del fan_in_fan_out
    matrix = weight.to(torch.float64)
    q, r = torch.linalg.qr(matrix)
    return _round_once(matrix - scale * (q[:, :rank] @ r[:rank]), weight.dtype)


def _round_once(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 `values` rounded once to `dtype` (to nearest, ties to even).

    torch rounds fp64 to bf16/fp16 through fp32, which can round twice; rounding to fp32 by
    round-to-odd first (toward zero, the last bit set when inexact) makes the second rounding exact.
    """
    import torch

    near = values.to(torch.float32)
    if dtype in (torch.float32, torch.float64):
        return values.to(dtype)
    toward_zero = torch.where(near.double().abs() > values.abs(), torch.nextafter(near, torch.zeros_like(near)), near)
    inexact = (toward_zero.double() != values).to(torch.int32)
    return (toward_zero.view(torch.int32) | inexact).view(torch.float32).to(dtype)


#: init name (as `adapters.inits` spells it) → the function that recomputes its residual.
RESIDUALS = {"pissa": pissa_residual, "olora": olora_residual}
