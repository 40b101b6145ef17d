"""Fused mixture-of-experts parameters and PEFT's `target_parameters` LoRA on them.

PEFT adapts a fused expert parameter `[E, d1, d2]` through its `ParamWrapper`:
A is `[E·r, in]` with the expert index varying slowest along its rows, B is
`[out, E·r]` with the expert index varying fastest along its columns, and

    ΔW[e] = scale · B[:, e::E] @ A[e·r:(e+1)·r]          laid out [out, in].

Which of d1/d2 is `in` depends on the parameter's layout: transformers keeps
most experts as `[E, out, in]` (Mixtral, Qwen-MoE, DeepSeek) and a few as
`[E, in, out]` (gpt-oss, flagged `is_transposed`). PEFT releases before the
in/out swap read every expert parameter as `[E, in, out]`; their adapters are
recognised from the shapes and merged as they were trained.

Everything here is pure: functions over shapes and indices, for the planner and
for other readers of expert checkpoints (quantized bases) to share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import IncompatibleError

__all__ = [
    "OLD_PEFT_RANGE",
    "ExpertReading",
    "ExpertPiece",
    "read_expert_shapes",
    "expert_rows_of_a",
    "expert_columns_of_b",
    "split_pieces",
    "fused_delta_shape",
    "fused_delta",
]

#: The PEFT releases that read every 3-D expert parameter as [experts, in, out].
OLD_PEFT_RANGE = "PEFT 0.17–0.18"
_FIRST_SWAPPING_PEFT = (0, 19)


@dataclass(frozen=True)
class ExpertReading:
    """How one adapter's A/B apply to a fused parameter `[experts, d1, d2]`.

    Attributes:
        experts: E.
        rank: the per-expert rank r = rows of A / E.
        transposed: True when ΔW[e] = (B_e·A_e)ᵀ lands on [d1, d2] (A reads d1), False when B_e·A_e does.
        old_peft: the adapter was written by a PEFT release that read the layout the other way round.
    """

    experts: int
    rank: int
    transposed: bool
    old_peft: bool = False


def _version(text: object) -> tuple[int, ...] | None:
    found = re.match(r"(\d+)\.(\d+)", str(text or ""))
    return (int(found[1]), int(found[2])) if found else None


def read_expert_shapes(
    where: str,
    param_shape: tuple[int, ...],
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    *,
    in_first: bool,
    peft_version: str | None = None,
) -> ExpertReading:
    """Decide how A `[E·r, in]` and B `[out, E·r]` apply to a fused parameter, from the shapes alone.

    Args:
        where: the adapter module, for messages.
        param_shape: the in-memory parameter `[E, d1, d2]`.
        in_first: the parameter is laid out `[E, in, out]` (transformers' `is_transposed`).
        peft_version: `peft_version` from adapter_config.json, to settle square parameters.

    Raises:
        IncompatibleError: the shapes fit no reading, or fit both readings of a square parameter
            written by an unknown PEFT release.
    """
    experts, d1, d2 = param_shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] % experts:
        raise IncompatibleError(
            f"{where}: cannot apply to experts {list(param_shape)}",
            [f"A {list(a_shape)} and B {list(b_shape)} are not [E·r, in] / [out, E·r] with E={experts}"],
        )
    rank = a_shape[0] // experts
    fits_plain = (a_shape[1], b_shape[0]) == (d2, d1)  # ΔW[e] = B_e·A_e as [d1, d2]
    fits_transposed = (a_shape[1], b_shape[0]) == (d1, d2)
    current = in_first  # what today's PEFT writes: A reads d1 only for [E, in, out] parameters
    if fits_plain and fits_transposed and not in_first:
        version = _version(peft_version)
        if version is None:
            raise IncompatibleError(
                f"{where}: the square expert parameter {list(param_shape)} cannot tell which PEFT wrote the adapter",
                [
                    f"{OLD_PEFT_RANGE} stored these experts' A/B with in and out swapped; add "
                    '"peft_version" to adapter_config.json (or re-save the adapter with PEFT ≥ 0.19)'
                ],
            )
        old = version < _FIRST_SWAPPING_PEFT
        return ExpertReading(experts, rank, transposed=old, old_peft=old)
    if fits_transposed and (current or not fits_plain):
        return ExpertReading(experts, rank, transposed=True, old_peft=not in_first)
    if fits_plain and not in_first:
        return ExpertReading(experts, rank, transposed=False)
    raise IncompatibleError(
        f"{where}: shape mismatch with experts {list(param_shape)}",
        [f"A {list(a_shape)}, B {list(b_shape)} fit neither [E, out, in] nor [E, in, out] with E={experts}"],
    )


def expert_rows_of_a(expert: int, rank: int) -> tuple[int, int]:
    """The rows `[start, stop)` of A that belong to `expert`."""
    return expert * rank, (expert + 1) * rank


def expert_columns_of_b(expert: int, experts: int) -> tuple[int, int]:
    """The columns of B that belong to `expert`, as (start, step): `B[:, start::step]`."""
    return expert, experts


@dataclass(frozen=True)
class ExpertPiece:
    """Expert `expert`'s ΔW rows `[out_start, out_stop)` (of B_e·A_e) go to the on-disk module `target`."""

    target: str
    expert: int
    out_start: int
    out_stop: int


def split_pieces(disk_prefix: str, experts: int, out_features: int, parts: tuple[str, ...]) -> list[ExpertPiece]:
    """Per-expert on-disk modules for a fused parameter whose out rows are `parts` in equal chunks.

    `gate_up_proj` ([E, 2I, H]) with parts ("gate_proj", "up_proj") gives `{prefix}.{e}.gate_proj`
    ← rows [0, I) and `{prefix}.{e}.up_proj` ← rows [I, 2I), as transformers concatenates them.
    """
    if out_features % len(parts):
        raise IncompatibleError(
            f"{disk_prefix}: cannot split experts", [f"{out_features} rows do not divide into {len(parts)} parts"]
        )
    size = out_features // len(parts)
    return [
        ExpertPiece(f"{disk_prefix}.{e}.{part}", e, i * size, (i + 1) * size)
        for e in range(experts)
        for i, part in enumerate(parts)
    ]


def fused_delta_shape(reading: ExpertReading, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the stacked ΔW `[E, d1, d2]` an expert reading builds."""
    inner, outer = a_shape[1], b_shape[0]
    return (reading.experts, inner, outer) if reading.transposed else (reading.experts, outer, inner)


def fused_delta(module, a, b):
    """Unscaled ΔW `[E, d1, d2]` of a fused-experts module, as PEFT's ParamWrapper builds it.

    A `[E·r, in]` → `[E, r, in]`; B `[out, E·r]` → `[out, r, E]`; ΔW[e] = B_e·A_e laid out [out, in], or its
    transpose (`module.fan_in_fan_out`) for `[E, in, out]` parameters. The caller applies the scale.
    """
    import torch

    experts = a.shape[0] // module.rank
    a = a.reshape(experts, module.rank, a.shape[-1])
    b = b.reshape(b.shape[0], module.rank, experts)
    pattern = "o r e, e r i -> e i o" if module.fan_in_fan_out else "o r e, e r i -> e o i"
    return torch.einsum(pattern, b, a)
