"""Adapters where they are served: GGUF LoRA (llama.cpp, Ollama), mlx-lm adapters, and readiness checks.

`register` adds the GGUF and MLX readers to the adapter format registry;
`export` writes those formats (called by `convert --to gguf|mlx`); `check`
lists what a serving engine would reject or silently ignore.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..adapter import Adapter

__all__ = ["register", "fit_to_base", "SERVING_FORMATS"]

SERVING_FORMATS = ("gguf", "mlx")


def register(formats: list) -> None:
    """Add the GGUF and mlx-lm readers (mlx-lm folders first: they also hold an adapter_config.json)."""
    from ..adapter import AdapterFormat
    from .gguf import detect_gguf, read_gguf
    from .mlx import detect_mlx, read_mlx

    formats.insert(0, AdapterFormat("mlx", detect_mlx, read_mlx))
    formats.append(AdapterFormat("gguf", detect_gguf, read_gguf))


def fit_to_base(adapter: Adapter, base: str | os.PathLike | None) -> Adapter:
    """Tell a serving-format adapter what only the base knows (GGUF q/k head counts)."""
    if adapter.format != "gguf" or base is None:
        return adapter
    from ..checkpoint import read_json
    from .gguf import bind_base_config

    config = Path(base) / "config.json"
    return bind_base_config(adapter, read_json(config, "config.json") if config.is_file() else None)
