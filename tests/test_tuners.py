"""PEFT's tuners other than LoRA, merged from files, against PEFT's own `merge_and_unload`.

Every case of `tuner_models.CASES` (each tuner on the layer kinds PEFT supports for it,
with its settings that change the arithmetic) is saved by PEFT, merged by lora_tools from
the files and by PEFT in memory. fp32 bases: at least as close to PEFT's fp64 merge as
PEFT's fp32 merge is (up to one fp32 ulp of the tensor's scale); bf16 bases: within one
bf16 ulp of PEFT's fp32 merge of the same values rounded once (PEFT's own bf16 merge
rounds ΔW first for RandLoRA and C3A). Tensors no module adapts stay byte-identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import REPO, build_model, llama_config, load_state, run_cli
from safetensors.torch import load_file, save_file
from tuner_models import CASES, peft_merged, randomize, save_base, save_tuner
from ulp import max_ulp

import lora_tools
from lora_tools.adapters.tuners import TUNERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="session")
def tuner_files(tmp_path_factory):
    """Bases (fp32, bf16) and PEFT-saved adapters, each built the first time a test asks for it."""
    root = tmp_path_factory.mktemp("tuners")
    built: dict = {}

    def get(case: str, dtype: str = "fp32"):
        if dtype not in built:
            built[dtype] = save_base(root / f"base-{dtype}.safetensors", DTYPES[dtype])
        if case not in built:
            built[case] = save_tuner(case, root / case)
        return built[dtype], built[case]

    return get


def _adapted(adapter) -> set[str]:
    """The tensors the adapter changes: its modules' weights, and their biases where IA3 scales them."""
    modules = lora_tools.read_adapter(adapter).modules
    return {f"{m.name}.weight" for m in modules} | {f"{m.name}.bias" for m in modules if m.bias_key}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(tuner_files, tmp_path, case, dtype):
    base, adapter = tuner_files(case, dtype)
    out = tmp_path / "merged.safetensors"
    lora_tools.merge(base, [adapter], out, device="cpu")
    ours, original = load_file(out), load_file(base)
    changed = _adapted(adapter)
    assert set(ours) == set(original)
    for name in set(original) - changed:
        assert torch.equal(ours[name], original[name]), name
    if dtype == "bf16":  # PEFT's fp32 merge of the bf16 values, rounded once
        exact = peft_merged(base, adapter, torch.float32)
        for name in changed:
            assert max_ulp(ours[name], exact[name].to(torch.bfloat16)) <= 1, name
        return
    peft, reference = peft_merged(base, adapter, torch.float32), peft_merged(base, adapter, torch.float64)
    for name in changed:
        error = (ours[name].double() - reference[name]).abs().max()
        peft_error = (peft[name].double() - reference[name]).abs().max()
        slack = torch.finfo(torch.float32).eps * reference[name].abs().max()
        assert error <= peft_error + slack, (name, float(error), float(peft_error))
        assert name.endswith(".bias") or not torch.equal(ours[name], original[name]), f"{name}: nothing changed"


@pytest.mark.parametrize("case", [c for c in CASES if TUNERS[c.split("-")[0].upper()].unmerge])
def test_unmerge_round_trip(tuner_files, tmp_path, case):
    """merge, then un-merge: the bf16 base back within one bf16 quantum (at the larger of W's and W''s scales)."""
    base, adapter = tuner_files(case, "bf16")
    lora_tools.merge(base, [adapter], tmp_path / "merged.safetensors", device="cpu")
    lora_tools.unmerge(tmp_path / "merged.safetensors", [adapter], tmp_path / "back.safetensors", device="cpu")
    back, original = load_file(tmp_path / "back.safetensors"), load_file(base)
    merged = load_file(tmp_path / "merged.safetensors")
    for name, tensor in original.items():
        scale = max(tensor.float().abs().max(), merged[name].float().abs().max())
        quantum = torch.finfo(torch.bfloat16).eps * scale
        assert (back[name].float() - tensor.float()).abs().max() <= quantum, name


LLAMA_CASES = {
    "ia3": lambda peft: peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]),
    "oft": lambda peft: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "o_proj", "embed_tokens"]),
    "vera": lambda peft: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "adalora": lambda peft: peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj", "up_proj"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_merged_llama_logits_equal_unmerged_peft(llama_base, tmp_path, case):
    """transformers loads the merged folder; its logits equal the unmerged PeftModel's."""
    import warnings

    import peft
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(llama_base), LLAMA_CASES[case](peft))
        randomize(model, 3)
        model.save_pretrained(tmp_path / "adapter")
        unmerged = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_base), tmp_path / "adapter")
    lora_tools.merge(llama_base, [tmp_path / "adapter"], tmp_path / "out", device="cpu")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, llama_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, found = unmerged.eval()(tokens).logits, merged(tokens).logits
    assert (expected - build_model("llama")(tokens).logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)


#: Config fields newer PEFT versions added (or that older configs leave out), at the case's default values.
TRIMMED = {
    "oft": ["coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "fan_in_fan_out"],
    "vera": ["save_projection", "fan_in_fan_out", "projection_prng_key"],
    "hra": ["apply_GS"],
    "miss": ["init_weights", "mini_r"],
    "lokr": ["use_effective_conv2d", "decompose_factor", "rank_dropout_scale", "alpha_pattern", "rank_pattern"],
}


@pytest.mark.parametrize("case", list(TRIMMED))
def test_older_configs_read_with_peft_defaults(tuner_files, tmp_path, case):
    """A config without the newer fields merges as PEFT merges it (PEFT fills its defaults)."""
    base, saved = tuner_files(case)
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key in TRIMMED[case]:
        config.pop(key, None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    lora_tools.merge(base, [adapter], tmp_path / "out.safetensors", device="cpu")
    ours, peft = load_file(tmp_path / "out.safetensors"), peft_merged(base, adapter, torch.float32)
    for name in _adapted(adapter):
        torch.testing.assert_close(ours[name], peft[name], rtol=0, atol=4e-6)


def _refused(result, *needles):
    assert result.exit_code == 3, result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_vera_without_saved_projections_is_refused(tuner_files, tmp_path):
    base, saved = tuner_files("vera")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    state = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items() if "vera_A" not in k}
    save_file({k: v for k, v in state.items() if "vera_B" not in k}, adapter / "adapter_model.safetensors")
    _refused(run_cli(["merge", base, adapter, "-o", tmp_path / "out.safetensors"]), "save_projection", "VERA", "vera_A")
    assert not (tmp_path / "out.safetensors").exists()


def test_ia3_unmerge_with_a_zero_scale_is_refused(tuner_files, tmp_path):
    base, saved = tuner_files("ia3")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lin.ia3_l"))
    state[key][0] = 0.0
    save_file(state, adapter / "adapter_model.safetensors")
    lora_tools.merge(base, [adapter], tmp_path / "merged.safetensors", device="cpu")
    result = run_cli(["unmerge", tmp_path / "merged.safetensors", adapter, "-o", tmp_path / "back.safetensors"])
    _refused(result, "lin", "zero", "cannot be undone")
    assert not (tmp_path / "back.safetensors").exists()


@pytest.mark.parametrize("case", ["oft", "ia3", "hra", "miss-bat"])
def test_multiplicative_tuners_merge_alone_at_weight_one(tuner_files, tmp_path, case):
    base, adapter = tuner_files(case)
    result = run_cli(["merge", base, adapter, "--weight", "0.5", "-o", tmp_path / "out.safetensors"])
    _refused(result, "transforms W", "weight 1")
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_tuner_tensor_is_named(tuner_files, tmp_path):
    base, saved = tuner_files("adalora")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if not k.endswith("ff.lora_E")}, adapter / "adapter_model.safetensors")
    _refused(run_cli(["merge", base, adapter, "-o", tmp_path / "out.safetensors"]), "ADALORA module 'ff'", "lora_E")


def test_boft_with_several_butterfly_factors_is_refused(tuner_files, tmp_path):
    base, saved = tuner_files("boft")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lin.boft_R"))
    state[key] = state[key].repeat(2, 1, 1, 1)
    save_file(state, adapter / "adapter_model.safetensors")
    _refused(run_cli(["merge", base, adapter, "-o", tmp_path / "out.safetensors"]), "boft_n_butterfly_factor")


def test_tuner_that_does_not_fit_the_base_names_the_module(tuner_files, tmp_path):
    base, saved = tuner_files("c3a")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("lin.c3a_kernel"))
    state[key] = state[key][:, :1].contiguous()
    save_file(state, adapter / "adapter_model.safetensors")
    _refused(run_cli(["merge", base, adapter, "-o", tmp_path / "out.safetensors"]), "lin", "c3a_kernel")


@pytest.mark.parametrize("case", ["oft-cayley", "ia3", "vera"])
def test_inspect_names_the_tuner_and_its_settings(tuner_files, case):
    _, adapter = tuner_files(case)
    config = json.loads((adapter / "adapter_config.json").read_text())
    report = json.loads(run_cli(["inspect", adapter, "--json"]).stdout)
    assert report["tuner"] == config["peft_type"]
    assert {m["variant"] for m in report["modules"]} == {TUNERS[config["peft_type"]].variant}
    if case == "oft-cayley":
        assert report["modules"][0]["params"]["coft"] is True
        assert report["modules"][0]["params"]["use_cayley_neumann"] is False
    if case == "ia3":
        assert {m["name"]: m["params"]["feedforward"] for m in report["modules"]} == {
            "conv": False, "ff": True, "lin": False}  # fmt: skip
    shown = run_cli(["inspect", adapter]).stderr
    assert f"tuner {config['peft_type']}" in shown
    if case == "ia3":  # IA3 has no rank or alpha: the table says so rather than "0"
        rows = [line for line in shown.splitlines() if line.strip().startswith(("ff ", "lin ", "conv "))]
        assert len(rows) == 3 and all(" – " in row and " 0 " not in row for row in rows), shown


@pytest.mark.parametrize("case", ["adalora", "vera", "fourierft", "randlora", "shira", "c3a", "miss", "loha", "oft"])
def test_stats_measure_peft_delta(tuner_files, case):
    """`inspect --stats --base`: ‖ΔW‖_F of each module equals ‖W' − W‖_F of PEFT's own merge (fp64)."""
    base, adapter = tuner_files(case)
    report = json.loads(run_cli(["inspect", adapter, "--stats", "--base", base, "--json"]).stdout)
    merged, original = peft_merged(base, adapter, torch.float64), load_file(base)
    for module in report["stats"]["modules"]:
        name = f"{module['name']}.weight"
        expected = float((merged[name] - original[name].double()).norm())
        assert module["frobenius"] == pytest.approx(expected, rel=1e-5), name


def test_stats_without_base_say_what_they_need(tuner_files):
    _, adapter = tuner_files("adalora")
    assert run_cli(["inspect", adapter, "--stats", "--json"]).exit_code == 0  # AdaLoRA's ΔW shape is its own
    _refused(run_cli(["inspect", tuner_files("vera")[1], "--stats"]), "VERA module", "pass --base")


def _converted_merge(tuner_files, tmp_path, case, *options):
    base, adapter = tuner_files(case)
    result = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / "lora", "--base", base, "--json", *options])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    return base, adapter, json.loads(result.stdout), peft_merged(base, tmp_path / "lora", torch.float64)


@pytest.mark.parametrize("case", ["adalora", "adalora-conv1d", "vera", "vera-conv1d"])
def test_convert_to_lora_is_exact_for_low_rank_tuners(tuner_files, tmp_path, case):
    """AdaLoRA and VeRA are rank-r LoRAs: PEFT merges the converted LoRA as it merges the tuner (fp32 rounding)."""
    base, adapter, report, converted = _converted_merge(tuner_files, tmp_path, case)
    assert {m["method"] for m in report["modules"]} == {"copied (exact)"}
    original = peft_merged(base, adapter, torch.float64)
    for name in _adapted(adapter):
        delta = original[name] - load_file(base)[name].double()
        error = (converted[name] - original[name]).abs().max() / delta.abs().max()
        assert error < 1e-6, (name, float(error))


@pytest.mark.parametrize("case", ["c3a", "oft", "fourierft", "hra"])
def test_convert_to_lora_refactorises_at_the_eckart_young_error(tuner_files, tmp_path, case):
    """Other tuners: the best rank-k LoRA of W' − W, its error the tail of ΔW's singular values."""
    base, adapter, report, converted = _converted_merge(tuner_files, tmp_path, case, "--rank", "6")
    original, weights = peft_merged(base, adapter, torch.float64), load_file(base)
    errors = {m["name"]: m["relative_error"] for m in report["modules"]}
    for name in _adapted(adapter):
        delta = (original[name] - weights[name].double()).reshape(original[name].shape[0], -1)
        values = torch.linalg.svdvals(delta if "emb" not in name else delta.T)
        tail = float(values[6:].norm() / values.norm())
        assert errors[name.removesuffix(".weight")] == pytest.approx(tail, rel=1e-4, abs=1e-7), name
        found = (converted[name] - original[name]).norm() / delta.norm()
        assert float(found) == pytest.approx(tail, rel=1e-4, abs=1e-6), name


def test_convert_says_what_a_tuner_needs(tuner_files, tmp_path):
    _, adapter = tuner_files("oft")
    result = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / "lora"])
    _refused(result, "OFT", "--rank N (or --energy F) and --base")
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llama.cpp", "mlx"])
def test_check_names_tuners_an_engine_cannot_serve(tuner_files, engine):
    _, adapter = tuner_files("adalora")
    report = json.loads(run_cli(["check", adapter, "--for", engine, "--json"]).stdout)
    found = {f["rule"]: f for f in report["findings"]}
    assert found["peft_tuner"]["effect"] == "rejects"
    assert found["peft_tuner"]["items"] == ["ff (ADALORA)", "lin (ADALORA)"]
    assert "loratool convert ADAPTER --to peft" in found["peft_tuner"]["fix"]
    assert "not_lora" not in found


def test_readme_and_docs_show_the_registry_table():
    """The support table in the README and on the tuners page is the one the registry makes (it cannot drift)."""
    from conftest import REPO

    from lora_tools.adapters.tuners import support_table

    table = "\n".join(support_table())
    assert table in (REPO / "README.md").read_text()
    assert table in (REPO / "docs" / "pages" / "tuners.md").read_text()


_LAYER_OF = {"lin": "linear", "ff": "linear", "conv": "conv2d", "emb": "embedding", "c1d": "conv1d"}


def test_every_layer_kind_the_registry_claims_is_tested_against_peft():
    covered: dict[str, set] = {}
    for make in CASES.values():
        config = make()
        targets = config.target_modules
        covered.setdefault(str(config.peft_type.value), set()).update(_LAYER_OF[t] for t in targets)
    for peft_type, tuner in TUNERS.items():
        if peft_type != "BONE":  # PEFT 0.21 no longer loads it: test_bone_merges_as_miss
            assert set(tuner.layers) <= covered.get(peft_type, set()), peft_type


@pytest.mark.parametrize("case", ["miss", "miss-bat"])
def test_bone_merges_as_miss(tuner_files, tmp_path, case):
    """BONE (MiSS' name before PEFT 0.18, `bone_block`) has MiSS' arithmetic: a MiSS adapter re-spelled as
    BONE merges as PEFT merges the MiSS one."""
    base, saved = tuner_files(case)
    adapter = tmp_path / "bone"
    adapter.mkdir()
    config = json.loads((saved / "adapter_config.json").read_text())
    config = {**{k: v for k, v in config.items() if k != "mini_r"}, "peft_type": "BONE"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(saved / "adapter_model.safetensors")
    save_file(
        {k.replace("miss_block", "bone_block"): v for k, v in state.items()}, adapter / "adapter_model.safetensors"
    )
    lora_tools.merge(base, [adapter], tmp_path / "out.safetensors", device="cpu")
    ours, expected = load_file(tmp_path / "out.safetensors"), peft_merged(base, saved, torch.float32)
    for name in ("lin.weight", "ff.weight"):
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=4e-7)


def test_adalora_with_pruned_ranks_keeps_its_initial_ranknum(tuner_files, tmp_path):
    """AdaLoRA's training prunes ranks (`rank_pattern`): PEFT saves the kept ones and still divides by init_r."""
    import warnings

    import peft
    from tuner_models import LINEARS, tiny

    base, _ = tuner_files("adalora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny(), peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=LINEARS))
        randomize(model, 5)
        model.peft_config["default"].rank_pattern = {"lin.lora_E.default": [True, False, True, False],
                                                     "ff.lora_E.default": [False, True, True, True]}  # fmt: skip
        model.save_pretrained(tmp_path / "adapter")
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.lin.lora_A"].shape[0] == 2
    lora_tools.merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu")
    ours, expected = load_file(tmp_path / "out.safetensors"), peft_merged(base, tmp_path / "adapter", torch.float32)
    for name in ("lin.weight", "ff.weight"):
        torch.testing.assert_close(ours[name], expected[name], rtol=0, atol=4e-8)


@pytest.mark.parametrize(
    "command",
    [
        ["resize", "ADAPTER", "--rank", "2", "-o", "OUT"],
        ["combine", "ADAPTER", "ADAPTER", "--method", "cat", "-o", "OUT"],
    ],
)
def test_lora_only_commands_point_a_tuner_to_convert(tuner_files, tmp_path, command):
    _, adapter = tuner_files("oft")
    args = [adapter if a == "ADAPTER" else str(tmp_path / "out") + a[3:] if a.startswith("OUT") else a for a in command]
    _refused(run_cli(args), "OFT adapter cannot be", "loratool convert ADAPTER --to peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_convert_by_energy_keeps_the_fewest_ranks_that_hold_it(tuner_files, tmp_path):
    base, adapter, report, _ = _converted_merge(tuner_files, tmp_path, "hra", "--energy", "0.9")
    original, weights = peft_merged(base, adapter, torch.float64), load_file(base)
    for module in report["modules"]:
        name = f"{module['name']}.weight"
        delta = original[name] - weights[name].double()
        values = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        kept = float(values[: module["rank"]].square().sum() / values.square().sum())
        fewer = float(values[: module["rank"] - 1].square().sum() / values.square().sum())
        assert kept >= 0.9 > fewer, (name, module["rank"], kept, fewer)


@pytest.mark.parametrize(("case", "options"), [("adalora", []), ("oft-cayley", ["--rank", "6"])])
def test_convert_to_kohya_goes_through_the_lora(tuner_files, tmp_path, case, options):
    """kohya files hold LoRA factors only: a tuner is written as the LoRA `--to peft` makes of it (exact for
    AdaLoRA, the best rank-k for OFT), so the kohya file merges bit for bit as that LoRA, which the tests
    above hold to PEFT's own merge; the report keeps the first step's per-module errors."""
    base, adapter = tuner_files(case)
    lora = run_cli(["convert", adapter, "--to", "peft", "--base", base, "-o", tmp_path / "lora", "--json", *options])
    assert lora.exit_code == 0, lora.output
    kohya = tmp_path / "kohya.safetensors"
    args = ["--base", base, "--component", "text_encoder", "-o", kohya, "--json", *options]
    result = run_cli(["convert", adapter, "--to", "kohya", *args])
    assert result.exit_code == 0, result.output
    first, report = json.loads(lora.stdout), json.loads(result.stdout)
    assert [(m["name"], m["method"], m["relative_error"]) for m in report["modules"]] == [
        (m["name"], m["method"], m["relative_error"]) for m in first["modules"]
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kohya.safetensors", "lora"]  # no scratch left
    lora_tools.merge(base, [tmp_path / "lora"], tmp_path / "a.safetensors", device="cpu")
    lora_tools.merge(base, [kohya], tmp_path / "b.safetensors", device="cpu")
    via_lora, via_kohya = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert via_lora.keys() == via_kohya.keys()
    for name, tensor in via_lora.items():
        assert torch.equal(tensor, via_kohya[name]), name


def test_convert_vera_to_gguf_matches_peft(llama_base, tmp_path):
    """A VeRA adapter on Llama written for llama.cpp (through its exact LoRA) reads back to PEFT's ΔW."""
    import warnings

    import peft
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(llama_base), LLAMA_CASES["vera"](peft))
        randomize(model, 5)
        model.save_pretrained(tmp_path / "vera")
        merged = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_base), tmp_path / "vera")
        expected = {k: v.double() for k, v in merged.merge_and_unload().state_dict().items()}
    gguf_file = tmp_path / "vera.gguf"
    result = run_cli(["convert", tmp_path / "vera", "--to", "gguf", "--base", llama_base, "-o", gguf_file])
    assert result.exit_code == 0, result.output
    result = run_cli(["convert", gguf_file, "--to", "peft", "--base", llama_base, "-o", tmp_path / "back"])
    assert result.exit_code == 0, result.output
    lora_tools.merge(llama_base, [tmp_path / "back"], tmp_path / "out", device="cpu", dtype="fp32")
    found, original = load_state(tmp_path / "out"), load_state(llama_base)
    changed = [n for n in expected if "q_proj" in n or "v_proj" in n or "down_proj" in n]
    assert changed
    for name in changed:
        delta = expected[name] - original[name].double()
        error = (found[name].double() - expected[name]).abs().max() / delta.abs().max()
        assert error < 1e-5, (name, float(error))


def test_convert_of_a_lone_peft_file_takes_alpha_when_looking_for_a_tuner(tmp_path):
    """Deciding whether an input is a tuner reads it with the user's --alpha: a lone PEFT file that does
    not record its alpha still converts to kohya (the check once read it without, and refused)."""
    lone = tmp_path / "lone.safetensors"
    shutil.copy(REPO / "fixtures" / "tiny-llama-lora" / "adapter_model.safetensors", lone)
    out = tmp_path / "k.safetensors"
    result = run_cli(["convert", lone, "--to", "kohya", "--alpha", "16", "--component", "text_encoder", "-o", out])
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.skipif("paca" not in CASES, reason="PaCA is new in PEFT 0.22")
@pytest.mark.parametrize(
    ("indices", "needle"),
    [([0, 48, 1], "paca_indices [0, 48, 1] are not distinct input columns of a 32×48 layer"),
     ([5, 5, 1], "paca_indices [5, 5, 1] are not distinct"), (None, "paca_indices")],
)  # fmt: skip
def test_paca_columns_outside_the_layer_are_refused(tuner_files, tmp_path, indices, needle):
    """A PaCA module whose saved columns are outside the layer (or repeated) exits 3 naming the module and
    writing nothing; a wrong number of columns for its update, too."""
    base, saved = tuner_files("paca")
    adapter = shutil.copytree(saved, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in state if k.endswith("ff.paca_indices"))
    state[key] = state[key][:-1].contiguous() if indices is None else torch.tensor(indices)  # None: one too few
    save_file(state, adapter / "adapter_model.safetensors")
    out = tmp_path / "out.safetensors"
    _refused(run_cli(["merge", base, adapter, "-o", out]), "ff", needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
