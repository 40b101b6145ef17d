"""Resized vocabularies: adapters whose embedding / lm_head copies have more rows than the base.

Trainers add tokens (chat or special tokens) and save the resized embedding and
head with the adapter: as `modules_to_save`, or, for a LoRA-only adapter, as the
copies PEFT saves on its own when it sees the vocabulary changed. Merged, those
copies replace the base's tensors at their new size, the config's `vocab_size`
follows, and the tokenizer that knows the new tokens travels with the output.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ..io.safetensors_header import TensorInfo

__all__ = ["EMBEDDING_MODULES", "TOKENIZER_FILES", "is_saved_embedding", "resized_base",
           "carry_tokenizer"]  # fmt: skip

#: Module names PEFT saves whole when the vocabulary was resized (its EMBEDDING_LAYER_NAMES and the usual aliases).
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "shared", "word_embeddings")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")  # fmt: skip


def is_saved_embedding(stripped_key: str) -> bool:
    """`model.embed_tokens.weight` / `lm_head.weight`: an embedding PEFT saved whole (resized vocabulary)."""
    module, _, leaf = stripped_key.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in EMBEDDING_MODULES


def resized_base(base: Mapping[str, TensorInfo], adapters, resolve) -> tuple[dict[str, TensorInfo], int | None]:
    """`base` with every tensor a whole replacement grows (more rows, same width) at its new shape.

    Args:
        resolve: maps a replacement's target name to the base tensor name (or None).

    Returns:
        The effective base, and the new vocabulary size (rows of the grown embedding) or None.
    """
    grown: dict[str, tuple[int, ...]] = {}
    for adapter in adapters:
        for item in adapter.replacements:
            target = resolve(item.target, base)
            shape = tuple(adapter.tensors[item.key].shape)
            if item.rows is not None or target is None or len(shape) != 2:
                continue
            old = base[target].shape
            if len(old) == 2 and shape[1] == old[1] and shape[0] > old[0]:
                grown[target] = max(shape, grown.get(target, old))
    if not grown:
        return dict(base), None
    _check_grown_together(base, grown)
    effective = {name: replace(info, shape=grown[name]) if name in grown else info for name, info in base.items()}
    return effective, max(shape[0] for shape in grown.values())


def carry_tokenizer(adapter_folders: Sequence[Path], target: Path) -> list[str]:
    """Copy the tokenizer files of the adapter folders (last one wins) over the base's; return their names."""
    copied = []
    for folder in adapter_folders:
        if not folder.is_dir():
            continue
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, target / name)
                copied.append(name)
    return sorted(set(copied))


def _check_grown_together(base: Mapping[str, TensorInfo], grown: dict[str, tuple[int, ...]]) -> None:
    """An untied embedding and head grow together: a head left at the old size cannot score the new tokens."""
    from ..errors import IncompatibleError

    old_rows = {base[name].shape[0] for name in grown}
    rows = {shape[0] for shape in grown.values()}
    left = [
        name for name, info in base.items()
        if name not in grown and len(info.shape) == 2 and info.shape[0] in old_rows
        and name.rpartition(".")[0].rsplit(".", 1)[-1] in EMBEDDING_MODULES
    ]  # fmt: skip
    if left or len(rows) > 1:
        found = ", ".join(f"{name} {list(shape)}" for name, shape in sorted(grown.items()))
        raise IncompatibleError(
            "the adapter resizes the vocabulary only in part",
            [f"it brings {found} but nothing for {', '.join(left) or 'the other copies'} "
             "(save the resized lm_head too, e.g. modules_to_save=['lm_head'])"],
        )  # fmt: skip
