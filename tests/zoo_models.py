"""An architecture zoo: tiny real configs of the families people fine-tune today, saved as save_pretrained writes
them, with PEFT adapters as PEFT saves them. Adding an architecture is one `Arch(...)` line in `ZOO`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Widths chosen so no expert parameter is square (2·I ≠ H): the in/out reading is then unambiguous.
_TEXT = dict(
    hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=100, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@dataclass(frozen=True)
class Arch:
    """One zoo member: how to build it, which Auto class loads it, what its adapter targets besides all-linear."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    auto: str = "AutoModelForCausalLM"
    dtype: torch.dtype = torch.float32
    target_parameters: tuple[str, ...] = ()
    seq2seq: bool = False

    def build(self, seed: int = 0):
        import transformers

        torch.manual_seed(seed)
        config = _config(self.model_type, self.config)
        model = getattr(transformers, self.auto).from_config(config)
        return model.to(self.dtype).eval()

    @property
    def model_class(self):
        import transformers

        return getattr(transformers, self.auto)


def _config(model_type: str, values: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


_VISION_CLIP = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
_VISION_SIGLIP = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=8)  # fmt: skip
_VISION_QWEN = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                    spatial_merge_size=1, temporal_patch_size=1, in_channels=3)  # fmt: skip
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24)

# fmt: off
ZOO: list[Arch] = [
    Arch("llama", "llama", dict(_TEXT, tie_word_embeddings=False)),
    Arch("qwen2", "qwen2", dict(_TEXT)),
    Arch("qwen3", "qwen3", dict(_TEXT)),
    Arch("gemma2", "gemma2", dict(_TEXT)),
    Arch("gemma3_text", "gemma3_text", dict(_TEXT)),
    Arch("phi3", "phi3", dict(_TEXT)),
    Arch("mistral", "mistral", dict(_TEXT)),
    Arch("mixtral", "mixtral", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2), target_parameters=_EXPERTS),
    Arch("qwen3_moe", "qwen3_moe", dict(_TEXT, num_experts=4, **_MOE), target_parameters=_EXPERTS),
    Arch("gpt_oss", "gpt_oss", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"]),
         dtype=torch.bfloat16, target_parameters=_EXPERTS),
    Arch("deepseek_v3", "deepseek_v3", dict({**_TEXT, "head_dim": 4, "num_key_value_heads": 4}, n_routed_experts=4,
         n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4,
         qk_nope_head_dim=8, v_head_dim=8, n_group=1,
         topk_group=1, **_MOE), dtype=torch.bfloat16, target_parameters=_EXPERTS),
    Arch("llava", "llava", dict(text_config=dict(_TEXT, model_type="llama"), vision_config=_VISION_CLIP,
         image_token_index=99), auto="AutoModelForImageTextToText"),
    Arch("gemma3", "gemma3", dict(text_config=dict(_TEXT), vision_config=_VISION_SIGLIP, mm_tokens_per_image=4,
         image_token_index=99, boi_token_index=97, eoi_token_index=98), auto="AutoModelForImageTextToText"),
    Arch("qwen2_vl", "qwen2_vl", dict(text_config=dict(_TEXT, rope_scaling={"type": "mrope",
         "mrope_section": [1, 1, 2]}), vision_config=_VISION_QWEN, image_token_id=99, video_token_id=98, vision_start_token_id=97),
         auto="AutoModelForImageTextToText"),
    Arch("t5", "t5", dict(d_model=32, d_ff=24, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=4,
         vocab_size=100, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
         auto="AutoModelForSeq2SeqLM", seq2seq=True),
    Arch("bart", "bart", dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
         decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=100,
         max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
         auto="AutoModelForSeq2SeqLM", seq2seq=True),
    Arch("gpt2", "gpt2", dict(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
         eos_token_id=0)),
]
# fmt: on


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter tensor random values (PEFT starts B at zero, which would make ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.1).to(param.dtype))


def lora_config_for(arch: Arch, **overrides):
    from peft import LoraConfig

    values = dict(r=4, lora_alpha=6, target_modules="all-linear", lora_dropout=0.0)
    if arch.target_parameters:
        values["target_parameters"] = list(arch.target_parameters)
    values.update(overrides)
    return LoraConfig(**values)


def build_case(arch: Arch, folder: Path) -> tuple[Path, Path]:
    """Save the base (as save_pretrained writes it) and a PEFT adapter on it; return both folders."""
    from peft import get_peft_model

    base, adapter = folder / "base", folder / "adapter"
    arch.build().save_pretrained(base)
    peft_model = get_peft_model(arch.build(), lora_config_for(arch))
    randomize_lora(peft_model, seed=1)
    peft_model.save_pretrained(adapter)
    return base, adapter


def inputs_for(arch: Arch) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 90, (1, 7), generator=generator)
    if arch.seq2seq:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


_BUILT: dict[str, tuple[Path, Path]] = {}


def cached_case(arch: Arch, tmp_path_factory) -> tuple[Path, Path]:
    """`build_case` once per test session, shared by every test module of the zoo."""
    if arch.name not in _BUILT:
        _BUILT[arch.name] = build_case(arch, tmp_path_factory.mktemp(f"zoo_{arch.name}"))
    return _BUILT[arch.name]
