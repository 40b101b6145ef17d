"""LoRA arithmetic on tensors: ΔW of every variant (LoHa, LoKr, Tucker, full, experts), DoRA's norms.

Shared by the merge, `inspect --stats`, `combine` and `convert`. The α/r scale is
applied by the caller, once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapters.model import LoraModule
from .tuners import is_tuner_delta, tuner_delta

__all__ = ["dora_norm", "per_output", "variant_delta", "low_rank_pair"]


def dora_norm(module: LoraModule, merged: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per channel: per output as PEFT takes it, or per input as LyCORIS' dora_scale does."""
    if module.dora_axis == "in":
        return merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(p=2, dim=1)
    if merged.dim() > 2:  # the layer kind comes from the weight: LoHa/LoKr store conv factors flattened
        return merged.reshape(merged.shape[0], -1).norm(p=2, dim=1)
    rows = merged.T if module.fan_in_fan_out else merged
    return torch.linalg.norm(rows, dim=1)


def per_output(module: LoraModule, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel factor to broadcast over the weight."""
    if module.dora_axis == "in":
        return factor.reshape(1, -1, *([1] * (like.dim() - 2)))
    if like.dim() > 2:
        return factor.reshape(-1, *([1] * (like.dim() - 1)))
    return factor.reshape(1, -1) if module.fan_in_fan_out else factor.reshape(-1, 1)


def variant_delta(module: LoraModule, factor: Callable[[str], torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Unscaled ΔW of a Tucker LoCon, LoHa or LoKr module, as LyCORIS' forward pass builds it.

    LoHa: (w1a·w1b) ⊙ (w2a·w2b), or with hada_t1/t2 each half rebuilt through its Tucker core.
    LoKr: w1 ⊗ w2, each half either stored whole or as a product (w2 possibly through lokr_t2).
    The α/r scale is applied once, by the caller (LyCORIS' merge script applies it twice for
    these variants; its forward pass, which inference uses, applies it once).
    """
    if is_tuner_delta(module):  # PEFT's other additive tuners (AdaLoRA, VeRA, FourierFT, …), scale included
        return tuner_delta(module, factor, shape)
    roles = dict(module.factors)
    if module.variant == "experts":
        from .layouts.experts import fused_delta

        return fused_delta(module, factor(roles["A"]), factor(roles["B"])).reshape(shape)
    if module.variant == "full":  # `.diff`: ΔW as stored
        return factor(roles["diff"]).reshape(shape).clone()
    if module.variant == "tucker":
        up, down, mid = factor(module.b_key), factor(module.a_key), factor(roles["mid"])
        delta = torch.einsum(
            "m n ..., i m, n j -> i j ...", mid, up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        )
    elif module.variant == "loha":
        w1a, w1b, w2a, w2b = (factor(roles[r]) for r in ("w1a", "w1b", "w2a", "w2b"))
        if "t1" in roles:
            first = torch.einsum("i j ..., j r, i p -> p r ...", factor(roles["t1"]), w1b, w1a)
            second = torch.einsum("i j ..., j r, i p -> p r ...", factor(roles["t2"]), w2b, w2a)
        else:
            first = w1a.reshape(w1a.shape[0], -1) @ w1b.reshape(w1b.shape[0], -1)
            second = w2a.reshape(w2a.shape[0], -1) @ w2b.reshape(w2b.shape[0], -1)
        delta = first * second
    elif module.variant == "lokr":
        w1 = factor(roles["k1"]) if "k1" in roles else factor(roles["k1a"]) @ factor(roles["k1b"])
        if "k2" in roles:
            w2 = factor(roles["k2"])
        elif "kt2" in roles:
            w2 = torch.einsum(
                "i j ..., i p, j r -> p r ...", factor(roles["kt2"]), factor(roles["k2a"]), factor(roles["k2b"])
            )
        else:
            w2b = factor(roles["k2b"])
            w2 = (factor(roles["k2a"]) @ w2b.reshape(w2b.shape[0], -1)).reshape(-1, *w2b.shape[1:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous())
    else:
        raise AssertionError(f"not a variant: {module.variant}")
    return delta.reshape(shape)


def low_rank_pair(module: LoraModule, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right = B·A laid out as the base weight's 2-D view (rows = its first axis)."""
    if module.kind == "conv":
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
    if module.kind == "embedding" or module.fan_in_fan_out:
        return a.T, b.T
    return b, a
