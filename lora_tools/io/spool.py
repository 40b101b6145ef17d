"""Tensors appended to one scratch file as they are produced, then written out as one safetensors file.

Extraction, resizing, conversion and combination produce an adapter's tensors one
module at a time; spooling each to disk as it comes keeps memory bounded by one
module whatever the adapter's size, and the final file is written sorted by name
(its bytes do not depend on the order the tensors came in).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .safetensors_header import TensorInfo
from .safetensors_writer import SafetensorsWriter
from .storage import naming

if TYPE_CHECKING:
    import torch

__all__ = ["Spool"]


class Spool:
    """Factor tensors appended to one scratch file as produced; written out as safetensors at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.entries: dict[str, TensorInfo] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from .tensors import tensor_bytes, to_safetensors_dtype

        data = tensor_bytes(tensor.detach().cpu().contiguous())
        view = memoryview(data).cast("B")
        with naming(self.path):
            while view:
                view = view[os.write(self._fd, view) :]
        self.entries[name] = TensorInfo(
            name, to_safetensors_dtype(tensor.dtype), tuple(tensor.shape), self.path, self._offset
        )
        self._offset += len(memoryview(data).cast("B"))

    def finish(self, destination: Path, metadata: dict[str, str] | None = None) -> int:
        """Write the spooled tensors (sorted by name) as a safetensors file; return its size."""
        os.close(self._fd)
        ordered = sorted(self.entries)
        writer = SafetensorsWriter(
            destination,
            [(n, self.entries[n].dtype, self.entries[n].shape) for n in ordered],
            {"format": "pt", **(metadata or {})},
        )
        for name in ordered:
            writer.copy_from(name, self.entries[name])
        writer.close()
        self.path.unlink()
        return writer.total_bytes
