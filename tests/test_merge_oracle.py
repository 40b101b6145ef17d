"""Merged weights against PEFT's own merge_and_unload, and logits through transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, load_state, lora_config, peft_model_for, read_json, save_adapter
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM
from ulp import max_ulp

import lora_tools

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _model_class(name: str):
    return GPT2LMHeadModel if name.startswith("gpt2") else LlamaForCausalLM


def _peft_merged_state(base, adapter, model_class) -> dict[str, torch.Tensor]:
    merged = peft_model_for(base, adapter, model_class).merge_and_unload(safe_merge=True)
    return {k: v.detach() for k, v in merged.state_dict().items()}


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "variant", ["plain", "rslora_patterns", "dora", "embedding_save", "trainable_tokens", "gpt2_fan_in_fan_out"]
)
def test_merge_matches_peft(variant, device, adapters, tmp_path):
    base, adapter = adapters[variant]
    out = tmp_path / "merged"
    report = lora_tools.merge(base, [adapter], out, device=device)
    assert report.device.startswith(device)
    assert report.tensors_changed > 0

    ours = load_state(out)
    expected = _peft_merged_state(base, adapter, _model_class(variant))
    tolerance = 2 if variant == "dora" else 1
    for name, tensor in ours.items():
        assert name in expected, f"{name} is not in PEFT's merged model"
        if device == "cuda":  # cuBLAS sums in another order than PEFT's CPU reference
            torch.testing.assert_close(tensor, expected[name].to(tensor.dtype), rtol=1e-5, atol=1e-6)
        else:
            assert max_ulp(tensor, expected[name].to(tensor.dtype)) <= tolerance, name
    # tensors PEFT writes that we do not are only tied copies
    assert set(expected) - set(ours) <= {"lm_head.weight"}

    peft_logits = peft_model_for(base, adapter, _model_class(variant))(TOKENS).logits
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(model(TOKENS).logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_are_untied_when_lm_head_changes(llama_tied_base, tmp_path):
    adapter = save_adapter(
        lambda: build_model("llama", tie_word_embeddings=True),
        lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
        tmp_path / "adapter",
    )
    out = tmp_path / "merged"
    report = lora_tools.merge(llama_tied_base, [adapter], out, device="cpu")
    assert any("tie_word_embeddings" in w for w in report.warnings)
    assert read_json(out / "config.json")["tie_word_embeddings"] is False

    state, base_state = load_state(out), load_state(llama_tied_base)
    assert "lm_head.weight" not in base_state
    assert torch.equal(state["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
    assert not torch.equal(state["lm_head.weight"], base_state["model.embed_tokens.weight"])

    peft_logits = peft_model_for(llama_tied_base, adapter, LlamaForCausalLM)(TOKENS).logits
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(model(TOKENS).logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_untied_when_embedding_changes(llama_tied_base, tmp_path):
    adapter = save_adapter(
        lambda: build_model("llama", tie_word_embeddings=True),
        lora_config(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
        tmp_path / "adapter",
    )
    out = tmp_path / "merged"
    lora_tools.merge(llama_tied_base, [adapter], out, device="cpu")
    state, base_state = load_state(out), load_state(llama_tied_base)
    assert torch.equal(state["lm_head.weight"], base_state["model.embed_tokens.weight"])
    peft_logits = peft_model_for(llama_tied_base, adapter, LlamaForCausalLM)(TOKENS).logits
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(model(TOKENS).logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_bf16_base_is_rounded_once(tmp_path):
    """A bf16 base: our single rounding is within 1 ulp of PEFT's (which rounds ΔW first)."""
    base = build_model("llama", dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    adapter = save_adapter(
        lambda: build_model("llama", dtype=torch.bfloat16),
        lora_config(r=4, lora_alpha=8, target_modules=["q_proj"]),
        tmp_path / "adapter",
    )
    out = tmp_path / "merged"
    lora_tools.merge(tmp_path / "base", [adapter], out, device="cpu")
    ours = load_state(out)
    # exact reference: fp64 sum rounded once
    from safetensors.torch import load_file

    lora = load_file(adapter / "adapter_model.safetensors")
    base_state = load_state(tmp_path / "base")
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.q_proj"
        a = lora[f"base_model.model.{name}.lora_A.weight"].double()
        b = lora[f"base_model.model.{name}.lora_B.weight"].double()
        exact = base_state[f"{name}.weight"].double() + 2.0 * (b @ a)
        assert ours[f"{name}.weight"].dtype == torch.bfloat16
        assert max_ulp(ours[f"{name}.weight"], exact.to(torch.bfloat16)) <= 1
    peft_state = _peft_merged_state(tmp_path / "base", adapter, LlamaForCausalLM)
    for name, tensor in ours.items():
        assert max_ulp(tensor, peft_state[name].to(torch.bfloat16)) <= 1, name
