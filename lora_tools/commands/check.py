"""`check --for ENGINE`: every reason a serving engine would reject an adapter or ignore part of it."""

from __future__ import annotations

import os
from pathlib import Path

from ..adapters.registry import fit_to_base, read_adapter
from ..errors import InvalidInputError
from ..serving.findings import CheckReport, base_facts, findings
from ..serving.rules import ENGINES, Facts

__all__ = ["check"]


def check(
    adapter: str | os.PathLike,
    *,
    engine: str,
    base: str | os.PathLike | None = None,
    max_lora_rank: int | None = None,
    alpha: float | None = None,
) -> CheckReport:
    """List what `engine` would reject or silently ignore in `adapter`.

    Args:
        adapter: any readable adapter (PEFT, GGUF, mlx-lm, kohya, ...).
        engine: "vllm", "sglang", "llama.cpp" or "mlx".
        base: the base model folder (weights optional; config.json is enough for the GGUF rules).
        max_lora_rank: the server's limit; default the engine's documented default.

    Returns:
        A `CheckReport`; `ready` is True when nothing was found.
    """
    if engine not in ENGINES:
        raise InvalidInputError(f"--for must be one of {', '.join(ENGINES)}, got {engine!r}")
    if max_lora_rank is not None and max_lora_rank <= 0:
        raise InvalidInputError(f"--max-lora-rank must be a positive integer, got {max_lora_rank}")
    settings = ENGINES[engine]
    base_path = Path(base) if base is not None else None
    if base_path is not None and not base_path.exists():
        raise InvalidInputError(f"{base_path}: no such file or folder")
    source = fit_to_base(read_adapter(adapter, alpha=alpha), base_path)
    tensors, config, notes = base_facts(base_path)
    limit = max_lora_rank if max_lora_rank is not None else settings.default_max_rank
    found = findings(Facts(source, settings, limit, tensors, config), engine)
    return CheckReport(str(source.path), engine, settings.checked, limit, str(base) if base else None, found, notes)
