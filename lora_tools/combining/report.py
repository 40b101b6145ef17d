"""What `combine` produced: one row per output module (inputs, ranks, errors), and the totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..adapters.report import mean_relative_error

__all__ = ["ModuleCombination", "CombineReport"]


@dataclass(frozen=True)
class ModuleCombination:
    """One output module: which adapters fed it, rank in (Σ rᵢ) and out, and how far it is from exact.

    `relative_error` is ‖Σ wᵢ·ΔWᵢ − B·A‖ / ‖Σ wᵢ·ΔWᵢ‖ (for TIES / DARE / pruning it includes what the
    method itself changes); `truncation_error` is the same against the method's own combined ΔW,
    i.e. what the re-factorisation to `rank_out` lost.
    """

    name: str
    shape: tuple[int, ...]
    adapters: list[int]  # 1-based positions on the command line
    rank_in: int
    rank_out: int
    relative_error: float
    truncation_error: float
    route: str


@dataclass(frozen=True)
class CombineReport:
    operation: str
    output: str
    method: str
    format: str
    device: str
    inputs: list[dict]
    modules: list[ModuleCombination]
    partial: list[dict]
    parameters: int
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] | None = None
    executor: str = "local"  # where the modules ran: "local" or "ray"
    nodes: int = 1  # machines that ran them

    @property
    def mean_relative_error(self) -> float:
        return mean_relative_error(self.modules)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "mean_relative_error": self.mean_relative_error,
            "max_relative_error": self.max_relative_error,
        }
