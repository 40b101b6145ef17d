"""What writing an adapter produced (`extract`, `resize`, `convert`): one row per module, and the totals.

`combine` has its own report; it shares `mean_relative_error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["ModuleExtraction", "ExtractReport", "mean_relative_error"]


@dataclass(frozen=True)
class ModuleExtraction:
    """What one module became: its rank, how much of ‖Δ‖² it keeps, its relative error."""

    name: str
    rank: int
    energy_kept: float
    relative_error: float
    method: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExtractReport:
    operation: str
    output: str
    device: str
    modules: list[ModuleExtraction]
    skipped: list[dict]
    unchanged: list[str]
    changed_1d: list[dict]
    modules_to_save: list[str]
    parameters: int
    bytes: int
    full_delta_parameters: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] | None = None
    block_diagonal: list[str] = field(default_factory=list)  # convert --naming: modules fused at summed rank
    executor: str = "local"  # where the modules ran: "local" or "ray"
    nodes: int = 1  # machines that ran them

    @property
    def mean_relative_error(self) -> float:
        return mean_relative_error(self.modules)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_relative_error": self.mean_relative_error}


def mean_relative_error(modules: Sequence) -> float:
    """Mean of the modules' `relative_error` (0 for none), as extract, resize and combine report it."""
    return sum(m.relative_error for m in modules) / len(modules) if modules else 0.0
