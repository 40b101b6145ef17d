"""`merge`: adapters into a base checkpoint, W' = W + Σ wᵢ·ΔWᵢ, streamed tensor by tensor."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..compute.executor import Executor
from ..merging.report import MergeReport
from ..merging.run import MergeOptions, run
from ..units import Progress

__all__ = ["merge"]


def merge(
    base: str | os.PathLike,
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
    """Merge adapters into a base checkpoint: W' = W + Σ wᵢ·ΔWᵢ, streamed tensor by tensor.

    Args:
        base: a model folder or weights file, or a Hub repo id.
        adapters: adapter folders, files or Hub repo ids, merged in order.
        output: the output folder (or a `.safetensors` file for a single-file base).
        weights: one wᵢ per adapter (default 1.0 each; negative allowed).
        dtype: "bf16", "fp16" or "fp32" for every float tensor; None keeps each tensor's dtype.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        max_shard_size: bytes per output shard, e.g. "5GB".
        force: replace an existing output (only once the new one is complete).
        dry_run: plan and report, write nothing.
        alpha: lora_alpha for adapter files that do not record it.
        allow_nonfinite: write NaN/Inf results instead of refusing them.
        allow_unmatched: merge what matches and leave out (with a warning) modules that match nothing.
        checksum: add the sha256 of every output file to the report.
        revision, token: for inputs given as Hub repo ids (`org/name`, or `org/name@revision`).
        progress: called with (bytes done, bytes total) after each tensor.
        renames: `REGEX=REPLACEMENT` rules applied to adapter module paths before matching.
        residual_base: `base` is the residual model PEFT saved right after a base-rewriting init (PiSSA,
            OLoRA, CorDA, LoftQ, …): add s·B·A to it as it is, instead of recomputing or refusing.
        executor: "local", or "ray" to write the output shards as tasks on a Ray cluster (inputs and
            output on paths every node sees); the same bytes either way.

    Returns:
        A `MergeReport`.

    Raises:
        InvalidInputError: (and subclasses) for inputs that cannot be merged; nothing is written.
        EnvironmentProblem: device or disk space problems.

    Example:
        >>> report = merge("llama", ["my-lora"], "llama-merged")
    """
    return run("merge", base, adapters, output, MergeOptions(
        weights=weights, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force, dry_run=dry_run,
        alpha=alpha, allow_nonfinite=allow_nonfinite, allow_unmatched=allow_unmatched, checksum=checksum,
        revision=revision, token=token, renames=renames, residual_base=residual_base, executor=executor,
    ), progress)  # fmt: skip
