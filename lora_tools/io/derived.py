"""A checkpoint whose tensors are computed from another file's on read (transposed, permuted, sliced).

Readers of serving formats (GGUF, MLX) store factors in other layouts than the
normalized model wants (A as r×in, B as out×r). They describe each derived
tensor by header-like data and a loader, so everything downstream keeps
reading one tensor at a time through `Adapter.read`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .safetensors_header import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["DerivedCheckpoint"]


@dataclass
class DerivedCheckpoint(Checkpoint):
    """Tensors known by `TensorInfo` (offset None), each produced by its loader when read."""

    loaders: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        path: Path,
        source: Path,
        entries: dict[str, tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
        metadata: dict[str, str],
    ) -> DerivedCheckpoint:
        """`path`: what the user named; `source`: the file holding the data; `entries`: name → (dtype, shape, loader)."""
        tensors = {name: TensorInfo(name, dtype, tuple(shape), source) for name, (dtype, shape, _) in entries.items()}
        loaders = {name: loader for name, (_, _, loader) in entries.items()}
        folder = path if path.is_dir() else None
        return cls(path=path, folder=folder, files=[source], tensors=tensors, metadata=metadata, loaders=loaders)

    def read(self, name: str) -> torch.Tensor:
        return self.loaders[name]().contiguous()

    def mapped(self, name: str) -> AbstractContextManager[torch.Tensor]:
        return nullcontext(self.read(name))

    def prefetch(self, name: str) -> None:
        return None
