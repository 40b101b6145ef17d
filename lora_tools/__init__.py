"""lora_tools: inspect, validate, merge, un-merge and extract LoRA adapters, streaming and exact.

The public functions are imported lazily so that `import lora_tools` (and the
CLI's `--help`) never pays for importing torch.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import TYPE_CHECKING

from .errors import LoraToolError
from .version import __version__

# torch warns at import when numpy is absent; lora_tools never needs numpy, so the warning is noise
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = [
    "__version__",
    "LoraToolError",
    "inspect",
    "merge",
    "unmerge",
    "extract",
    "resize",
    "combine",
    "convert",
    "diff",
    "validate",
    "push",
    "open_checkpoint",
    "read_adapter",
    "check",
]

_LAZY = {
    "inspect": ".commands.inspect",
    "merge": ".commands.merge",
    "unmerge": ".commands.unmerge",
    "extract": ".commands.extract",
    "resize": ".commands.resize",
    "combine": ".commands.combine",
    "convert": ".commands.convert",
    "diff": ".commands.diff",
    "validate": ".commands.validate",
    "push": ".commands.push",
    "open_checkpoint": ".io.checkpoint",
    "read_adapter": ".adapters.registry",
    "check": ".commands.check",
}

if TYPE_CHECKING:
    from .adapters.registry import read_adapter
    from .commands.check import check
    from .commands.combine import combine
    from .commands.convert import convert
    from .commands.diff import diff
    from .commands.extract import extract
    from .commands.inspect import inspect
    from .commands.merge import merge
    from .commands.push import push
    from .commands.resize import resize
    from .commands.unmerge import unmerge
    from .commands.validate import validate
    from .io.checkpoint import open_checkpoint


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
