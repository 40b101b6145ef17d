"""Pairing a fine-tune's tensors with its base's, and deciding how PEFT would carry each (pure: headers only)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..adapters.peft_rules import conv1d_names
from ..errors import IncompatibleError, InvalidInputError
from ..io.safetensors_header import TensorInfo

__all__ = ["METHODS", "EMBEDDING_MODES", "ExtractTask", "ExtractPlan", "plan_extraction"]

METHODS = ("auto", "svd", "randomized")
EMBEDDING_MODES = ("skip", "lora", "full")


@dataclass(frozen=True)
class ExtractTask:
    """One base weight to decompose: `module` is its module path, `kind` how PEFT carries it."""

    module: str
    tensor: str
    shape: tuple[int, ...]
    kind: str  # "linear", "conv", "embedding"
    fan_in_fan_out: bool = False
    embedding_like: bool = False


@dataclass(frozen=True)
class ExtractPlan:
    tasks: list[ExtractTask]
    one_dimensional: list[str]
    skipped: list[dict]


def _is_embedding_like(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe", "lm_head", "embed_out", "output")


def plan_extraction(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    *,
    base_config: dict | None = None,
    tuned_config: dict | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    skip_mismatched: bool = False,
) -> ExtractPlan:
    """Pair base and tuned tensors by name and decide how each could be carried (pure: headers only).

    Raises:
        InvalidInputError: different architectures, mismatched or one-sided tensors
            (unless `skip_mismatched`), bad regexes, or nothing selected.
    """
    base_type = (base_config or {}).get("model_type")
    tuned_type = (tuned_config or {}).get("model_type")
    if base_type and tuned_type and base_type != tuned_type:
        raise InvalidInputError(f"BASE is a {base_type} model and TUNED a {tuned_type} model; they must match")
    if embeddings not in EMBEDDING_MODES:
        raise InvalidInputError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {embeddings!r}")
    patterns = {}
    for option, value in (("--include", include), ("--exclude", exclude)):
        if value is not None:
            try:
                patterns[option] = re.compile(value)
            except re.error as exc:
                raise InvalidInputError(f"{option} {value!r} is not a valid regular expression ({exc})") from exc

    problems, skipped = [], []
    for name in tuned:
        if name not in base:
            problems.append(f"{name} is only in TUNED")
    for name, info in base.items():
        other = tuned.get(name)
        if other is None:
            problems.append(f"{name} is only in BASE")
        elif other.shape != info.shape:
            problems.append(
                f"{name} is {list(info.shape)} in BASE but {list(other.shape)} in TUNED (resized vocabulary?)"
            )
        elif other.dtype != info.dtype and not (other.is_float and info.is_float):
            problems.append(f"{name} is {info.dtype} in BASE but {other.dtype} in TUNED")
    if problems and not skip_mismatched:
        raise IncompatibleError(
            f"{len(problems)} tensor(s) do not pair up between BASE and TUNED (pass --skip-mismatched to leave them out)",
            problems,
        )
    skipped += [{"name": p.split(" ", 1)[0], "reason": p.split(" ", 1)[1]} for p in problems]

    conv1d = conv1d_names(base_config)  # transformers Conv1D layers store in×out (PEFT forces fan_in_fan_out)
    tasks, one_dimensional = [], []
    for name, info in base.items():
        other = tuned.get(name)
        if other is None or other.shape != info.shape or not info.is_float:
            continue
        module, _, leaf = name.rpartition(".")
        if "--include" in patterns and not patterns["--include"].search(name):
            continue
        if "--exclude" in patterns and patterns["--exclude"].search(name):
            continue
        if len(info.shape) == 1:
            one_dimensional.append(name)
            continue
        if leaf != "weight" or len(info.shape) > 5:
            skipped.append({"name": name, "reason": "not a weight PEFT can carry as LoRA"})
            continue
        embedding_like = _is_embedding_like(module)
        if embedding_like and embeddings == "skip":
            skipped.append({"name": name, "reason": "embedding / lm_head (use --embeddings lora|full)"})
            continue
        if len(info.shape) > 2:
            kind = "conv"
        elif embedding_like and module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out", "output"):
            kind = "embedding"
        else:
            kind = "linear"
        fan_in_fan_out = module.rsplit(".", 1)[-1] in conv1d and kind == "linear" and not embedding_like
        tasks.append(ExtractTask(module, name, info.shape, kind, fan_in_fan_out, embedding_like))
    if not tasks:
        raise InvalidInputError("no weight is selected for extraction (check --include / --exclude / --embeddings)")
    return ExtractPlan(tasks, one_dimensional, skipped)
