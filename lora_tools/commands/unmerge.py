"""`unmerge`: adapters out of a merged checkpoint, W = W' − Σ wᵢ·ΔWᵢ, with the merge's arithmetic."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..compute.executor import Executor
from ..merging.report import MergeReport
from ..merging.run import MergeOptions, run
from ..units import Progress

__all__ = ["unmerge"]


def unmerge(
    merged: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    dry_run: bool = False,
    alpha: float | None = None,
    allow_nonfinite: bool = False,
    allow_unmatched: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    renames: Sequence[str] = (),
    residual_base: bool = False,
    executor: str | Executor = "local",
) -> MergeReport:
    """Undo a merge: W = W' − Σ wᵢ·ΔWᵢ, with the same arithmetic and options as `merge`.

    DoRA modules are undone exactly only for folders merged by loratool, whose
    `loratool_merge.json` keeps the norms the merge divided by. An adapter whose init rewrote the
    base is refused unless `residual_base`: the result is then that residual base, not W.
    """
    return run("unmerge", merged, adapters, output, MergeOptions(
        weights=weights, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force, dry_run=dry_run,
        alpha=alpha, allow_nonfinite=allow_nonfinite, allow_unmatched=allow_unmatched, checksum=checksum,
        revision=revision, token=token, renames=renames, residual_base=residual_base, executor=executor,
    ), progress)  # fmt: skip
