"""Which files of a checkpoint folder or Hub repo make up its one set of weights (pure: names in, names out).

A folder or repo often holds the same weights several times: sharded safetensors
beside a `pytorch_model.bin`, Mistral's `consolidated.safetensors`, Meta's
`original/consolidated.00.pth`, GGUF or ONNX exports. transformers loads exactly
one set, in this order: the safetensors index and its shards, `model.safetensors`,
the `.bin` index and its shards, `pytorch_model.bin` (diffusers: the same with
`diffusion_pytorch_model`; PEFT: `adapter_model.safetensors` over `.bin`). We
choose the same way, for reading a folder and for downloading a repo.

Names in an index or a repo listing are judged as names: relative, no `..`, no
absolute path, drive letter or NUL. Where the file a safe name points to really
lives (HF cache snapshots are symlinks into `../../blobs/`) does not matter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = [
    "WeightSet",
    "choose_weights",
    "is_safe_name",
    "is_extra_file",
    "repo_files_to_fetch",
    "shard_names",
    "WEIGHT_SUFFIXES",
]

#: Suffixes of weight files of any framework (never carried along as "extra" files).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".npz")

#: transformers' / diffusers' / PEFT's order of preference: (kind, file name).
PREFERENCE = tuple(
    entry
    for safetensors_stem, pickle_stem in (
        ("model", "pytorch_model"),
        ("diffusion_pytorch_model", "diffusion_pytorch_model"),
        ("adapter_model", "adapter_model"),
    )
    for entry in (
        ("index", f"{safetensors_stem}.safetensors.index.json"),
        ("file", f"{safetensors_stem}.safetensors"),
        ("index", f"{pickle_stem}.bin.index.json"),
        ("file", f"{pickle_stem}.bin"),
    )
)

#: Weights of other formats or frameworks: never carried from a folder into an output.
_OTHER_FORMATS = (".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".npz")

#: Files that come along with the weights: configs, tokenizers, chat templates.
_EXTRA_PATTERNS = (r".*\.json", r".*\.model", r".*\.tiktoken", r".*\.txt", r".*\.jinja", r"tokenizer.*")
_EXTRA = re.compile("|".join(f"(?:{p})" for p in _EXTRA_PATTERNS))
_NEVER_FOLDERS = {"original", "onnx", "openvino", "flax", "tf", "gguf", "coreml"}
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class WeightSet:
    """One set of weights in a folder: an index (whose shards are listed inside it) or plain files."""

    index: str | None
    files: tuple[str, ...]


def is_safe_name(name: str) -> bool:
    """A relative name that stays inside its folder: no absolute path, drive letter, `..`, NUL or empty part."""
    if not isinstance(name, str) or not name or "\0" in name or _DRIVE.match(name):
        return False
    if name.startswith(("/", "\\")):
        return False
    parts = re.split(r"[\\/]", name)
    return all(part not in ("", ".", "..") for part in parts)


def _consolidated(name: str) -> bool:
    return name.startswith("consolidated")


def choose_weights(names: Iterable[str], *, ignore_prefix: str | None = None) -> WeightSet | None:
    """The one weight set among the file names of one folder (no subfolders), or None when there is none.

    Standard names in `PREFERENCE` order first; then, for folders saved under other names, another
    `*.safetensors.index.json`, every `*.safetensors`, another `*.bin.index.json`, every `*.bin` —
    never `consolidated*` files, and never names starting with `ignore_prefix` (loratool's own records).
    """
    present = {n for n in names if "/" not in n and not (ignore_prefix and n.startswith(ignore_prefix))}
    for kind, name in PREFERENCE:
        if name in present:
            return WeightSet(name, ()) if kind == "index" else WeightSet(None, (name,))
    candidates = sorted(n for n in present if not _consolidated(n))
    for suffix in (".safetensors", ".bin"):
        indexes = [n for n in candidates if n.endswith(f"{suffix}.index.json")]
        if indexes:
            return WeightSet(indexes[0], ())
        files = [n for n in candidates if n.endswith(suffix)]
        if files:
            return WeightSet(None, tuple(files))
    return None


def _elsewhere(name: str) -> bool:
    """Another copy of the weights: `consolidated*`, or anything in `original/`, `onnx/`, `gguf/`, ..."""
    path = PurePosixPath(name)
    return any(part in _NEVER_FOLDERS for part in path.parts[:-1]) or _consolidated(path.name)


def is_extra_file(name: str) -> bool:
    """A file a local folder carries into its output: not another copy of the weights, not another format's."""
    return not _elsewhere(name) and PurePosixPath(name).suffix not in _OTHER_FORMATS


def _is_download_extra(name: str) -> bool:
    """A config, tokenizer or template file of a repo (not a weight, not a weight index, not another format's)."""
    path = PurePosixPath(name)
    if _elsewhere(name) or path.name.endswith(".index.json") or path.suffix in WEIGHT_SUFFIXES:
        return False
    return _EXTRA.fullmatch(path.name) is not None


def repo_files_to_fetch(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a repo listing into what to download first and the indexes whose shards come second.

    Returns:
        (files: configs, tokenizer files, chosen single weight files and chosen indexes, by repo path;
        indexes: the chosen index paths, to be read for their shard names once downloaded).

    A pipeline (`model_index.json` at the top) gets one weight set per top-level component folder
    and none from the top; any other repo one set from the top and none from subfolders.
    """
    names = sorted(n for n in names if is_safe_name(n))
    pipeline = "model_index.json" in names
    folders: dict[str, list[str]] = {}
    for name in names:
        parent, _, base = name.rpartition("/")
        if ("/" not in parent) and (bool(parent) == pipeline) and parent not in _NEVER_FOLDERS:
            folders.setdefault(parent, []).append(base)
    files = [n for n in names if _is_download_extra(n)]
    indexes = []
    for folder, members in folders.items():
        chosen = choose_weights(members)
        if chosen is None:
            continue
        prefix = f"{folder}/" if folder else ""
        if chosen.index is not None:
            indexes.append(prefix + chosen.index)
        files += [prefix + f for f in chosen.files]
    files += indexes
    return sorted(set(files)), indexes


def shard_names(folder: str, weight_map: dict) -> list[str]:
    """Repo paths of the shards an index's weight_map names (unsafe names are left out; reading refuses them)."""
    prefix = f"{folder}/" if folder else ""
    return sorted({prefix + v for v in weight_map.values() if isinstance(v, str) and is_safe_name(v)})
