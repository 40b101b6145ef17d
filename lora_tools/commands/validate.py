"""`validate`: adapter files and folders checked from their headers alone (for pre-commit and CI).

Given any files (those a commit touched, say), it finds the adapters they belong to (an adapter
file, or the PEFT folder of an adapter_config.json or adapter weights), reads each one's config
and tensor headers, and, given a base, checks every module against the base's shapes. It reads
no tensor data and never imports torch, so a hook runs in well under a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..adapters.model import Adapter
from ..adapters.registry import fit_to_base, is_adapter, read_adapter
from ..errors import InvalidInputError
from ..io.checkpoint import open_checkpoint
from ..planning.compatibility import compatibility_problems

__all__ = ["AdapterCheck", "ValidateReport", "adapter_paths", "recorded_base", "validate"]


@dataclass(frozen=True)
class AdapterCheck:
    """One adapter: its modules, the base it was checked against, and every problem (empty when valid)."""

    path: str
    format: str | None
    base: str | None
    modules: list[str]
    problems: list[str]
    notes: list[str]


@dataclass(frozen=True)
class ValidateReport:
    base: str | None
    adapters: list[AdapterCheck]
    skipped: list[str]
    seconds: float

    @property
    def valid(self) -> bool:
        return all(not adapter.problems for adapter in self.adapters)

    def to_dict(self) -> dict:
        return {**asdict(self), "valid": self.valid}


def adapter_paths(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """The adapters the given files belong to (each once, in order), and the files that belong to none.

    A file next to an adapter_config.json belongs to that folder (PEFT, mlx-lm), even when it would read
    as an adapter alone; other files are adapters themselves (kohya, GGUF) or belong to none.
    """
    found: dict[Path, None] = {}
    skipped = []
    for given in map(Path, paths):
        candidates = (given,)
        if given.is_file():
            beside = (given.parent / "adapter_config.json").is_file()
            candidates = (given.parent, given) if beside else (given, given.parent)
        adapter = next((c for c in candidates if c.exists() and is_adapter(c)), None)
        if adapter is None:
            skipped.append(str(given))
        else:
            found.setdefault(adapter, None)
    return list(found), skipped


def recorded_base(adapter: Adapter) -> Path | None:
    """The base an adapter names (PEFT's base_model_name_or_path) when it is a local path: beside the adapter
    (relative to its folder), else relative to the current folder. A Hub id is never fetched."""
    if not adapter.base_model:
        return None
    folder = adapter.path if adapter.path.is_dir() else adapter.path.parent
    for candidate in (folder / adapter.base_model, Path(adapter.base_model)):
        if candidate.exists():
            return Path(os.path.normpath(candidate))
    return None


class _Bases:
    """Base checkpoints opened once each (their headers), by path."""

    def __init__(self) -> None:
        self._opened: dict[Path, tuple[dict, dict | None]] = {}

    def tensors(self, path: Path) -> tuple[dict, dict | None]:
        key = path.resolve()
        if key not in self._opened:
            checkpoint = open_checkpoint(path)
            self._opened[key] = (checkpoint.tensors, checkpoint.config)
        return self._opened[key]


#: How a Git LFS pointer file begins (a checkout without `git lfs pull` holds these instead of the weights).
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _lfs_pointers(path: Path) -> list[Path]:
    """The files of an adapter that are Git LFS pointers, not the files they point to."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    found = []
    for file in files:
        if file.is_file() and file.stat().st_size < 1024:
            with open(file, "rb") as handle:
                if handle.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    found.append(file)
    return found


def _check(path: Path, base: Path | None, bases: _Bases, alpha: float | None) -> AdapterCheck:
    try:
        adapter = read_adapter(path, alpha=alpha)
    except InvalidInputError as exc:
        pointers = _lfs_pointers(path)
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        if pointers:
            message = f"{pointers[0]}: a Git LFS pointer, not the weights; run `git lfs pull` (in Actions: lfs: true)"
        return AdapterCheck(str(path), None, None, [], [message], [])
    notes = []
    against = base or recorded_base(adapter)
    if against is None and adapter.base_model:
        notes.append(f"base {adapter.base_model} is not a local path: shapes not checked (pass --base)")
    modules = [m.name for m in adapter.modules]
    if against is None:
        problems = [f"{key}: not a key lora_tools understands" for key in adapter.unknown_keys]
        return AdapterCheck(str(path), adapter.format, None, modules, problems, notes)
    tensors, config = bases.tensors(against)
    problems = compatibility_problems(fit_to_base(adapter, against), tensors, config)
    return AdapterCheck(str(path), adapter.format, str(against), modules, problems, notes)


def validate(
    paths: Iterable[str | os.PathLike], *, base: str | os.PathLike | None = None, alpha: float | None = None
) -> ValidateReport:
    """Check the adapters that `paths` belong to, from headers only, against a base when one is known.

    Each adapter is checked against `base`, or else against the base its config names when that is
    a local folder or file (PEFT's base_model_name_or_path, relative to the adapter's folder or to
    the current one); otherwise only that it reads (config, headers, key names).

    Args:
        paths: adapter folders or files, or any files inside adapter folders (others are skipped).
        base: a base checkpoint (folder or file) for every adapter; its headers are read once.
        alpha: lora_alpha for adapter files that do not record it.

    Returns:
        A `ValidateReport`; `valid` is False when any adapter is unreadable or does not fit its base.

    Raises:
        InvalidInputError: a base cannot be opened.
    """
    started = time.perf_counter()
    found, skipped = adapter_paths(paths)
    base_path = Path(base) if base is not None else None
    if base_path is not None and not base_path.exists():
        raise InvalidInputError(f"{base_path}: no such file or folder")
    bases = _Bases()
    checks = [_check(path, base_path, bases, alpha) for path in found]
    return ValidateReport(str(base) if base else None, checks, skipped, time.perf_counter() - started)
