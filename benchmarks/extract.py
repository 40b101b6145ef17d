"""Benchmark: loratool extract against mergekit-extract-lora, side by side in one run.

Builds a Llama-shaped 1.1 GB bf16 pair (hidden 2048, intermediate 5632, vocab
32000, 8 layers): BASE, and TUNED = BASE + a rank-8 update + noise on all seven
projections of every layer. Both tools extract rank-16 adapters (embeddings and
lm_head left out by both); each runs in its own process for wall time and peak
RSS, then one evaluator measures every module's relative error
‖Δ − s·B·A‖_F / ‖Δ‖_F for every output (in fp32, a few seconds), and the optimal
(Eckart–Young) error from the eigenvalues of ΔᵀΔ (fp64, no SVD) on a sample of
modules (`--sample`, default the first layer's seven), next to each tool's error
on the same sample. `--layers 1` builds a one-layer pair (seven modules), small
enough for mergekit on a busy machine.

mergekit lives in its own environment (its pins are not ours):

    python3 -m venv /work/bench-venv && /work/bench-venv/bin/pip install torch==2.13.0 mergekit
    .venv/bin/python benchmarks/extract.py --mergekit /work/bench-venv/bin/mergekit-extract-lora [--workers 1 2]

`--executor ray` adds a run through Ray beside the `--workers` runs: a local cluster of `--ray-nodes`
nodes (default 2) of one CPU each, started once in a helper process (`ray.cluster_utils.Cluster`), each
run a fresh driver connected through RAY_ADDRESS; its time includes connecting and starting the
workers, which is the overhead of the Ray path on one machine. Its adapter must be byte-identical:

    .venv/bin/python benchmarks/extract.py --skip-mergekit --workers 2 --executor ray
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from contender import run_contender, scratch_folder

CLUSTER = """
import signal, sys, time
from ray.cluster_utils import Cluster
node = {"num_cpus": 1, "object_store_memory": 200 << 20}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
for _ in range(int(sys.argv[1]) - 1):
    cluster.add_node(**node)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
try:
    while True:
        time.sleep(1)
finally:
    cluster.shutdown()
"""


def start_cluster(nodes: int) -> tuple[subprocess.Popen, str]:
    """A local Ray cluster of `nodes` one-CPU nodes in a helper process; (the process, its address)."""
    helper = subprocess.Popen([sys.executable, "-c", CLUSTER, str(nodes)], stdout=subprocess.PIPE, text=True)
    address = helper.stdout.readline().strip()
    if not address:
        raise SystemExit("the local Ray cluster did not start")
    return helper, address


REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=32)
RANK = 16

BUILD = """
import json, shutil, sys, torch
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from safetensors.torch import load_file, save_file
from synthetic import write_llama_checkpoint
work, shape = Path(sys.argv[1]), json.loads(sys.argv[3])
write_llama_checkpoint(work / "base", vocab=32000, **shape)
shutil.copytree(work / "base", work / "tuned")
generator = torch.Generator().manual_seed(7)
for file in sorted((work / "tuned").glob("*.safetensors")):
    state = load_file(file)
    for name, tensor in state.items():
        if "proj" in name:
            out, inp = tensor.shape
            update = torch.randn(out, 8, generator=generator) @ torch.randn(8, inp, generator=generator) * 2e-3
            noise = torch.randn(out, inp, generator=generator) * 1e-4
            state[name] = (tensor.float() + update + noise).to(tensor.dtype)
    save_file(state, file, metadata={"format": "pt"})
"""

EVALUATE = """
import json, sys, torch
from lora_tools import open_checkpoint, read_adapter
base, tuned = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
sample = sys.argv[3]


def tensor_name(module):
    name = module + ".weight"
    if name not in base.tensors:
        name = name.removeprefix("model.") if name.removeprefix("model.") in base.tensors else "model." + name
    return name


def delta_of(name):  # fp32 is exact for the difference of two close bf16 values, and 2x cheaper than fp64
    return tuned.read(name).float() - base.read(name).float()


results, optimal = {}, {}
for label, path in zip(sys.argv[4::2], sys.argv[5::2]):
    adapter = read_adapter(path)
    errors = {}
    for module in adapter.modules:
        name = tensor_name(module.name)
        delta = delta_of(name)
        approx = module.scale * (adapter.read(module.b_key).float() @ adapter.read(module.a_key).float())
        errors[name] = float(torch.linalg.vector_norm(delta - approx) / torch.linalg.vector_norm(delta))
        if sample in name and name not in optimal:  # Eckart-Young: the best any rank-r factorisation can do
            wide = delta.double() if delta.shape[0] >= delta.shape[1] else delta.double().T
            energies = torch.linalg.eigvalsh(wide.T @ wide).flip(0)  # σ², from the small side's Gram matrix
            tail = float(energies.sum() - energies[: module.rank].sum())
            optimal[name] = max(tail, 0.0) ** 0.5 / float(energies.sum()) ** 0.5
    sampled = [errors[n] for n in optimal if n in errors]
    results[label] = {"modules": len(errors), "mean_relative_error": sum(errors.values()) / len(errors),
                      "sample_mean_relative_error": sum(sampled) / max(1, len(sampled))}
for entry in results.values():
    entry["sample_optimal_mean_relative_error"] = sum(optimal.values()) / max(1, len(optimal))
    entry["sample_modules"] = len(optimal)
print(json.dumps(results))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loratool runs, one per count")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each contender, interleaved; the best counts")
    parser.add_argument("--sample", default="layers.0.", help="tensors whose optimal error is computed (by name part)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="8: a 1.1 GB pair")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="ray: also a run through Ray")
    parser.add_argument("--ray-nodes", type=int, default=2, help="nodes of the local Ray cluster (one CPU each)")
    parser.add_argument("--keep", action="store_true", help="keep the generated pair (without --workdir: removed)")
    args = parser.parse_args()
    SHAPE["layers"] = args.layers
    work = args.workdir or scratch_folder("loratool-extract-bench-", args.keep)
    python = sys.executable
    if not (work / "tuned").exists():
        subprocess.run([python, "-c", BUILD, work, REPO / "tests", json.dumps(SHAPE)], check=True)
    runs: dict[str, list[dict]] = {}
    outputs, digests = [], {}
    contenders = [(f"loratool --workers {w}", work / f"ours-{w}", ["--workers", w]) for w in args.workers]
    helper = None
    if args.executor == "ray":
        helper, address = start_cluster(args.ray_nodes)
        os.environ["RAY_ADDRESS"] = address  # the contenders' drivers connect to it
        label = f"loratool --executor ray ({args.ray_nodes} nodes)"
        contenders.append((label, work / "ours-ray", ["--executor", "ray"]))
    try:
        for _ in range(args.repeat):  # interleaved, so a burst of load hits every contender alike
            for label, folder, options in contenders:
                ours = [python, "-m", "lora_tools", "extract", work / "base", work / "tuned", "-o", folder,
                        "--rank", RANK, "-q", "--device", args.device, *options]  # fmt: skip
                runs.setdefault(label, []).append(run_contender(label, ours, folder))
                digests.setdefault(label, set()).add(
                    hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
                )
    finally:
        if helper is not None:
            helper.terminate()
            helper.wait(60)
    outputs = [item for label, folder, _ in contenders for item in (label, folder)]
    if args.mergekit and not args.skip_mergekit:
        theirs = [args.mergekit, "--model", work / "tuned", "--base-model", work / "base", "--out-path", work / "mergekit",
                  "--max-rank", RANK, "-e", "embed_tokens|lm_head|norm", "--skip-undecomposable", "--quiet"]  # fmt: skip
        runs["mergekit-extract-lora"] = [run_contender("mergekit-extract-lora", theirs, work / "mergekit")]
        outputs += ["mergekit-extract-lora", work / "mergekit"]
    elif not args.skip_mergekit:
        print("mergekit-extract-lora not found: pass --mergekit PATH to compare", file=sys.stderr)
    evaluated = json.loads(
        subprocess.run(
            [python, "-c", EVALUATE, work / "base", work / "tuned", args.sample, *outputs],
            check=True,
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    )
    results = [min(r, key=lambda run: run["seconds"]) for r in runs.values()]
    print(
        f"bf16 Llama-shaped pair {SHAPE}, rank {RANK}, {os.cpu_count()} CPUs, best of {args.repeat}"
        if args.device == "cpu"
        else args.device
    )
    sampled = next(iter(evaluated.values()))
    print(f"optimal (Eckart–Young) mean relative error on {sampled['sample_modules']} sampled modules: "
          f"{sampled['sample_optimal_mean_relative_error']:.5f}")  # fmt: skip
    print(
        f"{'tool':34} {'wall s':>8} {'load':>5} {'peak RSS MB':>12} {'modules':>8} {'mean rel. error':>16} {'on sample':>10}"
    )
    for r in results:
        e = evaluated[r["label"]]
        print(f"{r['label']:34} {r['seconds']:8.1f} {r['load']:5.1f} {r['peak_rss_mb']:12.0f} {e['modules']:8d} "
              f"{e['mean_relative_error']:16.5f} {e['sample_mean_relative_error']:10.5f}")  # fmt: skip
    by_label = {r["label"]: r for r in results}
    first = f"loratool --workers {args.workers[0]}"
    for label, _, _ in contenders[1:]:
        ratio = by_label[label]["seconds"] / by_label[first]["seconds"]
        same = "byte-identical" if len(digests[label] | digests[first]) == 1 else "DIFFERENT BYTES"
        print(f"{label}: {ratio:.2f}× the time of {first}; adapters {same}")
    if "mergekit-extract-lora" in by_label:
        fastest = min((r for r in results if r["label"].startswith("loratool")), key=lambda r: r["seconds"])
        print(
            f"loratool is {by_label['mergekit-extract-lora']['seconds'] / fastest['seconds']:.1f}× faster than mergekit"
        )
    print(json.dumps({"runs": runs, "errors": evaluated, "sha256": {k: sorted(v) for k, v in digests.items()}}))


if __name__ == "__main__":
    main()
