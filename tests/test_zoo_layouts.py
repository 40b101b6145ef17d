"""Name maps beyond the basic zoo: per-expert Linear adapters into fused-on-disk experts (gpt-oss) and per-expert
checkpoints, tied vision-language models with new tokens, and --rename rules a user gets wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import load_state, run_cli
from ulp import ulp_at
from zoo_models import ZOO, cached_case, inputs_for, randomize_lora

import lora_tools

_BY_NAME = {arch.name: arch for arch in ZOO}
_PARTS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def zoo_case(tmp_path_factory):
    return lambda arch: cached_case(arch, tmp_path_factory)


class _PerExpert(torch.nn.ModuleList):
    """gpt-oss experts as per-expert Linear modules, the naming of per-expert models and older trainers.

    Built from the fused tensors with the test's own reading (gate = even columns of `gate_up_proj[e]`, up = odd);
    `test_per_expert_model_reproduces_transformers` proves that reading against transformers' forward.
    """

    def __init__(self, fused) -> None:
        super().__init__()
        gate_up, gate_up_bias = fused.gate_up_proj.detach(), fused.gate_up_proj_bias.detach()
        hidden, intermediate = gate_up.shape[1], gate_up.shape[2] // 2
        for e in range(gate_up.shape[0]):
            expert = torch.nn.Module()
            for name, columns in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                linear = torch.nn.Linear(hidden, intermediate)
                linear.weight.data, linear.bias.data = (
                    gate_up[e][:, columns].T.clone(),
                    gate_up_bias[e][columns].clone(),
                )
                setattr(expert, name, linear)
            expert.down_proj = torch.nn.Linear(intermediate, hidden)
            expert.down_proj.weight.data = fused.down_proj.detach()[e].T.clone()
            expert.down_proj.bias.data = fused.down_proj_bias.detach()[e].clone()
            self.append(expert)
        self.alpha, self.limit = fused.alpha, fused.limit

    def forward(self, hidden, router_indices, routing_weights):
        out = torch.zeros_like(hidden)
        for k in range(router_indices.shape[1]):
            for e, expert in enumerate(self):
                chosen = router_indices[:, k] == e
                if chosen.any():
                    x = hidden[chosen]
                    gate = expert.gate_proj(x).clamp(max=self.limit)
                    up = expert.up_proj(x).clamp(min=-self.limit, max=self.limit)
                    y = expert.down_proj((up + 1) * gate * torch.sigmoid(gate * self.alpha))
                    out[chosen] += y * routing_weights[chosen, k, None]
        return out


def _per_expert_model(base):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.mlp.experts = _PerExpert(layer.mlp.experts)
    return model


def _logits(model, arch) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(arch)).logits.float()


@pytest.fixture(scope="module")
def gpt_oss_linear_case(zoo_case, tmp_path_factory):
    """gpt-oss base (fused experts on disk) + a PEFT LoRA on its per-expert Linear form (ranks and alphas vary)."""
    from peft import LoraConfig, get_peft_model

    arch = _BY_NAME["gpt_oss"]
    base, _ = zoo_case(arch)
    config = LoraConfig(
        r=4, lora_alpha=6, target_modules=list(_PARTS), lora_dropout=0.0,
        rank_pattern={r"model.layers.0.mlp.experts.1.up_proj": 2},  # expert 1: gate r=4 + up r=2 (padded to R=8)
        alpha_pattern={r"model.layers.0.mlp.experts.2.down_proj": 3},  # another scale: a second stacked module
    )  # fmt: skip
    peft_model = get_peft_model(_per_expert_model(base), config)
    randomize_lora(peft_model, seed=5)
    adapter = tmp_path_factory.mktemp("gpt_oss_linear") / "adapter"
    peft_model.save_pretrained(adapter)
    return arch, base, adapter, peft_model.eval()


def test_per_expert_model_reproduces_transformers(zoo_case):
    """The test's reading of gpt-oss' interleave (gate even, up odd) gives transformers' own logits."""
    from transformers import AutoModelForCausalLM

    arch = _BY_NAME["gpt_oss"]
    base, _ = zoo_case(arch)
    fused = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(_per_expert_model(base), arch), _logits(fused, arch), atol=1e-5, rtol=1e-5)


def _fp64_reference(base, peft_model) -> dict[str, torch.Tensor]:
    """The fused tensors with each expert's s·B·A added, in fp64, transposed into its (interleaved) slice."""
    state = {k: v.double() for k, v in load_state(base).items()}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        path = name.split("base_model.model.")[1]  # model.layers.L.mlp.experts.E.part
        prefix, expert, part = path.rsplit(".", 2)
        delta = module.scaling["default"] * (
            module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
        )
        expert = int(expert)
        if part == "down_proj":
            state[f"{prefix}.down_proj"][expert] += delta.T
        else:
            state[f"{prefix}.gate_up_proj"][expert][:, 0 if part == "gate_proj" else 1 :: 2] += delta.T
    return state


def test_per_expert_linears_into_fused_experts_round_once(gpt_oss_linear_case, tmp_path):
    """Every fused expert tensor equals the fp64 reference rounded once to bf16, bit for bit; the rest untouched."""
    _, base, adapter, peft_model = gpt_oss_linear_case
    report = lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu")
    ours, original = load_state(tmp_path / "out"), load_state(base)
    reference = _fp64_reference(base, peft_model)
    assert set(ours) == set(original)
    changed = sorted(k for k in ours if not torch.equal(ours[k], original[k]))
    assert changed == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    assert report.tensors_changed == 2
    for name in changed:
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], reference[name].to(torch.bfloat16)), name


def test_per_expert_linears_merged_give_the_peft_logits(gpt_oss_linear_case, tmp_path):
    """transformers' fused gpt-oss forward on the merged checkpoint = the per-expert PeftModel's forward."""
    from transformers import AutoModelForCausalLM

    arch, base, adapter, peft_model = gpt_oss_linear_case
    lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, arch), _logits(peft_model, arch), atol=1e-5, rtol=1e-5)


def test_per_expert_linears_unmerge_from_fused_experts(gpt_oss_linear_case, tmp_path):
    _, base, adapter, _ = gpt_oss_linear_case
    lora_tools.merge(base, [adapter], tmp_path / "merged", device="cpu", dtype="fp32")
    lora_tools.unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", device="cpu")
    restored, original = load_state(tmp_path / "restored"), load_state(base)
    for key, tensor in original.items():
        torch.testing.assert_close(restored[key], tensor.float(), atol=1e-6, rtol=0, msg=key)


def test_inspect_names_the_interleaved_slice(gpt_oss_linear_case):
    _, base, adapter, _ = gpt_oss_linear_case
    result = run_cli(["inspect", adapter, "--base", base, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"]["compatible"] and len(report["modules"]) == 4 * 3
    rules = {m["name"]: m["rule"] for m in report["modules"]}
    slot = "model.layers.0.mlp.experts.gate_up_proj[1] (up_proj interleaved with gate_proj)"
    assert rules[slot] == "gpt_oss: experts.N.up_proj → model.layers.0.mlp.experts.gate_up_proj (fused on disk)"
    assert rules["model.layers.0.mlp.experts.down_proj[3]"].startswith("gpt_oss: experts.N.down_proj → ")


def test_ambiguous_per_expert_linear_exits_3(gpt_oss_linear_case, tmp_path):
    """A per-expert fused `gate_up_proj` Linear: concatenated or interleaved rows cannot be told apart, so refuse."""
    from safetensors.torch import load_file, save_file

    _, base, adapter, _ = gpt_oss_linear_case
    fused = tmp_path / "fused_adapter"
    shutil.copytree(adapter, fused)
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace(".0.gate_proj.", ".0.gate_up_proj."): v for k, v in state.items()},
              fused / "adapter_model.safetensors")  # fmt: skip
    result = run_cli(["merge", base, fused, "--output", tmp_path / "out"])
    assert result.exit_code == 3, result.output
    message = " ".join(result.output.split())
    assert "model.layers.0.mlp.experts.0.gate_up_proj (A [4, 32], B [24, 4])" in message
    assert "ambiguous" in message and "model.layers.0.mlp.experts.gate_up_proj [4, 32, 48]" in message
    assert not (tmp_path / "out").exists()


def test_misfit_per_expert_linear_exits_3(gpt_oss_linear_case, tmp_path):
    from safetensors.torch import load_file, save_file

    _, base, adapter, _ = gpt_oss_linear_case
    bad = tmp_path / "bad_adapter"
    shutil.copytree(adapter, bad)
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.0.down_proj.lora_A.weight"
    state[key] = torch.zeros(4, 25)
    save_file(state, bad / "adapter_model.safetensors")
    result = run_cli(["merge", base, bad, "--output", tmp_path / "out"])
    assert result.exit_code == 3, result.output
    message = " ".join(result.output.split())
    assert "model.layers.0.mlp.experts.0.down_proj (A [4, 25], B [32, 4])" in message
    assert "needs A [r, 24] and B [32, r]" in message and not (tmp_path / "out").exists()


class _PerExpertSkeleton(torch.nn.Module):
    """Just the per-expert Linear modules of a Qwen3-MoE layer, named as its checkpoint names them on disk."""

    def __init__(self, experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        mlp = torch.nn.Module()
        mlp.experts = torch.nn.ModuleList()
        for _ in range(experts):
            expert = torch.nn.Module()
            expert.gate_proj, expert.up_proj = (torch.nn.Linear(hidden, intermediate, bias=False) for _ in range(2))
            expert.down_proj = torch.nn.Linear(intermediate, hidden, bias=False)
            mlp.experts.append(expert)
        layer = torch.nn.Module()
        layer.mlp = mlp
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


def test_per_expert_linears_into_per_expert_checkpoint(zoo_case, tmp_path):
    """Qwen3-MoE keeps experts per expert on disk: each Linear LoRA lands on its own tensor (fp32 math)."""
    from peft import LoraConfig, get_peft_model

    base, _ = zoo_case(_BY_NAME["qwen3_moe"])
    peft_model = get_peft_model(
        _PerExpertSkeleton(4, 32, 24), LoraConfig(r=4, lora_alpha=6, target_modules=list(_PARTS))
    )
    randomize_lora(peft_model, seed=6)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = lora_tools.merge(base, [tmp_path / "adapter"], tmp_path / "out", device="cpu")
    ours, original = load_state(tmp_path / "out"), load_state(base)
    assert report.tensors_changed == 4 * 3
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.split("base_model.model.")[1] + ".weight"
            delta = module.scaling["default"] * (
                module.lora_B["default"].weight.double() @ module.lora_A["default"].weight.double()
            )
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            magnitude = original[key].abs() + (module.scaling["default"] * b.abs() @ a.abs()).float()
            error = (
                ours[key].double() - (original[key].double() + delta)
            ).abs()  # fp32 math: within a few ulp of |W| + |s·B|·|A|
            assert not torch.equal(ours[key], original[key]), key
            assert (error <= 4 * ulp_at(magnitude)).all(), key


@pytest.mark.parametrize(
    ("rule", "message"),
    [("model.layers", "expected REGEX=REPLACEMENT"), ("([=x", "'([' is not a valid regular expression")],
)
@pytest.mark.parametrize("command", ["merge", "unmerge", "inspect"])
def test_bad_rename_is_a_usage_error(command, rule, message, zoo_case, tmp_path):
    """A malformed --rename is the user's typo, not a bad input file: exit 2, the rule named, nothing written."""
    base, adapter = zoo_case(_BY_NAME["llama"])
    args = [adapter, "--base", base] if command == "inspect" else [base, adapter, "--output", tmp_path / "out"]
    result = run_cli([command, *args, "--rename", rule])
    assert result.exit_code == 2, result.output
    assert f"--rename {rule!r}: {message}" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "extras"),
    [
        ("saved-embeddings-tied", dict(target_modules=["q_proj", "v_proj"])),  # equal copies, as PEFT saves them
        ("modules-to-save-untied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    ],
)
def test_tied_vlm_with_new_tokens(case, extras, zoo_case, tmp_path):
    """Gemma 3 (VLM) ties lm_head to `language_model.model.embed_tokens`: equal saved copies keep the tie, trained
    ones untie it into the VLM's own `language_model.lm_head.weight`; logits equal the PeftModel's either way."""
    from conftest import read_json
    from peft import LoraConfig, PeftModel, get_peft_model

    arch = _BY_NAME["gemma3"]
    base, _ = zoo_case(arch)
    model = arch.model_class.from_pretrained(base)
    model.resize_token_embeddings(110, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, **extras))
    randomize_lora(peft_model, seed=7)
    tied = case == "saved-embeddings-tied"
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=tied)  # PEFT's "auto" misses VLMs
    report = lora_tools.merge(base, [tmp_path / "adapter"], tmp_path / "out", device="cpu")
    state, config = load_state(tmp_path / "out"), read_json(tmp_path / "out" / "config.json")
    assert state["language_model.model.embed_tokens.weight"].shape == (110, 32)
    assert ("language_model.lm_head.weight" in state) == (not tied) and "lm_head.weight" not in state
    assert config["tie_word_embeddings"] == config["text_config"]["tie_word_embeddings"] == tied
    assert config["text_config"]["vocab_size"] == 110
    assert any("ties lm_head to language_model.model.embed_tokens.weight" in w for w in report.warnings) == (not tied)

    resized = arch.model_class.from_pretrained(base)
    resized.resize_token_embeddings(110, mean_resizing=False)
    unmerged = PeftModel.from_pretrained(resized, tmp_path / "adapter").eval()
    merged = arch.model_class.from_pretrained(tmp_path / "out").eval()
    inputs = {"input_ids": torch.tensor([[3, 105, 17, 109, 42, 100]])}  # new tokens included
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_tied_names_follow_the_layout():
    from lora_tools.layouts.transformers import tied_names

    for model_type in ("gemma3", "llava", "mistral3"):
        embeddings, head = tied_names({"model_type": model_type})
        assert "language_model.model.embed_tokens.weight" in embeddings and head == "language_model.lm_head.weight"
    embeddings, head = tied_names({"model_type": "qwen2_vl"})
    assert "model.embed_tokens.weight" in embeddings and head == "lm_head.weight"
    assert tied_names({"model_type": "llama"})[1] == "lm_head.weight"


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_extract_fused_experts_as_target_parameters(name, zoo_case, tmp_path):
    """extract from a MoE pair writes PEFT target_parameters adapters: PEFT loads them onto the base with the tuned
    logits, and merging them back gives the tuned tensors (TUNED = BASE + exact rank ≤ 8 per-expert deltas)."""
    from peft import PeftModel

    arch = _BY_NAME[name]
    base, adapter = zoo_case(arch)
    lora_tools.merge(base, [adapter], tmp_path / "tuned", device="cpu")
    report = lora_tools.extract(base, tmp_path / "tuned", tmp_path / "extracted", rank=8, device="cpu")
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    experts = "model.layers.0.mlp.experts"
    assert {f"{experts}.gate_up_proj", f"{experts}.down_proj"} <= set(config["target_parameters"])
    assert not [s for s in report.skipped if ".experts." in s["name"] and not s["name"].endswith("_bias")]
    found = {m.name: m for m in report.modules}
    assert found[f"{experts}.base_layer"].rank == found[experts].rank == 8  # gate_up_proj nests inside down_proj
    exact = arch.dtype == torch.float32
    assert all(m.relative_error < (1e-5 if exact else 5e-3) for m in report.modules)

    peft_model = PeftModel.from_pretrained(arch.model_class.from_pretrained(base, dtype=torch.float32),
                                           tmp_path / "extracted").eval()  # fmt: skip
    tuned = arch.model_class.from_pretrained(tmp_path / "tuned", dtype=torch.float32).eval()
    tolerance = 1e-5 if exact else 2e-3
    torch.testing.assert_close(_logits(peft_model, arch), _logits(tuned, arch), atol=tolerance, rtol=tolerance)

    lora_tools.merge(base, [tmp_path / "extracted"], tmp_path / "again", device="cpu")
    again, expected = load_state(tmp_path / "again"), load_state(tmp_path / "tuned")
    for key in (k for k in expected if ".experts." in k):
        if exact:
            torch.testing.assert_close(again[key], expected[key], atol=1e-6, rtol=0, msg=key)
        else:  # bf16 TUNED is not exactly rank 8: within a bf16 ulp of its largest element
            atol = float(expected[key].abs().max()) * 2**-8
            torch.testing.assert_close(again[key].float(), expected[key].float(), atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_router_table_agrees_with_the_model(arch):
    """The layout's routers are exactly the modules transformers keeps as a bare 2-D weight (PEFT: target_parameters)."""
    from transformers.pytorch_utils import Conv1D

    from lora_tools.layouts.transformers import layout_for

    model = arch.build()
    _, layout = layout_for(model.config.to_dict())
    plain = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    bare = {
        name for name, module in model.named_modules()
        if not isinstance(module, plain) and isinstance(getattr(module, "weight", None), torch.nn.Parameter)
        and module.weight.dim() == 2
    }  # fmt: skip
    assert bare == {name for name, _ in model.named_modules() if layout.is_router(name)}


@pytest.mark.parametrize("arch", ZOO, ids=lambda a: a.name)
def test_table_agrees_with_transformers_rules(arch):
    """transformers' own loading rules (its conversion mapping, scoped by the model instance) turn every on-disk
    name lora_tools' table gives back into the in-memory name; the part lora_tools reads at runtime agrees too."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from lora_tools.layouts.hf_rules import transformers_layout
    from lora_tools.layouts.transformers import disk_tensor_names, layout_for, to_disk_path

    model = arch.build()
    _, layout = layout_for(model.config.to_dict())
    rules = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    memory = model.state_dict()
    for name in memory:
        for disk in disk_tensor_names(name, layout, experts=4):
            assert rename_source_key(disk, renamings, converters, model.base_model_prefix, memory)[0] == name, disk

    runtime = transformers_layout(arch.model_type)
    if runtime is None:
        return
    assert {(s.param, s.parts) for s in runtime.layout.experts} <= {(s.param, s.parts) for s in layout.experts}
    if runtime.layout.renames:
        for path, _ in model.named_modules():
            assert to_disk_path(path, runtime.layout.renames)[0] == to_disk_path(path, layout.renames)[0], path
    assert all("anchored" in why for why in runtime.left_out)  # VLM placements: scoped to sub-models


def test_model_type_outside_the_table_uses_transformers_rules(tmp_path):
    """MiniMax is not in lora_tools' table: transformers' rules (`.block_sparse_moe.` ↔ `.mlp.`, w1/w3/w2 fused into
    experts) place its expert adapter; the merge gives the PeftModel's logits and inspect names the source."""
    from peft import PeftModel
    from transformers import __version__
    from zoo_models import _EXPERTS, _TEXT, Arch, build_case

    from lora_tools.layouts.transformers import LAYOUTS

    arch = Arch("minimax", "minimax", dict(_TEXT, num_local_experts=4, num_experts_per_tok=2,
                layer_types=["full_attention"]), target_parameters=_EXPERTS)  # fmt: skip
    assert arch.model_type not in LAYOUTS
    base, adapter = build_case(arch, tmp_path)
    report = lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu")
    assert report.tensors_changed > 4 * 3 and not report.warnings
    unmerged = PeftModel.from_pretrained(arch.model_class.from_pretrained(base), adapter).eval()
    merged = arch.model_class.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(merged, arch), _logits(unmerged, arch), atol=1e-4, rtol=1e-4)

    result = run_cli(["inspect", adapter, "--base", base, "--json"])
    rules = {m["name"]: m["rule"] for m in json.loads(result.stdout)["modules"]}
    source = f"transformers {__version__} conversion_mapping['minimax']"
    assert rules["model.layers.0.block_sparse_moe.experts.{0..3}.{w1,w3}"] == (
        f"{source}: experts.gate_up_proj [4, 48, 32] → w1/w3 per expert"
    )
    assert rules["model.layers.0.block_sparse_moe.gate"] == rf"{source}: \.mlp\. → .block_sparse_moe."
