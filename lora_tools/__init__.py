"""lora_tools: inspect, validate, merge, un-merge and extract LoRA adapters, streaming and exact.

The public functions are imported lazily so that `import lora_tools` (and the
CLI's `--help`) never pays for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import LoraToolError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LoraToolError",
    "inspect",
    "merge",
    "unmerge",
    "extract",
    "resize",
    "convert",
    "push",
    "open_checkpoint",
    "read_adapter",
    "check",
]

_LAZY = {
    "inspect": ".inspection",
    "merge": ".merging",
    "unmerge": ".merging",
    "extract": ".extraction",
    "resize": ".extraction",
    "convert": ".convert",
    "push": ".hub",
    "open_checkpoint": ".checkpoint",
    "read_adapter": ".adapter",
    "check": ".serving.check",
}

if TYPE_CHECKING:
    from .adapter import read_adapter
    from .checkpoint import open_checkpoint
    from .convert import convert
    from .extraction import extract, resize
    from .hub import push
    from .inspection import inspect
    from .merging import merge, unmerge
    from .serving.check import check


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
