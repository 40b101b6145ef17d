"""`inspect --stats`: per-module statistics of an adapter, with its size against the base when one is given."""

from __future__ import annotations

import os

from ..adapters.registry import read_adapter
from ..analysis.stats import StatsReport, flag_outliers, module_stats, resize_parameters
from ..io.checkpoint import open_checkpoint
from ..io.hub import resolve_input

__all__ = ["adapter_stats"]


def adapter_stats(
    adapter: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    alpha: float | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> StatsReport:
    """Statistics of every module of an adapter (and, with `base`, its size against the base weight).

    Reads one module at a time; ΔW is formed only for LoHa/LoKr/Tucker and for DoRA with a base.

    Raises:
        InvalidInputError: the adapter or base cannot be read.
    """
    local, _ = resolve_input(adapter, revision=revision, token=token)
    source = read_adapter(local, alpha=alpha)
    checkpoint = None
    if base is not None:
        base_local, _ = resolve_input(base, revision=revision, token=token)
        checkpoint = open_checkpoint(base_local)
    modules = [module_stats(source, module, checkpoint) for module in source.modules]
    flag_outliers(modules)
    after, now = resize_parameters(source, modules)
    flagged: dict[str, list[str]] = {}
    for m in modules:
        for flag in m.flags:
            flagged.setdefault(flag, []).append(m.name)
    return StatsReport(str(adapter), str(base) if base else None, modules, 0.99, after, now, flagged)
