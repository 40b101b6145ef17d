"""Every adapter format lora_tools knows, as data: how to detect it, read it and write it.

The format modules (`peft`, `kohya`, `diffusers`, `gguf`, `mlx`) import only what lies
below them; this module imports them all and lists them in `FORMATS`, in the order
detection tries them. Adding a format is one module and one row here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError, LoraToolError, UnknownFormatError
from ..io.checkpoint import PICKLE_SUFFIXES, open_checkpoint, read_json
from ..io.spool import Spool
from . import diffusers, gguf, kohya, mlx, peft
from .model import Adapter, ModuleFactors

__all__ = [
    "AdapterFormat",
    "FORMATS",
    "format_named",
    "module_writer",
    "is_adapter",
    "read_adapter",
    "fit_to_base",
]


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format: `detect(path)` says whether `read` applies.

    `write_module` spools one module's factors under the format's keys (`ModuleFactors`);
    it is None for a format read only, and for GGUF and mlx-lm, whose files are written
    whole from an adapter (`gguf.write_gguf`, `mlx.write_mlx`: they need the base's layout
    or config). `bind_base` tells an adapter what only its base's config knows (GGUF's q/k
    head counts).
    """

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., Adapter]
    write_module: Callable[[Spool, ModuleFactors], None] | None = None
    bind_base: Callable[[Adapter, dict | None, set[str] | None], Adapter] | None = None


#: In detection order: mlx-lm folders before PEFT folders (they hold an adapter_config.json too), diffusers
#: files before lone PEFT files (both spell lora_A / lora_B; diffusers adds component prefixes).
FORMATS: tuple[AdapterFormat, ...] = (
    AdapterFormat("mlx", mlx.detect, mlx.read),
    AdapterFormat("peft", peft.detect_folder, peft.read_folder, write_module=peft.spool_module),
    AdapterFormat("diffusers", diffusers.detect, diffusers.read, write_module=diffusers.spool_module),
    AdapterFormat("peft-safetensors", peft.detect_file, peft.read_file, write_module=peft.spool_module),
    AdapterFormat("kohya", kohya.detect, kohya.read, write_module=kohya.spool_module),
    AdapterFormat("gguf", gguf.detect, gguf.read, bind_base=gguf.bind_base_config),
)


def format_named(name: str) -> AdapterFormat | None:
    """The registered format called `name`, or None."""
    return next((fmt for fmt in FORMATS if fmt.name == name), None)


def module_writer(name: str) -> Callable[[Spool, ModuleFactors], None]:
    """The function that spools one module under format `name`'s keys."""
    fmt = format_named(name)
    if fmt is None or fmt.write_module is None:
        writable = ", ".join(f.name for f in FORMATS if f.write_module is not None)
        raise InvalidInputError(f"no module writer for adapter format {name!r} (formats written by module: {writable})")
    return fmt.write_module


def is_adapter(path: str | os.PathLike) -> bool:
    """True when some registered format recognises `path`."""
    return any(fmt.detect(Path(path)) for fmt in FORMATS)


def read_adapter(path: str | os.PathLike, *, alpha: float | None = None) -> Adapter:
    """Read an adapter in any registered format.

    Args:
        path: a PEFT folder or an adapter file.
        alpha: overrides lora_alpha (needed for lone files that do not record it).

    Raises:
        UnknownFormatError: no registered format recognises `path`.
        CorruptFileError: the adapter is malformed, naming the file and key.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.read(path, alpha=alpha)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise UnknownFormatError(f"{path}: a lone pickle is not a known adapter format; pass the PEFT folder")
    raise UnknownFormatError(
        f"{path}: not a known adapter format (expected a PEFT folder with adapter_config.json, "
        "or a .safetensors file with lora_A/lora_B keys)"
    )


def fit_to_base(adapter: Adapter, base: str | os.PathLike | None) -> Adapter:
    """Tell an adapter what only its base knows (a GGUF adapter's q/k head counts), when its format needs it."""
    fmt = format_named(adapter.format)
    if fmt is None or fmt.bind_base is None or base is None:
        return adapter
    config = Path(base) / "config.json"
    return fmt.bind_base(adapter, read_json(config, "config.json") if config.is_file() else None, _weight_names(base))


def _weight_names(base: str | os.PathLike) -> set[str] | None:
    """The base's tensor names when its weights are there (headers only); None for a config-only folder."""
    try:
        return set(open_checkpoint(base).tensors)
    except LoraToolError:
        return None
