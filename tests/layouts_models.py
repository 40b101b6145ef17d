"""Checkpoints laid out as users have them: sharded with an index, shards symlinked into another folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from conftest import REPO
from safetensors.torch import load_file, save_file

FIXTURE_BASE = REPO / "fixtures" / "tiny-llama"
FIXTURE_ADAPTER = REPO / "fixtures" / "tiny-llama-lora"


def sharded_copy(destination: Path, parts: int = 3, source: Path = FIXTURE_BASE) -> Path:
    """The fixture base re-saved as `parts` shards with a `model.safetensors.index.json`, configs copied."""
    destination.mkdir(parents=True)
    for extra in source.iterdir():
        if extra.suffix != ".safetensors":
            shutil.copyfile(extra, destination / extra.name)
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for number in range(parts):
        file = f"model-{number + 1:05d}-of-{parts:05d}.safetensors"
        keys = names[number::parts]
        save_file({k: state[k] for k in keys}, destination / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
    (destination / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return destination


def symlinked_into(folder: Path, store: Path, *, relative: bool = False) -> Path:
    """Move every file of `folder` into `store` and leave symlinks (relative ones, as the HF cache has)."""
    store.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        target = store / file.name
        shutil.move(file, target)
        file.symlink_to(Path("..") / store.name / file.name if relative else target)
    return folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, following symlinks (what a reader sees)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def weight_bytes(folder: Path) -> dict[str, bytes]:
    """The weight files (and index) of an output folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}
