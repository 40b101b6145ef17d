"""Output shards: tensors cut into files of at most a given size, named as transformers names them (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InvalidInputError

__all__ = ["plan_shards", "shard_file_names"]


def plan_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Cut tensors (by index, in order) into shards of at most `max_bytes`, like transformers.

    A tensor larger than `max_bytes` gets a shard of its own.
    """
    if max_bytes <= 0:
        raise InvalidInputError(f"--max-shard-size must be positive, got {max_bytes}")
    shards: list[list[int]] = [[]]
    current = 0
    for index, size in enumerate(sizes):
        if shards[-1] and current + size > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(index)
        current += size
    return shards


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    """`model.safetensors` for one shard, else `model-0000i-of-0000N.safetensors`."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
