"""Llama-shaped checkpoints and PEFT adapters written straight to disk, of any size.

Used by the memory and interruption tests and by the benchmarks: no model is
instantiated, so building a 1 GB checkpoint costs only the disk writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = {
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("kv", "hidden"),
    "self_attn.v_proj": ("kv", "hidden"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("intermediate", "hidden"),
    "mlp.up_proj": ("intermediate", "hidden"),
    "mlp.down_proj": ("hidden", "intermediate"),
}


def _sizes(hidden: int, intermediate: int, heads: int, kv_heads: int | None) -> dict[str, int]:
    """Row and column sizes of the projections, by the names PROJECTIONS uses."""
    return {"hidden": hidden, "intermediate": intermediate, "kv": hidden // heads * (kv_heads or heads)}


def llama_shapes(
    *, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int | None
) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM checkpoint, by name and shape, in save_pretrained's order."""
    sizes = _sizes(hidden, intermediate, heads, kv_heads)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        names.append((f"{prefix}.input_layernorm.weight", (hidden,)))
        names += [(f"{prefix}.{p}.weight", (sizes[o], sizes[i])) for p, (o, i) in PROJECTIONS.items()]
        names.append((f"{prefix}.post_attention_layernorm.weight", (hidden,)))
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_llama_checkpoint(
    folder: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int = 16,
    kv_heads: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2_000_000_000,
    seed: int = 0,
) -> Path:
    """A transformers-loadable LlamaForCausalLM checkpoint with random weights, sharded like save_pretrained."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    names = llama_shapes(
        hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, heads=heads, kv_heads=kv_heads
    )

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in names:
        tensor = torch.ones(shape, dtype=dtype) if len(shape) == 1 else rand(*shape)
        if shards[-1] and size + tensor.numel() * tensor.element_size() > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.numel() * tensor.element_size()
    total = len(shards)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = "model.safetensors" if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if total > 1:
        total_size = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_lora_adapter(
    folder: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    rank: int,
    heads: int = 16,
    kv_heads: int | None = None,
    targets: tuple[str, ...] = tuple(p.split(".")[-1] for p in PROJECTIONS),
    alpha: float | None = None,
    seed: int = 1,
) -> Path:
    """A PEFT LoRA folder for `write_llama_checkpoint`'s model, with random (non-zero) A and B."""
    sizes = _sizes(hidden, intermediate, heads, kv_heads)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for projection, (out_kind, in_kind) in PROJECTIONS.items():
            if projection.split(".")[-1] not in targets:
                continue
            key = f"base_model.model.model.layers.{layer}.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, sizes[in_kind], generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(sizes[out_kind], rank, generator=generator) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
