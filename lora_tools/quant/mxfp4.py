"""MXFP4 (OCP Microscaling, E2M1 elements with an E8M0 shared exponent per 32), as gpt-oss stores experts.

Stored: `<name>_blocks` uint8 [E, R, C/32, 16], two E2M1 codes per byte (low
nibble first), and `<name>_scales` uint8 [E, R, C/32], exponents with bias 127.
Dequantized, row r of expert e holds C values; transformers then transposes the
last two axes, so the parameter the model computes with is [E, C, R] (gpt-oss:
`gate_up_proj` [E, hidden, 2·intermediate] with gate/up interleaved in the last
axis, `down_proj` [E, intermediate, hidden]). The logical tensor here is that
parameter, so ΔW is added in the layout the model uses.

Quantizing follows the OCP MX spec: shared exponent = floor(log2(amax)) − 2 (the
largest E2M1 exponent) per group of 32, elements = value / 2^exponent rounded to
the nearest E2M1 value with ties to even, clamped to ±6; an all-zero group gets
exponent byte 0; the sign bit is set for values below zero.
"""

from __future__ import annotations

import torch

__all__ = ["E2M1_VALUES", "GROUP", "dequantize", "quantize"]

#: E2M1 value of each 4-bit code (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_EMAX = 2


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [E, C, R] parameter from stored blocks [E, R, C/32, 16] and exponents [E, R, C/32]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], GROUP)
    values = table[codes.long()]
    exponents = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponents.unsqueeze(-1).float())
    return values.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).contiguous()


def _codes(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each value (|value| ≤ 6 after clamping), ties to the even code."""
    magnitude = scaled.abs()
    code = torch.zeros(scaled.shape, dtype=torch.uint8)
    for index, midpoint in enumerate(_MIDPOINTS):
        # at a tie, round towards the even code: up from an odd code (index odd), down from an even one
        above = magnitude >= midpoint if index % 2 else magnitude > midpoint
        code += above.to(torch.uint8)
    return code | ((scaled < 0).to(torch.uint8) << 3)


def quantize(parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, R, C/32, 16], scales uint8 [E, R, C/32]) for an fp32 [E, C, R] parameter."""
    rows = parameter.transpose(-1, -2)
    *lead, count, columns = rows.shape
    groups = rows.reshape(*lead, count, columns // GROUP, GROUP)
    amax = groups.abs().amax(dim=-1)
    _, exponent = torch.frexp(amax)  # amax = m·2^e with m in [0.5, 1): floor(log2 amax) = e − 1
    shared = (exponent.to(torch.int32) - 1 - _E2M1_EMAX).clamp(-127, 127)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -127))
    scaled = torch.ldexp(groups, -shared.unsqueeze(-1).float()).clamp_(-6.0, 6.0)
    codes = _codes(scaled).reshape(*lead, count, columns // GROUP, GROUP // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks.contiguous(), (shared + 127).to(torch.uint8)
