"""Lazy access to a model checkpoint: a folder, a single file, sharded or not.

Opening a checkpoint reads headers (and, for pickles, only the pickle's
structure through an mmap); tensor data is read later, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError, UnsafePickleError
from .safetensors_header import TensorInfo, read_header
from .weightsets import choose_weights, is_extra_file, is_safe_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "Checkpoint",
    "open_checkpoint",
    "open_components",
    "component_aliases",
    "read_json",
    "PICKLE_SUFFIXES",
    "RECORD_PREFIX",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: Files loratool leaves beside a merged model (never weights of the model itself).
RECORD_PREFIX = "loratool_merge"
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-\d{5}-of-(?P<total>\d{5})\.(?P<ext>safetensors|bin)$")


def read_json(path: Path, what: str) -> dict:
    """Load a JSON object from `path`, or raise `CorruptFileError` saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"{what} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise CorruptFileError(path, f"cannot read {what}: {exc.strerror or exc}") from exc
    if not isinstance(value, dict):
        raise CorruptFileError(path, f"{what} must be a JSON object, found {type(value).__name__}")
    return value


@dataclass
class Checkpoint:
    """A model's tensors, known by header, readable one at a time.

    Attributes:
        path: what the user named (folder or file).
        folder: the folder holding config and tokenizer files, or None for a lone file.
        files: the weight files, in order.
        tensors: every tensor's name, dtype, shape and location, in storage order.
        metadata: safetensors `__metadata__` of the first file.
        config: `config.json` when the folder has one.
        weight_prefix: "model" or "diffusion_pytorch_model", for naming output shards alike.
    """

    path: Path
    folder: Path | None
    files: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    weight_prefix: str = "model"
    _pickles: dict[Path, dict] = field(default_factory=dict, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def auxiliary_files(self) -> list[Path]:
        """Files of the folder that are not weights or weight indexes (config, tokenizer, ...).

        Judged by name, never by where a symlink points: in the HF cache every file is a symlink into
        `blobs/`. Other copies of the weights (`consolidated*`, `original/`, `*.pth`, `*.gguf`, ...) are left out.
        """
        if self.folder is None:
            return []
        weights = {f.relative_to(self.folder) for f in self.files if f.parent == self.folder}
        found = []
        for path in sorted(self.folder.rglob("*")):
            relative = path.relative_to(self.folder)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            if relative in weights or path.name.endswith(".index.json") or path.name.startswith(RECORD_PREFIX):
                continue
            if len(relative.parts) == 1 and path.suffix in (".safetensors", *PICKLE_SUFFIXES):
                continue
            if not is_extra_file(str(relative.as_posix())):
                continue
            found.append(path)
        return found

    def read(self, name: str) -> torch.Tensor:
        """Return one tensor as a fresh CPU tensor."""
        info = self.tensors[name]
        if info.offset is not None:
            from .tensors import read_safetensors_tensor

            return read_safetensors_tensor(info)
        return self._pickle(info.file)[name]

    def mapped(self, name: str) -> AbstractContextManager[torch.Tensor]:
        """A read-only CPU view of one tensor for the duration of a `with` block (mmap for safetensors)."""
        info = self.tensors[name]
        if info.offset is None:
            return nullcontext(self._pickle(info.file)[name])
        from .tensors import mapped_tensor

        return mapped_tensor(info.file, info.offset, info.dtype, info.shape)

    def prefetch(self, name: str) -> None:
        """Start reading one tensor into the page cache in the background."""
        info = self.tensors[name]
        if info.offset is not None:
            from .tensors import prefetch

            prefetch(info.file, info.offset, info.nbytes)

    def _pickle(self, path: Path) -> dict:
        if path not in self._pickles:
            self._pickles[path] = load_pickle_state_dict(path)
        return self._pickles[path]


def load_pickle_state_dict(path: Path) -> dict:
    """Load a PyTorch pickle with torch's weights-only unpickler (mmap when the format allows).

    A pickle that asks for any global outside the allow-list is refused; its code never runs.
    """
    import pickle
    import zipfile

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and zipfile.is_zipfile(path):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()
        detail = next((line for line in reason if "Unsupported global" in line or "GLOBAL" in line), None)
        if detail is not None or "weights_only" in str(exc):
            raise UnsafePickleError(
                path, f"refused to unpickle: {(detail or reason[0]).strip()} (only plain tensors are loaded)"
            ) from exc
        raise CorruptFileError(path, f"not a readable PyTorch file ({reason[0] if reason else exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptFileError(path, f"not a readable PyTorch file ({str(exc).splitlines()[0]})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CorruptFileError(path, f"holds a {type(state).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CorruptFileError(path, f"entries that are not tensors: {', '.join(bad[:5])}")
    return state


def _pickle_infos(path: Path, state: dict) -> dict[str, TensorInfo]:
    from .tensors import to_safetensors_dtype

    return {name: TensorInfo(name, to_safetensors_dtype(t.dtype), tuple(t.shape), path) for name, t in state.items()}


def _index_shards(index_path: Path) -> dict[str, list[str]]:
    """Map each shard file named by an index to the tensors the index puts there, refusing unsafe paths."""
    index = read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptFileError(index_path, "index has no 'weight_map' object of tensor name → file name")
    folder = index_path.parent
    shards: dict[str, list[str]] = {}
    for tensor, filename in weight_map.items():
        if not is_safe_name(filename):  # judged by name: a safe name may be a symlink to anywhere
            raise CorruptFileError(index_path, f"weight_map entry {tensor!r} points outside the folder: {filename!r}")
        candidate = folder / filename
        if not candidate.is_file():
            raise CorruptFileError(index_path, f"weight_map entry {tensor!r} names missing shard {filename!r}")
        shards.setdefault(filename, []).append(tensor)
    return shards


def _load_files(files: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, str], dict[Path, dict]]:
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    pickles: dict[Path, dict] = {}
    for path in files:
        if path.suffix == ".safetensors":
            infos, file_metadata = read_header(path)
            metadata = metadata or file_metadata
        else:
            pickles[path] = load_pickle_state_dict(path)
            infos = _pickle_infos(path, pickles[path])
        for name, info in infos.items():
            if name in tensors:
                raise CorruptFileError(path, f"tensor {name!r} is also stored in {tensors[name].file.name}")
            tensors[name] = info
    return tensors, metadata, pickles


def _check_against_index(index_path: Path, shards: dict[str, list[str]], tensors: dict[str, TensorInfo]) -> None:
    for filename, names in shards.items():
        shard = index_path.parent / filename
        held = {n for n, info in tensors.items() if info.file == shard}
        for name in names:
            if name not in held:
                raise CorruptFileError(index_path, f"weight_map puts {name!r} in {filename}, which does not hold it")
        listed = set(names)
        for name in held - listed:
            raise CorruptFileError(index_path, f"shard {filename} holds {name!r}, which weight_map does not list")
    folder, used = index_path.parent, set(shards)
    stems = {m.group("stem") for m in map(_SHARD_NAME.match, used) if m}
    for path in folder.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match and match.group("stem") in stems and path.name not in used:
            raise CorruptFileError(index_path, f"shard {path.name} is in the folder but weight_map never uses it")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint lazily: headers now, tensor data on demand.

    Args:
        path: a model folder, a `.safetensors` / `.bin` / `.pt` file, or an index `.json`.

    Raises:
        InvalidInputError: nothing loadable at `path`.
        CorruptFileError: a header, index or pickle is broken or unsafe, naming the entry.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    index_path: Path | None = None
    if path.is_dir():
        folder = path
        chosen = choose_weights((p.name for p in path.iterdir() if p.is_file()), ignore_prefix=RECORD_PREFIX)
        if chosen is not None and chosen.index is not None:
            index_path = path / chosen.index
            shards = _index_shards(index_path)
            files = [folder / name for name in sorted(shards)]
        elif chosen is not None:
            files = [path / name for name in chosen.files]
        else:  # nothing under a usual name: whatever weights there are (consolidated*, *.pt, *.pth)
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(RECORD_PREFIX))
            files = [p for p in found if p.suffix == ".safetensors"] or [
                p for p in found if p.suffix in PICKLE_SUFFIXES
            ]
            if not files:
                raise InvalidInputError(
                    f"{path}: no weights found (expected *.safetensors, an index, or pytorch_model*.bin)"
                )
    elif path.name.endswith(".index.json"):
        folder, index_path = path.parent, path
        shards = _index_shards(index_path)
        files = [folder / name for name in sorted(shards)]
    elif path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
        folder, files = None, [path]
    else:
        raise InvalidInputError(f"{path}: not a checkpoint (expected a folder, .safetensors, .bin, .pt or .pth)")

    tensors, metadata, pickles = _load_files(files)
    if index_path is not None:
        _check_against_index(index_path, shards, tensors)
    config_path = folder / "config.json" if folder is not None else None
    config = read_json(config_path, "config.json") if config_path is not None and config_path.is_file() else None
    prefix = "diffusion_pytorch_model" if files[0].name.startswith("diffusion_pytorch_model") else "model"
    return Checkpoint(path, folder, files, tensors, metadata, config, prefix, pickles)


def open_components(path: Path) -> dict[str | None, Checkpoint]:
    """A diffusers pipeline folder's weight-bearing subfolders by name, else the one checkpoint (key None)."""
    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        found = {}
        for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            weights = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()]
            if weights:
                found[folder.name] = open_checkpoint(folder)
        if not found:
            raise InvalidInputError(f"{path}: a pipeline folder (model_index.json) with no component weights")
        return found
    return {None: open_checkpoint(path)}


def component_aliases(components: dict) -> dict[str | None, str]:
    """kohya calls a Flux / SD3 transformer `lora_unet_`: map unet to transformer where only that exists; and
    sd-scripts calls Flux's T5 `lora_te3_` where diffusers has it as text_encoder_2 (no text_encoder_3).

    Keys with no component prefix (`down_blocks.…`, what `unet.save_attn_procs` and `save_lora_adapter`
    write) belong to the denoiser (unet, else transformer), as diffusers' model loaders read them: the
    same rule as on a single-file checkpoint, which is all denoiser.
    """
    denoiser = next((name for name in ("unet", "transformer") if name in components), None)
    unprefixed: dict[str | None, str] = {None: denoiser} if denoiser is not None and None not in components else {}
    if "unet" in components or "transformer" not in components:
        return unprefixed
    t5 = (
        {"text_encoder_3": "text_encoder_2"}
        if "text_encoder_2" in components and "text_encoder_3" not in components
        else {}
    )
    return {**unprefixed, "unet": "transformer", **t5}
