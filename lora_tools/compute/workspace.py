"""Reusable buffers per worker and device: a streaming computation allocates its tensors once."""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["Workspace"]


class Workspace:
    """Reusable flat buffers, grown to the largest tensor seen.

    Fresh tensor-sized allocations cost a page fault per 4 KiB and dominate a
    streaming merge; reusing a few buffers makes each pass run at memory speed
    and keeps peak memory at a few of the largest tensors.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()  # row workers ask for their own roles from their own threads

    def get(self, role: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (role, tuple(shape), dtype)
        view = self._views.get(key)  # the chunked paths ask for the same few views thousands of times
        if view is not None:
            return view
        numel = math.prod(shape)
        with self._lock:
            buffer = self._buffers.get(role)
            if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
                buffer = torch.empty(numel, dtype=dtype, device=self.device)
                self._buffers[role] = buffer
                self._views = {k: v for k, v in self._views.items() if k[0] != role}  # views of the old buffer
            view = self._views[key] = buffer[:numel].view(shape)
        return view
