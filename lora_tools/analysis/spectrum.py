"""Spectra of low-rank and dense matrices, and the numbers read off them.

A LoRA module's ΔW = s·B·A is never formed: with B = Q_b R_b and Aᵀ = Q_a R_a, the singular
values of ΔW are those of the r×r core s·R_b·R_aᵀ, exactly. Dense matrices (LoHa, LoKr, a
checkpoint difference) use an exact SVD when small and a seeded randomized range finder,
of bounded width, when large; the report then says the spectrum is a prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Spectrum", "low_rank_spectrum", "dense_spectrum", "energy_rank"]

#: Dense matrices up to this many columns (or rows) get an exact SVD.
EXACT_LIMIT = 1024
#: Width of the randomized sketch for larger matrices: ranks above it are reported as "more than".
SKETCH_WIDTH = 256
_POWER_ITERATIONS = 2


@dataclass(frozen=True)
class Spectrum:
    """Leading singular values (descending) of a matrix and its exact squared Frobenius norm.

    `complete` is False when `values` is only a prefix (randomized sketch of a large matrix).
    """

    values: tuple[float, ...]
    energy: float
    complete: bool = True

    @property
    def frobenius(self) -> float:
        return self.energy**0.5

    @property
    def top(self) -> float:
        return self.values[0] if self.values else 0.0

    @property
    def stable_rank(self) -> float:
        """‖M‖²_F / σ₁²: how many directions carry the change, counted softly."""
        return self.energy / self.top**2 if self.top > 0 else 0.0

    def rank_for(self, fraction: float) -> int | None:
        """Smallest k whose top-k singular values keep `fraction` of the energy; None if the prefix is too short."""
        return energy_rank(self.values, self.energy, fraction, self.complete)


def energy_rank(values: Sequence[float], energy: float, fraction: float, complete: bool = True) -> int | None:
    """Smallest k with Σ_{i<k} σᵢ² ≥ fraction·energy (0 for a zero matrix; None when undecided)."""
    if energy <= 0:
        return 0
    target, kept = fraction * energy * (1 - 1e-12), 0.0
    for index, value in enumerate(values):
        kept += value * value
        if kept >= target:
            return index + 1
    return len(values) if complete else None


def low_rank_spectrum(left: torch.Tensor, right: torch.Tensor, scale: float) -> Spectrum:
    """Exact spectrum of scale·left·right (left m×r, right r×n) through QR and an r×r SVD, in fp64."""
    left = left.to(torch.float64).reshape(left.shape[0], -1)
    right = right.to(torch.float64).reshape(right.shape[0], -1)
    r_left = torch.linalg.qr(left, mode="r").R
    r_right = torch.linalg.qr(right.T, mode="r").R
    values = torch.linalg.svdvals(abs(scale) * (r_left @ r_right.T))
    return Spectrum(tuple(values.tolist()), float(values.pow(2).sum()))


def dense_spectrum(matrix: torch.Tensor, seed: int = 0) -> Spectrum:
    """Spectrum of a dense 2-D matrix: exact when small, a randomized prefix of bounded width otherwise."""
    matrix = matrix.reshape(matrix.shape[0], -1)
    work = matrix.to(torch.float64) if min(matrix.shape) <= EXACT_LIMIT else matrix.to(torch.float32)
    energy = float(work.to(torch.float64).pow(2).sum()) if work.dtype != torch.float64 else float(work.pow(2).sum())
    if min(work.shape) <= EXACT_LIMIT:
        return Spectrum(tuple(torch.linalg.svdvals(work).tolist()), energy)
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(work.shape[1], SKETCH_WIDTH, generator=generator, dtype=work.dtype)
    basis = torch.linalg.qr(work @ sketch).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(work.T @ basis).Q
        basis = torch.linalg.qr(work @ basis).Q
    values = torch.linalg.svdvals(basis.T @ work)
    return Spectrum(tuple(values.tolist()), energy, complete=False)
