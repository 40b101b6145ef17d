"""`inspect --stats`: per-module statistics of an adapter, with its size against the base when one is given."""

from __future__ import annotations

import functools
import os

import torch

from ..adapters.model import Adapter, LoraModule
from ..adapters.registry import read_adapter
from ..analysis.stats import ModuleStats, StatsReport, flag_outliers, module_stats, resize_parameters
from ..compute.executor import Executor, executor_for
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
    executor: str | Executor = "local",
) -> StatsReport:
    """Statistics of every module of an adapter (and, with `base`, its size against the base weight).

    Reads one module at a time; ΔW is formed only for LoHa/LoKr/Tucker and for DoRA with a base.
    Modules are measured on the usable cores, one each (`executor="ray"`: as tasks on a Ray cluster);
    the numbers are the same either way.

    Raises:
        InvalidInputError: the adapter or base cannot be read.
    """
    local, _ = resolve_input(adapter, revision=revision, token=token)
    source = read_adapter(local, alpha=alpha)
    checkpoint = None
    if base is not None:
        base_local, _ = resolve_input(base, revision=revision, token=token)
        checkpoint = open_checkpoint(base_local)
    with executor_for(executor, [torch.device("cpu")]) as pool:
        measure = functools.partial(_measure, source, checkpoint)
        modules = list(pool.map(measure, source.modules, size=functools.partial(_module_bytes, source)))
    flag_outliers(modules)
    after, now = resize_parameters(source, modules)
    flagged: dict[str, list[str]] = {}
    for m in modules:
        for flag in m.flags:
            flagged.setdefault(flag, []).append(m.name)
    return StatsReport(
        str(adapter), str(base) if base else None, modules, 0.99, after, now, flagged, pool.name, pool.nodes
    )


def _measure(source: Adapter, checkpoint, module: LoraModule, workspace) -> ModuleStats:
    return module_stats(source, module, checkpoint)


def _module_bytes(source: Adapter, module: LoraModule) -> int:
    """A module's stored bytes, to size the executor's tasks."""
    keys = [module.a_key, module.b_key, *(key for _, key in module.factors), module.magnitude_key]
    return sum(source.tensors[key].nbytes for key in set(keys) if key in source.tensors)
