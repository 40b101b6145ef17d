"""The architecture zoo: for every family, `loratool merge` equals PEFT's merge_and_unload in the checkpoint's own
on-disk names, and transformers loads the output with the logits of the unmerged PeftModel."""

from __future__ import annotations

import pytest
import torch
from conftest import load_state
from ulp import ulp_at
from zoo_models import ZOO, Arch, cached_case, inputs_for

import lora_tools

_BY_NAME = {arch.name: arch for arch in ZOO}


@pytest.fixture(scope="session")
def zoo_case(tmp_path_factory):
    """Builds each architecture's base and adapter once per session, on first use."""
    return lambda arch: cached_case(arch, tmp_path_factory)


def _peft(arch: Arch, base, adapter, dtype):
    from peft import PeftModel

    return PeftModel.from_pretrained(arch.model_class.from_pretrained(base, dtype=dtype), adapter).eval()


def _merged_by_peft(arch: Arch, base, adapter, dtype, folder):
    _peft(arch, base, adapter, dtype).merge_and_unload().save_pretrained(folder)
    return load_state(folder)


def _assert_as_exact(name: str, ours: torch.Tensor, peft: torch.Tensor, exact: torch.Tensor) -> None:
    """Each element within 1 ulp of PEFT's, or closer to the fp64 merge than PEFT's is."""
    assert ours.dtype == peft.dtype and ours.shape == peft.shape, (name, ours.dtype, peft.dtype)
    if not ours.is_floating_point():
        assert torch.equal(ours, peft), name
        return
    within_ulp = (ours.double() - peft.double()).abs() <= ulp_at(peft)
    closer = (ours.double() - exact).abs() <= (peft.double() - exact).abs()
    bad = ~(within_ulp | closer)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements neither within 1 ulp of PEFT nor closer to fp64"


def _logits(model, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(arch)).logits.float()


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_merge_equals_peft_in_disk_names(arch: Arch, zoo_case, tmp_path):
    base, adapter = zoo_case(arch)
    report = lora_tools.merge(base, [adapter], tmp_path / "ours", device="cpu")
    assert not report.warnings
    ours = load_state(tmp_path / "ours")
    peft = _merged_by_peft(arch, base, adapter, arch.dtype, tmp_path / "peft")
    exact = _merged_by_peft(arch, base, adapter, torch.float64, tmp_path / "peft64")
    original = load_state(base)
    assert set(ours) == set(original) == set(peft)
    changed = [name for name in ours if not torch.equal(ours[name], original[name])]
    assert len(changed) == report.tensors_changed > 0
    for name, tensor in ours.items():
        # transformers keeps some tensors in fp32 in memory (DeepSeek's router); PEFT saves them so
        _assert_as_exact(name, tensor, peft[name].to(tensor.dtype), exact[name])

    unmerged = _logits(_peft(arch, base, adapter, torch.float32), arch)
    merged = _logits(arch.model_class.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval(), arch)
    tolerance = 1e-4 if arch.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, unmerged, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_layout_table_agrees_with_save_pretrained(arch: Arch, zoo_case):
    """Every in-memory tensor, mapped by lora_tools' table, is exactly what transformers' save_pretrained wrote."""
    from lora_tools.layouts.transformers import disk_tensor_names, layout_for

    base, _ = zoo_case(arch)
    model = arch.build()
    model_type, layout = layout_for(model.config.to_dict())
    assert model_type == arch.model_type
    experts = next((p.shape[0] for n, p in model.named_parameters() if n.endswith("experts.down_proj")), 0)
    seen, memory = set(), []
    for name, tensor in model.state_dict().items():  # persistent tensors; a tied copy is saved once
        if tensor.data_ptr() not in seen or not tensor.numel():
            seen.add(tensor.data_ptr())
            memory.append(name)
    mapped = {disk for name in memory for disk in disk_tensor_names(name, layout, experts)}
    assert mapped == set(load_state(base))


def test_experts_adapter_on_a_base_without_experts_exits_3(zoo_case, tmp_path):
    """--allow-unmatched is for names that match nothing; a recognised expert delta is never dropped silently."""
    from conftest import run_cli

    base, _ = zoo_case(_BY_NAME["qwen3"])
    _, adapter = zoo_case(_BY_NAME["qwen3_moe"])
    result = run_cli(["merge", base, adapter, "--output", tmp_path / "out", "--allow-unmatched"])
    assert result.exit_code == 3, result.output
    assert "model.layers.0.mlp.experts" in result.output and "target_parameters" in result.output
    assert "--allow-unmatched cannot leave out" in result.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def _old_peft_orientation(adapter, folder):
    """The same adapter as a PEFT release that read [E, out, in] experts as [E, in, out] would have saved it."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    state = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key in [k for k in state if "experts" in k and k.endswith("lora_A.weight")]:
        a, b = state[key], state[key.replace("lora_A", "lora_B")]
        experts = 4
        rank = a.shape[0] // experts
        old_a = torch.cat([b[:, e::experts].T for e in range(experts)])  # A_old_e = B_eᵀ
        old_b = torch.empty(a.shape[1], a.shape[0])
        for e in range(experts):
            old_b[:, e::experts] = a[e * rank : (e + 1) * rank].T  # B_old_e = A_eᵀ
        state[key], state[key.replace("lora_A", "lora_B")] = old_a.contiguous(), old_b.contiguous()
    save_file(state, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.17.1"}))
    return folder


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_swapped_orientation_release_merges_as_trained(name, zoo_case, tmp_path):
    base, adapter = zoo_case(_BY_NAME[name])
    old = _old_peft_orientation(adapter, tmp_path / "old")
    lora_tools.merge(base, [adapter], tmp_path / "new_out", device="cpu")
    report = lora_tools.merge(base, [old], tmp_path / "old_out", device="cpu")
    new_state, old_state = load_state(tmp_path / "new_out"), load_state(tmp_path / "old_out")
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)
    assert report.tensors_changed == len([k for k in new_state if not torch.equal(new_state[k], load_state(base)[k])])


def test_square_experts_need_the_peft_version():
    from lora_tools.errors import IncompatibleError
    from lora_tools.layouts.experts import read_expert_shapes

    square = (4, 32, 32)
    with pytest.raises(IncompatibleError, match="PEFT 0.17–0.18 stored these experts' A/B with in and out swapped"):
        read_expert_shapes("m.experts", square, (8, 32), (32, 8), in_first=False)
    assert read_expert_shapes("m", square, (8, 32), (32, 8), in_first=False, peft_version="0.17.1").transposed
    assert not read_expert_shapes("m", square, (8, 32), (32, 8), in_first=False, peft_version="0.21.2").transposed
    assert read_expert_shapes("m", square, (8, 32), (32, 8), in_first=True).transposed  # gpt-oss: no swap ever
    with pytest.raises(IncompatibleError, match=r"fit neither"):
        read_expert_shapes("m", (4, 48, 32), (8, 48), (48, 8), in_first=False)


def test_rename_moves_a_vlm_adapter_onto_its_text_model(zoo_case, tmp_path):
    """--rename: the Llava adapter's language-model modules merged into a plain Llama checkpoint."""
    from conftest import run_cli

    llama_base, _ = zoo_case(_BY_NAME["llama"])
    llava_base, llava_adapter = zoo_case(_BY_NAME["llava"])
    result = run_cli(["merge", llama_base, llava_adapter, "--output", tmp_path / "out", "--allow-unmatched",
                      "--rename", r"^model\.language_model\.=model.", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "modules match nothing in the base and were left out" in result.output
    lora_tools.merge(llava_base, [llava_adapter], tmp_path / "llava", device="cpu")
    ours, llava = load_state(tmp_path / "out"), load_state(tmp_path / "llava")
    llama_before, llava_before = load_state(llama_base), load_state(llava_base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        on_llava = "language_model." + name
        torch.testing.assert_close(ours[name] - llama_before[name], llava[on_llava] - llava_before[on_llava])
    bad = run_cli(["merge", llama_base, llava_adapter, "--output", tmp_path / "bad", "--rename", "("])
    assert bad.exit_code == 2 and "--rename '('" in bad.output and not (tmp_path / "bad").exists()


_RESIZED = {  # case → (tie_word_embeddings, LoraConfig extras)
    "modules_to_save-untied": (False, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    "modules_to_save-tied": (True, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    "auto-saved-tied": (True, dict(target_modules=["q_proj", "v_proj"])),
    "auto-saved-untied": (False, dict(target_modules=["q_proj", "v_proj"])),
    "lora-on-resized-embedding": (False, dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
}  # fmt: skip


def _resized_case(folder, tie: bool, extras: dict):
    """A Llama base with 100 tokens, and an adapter trained after resizing it to 110 (new chat tokens)."""
    from peft import LoraConfig, get_peft_model
    from zoo_models import randomize_lora

    arch = Arch("llama", "llama", dict(_BY_NAME["llama"].config, tie_word_embeddings=tie))
    base, adapter = folder / "base", folder / "adapter"
    arch.build().save_pretrained(base)
    model = arch.model_class.from_pretrained(base)
    model.resize_token_embeddings(110, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, **extras))
    randomize_lora(peft_model, seed=2)
    peft_model.save_pretrained(adapter)
    (adapter / "chat_template.jinja").write_text("{% for m in messages %}<|new|>{{ m.content }}{% endfor %}")
    return arch, base, adapter


@pytest.mark.parametrize("case", list(_RESIZED))
def test_resized_vocabulary_merges_like_the_peft_model(case, tmp_path):
    from conftest import read_json
    from peft import PeftModel

    tie, extras = _RESIZED[case]
    arch, base, adapter = _resized_case(tmp_path, tie, extras)
    report = lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu")
    config = read_json(tmp_path / "out" / "config.json")
    assert config["vocab_size"] == 110
    state = load_state(tmp_path / "out")
    assert state["model.embed_tokens.weight"].shape == (110, 32)
    stays_tied = tie and case == "auto-saved-tied"
    assert config.get("tie_word_embeddings", True) == stays_tied
    assert ("lm_head.weight" in state) == (not stays_tied)
    assert any("ties lm_head" in w for w in report.warnings) == (tie and not stays_tied)
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == (adapter / "chat_template.jinja").read_text()

    resized = arch.model_class.from_pretrained(base)
    resized.resize_token_embeddings(110, mean_resizing=False)
    peft_model = PeftModel.from_pretrained(resized, adapter).eval()
    merged = arch.model_class.from_pretrained(tmp_path / "out").eval()
    inputs = {"input_ids": torch.tensor([[3, 105, 17, 109, 42, 100]])}  # new tokens included
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, peft_model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_resized_embedding_without_its_head_exits_3(tmp_path):
    """PEFT does not save a resized lm_head when only the embedding is targeted: its new rows are lost, so refuse."""
    from conftest import run_cli

    _, base, adapter = _resized_case(tmp_path / "case", False, dict(target_modules=["q_proj", "embed_tokens"]))
    result = run_cli(["merge", base, adapter, "--output", tmp_path / "out"])
    assert result.exit_code == 3, result.output
    assert "resizes the vocabulary only in part" in result.output and "lm_head.weight" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "module", "target", "rule"),
    [
        ("llava", "model.language_model.layers.0.self_attn.q_proj",
         "language_model.model.layers.0.self_attn.q_proj", r"llava: ^model\.language_model\. → language_model.model."),
        ("mixtral", "model.layers.0.mlp.experts.base_layer", "model.layers.0.block_sparse_moe.experts.{0..3}.{w1,w3}",
         "mixtral: experts.gate_up_proj [4, 48, 32] → w1/w3 per expert"),
        ("gpt_oss", "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.down_proj",
         "gpt_oss: experts.down_proj [4, 24, 32] (fused on disk)"),
    ],
)  # fmt: skip
def test_inspect_shows_which_rule_mapped_each_module(name, module, target, rule, zoo_case):
    import json

    from conftest import run_cli

    base, adapter = zoo_case(_BY_NAME[name])
    result = run_cli(["inspect", adapter, "--base", base, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["compatible"]
    found = {m["name"]: m["rule"] for m in report["modules"]}
    assert found[target] == rule
    shown = run_cli(["inspect", adapter, "--base", base])
    assert f"module(s) by {rule}" in " ".join(shown.output.split())  # rich wraps long lines


def test_extract_from_a_vlm_loads_in_peft_with_the_tuned_logits(zoo_case, tmp_path):
    """extract names modules as the model does in memory, so PEFT loads an adapter extracted from a Llava."""
    from peft import PeftModel

    arch = _BY_NAME["llava"]
    base, adapter = zoo_case(arch)
    lora_tools.merge(base, [adapter], tmp_path / "tuned", device="cpu")
    report = lora_tools.extract(base, tmp_path / "tuned", tmp_path / "extracted", rank=4, device="cpu")
    assert report.modules and all(m.relative_error < 1e-5 for m in report.modules)
    peft_model = PeftModel.from_pretrained(arch.model_class.from_pretrained(base), tmp_path / "extracted").eval()
    loaded = {n for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert len(loaded) == len(report.modules)
    tuned = arch.model_class.from_pretrained(tmp_path / "tuned").eval()
    torch.testing.assert_close(_logits(peft_model, arch), _logits(tuned, arch), atol=1e-4, rtol=1e-4)


def test_expert_pieces_are_row_blocks_of_each_expert():
    from lora_tools.layouts.experts import ExpertPiece, expert_columns_of_b, expert_rows_of_a, split_pieces

    pieces = split_pieces("m.experts", 2, 48, ("gate_proj", "up_proj"))
    assert pieces == [
        ExpertPiece("m.experts.0.gate_proj", 0, 0, 24), ExpertPiece("m.experts.0.up_proj", 0, 24, 48),
        ExpertPiece("m.experts.1.gate_proj", 1, 0, 24), ExpertPiece("m.experts.1.up_proj", 1, 24, 48),
    ]  # fmt: skip
    assert expert_rows_of_a(3, 4) == (12, 16) and expert_columns_of_b(3, 8) == (3, 8)
    from lora_tools.errors import IncompatibleError

    with pytest.raises(IncompatibleError, match="47 rows do not divide into 2 parts"):
        split_pieces("m.experts", 2, 47, ("gate_proj", "up_proj"))


@pytest.mark.parametrize("arch", [a for a in ZOO if a.model_type in ("llava", "gemma3", "qwen2_vl", "mixtral")],
                         ids=lambda a: a.name)  # fmt: skip
def test_every_table_rename_inverts(arch: Arch):
    """extract's disk → memory names undo merge's memory → disk names for every module of the model."""
    from lora_tools.layouts.transformers import layout_for, to_disk_path, to_memory_path

    model = arch.build()
    _, layout = layout_for(model.config.to_dict())
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)):  # modules that own tensors (containers have no disk name)
            assert to_memory_path(to_disk_path(name, layout.renames)[0], layout) == name


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss", "llava"])
def test_unmerge_takes_the_same_names_back_out(name, zoo_case, tmp_path):
    base, adapter = zoo_case(_BY_NAME[name])
    lora_tools.merge(base, [adapter], tmp_path / "merged", device="cpu", dtype="fp32")
    report = lora_tools.unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", device="cpu")
    restored, original = load_state(tmp_path / "restored"), load_state(base)
    assert set(restored) == set(original) and report.tensors_changed > 0
    for key, tensor in original.items():
        torch.testing.assert_close(restored[key], tensor.float(), atol=1e-6, rtol=0, msg=key)
