"""Tiny bases of every architecture in layouts.gguf's table that transformers 5 builds, PEFT adapters on them, and
llama.cpp's own `convert_lora_to_gguf.py` run on each (restored by tests/llama_cpp_converter.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from llama_cpp_converter import lora_command

_TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ("gate_proj", "up_proj", "down_proj")
#: DeepSeek: its attention (kv_b_proj aside, which llama.cpp refuses). PEFT turns any gate/up/down_proj target on
#: transformers 5's DeepSeek into a LoRA on its fused experts, which llama.cpp refuses too (see the refusal tests).
_DEEPSEEK_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]
_DEEPSEEK = dict({**_TEXT, "num_key_value_heads": 4}, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                 kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **_MOE)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One architecture: its transformers model_type and config, the LoRA targets, the HF class name."""

    name: str
    model_type: str
    config: dict
    architecture: str
    targets: object = "all-linear"


# fmt: off
CASES: list[Case] = [
    Case("gemma2", "gemma2", _TEXT, "Gemma2ForCausalLM"),
    Case("gemma3_text", "gemma3_text", _TEXT, "Gemma3ForCausalLM"),
    Case("qwen3", "qwen3", _TEXT, "Qwen3ForCausalLM"),
    # MoE: llama.cpp converts no LoRA on transformers 5's fused experts; the router and attention it does
    Case("mixtral", "mixtral", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM",
         [*_ATTENTION, "gate"]),
    Case("phi2", "phi", dict(_TEXT, num_key_value_heads=4), "PhiForCausalLM"),
    Case("starcoder2", "starcoder2", _TEXT, "Starcoder2ForCausalLM"),
    Case("falcon", "falcon", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
         new_decoder_architecture=True, num_kv_heads=2), "FalconForCausalLM"),
    Case("llama", "llama", _TEXT, "LlamaForCausalLM"),
    Case("mistral", "mistral", _TEXT, "MistralForCausalLM"),
    Case("qwen2", "qwen2", _TEXT, "Qwen2ForCausalLM"),
    # what "all-linear" reached before PEFT 0.22 (which adds the fused experts and the router by target_parameters:
    # the *_fused cases below): attention, and the shared expert's linears and gate
    Case("qwen2_moe", "qwen2_moe", dict(_TEXT, num_experts=4, shared_expert_intermediate_size=48, **_MOE),
         "Qwen2MoeForCausalLM", [*_ATTENTION, "shared_expert_gate", *(f"shared_expert.{p}" for p in _MLP)]),
    Case("qwen3_moe", "qwen3_moe", dict(_TEXT, num_experts=4, **_MOE), "Qwen3MoeForCausalLM", [*_ATTENTION, "gate"]),
    Case("gemma", "gemma", _TEXT, "GemmaForCausalLM"),
    Case("phi3", "phi3", _TEXT, "Phi3ForCausalLM"),
    Case("stablelm", "stablelm", _TEXT, "StableLmForCausalLM"),
    Case("olmo", "olmo", _TEXT, "OlmoForCausalLM"),
    Case("olmo2", "olmo2", _TEXT, "Olmo2ForCausalLM"),
    Case("granite", "granite", _TEXT, "GraniteForCausalLM"),
    Case("cohere", "cohere", _TEXT, "CohereForCausalLM"),
    Case("glm4", "glm4", _TEXT, "Glm4ForCausalLM"),
    Case("gpt_oss", "gpt_oss", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2,
         layer_types=["full_attention"] * 2), "GptOssForCausalLM"),
    Case("deepseek_v2", "deepseek_v2", _DEEPSEEK, "DeepseekV2ForCausalLM", _DEEPSEEK_TARGETS),
    Case("deepseek_v3", "deepseek_v3", dict(_DEEPSEEK, n_group=1, topk_group=1), "DeepseekV3ForCausalLM",
         _DEEPSEEK_TARGETS),
]
# fmt: on


def build_base(case: Case, folder: Path, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(case.model_type, **case.config)).eval()
    model.save_pretrained(folder)
    return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random A and B (PEFT starts B at zero, which would make every ΔW zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def save_adapter(model: torch.nn.Module, targets, folder: Path, seed: int = 1, parameters=None) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=parameters, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    randomize(peft_model, seed)
    peft_model.save_pretrained(folder)
    return folder


def save_expert_adapter(folder: Path, layout: str, layers: int, experts: int, hidden: int, ffn: int,
                        skip: int | None = None) -> Path:  # fmt: skip
    """A PEFT adapter on per-expert linears, as PEFT saves it for transformers-4 MoE modules (which transformers 5
    fuses, so PEFT cannot build it here): `…experts.{e}.w1` (Mixtral) or `…mlp.experts.{e}.gate_proj` (Qwen-MoE)."""
    from safetensors.torch import save_file

    names = {"mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
             "qwen": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"))}[layout]  # fmt: skip
    generator = torch.Generator().manual_seed(7)
    state = {}
    for layer in range(layers):
        for expert in range(experts):
            if expert == skip:
                continue
            for projection, (rows, cols) in zip(names[1], ((ffn, hidden), (ffn, hidden), (hidden, ffn)), strict=True):
                prefix = f"base_model.model.model.layers.{layer}.{names[0]}.{expert}.{projection}"
                state[f"{prefix}.lora_A.weight"] = torch.randn(4, cols, generator=generator) * 0.1
                state[f"{prefix}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.1
    folder.mkdir(parents=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": list(names[1]),
              "base_model_name_or_path": None, "bias": "none", "use_rslora": False, "use_dora": False}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def llama_cpp_convert(converter: Path, adapter: Path, base: Path, output: Path) -> subprocess.CompletedProcess:
    """Run llama.cpp's convert_lora_to_gguf.py (f32) and return the finished process."""
    argv, env = lora_command(converter, adapter, base, output)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[str, torch.Tensor]]]:
    """(fields, tensor name → (GGUF type, tensor)) with gguf's own reader."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.get_field(name).contents() for name in reader.fields if not name.startswith("GGUF.")}
    return fields, {t.name: (t.tensor_type.name, torch.from_numpy(t.data.copy())) for t in reader.tensors}


#: transformers 5's fused expert parameters, as PEFT's target_parameters name them.
FUSED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def per_expert_equivalent(fused: Path, folder: Path, layout: str, experts: int, hidden: int) -> Path:
    """The per-expert PEFT adapter (transformers-4 module names) holding the same ΔW as a target_parameters LoRA
    on fused experts, for llama.cpp's converter, which takes only the former. Expert e of PEFT's ParamWrapper:
    A rows [e·r, (e+1)·r), B columns e::E; gate_up_proj ([E, 2I, H], A reads H) has gate rows, then up rows.
    The test checks these ΔW against PEFT's own merge."""
    from safetensors.torch import load_file, save_file

    config = json.loads((fused / "adapter_config.json").read_text())
    names = {"mixtral": ("block_sparse_moe.experts.{}.", ("w1", "w3"), "w2"),
             "qwen": ("mlp.experts.{}.", ("gate_proj", "up_proj"), "down_proj")}[layout]  # fmt: skip
    loaded, rank = load_file(fused / "adapter_model.safetensors"), config["r"]
    state = {k: v for k, v in loaded.items() if ".mlp.experts." not in k}
    for key, a in loaded.items():
        if ".mlp.experts." not in key or ".lora_A." not in key:
            continue
        b, prefix = loaded[key.replace("lora_A", "lora_B")], key.split(".mlp.experts.")[0] + "."
        for e in range(experts):
            a_e, b_e = a[e * rank : (e + 1) * rank], b[:, e::experts]
            parts = zip(names[1], b_e.chunk(2), strict=True) if a.shape[1] == hidden else [(names[2], b_e)]
            for projection, rows in parts:
                module = prefix + names[0].format(e) + projection
                state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a_e.clone(), rows.clone()
    folder.mkdir(parents=True)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, target_parameters=None)))
    return folder
