"""What a merge leaves beside its output so it can be undone and reproduced: the record, DoRA norms, config, card.

`loratool_merge.json` names the adapters by the sha256 of their weights (never a host
path) with their weights and the output dtype; DoRA merges also keep the per-row norms
they divided by, which `unmerge` needs to undo them exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..adapters.model import Adapter
from ..errors import UnsupportedError
from ..io.card import CARD_NAME, write_card
from ..io.checkpoint import RECORD_PREFIX, Checkpoint, read_json
from ..planning.merge_plan import MergePlan
from ..version import __version__
from .report import qualified_name

__all__ = [
    "RECORD_NAME",
    "DORA_NORMS_NAME",
    "sha256_file",
    "adapter_identity",
    "write_folder_extras",
    "write_merge_card",
    "write_record",
    "recorded_dora_norms",
]


RECORD_NAME = f"{RECORD_PREFIX}.json"


DORA_NORMS_NAME = f"{RECORD_PREFIX}.dora.safetensors"


def sha256_file(path: Path) -> str:
    status = os.stat(path)
    return _sha256_of(Path(path).resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """A file's sha256, remembered for as long as its size and mtime stay (a merge hashes its adapters on
    the copy thread, early, and reads the digests when it writes its record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_identity(adapter: Adapter) -> str:
    """A stable id for an adapter: the sha256 of its weight files (no host paths)."""
    return sha256_file(adapter.weights.files[0])


def _updated_config(config: dict, plan: MergePlan, dtype: str | None) -> dict:
    config = dict(config)
    if plan.untie_embeddings:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    if plan.vocab_size is not None:  # the adapter brought new tokens
        config["vocab_size"] = plan.vocab_size
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "vocab_size": plan.vocab_size}
    if dtype is not None:
        config.pop("quantization_config", None)  # quantized weights were written dequantized
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    return config


def write_folder_extras(
    target: Path, base: Checkpoint, plan: MergePlan, names: list[str], out_dtype: str | None
) -> None:
    """Index (when sharded), config and every non-weight file of the base folder."""
    if len(names) > 1:
        weight_map = {plan.tasks[i].name: name for shard, name in zip(plan.shards, names, strict=True) for i in shard}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (target / f"{base.weight_prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for source in base.auxiliary_files():
        relative = source.relative_to(base.folder)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if relative == Path(CARD_NAME):
            continue  # the base's card describes the base; the output gets its own
        if relative == Path("config.json") and base.config is not None:
            config = _updated_config(base.config, plan, out_dtype)
            destination.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(source, destination)


def write_merge_card(
    target: Path,
    operation: str,
    config: dict | None,
    base_name: str,
    base_repo: str | None,
    adapter_names: list[str],
    weights: Sequence[float],
    dtype: str | None,
) -> None:
    verb = "merged into" if operation == "merge" else "removed from"
    command = ["loratool", operation, base_name, *adapter_names, "--output", "OUTPUT"]
    if any(w != 1.0 for w in weights):
        command += [part for w in weights for part in ("--weight", f"{w:g}")]
    if dtype is not None:
        command += ["--dtype", dtype]
    write_card(
        target,
        base_model=base_repo or (config or {}).get("_name_or_path") or base_name,
        library_name="transformers",
        tags=["lora", "merge" if operation == "merge" else "unmerge", "loratool"],
        title=f"{base_name} {'+' if operation == 'merge' else '−'} {', '.join(adapter_names)}",
        summary=f"{base_name} with {len(adapter_names)} LoRA adapter(s) {verb} its weights "
        f"(W' = W {'+' if operation == 'merge' else '−'} Σ wᵢ·ΔWᵢ, summed in fp32 and rounded once).",
        table=(["adapter", "weight"], [[name, f"{w:g}"] for name, w in zip(adapter_names, weights, strict=True)]),
        command=command,
    )


def write_record(
    target: Path,
    operation: str,
    base_name: str,
    adapters: Sequence[Adapter],
    adapter_names: Sequence[str],
    weights: Sequence[float],
    out_dtype: str | None,
    norms: dict,
) -> None:
    """Leave `loratool_merge.json` (and DoRA norms) so the merge can be undone exactly."""
    record = {
        "tool": "loratool",
        "version": __version__,
        "operation": operation,
        "base": base_name,
        "adapters": [
            {"name": name, "sha256": adapter_identity(a), "weight": w}
            for a, name, w in zip(adapters, adapter_names, weights, strict=True)
        ],
        "dtype": out_dtype,
    }
    if norms:
        from ..io.safetensors_writer import write_tensors

        write_tensors(target / DORA_NORMS_NAME, norms)
        record["dora_norms"] = {"file": DORA_NORMS_NAME, "tensors": sorted(norms)}
    (target / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def recorded_dora_norms(merged: Path, adapters: Sequence[Adapter], plans: dict) -> dict:
    """The DoRA norms a loratool merge recorded, checked against the adapters given to un-merge."""
    dora_tasks = [(name, t) for name, plan in plans.items() for t in plan.tasks if t.dora is not None]
    if not dora_tasks:
        return {}
    shown = ", ".join(qualified_name(name, t.name) for name, t in dora_tasks[:3])
    if not merged.is_dir() or not (merged / RECORD_NAME).is_file():
        raise UnsupportedError(
            f"DoRA cannot be un-merged from merged weights alone ({shown}): the per-row norms are lost. "
            f"Only a folder merged by loratool, which keeps {RECORD_NAME}, can be un-merged exactly"
        )
    record = read_json(merged / RECORD_NAME, RECORD_NAME)
    recorded = {entry.get("sha256") for entry in record.get("adapters", []) if isinstance(entry, dict)}
    for _, task in dora_tasks:
        adapter = adapters[task.dora.adapter]
        if adapter_identity(adapter) not in recorded:
            raise UnsupportedError(f"{adapter.path} is not the DoRA adapter {merged / RECORD_NAME} says was merged")
    from ..io.safetensors_header import read_header
    from ..io.tensors import read_safetensors_tensor

    norms_path = merged / DORA_NORMS_NAME
    if not norms_path.is_file():
        raise UnsupportedError(f"{norms_path} is missing; the DoRA merge cannot be undone exactly")
    infos, _ = read_header(norms_path)
    wanted = [qualified_name(name, t.name) for name, t in dora_tasks]
    missing = [name for name in wanted if name not in infos]
    if missing:
        raise UnsupportedError(f"{norms_path} has no recorded norm for {', '.join(missing[:3])}")
    return {name: read_safetensors_tensor(infos[name]) for name in wanted}
