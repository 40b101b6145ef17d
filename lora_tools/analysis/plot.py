"""Pictures of what changed: a layers × module-type heat map and the spectra of the largest modules.

Drawn with matplotlib's object API (no pyplot, no display needed), as PNG or SVG by the file's
extension. matplotlib is the optional extra `lora_tools[plot]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..errors import EnvironmentProblem, InvalidInputError
from .grid import Grid, build_grid

__all__ = ["PLOT_SUFFIXES", "check_plot_path", "plot_stats", "plot_diff", "plot_extraction"]

PLOT_SUFFIXES = (".png", ".svg")
_CURVES = 6


def check_plot_path(path: str | Path) -> Path:
    """The plot path, refused unless it ends in .png or .svg."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidInputError(f"--plot {path}: the picture's format comes from its extension: use .png or .svg")
    return path


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise EnvironmentProblem(
            "--plot needs matplotlib: pip install 'lora_tools[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure


def _heat_map(figure, axes, grid: Grid, title: str, unit: str) -> None:
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.array(grid.values, dtype=float)
    masked = np.ma.masked_invalid(data)
    positive = [v for v in grid.finite if v > 0]
    # one outlier must not paint every other cell the same colour: a log scale when values span decades
    wide = positive and len(positive) == len(grid.finite) and max(positive) / min(positive) > 30
    norm = LogNorm(vmin=min(positive), vmax=max(positive)) if wide else None
    image = axes.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest", norm=norm)
    axes.set_title(title)
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_xticks(range(len(grid.kinds)), grid.kinds, rotation=45, ha="right", fontsize=8)
    step = max(1, math.ceil(len(grid.layers) / 20))  # at most ~20 labels: legible at 80 layers
    ticks = list(range(0, len(grid.layers), step))
    axes.set_yticks(ticks, [("—" if grid.layers[i] is None else str(grid.layers[i])) for i in ticks], fontsize=8)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.set_label(unit + (" (log scale)" if wide else ""))


def _spectra(axes_values, axes_energy, curves: Sequence[tuple[str, list[float], float, Sequence[int | None]]]) -> None:
    """Singular values (log scale) and cumulative energy of a few matrices, with the chosen ranks marked."""
    for label, values, energy, marks in curves:
        if not values or energy <= 0:
            continue
        index = range(1, len(values) + 1)
        (line,) = axes_values.semilogy(index, values, marker=".", markersize=3, label=label)
        cumulative, running = [], 0.0
        for value in values:
            running += value * value
            cumulative.append(running / energy)
        axes_energy.plot(index, cumulative, color=line.get_color(), label=label)
        for mark in marks:
            if mark:
                axes_energy.axvline(mark, color=line.get_color(), linestyle=":", linewidth=1)
    from matplotlib.ticker import LogFormatter, MaxNLocator

    axes_values.set_title(f"singular values, {len(curves)} largest")
    axes_values.set_xlabel("index")
    axes_values.set_ylabel("singular value (log scale)")
    # plain numbers (0.6, not 6×10⁻¹); minor ticks labelled when the values span few decades
    axes_values.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axes_values.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes_energy.set_title("cumulative energy")
    axes_energy.set_xlabel("rank (dotted: ranks keeping 90 % and 99 %)")
    axes_energy.set_ylabel("share of ‖ΔW‖²_F")
    axes_energy.set_ylim(0, 1.02)
    for axes in (axes_values, axes_energy):
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves:
        axes_energy.legend(fontsize=7, loc="lower right")


def _save(figure, path: Path) -> Path:
    path = check_plot_path(path)
    figure.savefig(path, format=path.suffix[1:].lower(), dpi=110)
    return path


def _figure(rows: int):
    figure_class = _figure_class()
    figure = figure_class(figsize=(13, 5.5 if rows == 1 else 9), layout="constrained")
    return figure


def plot_stats(report, path: str | Path) -> Path:
    """Heat map of ‖ΔW‖ per layer and module type, and spectra of the largest modules (inspect --stats)."""
    relative = all(m.relative_to_base is not None for m in report.modules) and report.modules
    grid = build_grid((m.layer, m.kind, m.relative_to_base if relative else m.frobenius) for m in report.modules)
    figure = _figure(1)
    heat, values, energy = figure.subplots(1, 3, width_ratios=(1.3, 1, 1))
    unit = "‖ΔW‖_F / ‖W‖_F" if relative else "‖ΔW‖_F"
    _heat_map(figure, heat, grid, f"{Path(report.path).name}: change per layer", unit)
    largest = sorted((m for m in report.modules if math.isfinite(m.frobenius)), key=lambda m: -m.frobenius)
    curves = [(m.name, m.singular_values, m.frobenius**2, (m.rank_90, m.rank_99)) for m in largest[:_CURVES]]
    _spectra(values, energy, curves)
    return _save(figure, path)


def plot_diff(report, path: str | Path) -> Path:
    """Heat map of the relative change per layer and tensor type, and spectra of the largest changes (diff)."""
    from .stats import layer_and_kind

    entries = []
    for t in report.tensors:
        layer, kind = layer_and_kind(t.name.removesuffix(".weight"))
        entries.append((layer, kind, t.relative_frobenius if t.status == "changed" else 0.0))
    figure = _figure(1)
    heat, values, energy = figure.subplots(1, 3, width_ratios=(1.3, 1, 1))
    _heat_map(figure, heat, build_grid(entries), "relative change per layer", "‖B − A‖_F / ‖A‖_F")
    changed = sorted((t for t in report.tensors if t.singular_values), key=lambda t: -(t.delta_frobenius or 0))
    curves = [
        (t.name, t.singular_values, (t.delta_frobenius or 0) ** 2, (t.rank_90, t.rank_99)) for t in changed[:_CURVES]
    ]
    _spectra(values, energy, curves)
    return _save(figure, path)


def plot_extraction(report, path: str | Path) -> Path:
    """Heat maps of the rank chosen and the energy kept per layer and module type (extract)."""
    from .stats import layer_and_kind

    ranks, kept = [], []
    for m in report.modules:
        layer, kind = layer_and_kind(m.name)
        ranks.append((layer, kind, float(m.rank)))
        kept.append((layer, kind, m.energy_kept))
    figure = _figure(1)
    left, right = figure.subplots(1, 2)
    _heat_map(figure, left, build_grid(ranks), "rank chosen per module", "rank")
    _heat_map(figure, right, build_grid(kept), "energy kept per module", "share of ‖ΔW‖²_F kept")
    return _save(figure, path)
