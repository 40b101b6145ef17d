"""inspect --stats, diff and --plot: statistics against fp64 oracles built from PEFT's own layers."""

from __future__ import annotations

import json
import shutil
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from conftest import load_state, lora_config, peft_model_for, randomize_adapter, run_cli
from safetensors.torch import load_file, save_file
from synthetic import write_lora_adapter
from ulp import max_ulp

from lora_tools.commands.stats import adapter_stats


def _peft_deltas(base: Path, adapter: Path, model_class) -> dict[str, torch.Tensor]:
    """ΔW per module from PEFT's own layers, in fp64 (effective change W' − W for DoRA)."""
    model = peft_model_for(base, adapter, model_class).double()
    deltas = {}
    for name, layer in model.named_modules():
        adapted = "default" in getattr(layer, "lora_A", {}) or "default" in getattr(layer, "lora_embedding_A", {})
        if not hasattr(layer, "get_delta_weight") or not adapted:
            continue
        path = name.removeprefix("base_model.model.")
        if getattr(layer, "use_dora", {}).get("default"):
            before = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["default"])
            deltas[path] = layer.get_base_layer().weight.detach() - before
        else:
            deltas[path] = layer.get_delta_weight("default").detach()
    return deltas


def _assert_spectrum_matches(ours, delta: torch.Tensor) -> None:
    expected = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
    top = float(expected[0])
    values = torch.tensor(ours.singular_values, dtype=torch.float64)
    assert len(values) >= 1
    assert torch.allclose(values, expected[: len(values)], rtol=0, atol=1e-6 * top), ours.name
    assert ours.top_singular_value == pytest.approx(top, rel=1e-6)
    assert ours.frobenius == pytest.approx(float(delta.norm()), rel=1e-6)
    assert ours.stable_rank == pytest.approx(float(delta.norm()) ** 2 / top**2, rel=1e-6)
    energy = torch.cumsum(expected**2, 0) / expected.pow(2).sum()
    assert ours.rank_99 == int((energy < 0.99 * (1 - 1e-12)).sum()) + 1


@pytest.mark.parametrize(
    "variant", ["plain", "rslora_patterns", "dora", "embedding_save", "gpt2_fan_in_fan_out"]
)  # fmt: skip
def test_stats_equal_fp64_spectra_of_peft_deltas(adapters, variant):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    base, adapter = adapters[variant]
    model_class = GPT2LMHeadModel if variant.startswith("gpt2") else LlamaForCausalLM
    deltas = _peft_deltas(base, adapter, model_class)
    report = adapter_stats(adapter, base=base)
    assert {m.name for m in report.modules} == set(deltas)
    weights = load_state(base)
    for module in report.modules:
        delta = deltas[module.name]
        if module.type == "embedding" and delta.shape != weights[f"{module.name}.weight"].shape:
            delta = delta.T
        _assert_spectrum_matches(module, delta)
        weight = weights[f"{module.name}.weight"].double()
        assert module.relative_to_base == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-6)
        assert module.flags == []


def test_stats_of_dora_without_base_say_what_they_measure(adapters):
    _, adapter = adapters["dora"]
    report = adapter_stats(adapter)
    assert all(m.relative_to_base is None for m in report.modules)
    assert all(any("DoRA" in note for note in m.notes) for m in report.modules)


def test_stats_of_conv_modules(tmp_path):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 6, 1))
    peft_model = get_peft_model(model, lora_config(r=3, lora_alpha=6, target_modules=["0", "1"]))
    randomize_adapter(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "conv")
    peft_model = peft_model.double()
    report = adapter_stats(tmp_path / "conv")
    assert [m.type for m in report.modules] == ["conv", "conv"]
    for module in report.modules:
        layer = peft_model.base_model.model[int(module.name)]
        _assert_spectrum_matches(module, layer.get_delta_weight("default").detach())


def _broken_copy(adapter: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(adapter, copy)
    tensors = load_file(copy / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    return copy


def test_zero_nonfinite_and_outlier_modules_are_flagged(adapters, tmp_path):
    _, adapter = adapters["plain"]
    prefix = "base_model.model.model.layers"

    def edit(tensors):
        tensors[f"{prefix}.0.self_attn.q_proj.lora_B.weight"].zero_()
        tensors[f"{prefix}.1.self_attn.k_proj.lora_A.weight"][0, 0] = float("nan")
        tensors[f"{prefix}.1.mlp.up_proj.lora_B.weight"] *= 1000

    broken = _broken_copy(adapter, tmp_path, edit)
    report = adapter_stats(broken)
    assert report.flagged == {
        "zero": ["model.layers.0.self_attn.q_proj"],
        "nonfinite": ["model.layers.1.self_attn.k_proj"],
        "outlier": ["model.layers.1.mlp.up_proj"],
    }
    result = run_cli(["inspect", broken, "--stats", "--json"])
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["flagged"]["zero"] == ["model.layers.0.self_attn.q_proj"]
    text = run_cli(["inspect", broken, "--stats"])
    assert "zero: 1 module(s): model.layers.0.self_attn.q_proj" in text.stderr


def test_resize_estimate_matches_what_resize_does(tmp_path):
    # a rank-8 adapter whose modules use only rank 3: resize --energy 0.99 keeps 3
    adapter = write_lora_adapter(tmp_path / "a", hidden=32, intermediate=64, layers=2, rank=8, heads=4)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in tensors:
        if key.endswith("lora_A.weight"):
            tensors[key][3:] = 0
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    report = adapter_stats(adapter)
    assert {m.rank_99 for m in report.modules} == {3}
    resized = run_cli(["resize", adapter, "-o", tmp_path / "r", "--energy", "0.99", "--json", "-q"])
    assert resized.exit_code == 0, resized.stderr
    parameters = json.loads(resized.stdout)["parameters"]
    assert report.resize_parameters == parameters and report.resize_saving == pytest.approx(5 / 8)


# --- diff -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_twice(adapters, tmp_path_factory):
    base, adapter = adapters["plain"]
    root = tmp_path_factory.mktemp("diff")
    for name in ("one", "two"):
        result = run_cli(["merge", base, adapter, "-o", root / name, "-q"])
        assert result.exit_code == 0, result.stderr
    return base, root / "one", root / "two"


def test_diff_of_a_merge_names_exactly_the_targeted_tensors(merged_twice):
    base, merged, _ = merged_twice
    result = run_cli(["diff", base, merged, "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    changed = {t["name"]: t for t in report["tensors"] if t["status"] != "identical"}
    before, after = load_state(base), load_state(merged)
    targeted = {n for n in before if any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"))}  # fmt: skip
    assert set(changed) == targeted and len(targeted) == 14
    for name, entry in changed.items():
        assert entry["max_ulp"] == max_ulp(before[name], after[name])
        delta = after[name].double() - before[name].double()
        assert entry["max_abs"] == pytest.approx(float(delta.abs().max()), rel=1e-12)
        assert entry["relative_frobenius"] == pytest.approx(float(delta.norm() / before[name].double().norm()))
        assert entry["changed_elements"] == int((after[name] != before[name]).sum())
        assert 1 <= entry["rank_99"] <= 4  # the adapter has rank 4
    assert report["only_in_a"] == report["only_in_b"] == [] and report["identical"] is False


def test_diff_gates_for_ci(merged_twice):
    base, one, two = merged_twice
    same = run_cli(["diff", one, two, "--expect-identical"])
    assert same.exit_code == 0, same.stderr
    assert "14 differ" not in same.stderr and "; identical" in same.stderr
    different = run_cli(["diff", base, one, "--expect-identical"])
    assert different.exit_code == 3
    assert "fail --expect-identical" in different.stderr and "q_proj.weight: changed" in different.stderr
    loose = run_cli(["diff", base, one, "--max-ulp", str(1 << 40)])  # sign changes span ~2³¹ fp32 ulp
    assert loose.exit_code == 0
    tight = run_cli(["diff", base, one, "--max-ulp", "0"])
    assert tight.exit_code == 3 and "ulp > 0" in tight.stderr
    informative = run_cli(["diff", base, one])
    assert informative.exit_code == 0 and "14 differ" in informative.stderr


def test_diff_reports_tensors_on_one_side_and_shape_changes(tmp_path):
    first = {"a": torch.ones(3), "b": torch.zeros(2, 2), "c": torch.ones(4)}
    second = {"a": torch.ones(3), "b": torch.zeros(3, 2), "d": torch.ones(1)}
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")
    result = run_cli(["diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json", "--expect-identical"])
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["only_in_a"] == ["c"] and report["only_in_b"] == ["d"]
    assert {t["name"]: t["status"] for t in report["tensors"]} == {"a": "identical", "b": "shape"}


def test_ulp_distance_across_zero_and_dtypes():
    from lora_tools.analysis.diff import ulp_distance

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        tiny = torch.finfo(dtype).tiny
        a = torch.tensor([0.0, -0.0, 1.0, -tiny, 1.0], dtype=dtype)
        b = torch.tensor([-0.0, 0.0, torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype)).item(),
                          tiny, 1.0], dtype=dtype)  # fmt: skip
        distance = ulp_distance(a, b).tolist()
        subnormals = 2 ** {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]
        assert distance == [0, 0, 1, 2 * subnormals, 0], dtype


# --- pictures ---------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pictures_of_sensible_size(adapters, merged_twice, tmp_path):
    pytest.importorskip("matplotlib")
    base, adapter = adapters["plain"]
    _, merged, _ = merged_twice
    stats_png = tmp_path / "stats.png"
    assert run_cli(["inspect", adapter, "--stats", "--base", base, "--plot", stats_png]).exit_code == 0
    width, height = _png_size(stats_png)
    assert 800 <= width <= 3000 and 400 <= height <= 2000
    diff_svg = tmp_path / "diff.svg"
    assert run_cli(["diff", base, merged, "--plot", diff_svg, "-q"]).exit_code == 0
    root = ET.parse(diff_svg).getroot()
    assert root.tag.endswith("svg") and "relative change per layer" in diff_svg.read_text()
    extract_png = tmp_path / "extract.png"
    result = run_cli(["extract", base, merged, "-o", tmp_path / "x", "-r", "2", "-q", "--plot", extract_png])
    assert result.exit_code == 0, result.stderr
    assert _png_size(extract_png)[0] >= 800


def test_plot_refuses_an_unknown_extension(adapters, tmp_path):
    base, adapter = adapters["plain"]
    for args in (
        ["inspect", adapter, "--stats"],
        ["diff", base, base],
        ["extract", base, base, "-o", tmp_path / "x", "-r", "2"],
    ):
        result = run_cli([*args, "--plot", tmp_path / "picture.jpg"])
        assert result.exit_code == 2 and ".png or .svg" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_stats_refused_for_a_checkpoint(adapters):
    base, _ = adapters["plain"]
    result = run_cli(["inspect", base, "--stats"])
    assert result.exit_code == 2 and "loratool diff" in result.stderr


def test_stats_on_many_layers_stays_fast_and_complete(tmp_path):
    adapter = write_lora_adapter(tmp_path / "a", hidden=32, intermediate=64, layers=32, rank=8, heads=4)
    report = adapter_stats(adapter)
    assert len(report.modules) == 32 * 7 and {m.layer for m in report.modules} == set(range(32))
    assert all(m.rank_99 is not None and m.rank_99 <= 8 for m in report.modules)
