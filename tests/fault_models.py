"""Helpers for the fault tests: a large checkpoint written fast, and small filesystems mounted for a test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from synthetic import llama_shapes

from lora_tools.io.safetensors_writer import SafetensorsWriter
from lora_tools.io.tensors import tensor_bytes


def write_big_llama(folder: Path, *, layers: int, hidden: int, intermediate: int, vocab: int, heads: int) -> Path:
    """A one-file bf16 Llama checkpoint of any size in about the time the disk takes.

    Every tensor repeats one random 1 MiB block (finite values), which is all a
    test of the writer needs; `synthetic.write_llama_checkpoint` draws every
    value and is ten times slower at hundreds of MB.
    """
    names = llama_shapes(
        hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, heads=heads, kv_heads=None
    )
    folder.mkdir(parents=True)
    block = tensor_bytes((torch.randn(1 << 19, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16())
    writer = SafetensorsWriter(folder / "model.safetensors", [(n, "BF16", s) for n, s in names], {"format": "pt"})
    for name, shape in names:
        nbytes = 2 * torch.Size(shape).numel()
        writer.write(name, (bytes(block) * (nbytes // len(block) + 1))[:nbytes])
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _mount_command(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


@contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `folder` for the test's duration; skips where this process may not mount."""
    if not sys.platform.startswith("linux"):
        pytest.skip("tmpfs mounts are Linux-only")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        done = _mount_command(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(folder)])
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if _mount_command(["umount", str(folder)]).returncode != 0:
            _mount_command(["umount", "-l", str(folder)])


def remount_read_only(folder: Path) -> None:
    done = _mount_command(["mount", "-o", "remount,ro", str(folder)])
    assert done.returncode == 0, done.stderr
