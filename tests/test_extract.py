"""Extraction and resizing against Eckart–Young (fp64 truncated SVD) and PEFT itself."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, load_state, lora_config, run_cli, save_adapter
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import lora_tools
from lora_tools.lowrank.rank import RankRule, choose_rank

TRUE_RANKS = {"self_attn.q_proj": 3, "self_attn.v_proj": 2, "mlp.down_proj": 3, "mlp.gate_proj": 1}
TRUE_RANK = max(TRUE_RANKS.values())
NOISE = 1e-4


def _fine_tune(tmp_path, noise: float = NOISE, seed: int = 5):
    """A tiny Llama and a 'fine-tune' of it: known low-rank updates plus noise on four projections per layer."""
    base_model = build_model("llama")
    base_model.save_pretrained(tmp_path / "base")
    state = {k: v.clone() for k, v in base_model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in range(2):
        for module, rank in TRUE_RANKS.items():
            name = f"model.layers.{layer}.{module}.weight"
            out, inp = state[name].shape
            low_rank = torch.randn(out, rank, generator=generator) @ torch.randn(rank, inp, generator=generator)
            delta = 0.05 * low_rank + noise * torch.randn(out, inp, generator=generator)
            state[name] = state[name] + delta
            deltas[name] = state[name].double() - base_model.state_dict()[name].double()
    tuned = build_model("llama")
    tuned.load_state_dict(state)
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned", deltas


def _optimal_error(delta: torch.Tensor, rank: int) -> float:
    values = torch.linalg.svdvals(delta.double())
    return float(values[rank:].pow(2).sum().sqrt())


def _peft_merged(base, adapter) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig.from_pretrained(adapter))
    result = set_peft_model_state_dict(peft_model, load_file(adapter / "adapter_model.safetensors"))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    return peft_model.merge_and_unload().state_dict()


@pytest.mark.parametrize("method", ["randomized", "svd"])
def test_extraction_is_within_two_percent_of_optimal(tmp_path, method):
    base, tuned, deltas = _fine_tune(tmp_path)
    out = tmp_path / "adapter"
    report = lora_tools.extract(base, tuned, out, rank=4, method=method, device="cpu")
    assert {m.method for m in report.modules} == {method}
    assert len(report.modules) == len(deltas) and {m.rank for m in report.modules} == {4}
    merged, tuned_state = _peft_merged(base, out), load_state(tuned)
    for name, delta in deltas.items():
        error = float((merged[name].double() - tuned_state[name].double()).norm())
        assert error <= 1.02 * _optimal_error(delta, 4) + 1e-6, name
        assert error < 0.01 * float(delta.norm())  # recovered to the noise level
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4


def test_extract_then_merge_reproduces_tuned(tmp_path):
    base, tuned, deltas = _fine_tune(tmp_path, noise=0.0)
    lora_tools.extract(base, tuned, tmp_path / "adapter", rank=TRUE_RANK, device="cpu")
    result = run_cli(["merge", base, tmp_path / "adapter", "-o", tmp_path / "merged", "-q"])
    assert result.exit_code == 0, result.stderr
    merged, tuned_state, base_state = load_state(tmp_path / "merged"), load_state(tuned), load_state(base)
    for name in tuned_state:
        if name in deltas:
            torch.testing.assert_close(merged[name], tuned_state[name], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], base_state[name]), name


def _spectrum_pair(tmp_path, values: list[float]):
    """BASE and TUNED differing in one matrix whose singular values are `values`."""
    base_model = build_model("llama")
    base_model.save_pretrained(tmp_path / "base")
    state = dict(base_model.state_dict())
    name = "model.layers.0.mlp.down_proj.weight"
    out, inp = state[name].shape
    generator = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(out, len(values), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, len(values), generator=generator, dtype=torch.float64)).Q
    delta = (u * torch.tensor(values, dtype=torch.float64)) @ v.T
    state[name] = (state[name].double() + delta).float()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "tuned.safetensors")
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned.safetensors").rename(tmp_path / "tuned" / "model.safetensors")
    (tmp_path / "tuned" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    return tmp_path / "base", tmp_path / "tuned"


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("--energy", 0.9, 2), ("--energy", 0.99, 4), ("--energy", 0.999, 5), ("--sv-ratio", 10, 4), ("--sv-ratio", 2, 2)],
)
def test_energy_and_ratio_choose_the_right_rank(tmp_path, option, value, expected):
    # the rule computed independently: energy = smallest k with Σ_{i<k} s² ≥ E·Σ s²; ratio = #{s ≥ s₀/X}
    squares = [s * s for s in SPECTRUM]
    if option == "--energy":
        independent = next(k for k in range(1, 8) if sum(squares[:k]) >= value * sum(squares) * (1 - 1e-12))
    else:
        independent = sum(1 for s in SPECTRUM if s >= SPECTRUM[0] / value)
    assert independent == expected
    base, tuned = _spectrum_pair(tmp_path, SPECTRUM)
    result = run_cli(["extract", base, tuned, "-o", tmp_path / "out", option, value, "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["rank"] for m in report["modules"]] == [expected]
    assert report["modules"][0]["energy_kept"] == pytest.approx(sum(squares[:expected]) / sum(squares), rel=1e-4)


def test_per_module_ranks_go_to_rank_pattern(tmp_path):
    base, tuned, deltas = _fine_tune(tmp_path, noise=0.0)
    out = tmp_path / "adapter"
    report = lora_tools.extract(base, tuned, out, energy=0.999999, max_rank=8, device="cpu", include=r"layers\.0\.")
    assert {m.name.split(".", 3)[3]: m.rank for m in report.modules} == TRUE_RANKS
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {"model.layers.0.mlp.gate_proj": 1, "model.layers.0.self_attn.v_proj": 2}
    assert config["alpha_pattern"] == {"model.layers.0.mlp.gate_proj": 1.0, "model.layers.0.self_attn.v_proj": 2.0}
    assert all(name.startswith("model.layers.0.") for name in config["target_modules"])
    merged, tuned_state = _peft_merged(base, out), load_state(tuned)  # loads with no missing or unexpected keys
    for name in deltas:
        if name.startswith("model.layers.0."):
            torch.testing.assert_close(merged[name], tuned_state[name], rtol=1e-5, atol=1e-6)


def test_resize_equals_best_low_rank_approximation(tmp_path):
    adapter = save_adapter(
        lambda: build_model("llama"),
        lora_config(r=32, lora_alpha=64, target_modules=["gate_proj", "up_proj"]),
        tmp_path / "r32",
    )
    report = lora_tools.resize(adapter, tmp_path / "r8", rank=8, device="cpu")
    assert {m.rank for m in report.modules} == {8}
    old, new = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "r8" / "adapter_model.safetensors"),
    )
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    new_scale = config["lora_alpha"] / config["r"]
    assert new_scale == pytest.approx(2.0)
    for key in old:
        if not key.endswith("lora_A.weight"):
            continue
        b_key = key.replace("lora_A", "lora_B")
        delta = 2.0 * old[b_key].double() @ old[key].double()
        u, s, vh = torch.linalg.svd(delta)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        resized = new_scale * new[b_key].double() @ new[key].double()
        assert new[key].shape[0] == 8
        torch.testing.assert_close(resized, best, rtol=1e-5, atol=1e-6)
    # and PEFT loads it
    from peft import PeftModel

    PeftModel.from_pretrained(build_model("llama"), tmp_path / "r8")


def test_rank_rule_is_pure():
    assert choose_rank([3.0, 2.0, 1.0], 14.0, RankRule(rank=5), full_rank=3) == 3
    assert choose_rank([3.0, 2.0, 1.0], 14.0, RankRule(energy=0.5), full_rank=3) == 1
    assert choose_rank([3.0, 2.0, 1.0], 14.0, RankRule(energy=0.9, max_rank=1), full_rank=3) == 1
    assert choose_rank([], 0.0, RankRule(rank=2), full_rank=3) == 0


def _refused(result, needle):
    assert result.exit_code == 3, (result.exit_code, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "0"], "--rank must be a positive integer"),
        (["--energy", "0"], "--energy must be in (0, 1]"),
        (["--energy", "1.5"], "--energy must be in (0, 1]"),
        (["--rank", "4", "--energy", "0.5"], "exactly one of"),
        (["--rank", "4", "--include", "nothing-matches"], "no weight is selected"),
        (["--rank", "4", "--exclude", "."], "no weight is selected"),
        (["--rank", "4", "--include", "("], "not a valid regular expression"),
    ],
)
def test_bad_extract_options(tmp_path, args, needle):
    base, tuned, _ = _fine_tune(tmp_path)
    _refused(run_cli(["extract", base, tuned, "-o", tmp_path / "out", "-q", *args]), needle)
    assert not (tmp_path / "out").exists()


def test_different_architectures_and_shapes_are_refused(tmp_path, gpt2_base, llama_base):
    _refused(run_cli(["extract", llama_base, gpt2_base, "-o", tmp_path / "out", "-r", "4", "-q"]), "must match")
    wide = tmp_path / "wide"
    build_model("llama", vocab_size=128).save_pretrained(wide)
    result = run_cli(["extract", llama_base, wide, "-o", tmp_path / "out", "-r", "4", "-q"])
    _refused(result, "resized vocabulary")
    assert "--skip-mismatched" in result.stderr
    assert not (tmp_path / "out").exists()


def test_embeddings_skipped_by_default_then_lora_or_full(tmp_path):
    base_model = build_model("llama")
    base_model.save_pretrained(tmp_path / "base")
    state = {k: v.clone() for k, v in base_model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state["model.embed_tokens.weight"] += (
        0.01 * torch.randn(96, 2, generator=generator) @ torch.randn(2, 32, generator=generator)
    )
    state["model.layers.0.self_attn.q_proj.weight"] += 0.01
    state["model.norm.weight"] += 0.5
    save_file(state, tmp_path / "model.safetensors")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tmp_path / "model.safetensors").rename(tuned / "model.safetensors")
    (tuned / "config.json").write_text((tmp_path / "base" / "config.json").read_text())

    skipped = lora_tools.extract(tmp_path / "base", tuned, tmp_path / "a", rank=2, device="cpu")
    assert [m.name for m in skipped.modules] == ["model.layers.0.self_attn.q_proj"]
    assert any("embedding" in s["reason"] for s in skipped.skipped)
    assert any("model.embed_tokens.weight changed but were skipped" in n for n in skipped.notes), skipped.notes
    assert not any("lm_head" in n for n in skipped.notes)  # skipped, but unchanged: no note
    assert skipped.changed_1d == [{"name": "model.norm.weight", "max_abs_change": pytest.approx(0.5)}]

    as_lora = lora_tools.extract(
        tmp_path / "base", tuned, tmp_path / "b", rank=2, embeddings="lora", save_1d=True, device="cpu"
    )
    assert {m.name for m in as_lora.modules} == {"model.embed_tokens", "model.layers.0.self_attn.q_proj"}
    merged = _peft_merged(tmp_path / "base", tmp_path / "b")
    torch.testing.assert_close(
        merged["model.embed_tokens.weight"], state["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(merged["model.norm.weight"], state["model.norm.weight"])

    full = lora_tools.extract(tmp_path / "base", tuned, tmp_path / "c", rank=2, embeddings="full", device="cpu")
    assert full.modules_to_save == ["model.embed_tokens"]
    merged = _peft_merged(tmp_path / "base", tmp_path / "c")
    assert torch.equal(merged["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
