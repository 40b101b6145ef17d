"""lora_tools: inspect, validate, merge, un-merge and extract LoRA adapters, streaming and exact.

The public functions are imported lazily so that `import lora_tools` (and the
CLI's `--help`) never pays for importing torch.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import LoraToolError

__version__ = "0.1.0"

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
    "combine": ".combine",
    "convert": ".convert",
    "push": ".io.hub",
    "open_checkpoint": ".io.checkpoint",
    "read_adapter": ".adapters.reading",
    "check": ".serving.check",
}

if TYPE_CHECKING:
    from .adapters.reading import read_adapter
    from .combine import combine
    from .convert import convert
    from .extraction import extract, resize
    from .inspection import inspect
    from .io.checkpoint import open_checkpoint
    from .io.hub import push
    from .merging import merge, unmerge
    from .serving.check import check


class CallableModule(ModuleType):
    """A submodule named like the function it exports (`convert`, `combine`).

    Importing `lora_tools.convert` makes Python set the package attribute `convert` to the
    submodule, hiding the lazily exported function; calling the module calls the function.
    """

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
