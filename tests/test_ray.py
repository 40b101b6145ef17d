"""`--executor ray` on one local two-node Ray cluster (ray.cluster_utils.Cluster), started once for the session.

Every engine's output through Ray is compared byte for byte with the local run; the worker node is
removed in the middle of a merge (Ray retries its tasks: the bytes stay the same); an error of ours
in a task ends the run as it does locally, with nothing left on disk.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, build_model, lora_config, run_cli, save_adapter
from safetensors.torch import load_file, save_file

import lora_tools
from lora_tools.commands.combine import combine
from lora_tools.commands.extract import extract
from lora_tools.commands.resize import resize
from lora_tools.commands.stats import adapter_stats
from lora_tools.compute.executor import RayExecutor, batches

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

_NODE = {"num_cpus": 1, "object_store_memory": 100 << 20}


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on loopback (one CPU each), this process connected as the driver."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = cluster_utils.Cluster(
        initialize_head=True, connect=True, head_node_args={**_NODE, "include_dashboard": False}
    )
    cluster.add_node(**_NODE)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _spread() -> RayExecutor:
    """A Ray executor with one module (or shard) per task, so even a tiny model's tasks reach both nodes."""
    return RayExecutor(task_bytes=1)


def _same_files(first: Path, second: Path) -> None:
    """The two outputs hold the same files with the same bytes."""
    if first.is_file():
        assert first.read_bytes() == second.read_bytes()
        return
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _left_behind(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if name in p.name]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama in small shards, a 'fine-tune' of it, and two LoRA adapters for it."""
    root = tmp_path_factory.mktemp("ray_inputs")
    model = build_model("llama")
    model.save_pretrained(root / "base", max_shard_size="40KB")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    for name, value in state.items():
        if name.endswith("proj.weight"):
            value += 0.05 * torch.randn(value.shape[0], 2, generator=generator) @ torch.randn(2, value.shape[1])
    tuned = build_model("llama")
    tuned.load_state_dict(state)
    tuned.save_pretrained(root / "tuned")
    config = lora_config(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    first = save_adapter(lambda: build_model("llama"), config, root / "first", seed=1)
    second = save_adapter(lambda: build_model("llama"), config, root / "second", seed=2)
    return root / "base", root / "tuned", first, second


def test_extract_and_resize_through_ray_are_byte_identical(cluster, inputs, tmp_path):
    base, tuned, adapter, _ = inputs
    local = extract(base, tuned, tmp_path / "local", rank=3, device="cpu", workers=2)
    remote = extract(base, tuned, tmp_path / "ray", rank=3, device="cpu", executor=_spread())
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert (local.executor, local.nodes) == ("local", 1)
    assert (remote.executor, remote.nodes) == ("ray", 2)
    resize(adapter, tmp_path / "small_local", rank=2, device="cpu")
    resized = resize(adapter, tmp_path / "small_ray", rank=2, device="cpu", executor=_spread())
    _same_files(tmp_path / "small_local", tmp_path / "small_ray")
    assert resized.nodes == 2


@pytest.mark.parametrize("method", ["cat", "ties"])
def test_combine_through_ray_is_byte_identical(cluster, inputs, tmp_path, method):
    _, _, first, second = inputs
    options = dict(method=method, weights=[0.7, -0.4], density=0.5 if method == "ties" else None, device="cpu")
    combine([first, second], tmp_path / "local", workers=1, **options)
    report = combine([first, second], tmp_path / "ray", executor=_spread(), **options)
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert report.executor == "ray"


def test_stats_through_ray_are_the_same_numbers(cluster, inputs):
    base, _, adapter, _ = inputs
    local = adapter_stats(adapter, base=base).to_dict()
    remote = adapter_stats(adapter, base=base, executor=_spread()).to_dict()
    assert (remote.pop("executor"), remote.pop("nodes")) == ("ray", 2)
    assert (local.pop("executor"), local.pop("nodes")) == ("local", 1)
    assert json.dumps(local) == json.dumps(remote)  # every float the same, NaN included


def test_merge_and_unmerge_through_ray_are_byte_identical(cluster, inputs, tmp_path):
    base, _, first, second = inputs
    options = dict(weights=[1.0, 0.5], device="cpu", max_shard_size="20KB", dtype="bf16")
    local = lora_tools.merge(base, [first, second], tmp_path / "local", **options)
    remote = lora_tools.merge(base, [first, second], tmp_path / "ray", executor=_spread(), **options)
    assert len(remote.files) > 2 and (remote.executor, remote.nodes) == ("ray", 2)
    _same_files(tmp_path / "local", tmp_path / "ray")
    assert local.changes == remote.changes  # names, terms and max |ΔW| alike
    lora_tools.unmerge(tmp_path / "local", [first], tmp_path / "un_local", device="cpu")
    lora_tools.unmerge(tmp_path / "local", [first], tmp_path / "un_ray", device="cpu", executor=_spread())
    _same_files(tmp_path / "un_local", tmp_path / "un_ray")


def test_cli_executor_ray_reports_executor_and_nodes(cluster, inputs, tmp_path):
    base, tuned, adapter, _ = inputs
    done = run_cli(["extract", base, tuned, "-o", tmp_path / "cli", "-r", "2", "--device", "cpu", "--executor", "ray",
                    "--json", "-q"])  # fmt: skip
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["executor"] == "ray" and report["nodes"] >= 1
    extract(base, tuned, tmp_path / "lib", rank=2, device="cpu")
    _same_files(tmp_path / "lib", tmp_path / "cli")
    stats = run_cli(["inspect", adapter, "--stats", "--executor", "ray", "--json"])
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.stdout)["stats"]["executor"] == "ray"
    refused = run_cli(["resize", adapter, "-o", tmp_path / "x", "-r", "2", "--workers", "2", "--executor", "ray"])
    assert refused.exit_code == 3 and "--workers is for --executor local" in refused.output
    assert not (tmp_path / "x").exists()


@pytest.fixture
def nonfinite_base(inputs, tmp_path):
    """The base with a NaN in one projection: the merge refuses it when it computes that tensor (in a task)."""
    base, *_ = inputs
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
            continue
        state = load_file(file)
        if "model.layers.1.self_attn.v_proj.weight" in state:
            state["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("nan")
        save_file(state, broken / file.name, metadata={"format": "pt"})
    return broken


def test_an_error_in_a_ray_task_is_the_local_error_and_leaves_nothing(cluster, inputs, nonfinite_base, tmp_path):
    _, _, adapter, _ = inputs
    results = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        results[executor] = run_cli(["merge", nonfinite_base, adapter, "-o", out, "--device", "cpu",
                                     "--max-shard-size", "20KB", "--executor", executor, "-q"])  # fmt: skip
        assert not out.exists() and _left_behind(tmp_path, executor) == []
    assert results["local"].exit_code == results["ray"].exit_code == 3
    errors = {
        name: [line for line in r.stderr.splitlines() if line.startswith("error:")] for name, r in results.items()
    }
    assert len(errors["local"]) == 1 and "v_proj" in errors["local"][0]
    assert errors["ray"] == errors["local"]


def test_removing_the_worker_node_mid_merge_still_gives_the_same_bytes(cluster, inputs, tmp_path):
    """The worker node dies once the first shard is back: Ray retries its tasks on the head node."""
    base, _, first, _ = inputs
    options = dict(device="cpu", max_shard_size="20KB")
    lora_tools.merge(base, [first], tmp_path / "local", **options)
    worker = next(node for node in cluster.list_all_nodes() if node is not cluster.head_node)
    removed = []

    def progress(done: int, total: int) -> None:
        if not removed:
            cluster.remove_node(worker)  # tasks still queued or running on it are lost with it
            removed.append(worker)

    try:
        lora_tools.merge(base, [first], tmp_path / "ray", executor=_spread(), progress=progress, **options)
    finally:
        cluster.add_node(**_NODE)  # back to two nodes for whatever runs next
        cluster.wait_for_nodes()
    assert removed
    _same_files(tmp_path / "local", tmp_path / "ray")


def test_without_ray_the_message_says_how_to_install_it(inputs, tmp_path, monkeypatch):
    base, tuned, *_ = inputs
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    done = run_cli(["extract", base, tuned, "-o", tmp_path / "out", "-r", "2", "--executor", "ray"])
    assert done.exit_code == 4
    assert "pip install 'lora_tools[ray]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tasks_are_grouped_by_bytes():
    assert batches([5, 5, 20, 1, 1], lambda n: n, 10) == [[5, 5], [20], [1, 1]]
    assert batches([3, 3], None, 10) == [[3], [3]]
    assert batches([], lambda n: n, 10) == []


def test_a_ray_address_nothing_answers_at_is_refused_at_once(inputs, tmp_path):
    """Ray's own `ray.init` retries a dead RAY_ADDRESS for minutes; loratool probes it and exits 4 in seconds."""
    import os
    import socket
    import subprocess
    import time

    base, tuned, *_ = inputs
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lora_tools", "extract", base, tuned, "-o", tmp_path / "out", "-r", "2",
         "--executor", "ray"], capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert f"RAY_ADDRESS=127.0.0.1:{port}: nothing answers" in done.stderr and "ray start --head" in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()
