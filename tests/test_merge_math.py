"""Merge arithmetic against independent references: fp64 sums, torch's conv, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, load_state, lora_config, read_json, run_cli, save_adapter
from safetensors.torch import load_file, save_file
from ulp import ulp_at

import lora_tools
from lora_tools.errors import UnsupportedError


def _adapter_delta(adapter, module: str, scale: float) -> torch.Tensor:
    lora = load_file(adapter / "adapter_model.safetensors")
    a = lora[f"base_model.model.{module}.lora_A.weight"].double()
    b = lora[f"base_model.model.{module}.lora_B.weight"].double()
    return scale * (b @ a)


def test_weighted_multi_adapter_merge_matches_fp64_reference(adapters, tmp_path):
    base, plain = adapters["plain"]
    _, patterned = adapters["rslora_patterns"]
    out = tmp_path / "merged"
    lora_tools.merge(base, [plain, patterned], out, weights=[0.7, -0.3], device="cpu")
    ours, original = load_state(out), load_state(base)
    config = read_json(patterned / "adapter_config.json")
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.down_proj"
        rank = 2  # rank_pattern
        reference = (
            original[f"{name}.weight"].double()
            + 0.7 * _adapter_delta(plain, name, 8 / 4)
            - 0.3 * _adapter_delta(patterned, name, config["lora_alpha"] / rank**0.5)
        )
        torch.testing.assert_close(ours[f"{name}.weight"].double(), reference, rtol=1e-6, atol=1e-7)
    untouched = "model.layers.0.input_layernorm.weight"
    assert torch.equal(ours[untouched], original[untouched])


def _small_adapter(tmp_path, dtype=torch.float32):
    """An adapter whose ΔW is small beside W, as trained LoRAs are."""
    path = save_adapter(
        lambda: build_model("llama", dtype=dtype),
        lora_config(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
        tmp_path / "small",
    )
    state = load_file(path / "adapter_model.safetensors")
    save_file({k: v * 0.05 if "lora_B" in k else v for k, v in state.items()}, path / "adapter_model.safetensors")
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_of_merge_is_within_one_ulp(dtype, tmp_path):
    """W'' = (W + ΔW) − ΔW differs from W by at most one ulp of the merged value W' (the one rounding it went through)."""
    base = tmp_path / "base"
    build_model("llama", dtype=dtype).save_pretrained(base)
    adapter = _small_adapter(tmp_path, dtype)
    lora_tools.merge(base, [adapter], tmp_path / "merged", device="cpu")
    report = lora_tools.unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", device="cpu")
    assert report.operation == "unmerge" and report.max_abs_delta > 0
    restored, original = load_state(tmp_path / "restored"), load_state(base)
    merged = load_state(tmp_path / "merged")
    assert restored.keys() == original.keys()
    for name in original:
        error = (restored[name].double() - original[name].double()).abs()
        assert bool((error <= ulp_at(merged[name])).all()), name
        if merged[name].equal(original[name]):
            assert restored[name].equal(original[name]), name


def test_dora_merge_unmerge_round_trip_through_record(adapters, tmp_path):
    base, adapter = adapters["dora"]
    merged = tmp_path / "merged"
    lora_tools.merge(base, [adapter], merged, device="cpu")
    record = read_json(merged / "loratool_merge.json")
    assert record["dora_norms"]["tensors"]
    assert str(tmp_path) not in json.dumps(record)  # no host paths
    lora_tools.unmerge(merged, [adapter], tmp_path / "restored", device="cpu")
    restored, original = load_state(tmp_path / "restored"), load_state(base)
    for name in original:
        torch.testing.assert_close(restored[name], original[name], rtol=2e-6, atol=1e-7)


def test_dora_unmerge_without_record_is_refused(adapters, tmp_path):
    base, adapter = adapters["dora"]
    merged = tmp_path / "merged"
    lora_tools.merge(base, [adapter], merged, device="cpu")
    (merged / "loratool_merge.json").unlink()
    with pytest.raises(UnsupportedError, match="per-row norms are lost"):
        lora_tools.unmerge(merged, [adapter], tmp_path / "restored", device="cpu")
    result = run_cli(["unmerge", merged, adapter, "-o", tmp_path / "restored2", "-q"])
    assert result.exit_code == 3
    assert "per-row norms are lost" in result.stderr
    assert not (tmp_path / "restored2").exists()


def test_unmerge_refuses_modules_to_save(adapters, tmp_path):
    base, adapter = adapters["embedding_save"]
    lora_tools.merge(base, [adapter], tmp_path / "merged", device="cpu")
    with pytest.raises(UnsupportedError, match="cannot be un-merged"):
        lora_tools.unmerge(tmp_path / "merged", [adapter], tmp_path / "restored", device="cpu")


class _ConvNet(torch.nn.Module):
    def __init__(self, kernel: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, kernel, padding=kernel // 2)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_lora_matches_torch_conv_arithmetic(kernel, tmp_path):
    from peft import get_peft_model

    torch.manual_seed(0)
    net = _ConvNet(kernel)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base.safetensors")
    peft_model = get_peft_model(net, lora_config(r=2, lora_alpha=6, target_modules=["conv"]))
    from conftest import randomize_adapter

    randomize_adapter(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.safetensors"
    lora_tools.merge(tmp_path / "base.safetensors", [tmp_path / "adapter"], out, device="cpu")
    merged = load_file(out)

    lora = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = lora["base_model.model.conv.lora_A.weight"], lora["base_model.model.conv.lora_B.weight"]
    base = load_file(tmp_path / "base.safetensors")
    x = torch.randn(2, 3, 8, 8)
    pad = kernel // 2
    expected = torch.nn.functional.conv2d(x, base["conv.weight"], base["conv.bias"], padding=pad) + 3.0 * (
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=pad), b)
    )
    got = torch.nn.functional.conv2d(x, merged["conv.weight"], merged["conv.bias"], padding=pad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged["conv.bias"], base["conv.bias"])


def test_sharding_index_and_auxiliary_files(adapters, tmp_path):
    base, adapter = adapters["plain"]
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "merged"
    report = lora_tools.merge(base, [adapter], out, device="cpu", max_shard_size="20KB")
    assert len(report.files) > 1
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(report.files)
    assert index["metadata"]["total_size"] == report.bytes_written
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    # the sharded output reads back as a checkpoint equal to an unsharded merge
    lora_tools.merge(base, [adapter], tmp_path / "single", device="cpu")
    sharded, single = load_state(out), load_state(tmp_path / "single")
    assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)


def test_dtype_option_converts_and_updates_config(adapters, tmp_path):
    base, adapter = adapters["plain"]
    out = tmp_path / "merged"
    lora_tools.merge(base, [adapter], out, device="cpu", dtype="bf16")
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    config = read_json(out / "config.json")
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_pickle_base_comes_out_as_safetensors(adapters, tmp_path):
    base, adapter = adapters["plain"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_state(base), pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text((base / "config.json").read_text())
    lora_tools.merge(pickled, [adapter], tmp_path / "from_bin", device="cpu")
    lora_tools.merge(base, [adapter], tmp_path / "from_safetensors", device="cpu")
    assert (tmp_path / "from_bin" / "model.safetensors").read_bytes() == (
        tmp_path / "from_safetensors" / "model.safetensors"
    ).read_bytes()


def test_merge_is_deterministic(adapters, tmp_path):
    base, adapter = adapters["dora"]
    for name in ("one", "two"):
        lora_tools.merge(base, [adapter], tmp_path / name, device="cpu")
    for file in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "two" / file).read_bytes(), file


def test_checksums_are_stable_and_true(adapters, tmp_path):
    import hashlib

    base, adapter = adapters["plain"]
    first = json.loads(run_cli(["merge", base, adapter, "-o", tmp_path / "a", "--checksum", "--json", "-q"]).stdout)
    second = json.loads(run_cli(["merge", base, adapter, "-o", tmp_path / "b", "--checksum", "--json", "-q"]).stdout)
    assert first["checksums"] == second["checksums"]
    assert set(first["checksums"]) == {p.name for p in (tmp_path / "a").iterdir()}
    for name, digest in first["checksums"].items():
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest
