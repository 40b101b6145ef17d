"""Tiny Llama / Qwen2 / Phi-3 bases, PEFT adapters for them, and mlx-lm adapters written by mlx-lm itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import llama_config, randomize_adapter

#: architecture → (transformers config class, model class, LoRA targets).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}
#: The shared tiny Llama sizes (conftest.llama_config), used for every architecture here.
SIZES = {
    key: getattr(llama_config(), key)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
}  # fmt: skip


def build(kind: str):
    import transformers

    config_class, model_class, _ = ARCHITECTURES[kind]
    extra = {"pad_token_id": 0} if kind == "phi3" else {}
    config = getattr(transformers, config_class)(**SIZES, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def save_peft(kind: str, folder: Path, seed: int = 3, **lora) -> Path:
    """A PEFT adapter for `kind`, all factors random (B is not left at zero)."""
    from peft import LoraConfig, get_peft_model

    options = dict(r=4, lora_alpha=8, target_modules=ARCHITECTURES[kind][2])
    options.update(lora)
    model = get_peft_model(build(kind), LoraConfig(**options))
    randomize_adapter(model, seed)
    model.save_pretrained(folder)
    return folder


def mlx_llama(num_layers: int = 2):
    """mlx-lm's own Llama with the tiny sizes above (frozen, as mlx-lm's trainer freezes it)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=SIZES["hidden_size"],
        num_hidden_layers=num_layers,
        intermediate_size=SIZES["intermediate_size"],
        num_attention_heads=SIZES["num_attention_heads"],
        num_key_value_heads=SIZES["num_key_value_heads"],
        rms_norm_eps=1e-6,
        vocab_size=SIZES["vocab_size"],
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    model.freeze()
    return model


def save_mlx_adapter(folder: Path, *, rank: int = 4, scale: float = 3.5, dora: bool = False, keys=None) -> Path:
    """Write an adapter the way `mlx_lm.lora` does: LoRA layers from its tuner, trainable parameters saved."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = mlx_llama()
    parameters = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        parameters["keys"] = keys
    linear_to_lora_layers(model, 2, parameters, use_dora=dora)
    mx.random.seed(5)
    trained = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        trained[name] = value + 0.1 * mx.random.normal(value.shape)  # lora_b starts at zero: make it count
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), trained)
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": 2, "lora_parameters": parameters}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def save_mlx_moe_adapter(folder: Path, *, experts: int = 3, rank: int = 2, scale: float = 1.5):
    """mlx-lm's tiny Mixtral with LoRASwitchLinear on the stacked experts; returns (folder, {module: mlx ΔW})."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import mixtral
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = mixtral.ModelArgs(
        model_type="mixtral", vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=2,
    )  # fmt: skip
    model = mixtral.Model(args)
    model.freeze()
    keys = ["block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.switch_mlp.down_proj"]
    parameters = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, 1, parameters)
    mx.random.seed(7)
    model.update(
        {"model": {"layers": [{"block_sparse_moe": {"switch_mlp": {
            name: {"lora_b": 0.1 * mx.random.normal(getattr(model.model.layers[0].block_sparse_moe.switch_mlp, name).lora_b.shape)}
            for name in ("gate_proj", "down_proj")
        }}}]}}
    )  # fmt: skip
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": parameters}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    deltas = {}
    for name in ("gate_proj", "down_proj"):
        layer = getattr(model.model.layers[0].block_sparse_moe.switch_mlp, name)
        delta = np.array(layer.fuse().weight - layer.linear.weight)  # mlx-lm's own fused ΔW, [E, out, in]
        deltas[name] = torch.from_numpy(delta)
    return folder, deltas
