"""`inspect` reports what PEFT itself loads: every module's rank and scale."""

from __future__ import annotations

import json

import pytest
from conftest import ADAPTER_VARIANTS, peft_model_for, run_cli
from transformers import GPT2LMHeadModel, LlamaForCausalLM


@pytest.mark.parametrize("variant", sorted(ADAPTER_VARIANTS))
def test_inspect_json_matches_peft_layers(variant, adapters):
    from peft.tuners.lora import LoraLayer

    base, adapter = adapters[variant]
    result = run_cli(["inspect", adapter, "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "peft"
    model_class = GPT2LMHeadModel if variant.startswith("gpt2") else LlamaForCausalLM
    peft_model = peft_model_for(base, adapter, model_class)
    expected = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.r
    }
    ours = {m["name"]: m for m in report["modules"]}
    assert ours.keys() == expected.keys()
    for name, layer in expected.items():
        assert ours[name]["rank"] == layer.r["default"], name
        assert ours[name]["scale"] == layer.scaling["default"], name
        assert ours[name]["dora"] == bool(layer.use_dora.get("default", False)), name
    from safetensors.torch import load_file

    assert report["num_parameters"] == sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())


def test_inspect_with_base_reports_compatible(adapters):
    base, adapter = adapters["plain"]
    result = run_cli(["inspect", adapter, "--base", base, "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["validation"] == {"base": str(base), "problems": [], "compatible": True}


def test_inspect_checkpoint_json(adapters):
    base, _ = adapters["plain"]
    report = json.loads(run_cli(["inspect", base, "--json"]).stdout)
    assert report["num_tensors"] == 21
    assert report["dtypes"] == {"F32": 21}
    assert report["files"] == ["model.safetensors"]
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["lm_head"] == "present"
    assert report["total_bytes"] == report["num_parameters"] * 4


def test_inspect_tied_checkpoint(gpt2_base):
    report = json.loads(run_cli(["inspect", gpt2_base, "--json"]).stdout)
    assert report["lm_head"] == "tied"


def test_inspect_renders_grouped_table_on_stderr(adapters):
    _, adapter = adapters["rslora_patterns"]
    result = run_cli(["inspect", adapter])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "rsLoRA" in result.stderr and "down_proj" in result.stderr
    every = run_cli(["inspect", adapter, "--all"])
    assert "model.layers.1.self_attn.q_proj" in every.stderr


def test_lone_adapter_file_needs_alpha(adapters, tmp_path):
    _, adapter = adapters["plain"]
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    result = run_cli(["inspect", lone, "--json"])
    assert result.exit_code == 3
    assert "--alpha" in result.stderr and str(lone) in result.stderr
    report = json.loads(run_cli(["inspect", lone, "--json", "--alpha", "8"]).stdout)
    assert report["format"] == "peft-safetensors"
    assert {m["scale"] for m in report["modules"]} == {2.0}
