"""One output module of a combination, computed: stacked factors (cat), QR + core SVD (svd), or densely.

Errors against the exact Σ wᵢ·ΔWᵢ are measured without forming m×n products where
the factors allow it (the Gram trick), densely otherwise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..adapters.model import Adapter
from ..lowrank.rank import RankRule, choose_rank
from ..lowrank.svd import factorize
from ..ops import variant_delta
from .methods import combine_deltas
from .options import CombineOptions
from .plan import Member, ModuleGroup

if TYPE_CHECKING:
    import torch

__all__ = ["GroupResult", "GroupReader", "combine_group"]


def _low_rank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left·right‖_F without forming the product: √Σ (LᵀL) ⊙ (RRᵀ), in fp64."""
    left, right = left.double(), right.double()
    return math.sqrt(max(0.0, float(((left.T @ left) * (right @ right.T)).sum())))


def _numerical_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of `matrix` at its numerical rank (σ > σ₀·ε·max(m, n)): exact to rounding."""
    import torch

    left, values, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = float(values[0]) * torch.finfo(matrix.dtype).eps * max(matrix.shape) if values.numel() else 0.0
    rank = max(1, int((values > tolerance).sum()))
    root = values[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass
class GroupResult:
    up: torch.Tensor  # m×k
    down: torch.Tensor  # k×n
    relative_error: float
    truncation_error: float
    route: str


class GroupReader:
    """Reads the members of a group as (left, right) factor pairs or dense ΔW, scale applied."""

    def __init__(self, adapters: Sequence[Adapter], device: torch.device, compute: torch.dtype) -> None:
        self.adapters, self.device, self.compute = adapters, device, compute

    def read(self, member: Member, key: str) -> torch.Tensor:
        return self.adapters[member.adapter].read(key).to(self.device, self.compute)

    def pair(self, member: Member, rows: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, factor·s·A) as m×r, r×n fp64 matrices (the product folded in fp64, rounded never)."""
        import torch

        module = member.module
        adapter = self.adapters[member.adapter]
        up = adapter.read(module.b_key).to(self.device, torch.float64).reshape(rows, -1)
        down = adapter.read(module.a_key).to(self.device, torch.float64).reshape(up.shape[1], -1)
        return up, down * (module.scale * factor)

    def dense(self, member: Member, group: ModuleGroup) -> torch.Tensor:
        """s·ΔW as an m×n matrix: B·A (as PEFT's get_delta_weight computes it) or the variant's product."""
        import torch

        module = member.module
        rows, cols = group.matrix_shape
        if module.variant == "lora":
            up = self.read(member, module.b_key).reshape(rows, -1)
            return (up @ self.read(member, module.a_key).reshape(up.shape[1], cols)) * module.scale
        delta = variant_delta(module, lambda key: self.read(member, key), torch.Size(member.shape))
        return delta.reshape(rows, cols) * module.scale


def _cat(group: ModuleGroup, weights: Sequence[float], reader: GroupReader) -> GroupResult:
    import torch

    rows, _ = group.matrix_shape
    ups, downs = [], []
    for member in group.members:
        if member.module.variant == "lora":
            up, down = reader.pair(member, rows, weights[member.adapter])
        else:
            up, down = _numerical_factors(reader.dense(member, group).double() * weights[member.adapter])
        ups.append(up)
        downs.append(down)
    up, down = torch.cat(ups, dim=1).to(reader.compute), torch.cat(downs, dim=0).to(reader.compute)
    error = _relative_residual(ups, downs, up, down)
    route = "stacked" if all(m.module.variant == "lora" for m in group.members) else "stacked (variants by SVD)"
    return GroupResult(up, down, error, error, route)


def _relative_residual(ups, downs, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖Σ upsᵢ·downsᵢ − up·down‖ / ‖Σ upsᵢ·downsᵢ‖ through the Gram trick (no m×n product)."""
    import torch

    exact_left, exact_right = torch.cat(list(ups), dim=1), torch.cat(list(downs), dim=0)
    norm = _low_rank_norm(exact_left, exact_right)
    left = torch.cat([exact_left.double(), -up.double()], dim=1)
    right = torch.cat([exact_right.double(), down.double()], dim=0)
    return _low_rank_norm(left, right) / norm if norm else 0.0


def _svd_stacked(group: ModuleGroup, weights: Sequence[float], reader: GroupReader, rule: RankRule) -> GroupResult:
    """Best rank-k of Σ wᵢ·sᵢ·BᵢAᵢ via QR of the stacked factors and the SVD of the small core."""
    import torch

    rows, cols = group.matrix_shape
    ups, downs = [], []
    for member in group.members:
        up, down = reader.pair(member, rows, weights[member.adapter])
        ups.append(up)
        downs.append(down)
    q_up, r_up = torch.linalg.qr(torch.cat(ups, dim=1))
    q_down, r_down = torch.linalg.qr(torch.cat(downs, dim=0).T)
    core_u, values, core_vh = torch.linalg.svd(r_up @ r_down.T)
    rank = max(1, choose_rank(values.tolist(), float(values.pow(2).sum()), rule, min(rows, cols)))
    root = values[:rank].sqrt()
    up = ((q_up @ core_u[:, :rank]) * root).to(reader.compute)
    down = (root[:, None] * (core_vh[:rank] @ q_down.T)).to(reader.compute)
    error = _relative_residual(ups, downs, up, down)
    return GroupResult(up, down, error, error, "qr-svd")


def _dense(
    group: ModuleGroup, weights: Sequence[float], reader: GroupReader, options: CombineOptions, default_rank: int
) -> GroupResult:
    """Form each ΔWᵢ, combine by the method, re-factorise to the rule; errors measured densely."""
    import torch

    deltas = [reader.dense(member, group) for member in group.members]
    member_weights = [weights[m.adapter] for m in group.members]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{options.seed}:{group.name}".encode()))
    combined = combine_deltas(
        deltas, member_weights, options.method, density=options.density or 1.0,
        majority_sign=options.majority_sign, generator=generator,
    )  # fmt: skip
    exact = sum(delta.double() * weight for delta, weight in zip(deltas, member_weights, strict=True))
    del deltas
    up, down, method = factorize(combined, options.rule_for(default_rank), "auto", seed=zlib.crc32(group.name.encode()))
    if up.shape[1] == 0:  # ΔW is exactly zero: one zero component keeps the module loadable
        up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
    up, down = up.to(reader.compute), down.to(reader.compute)
    product = up.double() @ down.double()
    exact_norm, combined_norm = float(exact.norm()), float(combined.double().norm())
    error = float((exact - product).norm()) / exact_norm if exact_norm else 0.0
    truncation = float((combined.double() - product).norm()) / combined_norm if combined_norm else 0.0
    return GroupResult(up, down, error, truncation, f"dense ({method})")


def combine_group(
    group: ModuleGroup, weights: Sequence[float], reader: GroupReader, options: CombineOptions
) -> GroupResult:
    rows, cols = group.matrix_shape
    rank_in = sum(m.module.rank for m in group.members)
    default_rank = max(m.module.rank for m in group.members)
    low_rank = all(m.module.variant == "lora" for m in group.members)
    if options.method == "cat":
        return _cat(group, weights, reader)
    if options.method == "svd" and low_rank and rank_in * 2 <= min(rows, cols):
        return _svd_stacked(group, weights, reader, options.rule_for(default_rank))
    return _dense(group, weights, reader, options, default_rank)
