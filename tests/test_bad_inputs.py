"""Every bad input a user can bring: exit code, a message naming the culprit, no traceback, nothing left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import build_model, lora_config, run_cli, save_adapter
from safetensors.torch import load_file, save_file


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_refused(result, code: int, *needles: str):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_nothing_left(folder, name="out"):
    leftovers = [p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert leftovers == [], leftovers


@pytest.fixture
def plain(adapters, tmp_path):
    base, adapter = adapters["plain"]
    return _copy(base, tmp_path / "base"), _copy(adapter, tmp_path / "adapter")


def merge(base, adapter, tmp_path, *extra):
    return run_cli(["merge", base, adapter, "-o", tmp_path / "out", "-q", "--device", "cpu", *extra])


def test_corrupt_header(plain, tmp_path):
    base, adapter = plain
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"}}}}"
    weights.write_bytes(bytes(data))
    assert_refused(merge(base, adapter, tmp_path), 3, str(weights), "not valid JSON")
    assert_nothing_left(tmp_path)


def test_truncated_file(plain, tmp_path):
    base, adapter = plain
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_refused(merge(base, adapter, tmp_path), 3, str(weights), "truncated")
    assert_nothing_left(tmp_path)


def test_bad_adapter_config_json(plain, tmp_path):
    base, adapter = plain
    (adapter / "adapter_config.json").write_text('{"r": 4,')
    assert_refused(merge(base, adapter, tmp_path), 3, "adapter_config.json", "not valid JSON")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("r", 0, "'r' must be an integer"),
        ("r", "8", "'r' must be an integer"),
        ("lora_alpha", -1, "'lora_alpha' must be a number"),
        ("lora_alpha", 1e12, "'lora_alpha' must be a number"),
        ("peft_type", "PREFIX_TUNING", "peft_type 'PREFIX_TUNING' is not supported"),
        ("rank_pattern", {"q_proj[": 2}, "not a valid regular expression"),
        ("use_rslora", "yes", "'use_rslora' must be true or false"),
    ],
)
def test_bad_adapter_config_values(plain, tmp_path, field, value, needle):
    base, adapter = plain
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(merge(base, adapter, tmp_path), 3, needle)
    assert_nothing_left(tmp_path)


def _shard(base, tmp_path):
    """Re-save the base as two shards with an index."""
    state = load_file(base / "model.safetensors")
    names = sorted(state)
    (base / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, base / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_index_entry_outside_folder(plain, tmp_path):
    base, adapter = plain
    index = _shard(base, tmp_path)
    name = next(iter(index["weight_map"]))
    shutil.copy(base / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    index["weight_map"][name] = "../outside.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(merge(base, adapter, tmp_path), 3, "points outside the folder", name)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("bad", ["{absolute}", "C:\\model.safetensors", "sub/../../x.safetensors", "a\0b", ""])
def test_index_names_are_judged_by_name(plain, tmp_path, bad):
    """Absolute paths, drive letters, `..`, NUL and empty names are refused; a symlink to elsewhere is fine."""
    base, adapter = plain
    index = _shard(base, tmp_path)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = bad.format(absolute=base / "model-00001-of-00002.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(merge(base, adapter, tmp_path), 3, "points outside the folder")
    assert_nothing_left(tmp_path)


def test_index_shard_symlinked_elsewhere_is_read(plain, tmp_path):
    base, adapter = plain
    _shard(base, tmp_path)
    (tmp_path / "store").mkdir()
    shutil.move(base / "model-00001-of-00002.safetensors", tmp_path / "store" / "elsewhere.safetensors")
    (base / "model-00001-of-00002.safetensors").symlink_to(tmp_path / "store" / "elsewhere.safetensors")
    result = merge(base, adapter, tmp_path)
    assert result.exit_code == 0, result.stderr
    assert len(load_file(tmp_path / "out" / "model.safetensors")) == len(
        load_file(tmp_path / "store" / "elsewhere.safetensors")
    ) + len(load_file(base / "model-00002-of-00002.safetensors"))


def test_missing_shard(plain, tmp_path):
    base, adapter = plain
    _shard(base, tmp_path)
    (base / "model-00002-of-00002.safetensors").unlink()
    assert_refused(merge(base, adapter, tmp_path), 3, "missing shard", "model-00002-of-00002.safetensors")
    assert_nothing_left(tmp_path)


def test_index_disagrees_with_shards(plain, tmp_path):
    base, adapter = plain
    index = _shard(base, tmp_path)
    moved = next(iter(index["weight_map"]))
    index["weight_map"][moved] = "model-00002-of-00002.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(merge(base, adapter, tmp_path), 3, moved)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_payload_never_runs(plain, tmp_path):
    base, adapter = plain
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model.embed_tokens.weight": payload}, evil / "pytorch_model.bin")
    assert not marker.exists()
    result = merge(evil, adapter, tmp_path)
    assert_refused(result, 3, str(evil / "pytorch_model.bin"), "refused to unpickle")
    assert not marker.exists(), "the pickle's payload ran"
    assert_nothing_left(tmp_path)


def test_rank_mismatch(plain, tmp_path):
    base, adapter = plain
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = state[key][:, :3].contiguous()
    save_file(state, adapter / "adapter_model.safetensors")
    assert_refused(merge(base, adapter, tmp_path), 3, "model.layers.0.self_attn.q_proj", "rank mismatch")
    assert_nothing_left(tmp_path)


def test_shape_mismatch_lists_every_module(plain, tmp_path):
    base, _ = plain
    wide = save_adapter(
        lambda: build_model("llama", hidden_size=48), lora_config(r=4, target_modules=["q_proj"]), tmp_path / "wide"
    )
    result = merge(base, wide, tmp_path)
    assert_refused(
        result, 3, "shape mismatch", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "[32, 32]"
    )
    assert_nothing_left(tmp_path)


def test_target_missing_from_base(plain, adapters, tmp_path):
    base, _ = plain
    _, gpt2_adapter = adapters["gpt2_fan_in_fan_out"]
    assert_refused(merge(base, gpt2_adapter, tmp_path), 3, "no such module in the base", "transformer.h.0.attn.c_attn")
    assert_nothing_left(tmp_path)


def test_inspect_with_incompatible_base_exits_3(plain, adapters, tmp_path):
    base, _ = plain
    _, gpt2_adapter = adapters["gpt2_fan_in_fan_out"]
    result = run_cli(["inspect", gpt2_adapter, "--base", base, "--json"])
    assert_refused(result, 3, "does not fit")
    assert json.loads(result.stdout)["validation"]["compatible"] is False


def test_nonfinite_adapter(plain, tmp_path):
    base, adapter = plain
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    state[key][0, 0] = float("nan")
    save_file(state, adapter / "adapter_model.safetensors")
    assert_refused(merge(base, adapter, tmp_path), 3, key, "NaN")
    assert_nothing_left(tmp_path)


def test_fp16_overflow_is_refused(plain, tmp_path):
    base, adapter = plain
    assert_refused(merge(base, adapter, tmp_path, "--dtype", "fp16", "--weight", "1e6"), 3, "NaN/Inf", "fp16")
    assert_nothing_left(tmp_path)


def test_unknown_adapter_format(plain, tmp_path):
    base, _ = plain
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    assert_refused(merge(base, junk, tmp_path), 3, "not a known adapter format")


def test_missing_paths(plain, tmp_path):
    base, adapter = plain
    assert_refused(merge(tmp_path / "nope", adapter, tmp_path), 3, "no such file or folder")
    assert_refused(merge(base, tmp_path / "nope", tmp_path), 3, "no such file or folder")


def test_existing_output_needs_force(plain, tmp_path):
    base, adapter = plain
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_refused(merge(base, adapter, tmp_path), 3, "already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert merge(base, adapter, tmp_path, "--force").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_output_inside_input_is_refused(plain, tmp_path):
    base, adapter = plain
    result = run_cli(["merge", base, adapter, "-o", base / "merged", "-q"])
    assert_refused(result, 3, "sit inside input")
    result = run_cli(["merge", base, adapter, "-o", base, "-q", "--force"])
    assert_refused(result, 3, "overwrite")
    assert not (base / "merged").exists()


def test_weight_count_must_match(plain, tmp_path):
    base, adapter = plain
    assert_refused(merge(base, adapter, tmp_path, "-w", "1", "-w", "2"), 3, "2 --weight values for 1 adapters")


def test_unavailable_device_is_an_environment_error(plain, tmp_path):
    base, adapter = plain
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "out", "-q", "--device", "cuda:0"])
    assert_refused(result, 4, "CUDA", "--device cpu")


def test_bad_size_is_a_usage_error(plain, tmp_path):
    base, adapter = plain
    result = merge(base, adapter, tmp_path, "--max-shard-size", "5 parsecs")
    assert result.exit_code == 2
    assert "not understood" in result.stderr


def test_disk_space_check(plain, tmp_path, monkeypatch):
    import shutil as shutil_module

    from lora_tools.io import output

    base, adapter = plain
    real = shutil_module.disk_usage
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert_refused(merge(base, adapter, tmp_path), 4, "needs about", "only 1,000 are free")
    assert_nothing_left(tmp_path)


def test_debug_variable_shows_traceback(plain, tmp_path, monkeypatch):
    base, adapter = plain
    monkeypatch.setenv("LORATOOL_DEBUG", "1")
    result = merge(tmp_path / "nope", adapter, tmp_path)
    assert result.exit_code == 3
    assert "Traceback" in result.stderr


def test_nonfinite_base_tensor_is_refused_unless_allowed(plain, tmp_path):
    base, adapter = plain
    state = load_file(base / "model.safetensors")
    state["model.layers.0.input_layernorm.weight"][5] = float("nan")
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert_refused(merge(base, adapter, tmp_path), 3, "model.layers.0.input_layernorm.weight", "1 NaN/Inf")
    state["model.layers.0.input_layernorm.weight"][5] = 1.0
    state["model.norm.weight"][3] = float("inf")
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert_refused(merge(base, adapter, tmp_path), 3, "model.norm.weight", "NaN/Inf", "--allow-nonfinite")
    assert_nothing_left(tmp_path)
    assert merge(base, adapter, tmp_path, "--allow-nonfinite").exit_code == 0
    assert load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"][3] == float("inf")


def test_extra_shard_and_tensor_in_two_shards(plain, tmp_path):
    base, adapter = plain
    index = _shard(base, tmp_path)
    shutil.copy(base / "model-00002-of-00002.safetensors", base / "model-00003-of-00002.safetensors")
    assert_refused(merge(base, adapter, tmp_path), 3, "model-00003-of-00002.safetensors", "never uses it")
    (base / "model-00003-of-00002.safetensors").unlink()
    state = load_file(base / "model-00002-of-00002.safetensors")
    first = load_file(base / "model-00001-of-00002.safetensors")
    duplicated = next(iter(first))
    state[duplicated] = first[duplicated]
    save_file(state, base / "model-00002-of-00002.safetensors")
    assert duplicated in index["weight_map"]
    assert_refused(merge(base, adapter, tmp_path), 3, duplicated, "also stored in")
    assert_nothing_left(tmp_path)


def test_output_symlink_into_input_is_refused(plain, tmp_path):
    base, adapter = plain
    (tmp_path / "sneaky").symlink_to(base)
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "sneaky" / "merged", "-q"])
    assert_refused(result, 3, "sit inside input")
    assert not (base / "merged").exists()


def test_failed_force_keeps_the_old_output(plain, tmp_path):
    base, adapter = plain
    assert merge(base, adapter, tmp_path).exit_code == 0
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    state = load_file(base / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")  # found only while writing, inside the temporary folder
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert_refused(merge(base, adapter, tmp_path, "--force"), 3, "model.norm.weight")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
