"""The combination methods on full ΔWᵢ, as PEFT's merge utilities define them (pure tensor functions).

TIES trims each ΔWᵢ by magnitude, elects a sign per element and averages the agreeing
values; DARE drops elements at random and rescales the rest; magnitude pruning trims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from .options import METHODS

if TYPE_CHECKING:
    import torch

__all__ = ["combine_deltas"]


def _magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest-magnitude elements (PEFT's `magnitude_based_pruning`)."""
    import torch

    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def _random_prune(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each element with probability 1 − density, rescale the rest by 1/density."""
    import torch

    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=delta.dtype), generator=generator)
    return delta * mask.to(delta.device) / density


def _disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES: elect a sign per element, average the weighted values that carry it."""
    import torch

    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    kept = (stacked * weights * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1).to(stacked.dtype)


def combine_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The combined ΔW of one module from the full ΔWᵢ, as PEFT's merge utilities define it.

    `cat` and `svd` give Σ wᵢ·ΔWᵢ; see the module docstring for the others. DARE's masks are
    drawn from `generator` in adapter order (the global generator when None).
    """
    import torch

    stack_weights = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)
    stack_weights = stack_weights.reshape(-1, *([1] * deltas[0].dim()))
    if method in ("cat", "svd"):
        return (torch.stack(list(deltas)) * stack_weights).sum(dim=0)
    if method in ("ties", "magnitude-prune"):
        pruned = [_magnitude_prune(delta, density) for delta in deltas]
    elif method in ("dare-linear", "dare-ties"):
        pruned = [_random_prune(delta, density, generator) for delta in deltas]
    else:
        raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    stacked = torch.stack(pruned)
    if method in ("ties", "dare-ties"):
        return _disjoint_mean(stacked, stack_weights, majority_sign)
    return (stacked * stack_weights).sum(dim=0)
