"""Choosing a rank from a spectrum: fixed, by energy kept, or by singular-value ratio.

Pure functions over lists of singular values, shared by `extract`, `resize`, `combine` and `convert`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidInputError

__all__ = ["RankRule", "choose_rank", "spectrum_decided"]


@dataclass(frozen=True)
class RankRule:
    """Exactly one of `rank`, `energy`, `sv_ratio`; `max_rank` caps whichever is used."""

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [
            n
            for n, v in (("--rank", self.rank), ("--energy", self.energy), ("--sv-ratio", self.sv_ratio))
            if v is not None
        ]
        if len(given) != 1:
            raise InvalidInputError(
                f"give exactly one of --rank, --energy, --sv-ratio (got {', '.join(given) or 'none'})"
            )
        if self.rank is not None and self.rank <= 0:
            raise InvalidInputError(f"--rank must be a positive integer, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise InvalidInputError(f"--energy must be in (0, 1], got {self.energy:g}")
        if self.sv_ratio is not None and not self.sv_ratio >= 1:
            raise InvalidInputError(f"--sv-ratio must be at least 1, got {self.sv_ratio:g}")
        if self.max_rank is not None and self.max_rank <= 0:
            raise InvalidInputError(f"--max-rank must be a positive integer, got {self.max_rank}")

    def ceiling(self, full_rank: int) -> int:
        """The largest rank this rule can pick for a matrix of rank ≤ `full_rank`."""
        cap = min(full_rank, self.max_rank or full_rank)
        return min(cap, self.rank) if self.rank is not None else cap

    def words(self) -> list[str]:
        """The command-line options that give this rule (`--rank 8`, `--max-rank 16`), for model cards."""
        words = []
        for flag, value in (("--rank", self.rank), ("--energy", self.energy), ("--sv-ratio", self.sv_ratio),
                            ("--max-rank", self.max_rank)):  # fmt: skip
            if value is not None:
                words += [flag, f"{value:g}"]
        return words


def choose_rank(singular_values: Sequence[float], total_energy: float, rule: RankRule, full_rank: int) -> int:
    """The rank the rule picks, given the leading singular values (descending) and ‖Δ‖²_F.

    `singular_values` may be a prefix of the spectrum; `spectrum_decided` says
    whether the prefix was long enough.
    """
    ceiling = rule.ceiling(full_rank)
    values = [float(s) for s in singular_values]
    if not values or values[0] <= 0 or total_energy <= 0:
        return 0
    if rule.rank is not None:
        chosen = ceiling
    elif rule.energy is not None:
        target, kept, chosen = rule.energy * total_energy, 0.0, len(values)
        for index, value in enumerate(values):
            kept += value * value
            if kept >= target * (1 - 1e-12):
                chosen = index + 1
                break
    else:
        threshold = values[0] / rule.sv_ratio
        chosen = sum(1 for value in values if value >= threshold)
    return max(1, min(chosen, ceiling, len(values)))


def spectrum_decided(singular_values: Sequence[float], total_energy: float, rule: RankRule, full_rank: int) -> bool:
    """True when a prefix of the spectrum is long enough for `choose_rank` to be exact."""
    count = len(singular_values)
    ceiling = rule.ceiling(full_rank)
    if count >= ceiling or rule.rank is not None:
        return count >= ceiling
    values = [float(s) for s in singular_values]
    if rule.energy is not None:
        return sum(v * v for v in values) >= rule.energy * total_energy * (1 - 1e-12)
    return values[-1] < values[0] / rule.sv_ratio
