"""A tensor's smallest and largest values, by whichever of torch's reductions is faster for its dtype.

On the CPU, `torch.aminmax` over fp32 or fp64 takes about 1.5× the time of `amin` and
`amax` run one after the other (43 µs against 28 µs for a 1 MiB fp32 block on one core
here), while over bf16 and fp16 it is the faster one (25 µs against 95 µs). Both give the
same values: min and max are exact, and a NaN anywhere makes both NaN.
"""

from __future__ import annotations

import torch

__all__ = ["extremes"]

_PAIRED = (torch.float32, torch.float64)


def extremes(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of a non-empty tensor, as 0-d tensors on its device."""
    if tensor.device.type == "cpu" and tensor.dtype in _PAIRED:
        return torch.amin(tensor), torch.amax(tensor)
    return torch.aminmax(tensor)
