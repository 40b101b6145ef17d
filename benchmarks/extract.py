"""Benchmark: loratool extract against mergekit-extract-lora, side by side in one run.

Builds a Llama-shaped 1.1 GB bf16 pair (hidden 2048, intermediate 5632, vocab
32000, 8 layers): BASE, and TUNED = BASE + a rank-8 update + noise on all seven
projections of every layer. Both tools extract rank-16 adapters (embeddings and
lm_head left out by both); each runs in its own process for wall time and peak
RSS, then one evaluator measures every module's relative error
‖Δ − s·B·A‖_F / ‖Δ‖_F for both outputs, next to the optimal (Eckart–Young) error.

mergekit lives in its own environment (its pins are not ours):

    python3 -m venv /tmp/mkenv && /tmp/mkenv/bin/pip install torch==2.13.0 mergekit
    .venv/bin/python benchmarks/extract.py --mergekit /tmp/mkenv/bin/mergekit-extract-lora [--workers 1 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from contender import run_contender

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=32)
RANK = 16

BUILD = f"""
import shutil, sys, torch
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from safetensors.torch import load_file, save_file
from synthetic import write_llama_checkpoint
work = Path(sys.argv[1])
write_llama_checkpoint(work / "base", vocab=32000, **{SHAPE!r})
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
    save_file(state, file, metadata={{"format": "pt"}})
"""

EVALUATE = """
import json, sys, torch
from lora_tools import open_checkpoint, read_adapter
base, tuned = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
results = {}
for label, path in zip(sys.argv[3::2], sys.argv[4::2]):
    adapter = read_adapter(path)
    errors, optimal = [], []
    for module in adapter.modules:
        name = module.name + ".weight"
        if name not in base.tensors:
            name = name.removeprefix("model.") if name.removeprefix("model.") in base.tensors else "model." + name
        delta = tuned.read(name).double() - base.read(name).double()
        approx = module.scale * adapter.read(module.b_key).double() @ adapter.read(module.a_key).double()
        errors.append(float((delta - approx).norm() / delta.norm()))
        values = torch.linalg.svdvals(delta)
        optimal.append(float(values[module.rank:].pow(2).sum().sqrt() / delta.norm()))
    results[label] = {"modules": len(errors), "mean_relative_error": sum(errors) / len(errors),
                      "optimal_mean_relative_error": sum(optimal) / len(optimal)}
print(json.dumps(results))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loratool runs, one per count")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loratool-extract-bench-"))
    python = sys.executable
    if not (work / "tuned").exists():
        subprocess.run([python, "-c", BUILD, work], check=True)
    results, outputs, digests = [], [], {}
    for workers in args.workers:
        label, folder = f"loratool --workers {workers}", work / f"ours-{workers}"
        ours = [python, "-m", "lora_tools", "extract", work / "base", work / "tuned", "-o", folder,
                "--rank", RANK, "-q", "--device", args.device, "--workers", workers]  # fmt: skip
        results.append(run_contender(label, ours, folder))
        outputs += [label, folder]
        digests[label] = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    if args.mergekit:
        theirs = [args.mergekit, "--model", work / "tuned", "--base-model", work / "base", "--out-path", work / "mergekit",
                  "--max-rank", RANK, "-e", "embed_tokens|lm_head|norm", "--skip-undecomposable", "--quiet"]  # fmt: skip
        results.append(run_contender("mergekit-extract-lora", theirs, work / "mergekit"))
        outputs += ["mergekit-extract-lora", work / "mergekit"]
    else:
        print("mergekit-extract-lora not found: pass --mergekit PATH to compare", file=sys.stderr)
    evaluated = json.loads(
        subprocess.run(
            [python, "-c", EVALUATE, work / "base", work / "tuned", *outputs],
            check=True,
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    )
    print(
        f"1.1 GB bf16 Llama-shaped pair {SHAPE}, rank {RANK}, {os.cpu_count()} CPUs"
        if args.device == "cpu"
        else args.device
    )
    print(f"{'tool':24} {'wall s':>8} {'peak RSS MB':>12} {'modules':>8} {'mean rel. error':>16} {'optimal':>9}")
    for r in results:
        e = evaluated[r["label"]]
        print(f"{r['label']:24} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} {e['modules']:8d} "
              f"{e['mean_relative_error']:16.5f} {e['optimal_mean_relative_error']:9.5f}")  # fmt: skip
    by_label = {r["label"]: r for r in results}
    first = f"loratool --workers {args.workers[0]}"
    for workers in args.workers[1:]:
        label = f"loratool --workers {workers}"
        speedup = by_label[first]["seconds"] / by_label[label]["seconds"]
        same = "byte-identical" if digests[label] == digests[first] else "DIFFERENT BYTES"
        print(f"{label} is {speedup:.2f}× faster than {first}; adapters {same}")
    if "mergekit-extract-lora" in by_label:
        fastest = min((r for r in results if r["label"].startswith("loratool")), key=lambda r: r["seconds"])
        print(
            f"loratool is {by_label['mergekit-extract-lora']['seconds'] / fastest['seconds']:.1f}× faster than mergekit"
        )
    print(json.dumps({"runs": results, "errors": evaluated, "sha256": digests}))


if __name__ == "__main__":
    main()
