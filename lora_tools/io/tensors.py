"""The few places where safetensors bytes become torch tensors and back."""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from .. import libc
from ..errors import CorruptFileError
from .safetensors_header import TensorInfo

__all__ = [
    "TORCH_DTYPES",
    "to_torch_dtype",
    "to_safetensors_dtype",
    "read_safetensors_tensor",
    "mapped_tensor",
    "prefetch",
    "tensor_bytes",
    "return_freed_memory_to_os",
]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}  # fmt: skip
_SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def to_safetensors_dtype(dtype: torch.dtype) -> str:
    return _SAFETENSORS_DTYPES[dtype]


def read_safetensors_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from disk into a fresh CPU tensor (nothing else is loaded)."""
    dtype = TORCH_DTYPES[info.dtype]
    nbytes = info.nbytes
    if nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buffer = bytearray(nbytes)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset)
        view, done = memoryview(buffer), 0
        while done < nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise CorruptFileError(info.file, f"tensor {info.name!r} is cut short (truncated file?)")
            done += got
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


@contextmanager
def mapped_tensor(
    path: Path, offset: int, dtype: str, shape: tuple[int, ...], *, writable: bool = False
) -> Iterator[torch.Tensor]:
    """A tensor viewing `path`'s bytes at `offset` through mmap, unmapped on exit.

    Reading through a mapping skips a copy out of the page cache, and writing
    through one skips a copy into it. Only the tensor's own pages are mapped, and
    only while in use, so resident memory stays at the tensors being worked on.
    """
    torch_dtype = TORCH_DTYPES[dtype]
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch_dtype.itemsize
    if nbytes == 0:
        yield torch.empty(shape, dtype=torch_dtype)
        return
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "r+b" if writable else "rb") as f:
        mapping = mmap.mmap(
            f.fileno(),
            nbytes + offset - start,
            offset=start,
            access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensor = torch.frombuffer(mapping, dtype=torch_dtype, count=numel, offset=offset - start).view(shape)
    try:
        yield tensor
    finally:
        del tensor
        with suppress(BufferError):  # a view still escapes; the mapping closes when it is collected
            mapping.close()


def prefetch(path: Path, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading a byte range into the page cache, without waiting."""
    if hasattr(os, "posix_fadvise") and nbytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without copying when it is contiguous."""
    import ctypes

    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return memoryview(b"")
    # through ctypes rather than .numpy(): numpy is not a dependency of lora_tools
    window = (ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())
    window.owner = flat  # the memoryview keeps the window alive, the window keeps the tensor alive
    return memoryview(window).cast("B")


def return_freed_memory_to_os() -> None:
    """Make glibc hand large freed buffers back to the OS at once.

    glibc raises its mmap threshold after each large free, after which tensor-sized
    buffers come from the heap and fragment it: peak RSS then grows with the number
    of tensors streamed. A fixed 1 MiB threshold keeps it bounded by the largest
    tensors. A no-op where glibc is absent.
    """
    mallopt = libc.function("mallopt")
    if mallopt is None:
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)
