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
    from ..adapters.reading import Adapter

__all__ = ["register", "fit_to_base", "as_peft", "SERVING_FORMATS"]

SERVING_FORMATS = ("gguf", "mlx")


def register(formats: list) -> None:
    """Add the GGUF and mlx-lm readers (mlx-lm folders first: they also hold an adapter_config.json)."""
    from ..adapters.reading import AdapterFormat
    from .gguf import detect_gguf, read_gguf
    from .mlx import detect_mlx, read_mlx

    formats.insert(0, AdapterFormat("mlx", detect_mlx, read_mlx))
    formats.append(AdapterFormat("gguf", detect_gguf, read_gguf))


def fit_to_base(adapter: Adapter, base: str | os.PathLike | None) -> Adapter:
    """Tell a serving-format adapter what only the base knows (GGUF q/k head counts)."""
    if adapter.format != "gguf" or base is None:
        return adapter
    from ..io.checkpoint import read_json
    from .gguf import bind_base_config

    config = Path(base) / "config.json"
    return bind_base_config(adapter, read_json(config, "config.json") if config.is_file() else None)


def as_peft(adapter: Adapter) -> Adapter:
    """A GGUF or mlx-lm adapter seen as a PEFT one: PEFT keys and config, same factors and scales.

    Lets code that writes PEFT folders by the source's own keys (resize) take these formats.
    """
    from dataclasses import replace

    from ..adapters.reading import Adapter as AdapterClass
    from ..extraction import peft_adapter_config
    from .derived import DerivedCheckpoint

    if adapter.format not in SERVING_FORMATS:
        return adapter
    entries, modules = {}, []
    for module in adapter.modules:
        prefix = f"base_model.model.{module.name}"
        keys = (
            (f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B")
            if module.kind == "embedding"
            else (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
        )
        magnitude = f"{prefix}.lora_magnitude_vector" if module.magnitude_key else None
        for new, old in zip((*keys, magnitude), (module.a_key, module.b_key, module.magnitude_key), strict=True):
            if new is not None:
                info = adapter.tensors[old]
                entries[new] = (info.dtype, info.shape, lambda old=old: adapter.read(old))
        modules.append(replace(module, a_key=keys[0], b_key=keys[1], magnitude_key=magnitude))
    ranks = {m.name: m.rank for m in modules}
    config = peft_adapter_config(
        ranks, {m.name: m.scale * m.rank for m in modules}, base_model=adapter.base_model, fan_in_fan_out=False,
        modules_to_save=[], extra={"use_dora": any(m.dora for m in modules)},
    )  # fmt: skip
    weights = DerivedCheckpoint.build(adapter.path, adapter.weights.files[0], entries, dict(adapter.metadata))
    return AdapterClass(
        adapter.path, "peft", modules, [], list(adapter.unknown_keys), weights, config, adapter.base_model
    )
