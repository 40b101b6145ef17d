"""What differs between two checkpoints, tensor by tensor (`commands.diff` walks the checkpoints).

Tensors are compared one at a time through memory maps: first as raw bytes (identical or
not), then, where they differ, in fp64 chunks for the largest absolute change, the relative
Frobenius change ‖B−A‖/‖A‖ and the largest distance in units in the last place of the stored
dtype; 2-D tensors also get the rank holding 90 % / 99 % of the change's energy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..io.checkpoint import Checkpoint
from .spectrum import dense_spectrum

__all__ = ["TensorDiff", "DiffReport", "tensor_diff", "ulp_distance", "SPECTRUM_LIMIT"]

#: Changes of 2-D tensors up to this many elements get a spectrum (larger ones: `rank_*` is None).
SPECTRUM_LIMIT = 1 << 26
_CHUNK = 1 << 22
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs. `status`: identical, changed, dtype (dtypes differ) or shape."""

    name: str
    status: str
    dtype: str
    shape: list[int]
    other: str | None = None
    max_abs: float | None = None
    delta_frobenius: float | None = None
    relative_frobenius: float | None = None
    max_ulp: int | None = None
    changed_elements: int | None = None
    rank_90: int | None = None
    rank_99: int | None = None
    singular_values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DiffReport:
    """Every tensor's comparison, and the names present on one side only."""

    a: str
    b: str
    tensors: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    seconds: float

    @property
    def identical(self) -> bool:
        return not self.only_in_a and not self.only_in_b and all(t.status == "identical" for t in self.tensors)

    @property
    def changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status != "identical"]

    @property
    def max_ulp(self) -> int:
        return max((t.max_ulp or 0 for t in self.tensors), default=0)

    def violations(self, *, expect_identical: bool, max_ulp: int | None) -> list[str]:
        """What breaks the gate the user asked for (empty when it holds)."""
        problems = [f"{n}: only in {self.a}" for n in self.only_in_a]
        problems += [f"{n}: only in {self.b}" for n in self.only_in_b]
        problems += [f"{t.name}: {t.status} differs ({t.dtype}{t.shape} vs {t.other})" for t in self.tensors
                     if t.status in ("dtype", "shape")]  # fmt: skip
        if expect_identical:
            problems += [f"{t.name}: changed (max ulp {t.max_ulp})" for t in self.tensors if t.status == "changed"]
        elif max_ulp is not None:
            problems += [f"{t.name}: {t.max_ulp} ulp > {max_ulp}" for t in self.tensors
                         if t.status == "changed" and (t.max_ulp is None or t.max_ulp > max_ulp)]  # fmt: skip
        if not expect_identical and max_ulp is None:
            return []
        return problems

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(identical=self.identical, changed_tensors=len(self.changed), max_ulp=self.max_ulp)
        return data


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element distance in units in the last place of the shared float dtype (|a−b| for integers).

    Floats are mapped to integers ordered like the values (sign-magnitude to two's complement), so
    that consecutive representable values are one apart and −0 equals +0.
    """
    if not a.is_floating_point():
        return (a.to(torch.int64) - b.to(torch.int64)).abs()
    view = _INT_VIEW[a.element_size()]
    lowest = torch.iinfo(view).min

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(view).to(torch.int64)
        return torch.where(bits < 0, lowest - bits, bits)

    first, second = ordinal(a), ordinal(b)
    if a.element_size() < 8:
        return (first - second).abs()
    # 64-bit ordinals: exact when the signs agree; across zero the distance may overflow int64 (and is huge)
    same_sign = (first >= 0) == (second >= 0)
    across = first.to(torch.float64).abs() + second.to(torch.float64).abs()
    return torch.where(same_sign, (first - second).abs().to(torch.float64), across)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    if flat_a.numel() == 0:
        return True
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def _compare(name: str, a: torch.Tensor, b: torch.Tensor, spectrum: bool, dtype: str) -> TensorDiff:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    max_abs = delta_energy = base_energy = 0.0
    max_ulp = changed = 0
    for start in range(0, flat_a.numel(), _CHUNK):
        part_a, part_b = flat_a[start : start + _CHUNK], flat_b[start : start + _CHUNK]
        delta = part_b.to(torch.float64) - part_a.to(torch.float64)
        max_abs = max(max_abs, float(delta.abs().max()))
        delta_energy += float(delta.pow(2).sum())
        base_energy += float(part_a.to(torch.float64).pow(2).sum())
        distance = ulp_distance(part_a, part_b)
        max_ulp = max(max_ulp, int(distance.max()))
        changed += int((distance != 0).sum())
    relative = math.sqrt(delta_energy / base_energy) if base_energy > 0 else (math.inf if delta_energy else 0.0)
    ranks: dict = {}
    if spectrum and a.dim() == 2 and a.numel() <= SPECTRUM_LIMIT:
        found = dense_spectrum(b.to(torch.float32) - a.to(torch.float32))
        ranks = dict(rank_90=found.rank_for(0.9), rank_99=found.rank_for(0.99), singular_values=list(found.values[:64]))
    return TensorDiff(
        name, "changed", dtype, list(a.shape), max_abs=max_abs, delta_frobenius=math.sqrt(delta_energy),
        relative_frobenius=relative, max_ulp=max_ulp,
        changed_elements=changed, **ranks,
    )  # fmt: skip


def tensor_diff(name: str, first: Checkpoint, second: Checkpoint, spectrum: bool) -> TensorDiff:
    info_a, info_b = first.tensors[name], second.tensors[name]
    if info_a.dtype != info_b.dtype:
        return TensorDiff(name, "dtype", info_a.dtype, list(info_a.shape), other=f"{info_b.dtype}{list(info_b.shape)}")
    if tuple(info_a.shape) != tuple(info_b.shape):
        return TensorDiff(name, "shape", info_a.dtype, list(info_a.shape), other=f"{info_b.dtype}{list(info_b.shape)}")
    with first.mapped(name) as a, second.mapped(name) as b:
        if _same_bytes(a, b):
            return TensorDiff(name, "identical", info_a.dtype, list(info_a.shape))
        return _compare(name, a, b, spectrum, info_a.dtype)
