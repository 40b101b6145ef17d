"""How `combine` combines: the methods, PEFT's name for each, and the options they take (validated)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError
from ..lowrank.rank import RankRule

__all__ = ["METHODS", "PEFT_EQUIVALENT", "SIGN_METHODS", "TARGET_FORMATS", "PRUNING_METHODS", "CombineOptions"]

METHODS = ("cat", "svd", "ties", "dare-linear", "dare-ties", "magnitude-prune")


#: The `combination_type` of PEFT's `add_weighted_adapter` each method reproduces.
PEFT_EQUIVALENT = {
    "cat": "cat",
    "svd": "svd",
    "ties": "ties_svd",
    "dare-linear": "dare_linear_svd",
    "dare-ties": "dare_ties_svd",
    "magnitude-prune": "magnitude_prune_svd",
}
SIGN_METHODS = ("total", "frequency")
TARGET_FORMATS = ("peft", "kohya")
PRUNING_METHODS = ("ties", "dare-linear", "dare-ties", "magnitude-prune")


@dataclass(frozen=True)
class CombineOptions:
    """How to combine: the method, its rank rule, density, sign rule, seed.

    Without a rule each module gets its largest input rank (as PEFT does), capped by `max_rank`.
    """

    method: str = "cat"
    rule: RankRule | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_rank is not None and self.max_rank <= 0:
            raise InvalidInputError(f"--max-rank must be a positive integer, got {self.max_rank}")
        if self.method == "cat" and (self.rule is not None or self.max_rank is not None):
            raise InvalidInputError(
                "--method cat keeps every rank (Σ rᵢ); --rank / --energy / --sv-ratio / --max-rank "
                "need --method svd, ties, dare-linear, dare-ties or magnitude-prune"
            )
        if self.method in PRUNING_METHODS:
            if self.density is None:
                raise InvalidInputError(f"--method {self.method} needs --density D, the fraction kept, in (0, 1]")
            if not 0 < self.density <= 1:
                raise InvalidInputError(f"--density must be in (0, 1], got {self.density:g}")
        elif self.density is not None:
            raise InvalidInputError(f"--density applies to {', '.join(PRUNING_METHODS)}, not to --method {self.method}")
        if self.majority_sign not in SIGN_METHODS:
            raise InvalidInputError(f"--majority-sign must be total or frequency, got {self.majority_sign!r}")

    def rule_for(self, default_rank: int) -> RankRule:
        return self.rule or RankRule(rank=default_rank, max_rank=self.max_rank)
