"""Checkpoints as they sit on disk: symlinked shards, an OUT that can never touch an input, one run per OUT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_state, run_cli
from layouts_models import FIXTURE_ADAPTER, FIXTURE_BASE, digests, sharded_copy, symlinked_into, weight_bytes
from safetensors import safe_open

import lora_tools
from lora_tools.errors import OutputExistsError
from lora_tools.io.output_guard import LOCK_SUFFIX, rename_no_replace


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """A sharded base as plain files, the same base with its shards symlinked into a store, and merges of both."""
    root = tmp_path_factory.mktemp("layouts")
    plain = sharded_copy(root / "plain")
    linked = symlinked_into(sharded_copy(root / "linked"), root / "store")
    for name, base in (("plain", plain), ("linked", linked)):
        result = run_cli(["merge", base, FIXTURE_ADAPTER, "-o", root / f"merged-{name}", "-q", "--device", "cpu"])
        assert result.exit_code == 0, result.stderr
    return root


def _cli_ok(*args):
    result = run_cli([str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def test_symlinked_shards_merge_unmerge_extract_inspect(layouts, tmp_path):
    linked, store = layouts / "linked", layouts / "store"
    assert all(p.is_symlink() for p in linked.iterdir())
    merged = layouts / "merged-linked"
    assert weight_bytes(merged) == weight_bytes(layouts / "merged-plain")
    assert (merged / "config.json").is_file() and not (merged / "config.json").is_symlink()

    _cli_ok("unmerge", merged, FIXTURE_ADAPTER, "-o", tmp_path / "restored", "-q", "--device", "cpu")
    restored, original = load_state(tmp_path / "restored"), load_state(FIXTURE_BASE)
    assert restored.keys() == original.keys()
    changed = [n for n in original if not load_state(merged)[n].equal(original[n])]
    assert changed and all(restored[n].equal(original[n]) for n in original if n not in changed)

    # merged shards symlinked elsewhere too: extract reads both sides through symlinks
    merged_link = symlinked_into(_copy_folder(merged, tmp_path / "merged-link"), tmp_path / "merged-store")
    _cli_ok("extract", linked, merged_link, "-o", tmp_path / "extracted", "--rank", "4", "-q", "--device", "cpu")
    assert (tmp_path / "extracted" / "adapter_model.safetensors").is_file()

    seen = json.loads(_cli_ok("inspect", "--json", linked).stdout)
    expected = json.loads(_cli_ok("inspect", "--json", layouts / "plain").stdout)
    assert {**seen, "path": None} == {**expected, "path": None}
    assert seen["num_tensors"] == len(original)
    assert digests(store) == digests(layouts / "plain")  # nothing wrote into the store


def _copy_folder(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


@pytest.mark.parametrize("where", ["store", "store/sub", "store/model-00001-of-00003.safetensors", "."])
def test_force_into_where_the_base_really_lives_is_refused(layouts, where):
    before = digests(layouts / "store")
    out = layouts / where if where != "." else layouts
    result = run_cli(["merge", layouts / "linked", FIXTURE_ADAPTER, "-o", out, "--force", "-q", "--device", "cpu"])
    assert result.exit_code == 3, result.stderr
    assert "error: output" in result.stderr and ("input folder" in result.stderr or "reads" in result.stderr)
    assert digests(layouts / "store") == before
    assert not (layouts / "store" / "sub").exists()
    assert not list(layouts.glob(f"*{LOCK_SUFFIX}")) and not list((layouts / "store").glob(".*"))


def test_out_equal_to_the_adapters_real_folder_is_refused(tmp_path):
    real = _copy_folder(FIXTURE_ADAPTER, tmp_path / "adapter-real")
    (tmp_path / "adapter").symlink_to(real)  # the adapter given through a symlinked folder
    linked_files = symlinked_into(_copy_folder(FIXTURE_ADAPTER, tmp_path / "adapter2"), tmp_path / "adapter2-store")
    before = digests(real), digests(tmp_path / "adapter2-store")
    for adapter, out in ((tmp_path / "adapter", real), (linked_files, tmp_path / "adapter2-store")):
        result = run_cli(["merge", FIXTURE_BASE, adapter, "-o", out, "--force", "-q", "--device", "cpu"])
        assert result.exit_code == 3, result.stderr
        assert "would overwrite" in result.stderr
    assert (digests(real), digests(tmp_path / "adapter2-store")) == before


def test_single_file_output_from_a_folder_base(layouts, tmp_path):
    """Documented: a folder base with `-o X.safetensors` writes one file holding every tensor (config not carried)."""
    out = tmp_path / "merged.safetensors"
    result = _cli_ok("merge", layouts / "linked", FIXTURE_ADAPTER, "-o", out, "--dtype", "bfloat16", "-q",
                     "--device", "cpu", "--max-shard-size", "10KB")  # fmt: skip
    assert out.is_file()
    assert "config.json, tokenizer and other files" in result.stderr and "not carried" in result.stderr
    folder = load_state(layouts / "merged-linked")
    single = load_state(out)
    assert single.keys() == folder.keys()
    for name, tensor in folder.items():
        assert single[name].dtype == torch.bfloat16 and single[name].equal(tensor), name
    with safe_open(out, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.safetensors"]


@pytest.mark.parametrize("command", ["extract", "resize"])
def test_a_folder_output_named_like_a_file_is_refused(tmp_path, command):
    args = [FIXTURE_BASE, FIXTURE_BASE] if command == "extract" else [FIXTURE_ADAPTER]
    result = run_cli([command, *args, "-o", tmp_path / "out.safetensors", "--rank", "2", "-q"])
    assert result.exit_code == 2, result.stderr
    assert "names a file, but this writes a folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_dtype_long_spellings(tmp_path):
    for spelling, dtype in (("bfloat16", torch.bfloat16), ("FP16", torch.float16), ("float32", torch.float32)):
        out = tmp_path / spelling
        _cli_ok("merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "--dtype", spelling, "-q", "--device", "cpu")
        assert {t.dtype for t in load_state(out).values()} == {dtype}
        config = json.loads((out / "config.json").read_text())
        assert (config.get("torch_dtype") or config.get("dtype")) == str(dtype).removeprefix("torch.")


def test_an_out_that_appears_during_the_run_is_never_replaced(tmp_path):
    out = tmp_path / "out"

    def somebody_else_writes(done: int, total: int) -> None:
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("mine")

    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], out, device="cpu", progress=somebody_else_writes)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary, no lock file


def test_rename_no_replace_with_and_without_the_kernel(tmp_path, monkeypatch):
    import lora_tools.io.output_guard as guard

    for native in (True, False):
        if not native:
            monkeypatch.setattr(guard, "_native_no_replace", lambda: None)
        source, target = tmp_path / f"new{native}", tmp_path / f"taken{native}"
        source.write_text("new")
        target.mkdir()
        with pytest.raises(FileExistsError):
            rename_no_replace(source, target)
        assert source.read_text() == "new" and target.is_dir()
        target.rmdir()
        rename_no_replace(source, target)
        assert target.read_text() == "new" and not source.exists()


def test_two_merges_to_one_new_out_exactly_one_wins(tmp_path):
    """Two runs started together (threads: each opens the lock file itself, so flock sets them apart as processes)."""
    out = tmp_path / "out"
    start = threading.Barrier(2)

    def run(weight: float):
        start.wait()
        try:
            lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], out, weights=[weight], device="cpu")
        except OutputExistsError as exc:
            return exc.exit_code, str(exc)
        return 0, ""

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((1.0, 0.5), pool.map(run, (1.0, 0.5)), strict=True))
    assert sorted(code for code, _ in results.values()) == [0, 3], results
    winner = next(weight for weight, (code, _) in results.items() if code == 0)
    loser_message = next(message for code, message in results.values() if code == 3)
    assert "another loratool run is writing" in loser_message or "already exists" in loser_message
    lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], tmp_path / "reference", weights=[winner], device="cpu")
    assert weight_bytes(out) == weight_bytes(tmp_path / "reference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]


def test_a_killed_lock_holder_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from lora_tools.io.output_guard import "
         "output_lock\nwith output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)", out],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = run_cli(["merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--device", "cpu"])
        assert busy.exit_code == 3 and "another loratool run is writing" in busy.stderr, busy.stderr
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / f".out{LOCK_SUFFIX}").exists()  # left by the killed holder, unlocked
    started = time.perf_counter()
    _cli_ok("merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--device", "cpu")
    assert time.perf_counter() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the next run cleaned the lock file up


def test_other_copies_of_the_weights_are_neither_read_nor_carried(layouts, tmp_path):
    """Beside the shards: a .bin duplicate, consolidated.safetensors, original/*.pth, a GGUF — the index wins."""
    base = sharded_copy(tmp_path / "base")
    torch.save(load_state(FIXTURE_BASE), base / "pytorch_model.bin")
    (base / "consolidated.safetensors").write_bytes((FIXTURE_BASE / "model.safetensors").read_bytes())
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes((base / "pytorch_model.bin").read_bytes())
    (base / "original" / "params.json").write_text("{}")
    (base / "model-q4.gguf").write_bytes(b"GGUF")
    (base / "chat_template.jinja").write_text("{{ messages }}")
    _cli_ok("merge", base, FIXTURE_ADAPTER, "-o", tmp_path / "out", "-q", "--device", "cpu")
    assert weight_bytes(tmp_path / "out") == weight_bytes(layouts / "merged-plain")
    carried = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert "chat_template.jinja" in carried and "config.json" in carried
    assert not [
        name for name in carried if "consolidated" in name or "original" in name or name.endswith((".gguf", ".bin"))
    ]


def test_out_may_sit_beside_a_single_file_input(tmp_path):
    (tmp_path / "base.safetensors").write_bytes((FIXTURE_BASE / "model.safetensors").read_bytes())
    _cli_ok("merge", tmp_path / "base.safetensors", FIXTURE_ADAPTER, "-o", tmp_path / "out.safetensors", "-q")
    assert load_state(tmp_path / "out.safetensors").keys() == load_state(FIXTURE_BASE).keys()
    refused = run_cli(["merge", tmp_path / "base.safetensors", FIXTURE_ADAPTER, "-o", tmp_path / "base.safetensors",
                       "--force", "-q"])  # fmt: skip
    assert refused.exit_code == 3 and "would overwrite" in refused.stderr


def test_weight_set_choice_for_repo_listings():
    """Pure choice over repo paths: transformers' order, per pipeline component, adapters' safetensors first."""
    from lora_tools.io.weightsets import choose_weights, is_safe_name, repo_files_to_fetch

    files, indexes = repo_files_to_fetch([
        "model_index.json", "sd_xl_base.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
        "text_encoder/config.json", "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors", "text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "onnx/unet/model.onnx", "scheduler/scheduler_config.json",
    ])  # fmt: skip
    assert files == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json", "vae/diffusion_pytorch_model.bin", "tokenizer/vocab.json",
        "tokenizer/merges.txt", "scheduler/scheduler_config.json",
    ])  # fmt: skip
    assert indexes == ["text_encoder/model.safetensors.index.json"]
    adapter, _ = repo_files_to_fetch(["adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"])
    assert adapter == ["adapter_config.json", "adapter_model.safetensors"]
    mistral, _ = repo_files_to_fetch(["params.json", "consolidated.safetensors", "tokenizer.model.v3"])
    assert mistral == ["params.json", "tokenizer.model.v3"]  # a consolidated copy only: no weights chosen
    assert choose_weights(["model.safetensors", "pytorch_model.bin.index.json"]).files == ("model.safetensors",)
    assert choose_weights(["lora.safetensors", "consolidated.safetensors"]).files == ("lora.safetensors",)
    assert [is_safe_name(n) for n in ("a/b.safetensors", "../x", "/x", "C:x", "a\\..\\b", "a\0", "", "a//b")] == [
        True, False, False, False, False, False, False, False,
    ]  # fmt: skip


def test_force_replaces_an_existing_out_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    _cli_ok("merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--device", "cpu")
    first = weight_bytes(out)
    _cli_ok("merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--device", "cpu", "--weight", "0.5", "--force")
    lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], tmp_path / "half", weights=[0.5], device="cpu")
    assert weight_bytes(out) == weight_bytes(tmp_path / "half") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "out"]


def test_a_pipeline_cannot_become_one_file(tmp_path):
    pipeline = tmp_path / "pipeline"
    (pipeline / "text_encoder").mkdir(parents=True)
    (pipeline / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipeline / "text_encoder" / "model.safetensors").write_bytes((FIXTURE_BASE / "model.safetensors").read_bytes())
    result = run_cli(["merge", pipeline, FIXTURE_ADAPTER, "-o", tmp_path / "out.safetensors", "-q"])
    assert result.exit_code == 2, result.stderr
    assert "a pipeline has several components (text_encoder); give a folder as --output" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
