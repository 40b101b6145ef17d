"""Distances in units in the last place, for asserting how exact a result is."""

from __future__ import annotations

import torch

_INT_VIEW = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.bfloat16: (torch.int16, 0x7FFF),
             torch.float16: (torch.int16, 0x7FFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}  # fmt: skip


def _ordered(x: torch.Tensor) -> torch.Tensor:
    int_dtype, mask = _INT_VIEW[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64)
    return torch.where(bits < 0, -(bits & mask), bits)


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest ulp distance between same-dtype tensors (0 means bit-identical)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max())


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}


def ulp_at(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at each value of x (in float64)."""
    _, exponent = torch.frexp(x.double().abs().clamp_min(torch.finfo(x.dtype).tiny))
    return torch.pow(2.0, (exponent - 1 - _MANTISSA_BITS[x.dtype]).double())
