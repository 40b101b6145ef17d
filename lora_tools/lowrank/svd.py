"""Truncated SVD of a dense matrix into balanced rank-r factors B·A, the rank chosen by a `RankRule`.

A randomized range finder with power iterations gives the leading singular
triplets when the largest rank the rule may pick is small against the matrix;
otherwise a full SVD. The sketch is seeded, so results are reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .rank import RankRule, choose_rank, spectrum_decided

if TYPE_CHECKING:
    import torch

__all__ = ["factorize"]

_OVERSAMPLE = 8
_POWER_ITERATIONS = 4


def _randomized_svd(matrix: torch.Tensor, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading `width` singular triplets by a seeded randomized range finder with power iterations."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(matrix.shape[1], width, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small_u, values, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_u, values, vh


def factorize(
    matrix: torch.Tensor, rule: RankRule, method: str, seed: int = 0, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Balanced rank-r factors B (m×r), A (r×n) of `matrix` (fp32/fp64) chosen by `rule`.

    `auto` uses the randomized SVD when the largest rank the rule may pick is
    small against the matrix (growing the sketch until energy / ratio criteria
    are decided), and a full SVD otherwise. Returns (B, A, method used).
    `scratch`: a reusable buffer of `matrix`'s shape and dtype (else one is allocated).
    """
    import torch

    full_rank = min(matrix.shape)
    total = float(torch.pow(matrix, 2, out=scratch).sum() if scratch is not None else matrix.pow(2).sum())
    ceiling = rule.ceiling(full_rank)
    use_full = method == "svd" or (method == "auto" and (ceiling + _OVERSAMPLE) * 4 > full_rank)
    values = vh = left = None
    if not use_full:
        width = ceiling + _OVERSAMPLE if rule.rank is not None or rule.max_rank else min(64, ceiling) + _OVERSAMPLE
        while True:
            width = min(width, full_rank)
            left, values, vh = _randomized_svd(matrix, width, seed)
            if spectrum_decided(values.tolist()[: width - _OVERSAMPLE] or values.tolist(), total, rule, full_rank):
                break
            if width >= full_rank // 2:
                if method == "randomized":
                    break
                use_full = True
                break
            width *= 2
    if use_full:
        left, values, vh = torch.linalg.svd(matrix, full_matrices=False)
        method = "svd"
    else:
        method = "randomized"
    rank = choose_rank(values.tolist(), total, rule, full_rank)
    root = values[:rank].clamp_min(0).sqrt()
    return left[:, :rank] * root, root[:, None] * vh[:rank], method
