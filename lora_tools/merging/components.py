"""Pipelines and single files: which part of each adapter goes to which component, and what an output carries."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..adapters.model import Adapter
from ..errors import IncompatibleError, OutputNameError
from ..io.card import CARD_NAME
from ..io.checkpoint import RECORD_PREFIX, Checkpoint, component_aliases
from ..planning.compatibility import unknown_key_problem

__all__ = ["single_file_output", "assign_components", "copy_pipeline_files"]


def single_file_output(output: Path, components: dict) -> tuple[bool, list[str]]:
    """Whether OUT is one `.safetensors` file (every tensor of the base in it), and what that leaves behind."""
    if output.suffix != ".safetensors":
        return False, []
    if None not in components:
        raise OutputNameError(
            f"output {output} is one file, but a pipeline has several components ({', '.join(components)}); "
            "give a folder as --output"
        )
    folder = components[None].folder
    if folder is None:
        return True, []
    return True, [
        f"{output} is a single .safetensors file: config.json, tokenizer and other files of {folder} are not "
        "carried (and no merge record is kept); give a folder as --output to keep them"
    ]


def assign_components(
    adapters: Sequence[Adapter], components: dict[str | None, Checkpoint], allow_unmatched: bool
) -> tuple[dict[str | None, list[Adapter]], list[str]]:
    """Split each adapter by the pipeline component its modules target (all of it for a lone checkpoint).

    Returns the parts by component, and warnings for what `allow_unmatched` left out.
    """
    if None in components:
        return {None: list(adapters)}, []
    aliases = component_aliases(components)
    parts: dict[str | None, list[Adapter]] = {name: [] for name in components}
    problems, warnings = [], []
    for adapter in adapters:
        problems += [f"{adapter.path}: {unknown_key_problem(key)}" for key in adapter.unknown_keys]
        wanted = {aliases.get(c, c) for c in adapter.components}
        if None in wanted:
            problems.append(
                f"{adapter.path}: some modules name no pipeline component (no unet./text_encoder. or lora_unet_/lora_te_ "
                "prefix); point BASE at the component's folder instead"
            )
        missing = sorted(c for c in wanted - set(components) if c is not None)
        if missing and not allow_unmatched:
            problems.append(
                f"{adapter.path}: targets {', '.join(missing)}, which the pipeline does not have "
                "(--allow-unmatched leaves those modules out)"
            )
        elif missing:
            count = sum(1 for m in adapter.modules if aliases.get(m.component, m.component) in missing)
            warnings.append(
                f"{adapter.path}: {count} modules for {', '.join(missing)} were left out (--allow-unmatched)"
            )
        for name in components:
            parts[name].append(adapter.restricted(*(c for c in adapter.components if aliases.get(c, c) == name)))
    if problems:
        raise IncompatibleError("the adapters do not fit the pipeline", problems)
    return parts, warnings


def copy_pipeline_files(base: Path, target: Path, components: dict) -> None:
    """Everything of a pipeline folder outside the merged components (model_index.json, scheduler, tokenizer, …)."""
    for source in sorted(base.rglob("*")):
        relative = source.relative_to(base)
        if not source.is_file() or relative.parts[0] in components or relative.parts[0].startswith("."):
            continue
        if relative == Path(CARD_NAME) or relative.name.startswith(RECORD_PREFIX):
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
