"""Statistics and diffs on the terminal with rich: tables, a coloured heat map, summary lines."""

from __future__ import annotations

import math

from ...analysis.grid import Grid, build_grid
from ...units import format_bytes

__all__ = ["render_stats", "render_diff", "heat_map_table"]

#: Background colours from small to large values (viridis-like, readable with white or black text).
_PALETTE = ("on #440154", "on #3b528b", "on #21918c", "on #5ec962", "on #fde725")


def _shade(value: float, low: float, high: float) -> str:
    if not math.isfinite(value):
        return ""
    if high <= low:
        return _PALETTE[-1]
    position = (value - low) / (high - low)
    style = _PALETTE[min(len(_PALETTE) - 1, int(position * len(_PALETTE)))]
    return style + (" black" if style in _PALETTE[3:] else " white")


def heat_map_table(grid: Grid, title: str):
    """A rich table: one row per layer, one column per module type, each cell its number on a colour."""
    from rich.table import Table

    table = Table(title=title, show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for kind in grid.kinds:
        table.add_column(kind, justify="right")
    finite = grid.finite
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    for layer, row in zip(grid.layers, grid.values, strict=True):
        cells = [f"[{_shade(v, low, high)}]{v:.3g}[/]" if math.isfinite(v) else "" for v in row]
        table.add_row("—" if layer is None else str(layer), *cells)
    return table


def _rank(value: int | None) -> str:
    return "?" if value is None else str(value)


def _ranks(t) -> tuple[str, str]:
    """r90 / r99 of a changed tensor: "-" where no spectrum was taken (--no-spectrum, not 2-D, too large)."""
    if not t.singular_values:
        return "-", "-"
    return _rank(t.rank_90), _rank(t.rank_99)


def render_stats(console, report) -> None:
    """Per-module table, the heat map, flags and the resize estimate."""
    from rich.table import Table

    relative = bool(report.modules) and all(m.relative_to_base is not None for m in report.modules)
    table = Table(show_edge=False)
    for column in ("module", "rank", "‖ΔW‖_F", "σ₁", "stable rank", "r90", "r99", *(["‖ΔW‖/‖W‖"] if relative else []), "flags"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("module", "flags") else "right")
    for m in report.modules:
        row = [m.name, str(m.rank), f"{m.frobenius:.4g}", f"{m.top_singular_value:.4g}", f"{m.stable_rank:.2f}",
               _rank(m.rank_90), _rank(m.rank_99)]  # fmt: skip
        if relative:
            row.append(f"{m.relative_to_base:.3g}")
        row.append(", ".join(m.flags))
        table.add_row(*row)
    console.print(table)
    value = (lambda m: m.relative_to_base) if relative else (lambda m: m.frobenius)
    grid = build_grid((m.layer, m.kind, value(m)) for m in report.modules)
    unit = "‖ΔW‖_F / ‖W‖_F" if relative else "‖ΔW‖_F"
    console.print(heat_map_table(grid, f"{unit} per layer and module type"))
    for flag, names in report.flagged.items():
        console.print(f"[yellow]{flag}:[/yellow] {len(names)} module(s): {', '.join(names[:8])}")
    for note in sorted({n for m in report.modules for n in m.notes}):
        console.print(f"note: {note}")
    if report.lora_parameters:
        console.print(
            f"resize --energy {report.resize_energy:g} would keep {report.resize_parameters:,} of "
            f"{report.lora_parameters:,} LoRA parameters (saving {report.resize_saving:.1%}; "
            f"{format_bytes(4 * (report.lora_parameters - report.resize_parameters))} in fp32)"
        )


def render_diff(console, report) -> None:
    """The changed tensors, what exists on one side only, and one summary line fit for a CI log."""
    from rich.table import Table

    from ..ci.outcome import record_report

    record_report(report.to_dict())
    if report.changed:
        table = Table(show_edge=False)
        for column in ("tensor", "status", "max |Δ|", "rel. change", "max ulp", "changed", "r90", "r99"):
            table.add_column(column, justify="left" if column in ("tensor", "status") else "right")
        for t in report.changed:
            if t.status != "changed":
                table.add_row(t.name, f"{t.status}: {t.dtype}{t.shape} vs {t.other}", "", "", "", "", "", "")
                continue
            table.add_row(
                t.name, t.status, f"{t.max_abs:.3g}", f"{t.relative_frobenius:.3g}", str(t.max_ulp),
                f"{t.changed_elements:,}", *_ranks(t),
            )  # fmt: skip
        console.print(table)
    for side, names in ((report.a, report.only_in_a), (report.b, report.only_in_b)):
        if names:
            console.print(f"only in {side}: {len(names)} tensor(s): {', '.join(names[:8])}")
    identical = sum(1 for t in report.tensors if t.status == "identical")
    console.print(
        f"diff {report.a} {report.b}: {len(report.tensors)} shared tensors, {identical} identical, "
        f"{len(report.changed)} differ (max {report.max_ulp} ulp), {len(report.only_in_a)} only in A, "
        f"{len(report.only_in_b)} only in B; {'identical' if report.identical else 'different'}",
        markup=False,
    )
