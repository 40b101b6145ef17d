"""Arranging per-module numbers as a layers × module-type grid, shared by the terminal and the plots."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Grid", "build_grid", "kind_order"]

#: Module types in the order a reader expects them: attention projections, then the MLP, then the rest.
_ORDER = (
    "q_proj", "k_proj", "v_proj", "qkv", "query", "key", "value", "to_q", "to_k", "to_v", "o_proj", "out_proj",
    "dense", "to_out", "c_attn", "c_proj", "gate", "w1", "up", "w3", "fc1", "c_fc", "down", "w2", "fc2",
)  # fmt: skip


def kind_order(kind: str) -> tuple[int, str]:
    """Sort key of a module type: known projections in reading order, then the rest alphabetically."""
    last = kind.rsplit(".", 1)[-1]
    for position, token in enumerate(_ORDER):
        if last == token or last.startswith(token):
            return position, kind
    return len(_ORDER), kind


@dataclass(frozen=True)
class Grid:
    """values[i][j] for layer `layers[i]` and module type `kinds[j]` (NaN where nothing is there)."""

    layers: list[int | None]
    kinds: list[str]
    values: list[list[float]]

    @property
    def finite(self) -> list[float]:
        return [v for row in self.values for v in row if math.isfinite(v)]


def build_grid(entries: Iterable[tuple[int | None, str, float]]) -> Grid:
    """A grid from (layer, module type, value) triples; a cell seen twice keeps the larger value."""
    cells: dict[tuple[int | None, str], float] = {}
    for layer, kind, value in entries:
        key = (layer, kind)
        cells[key] = value if key not in cells or not math.isfinite(cells[key]) else max(cells[key], value)
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x or 0))
    kinds = sorted({kind for _, kind in cells}, key=kind_order)
    values = [[cells.get((layer, kind), math.nan) for kind in kinds] for layer in layers]
    return Grid(layers, kinds, values)
