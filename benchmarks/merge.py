"""Benchmark: loratool merge against transformers + PEFT, with `cp -r` as the I/O floor.

Builds a Llama-shaped 1.1 GB bf16 checkpoint (hidden 2048, intermediate 5632,
vocab 32000, 8 layers) and a rank-16 LoRA on all seven projections, then times
each contender in its own process, side by side, reporting wall time and peak
RSS. The FP8 case merges the same adapter into the same model with its
projections stored as DeepSeek-V3-style FP8 blocks (128×128, fp32 scales):
dequantize, merge, requantize. This parent process never imports torch, so the children's peak RSS is
their own (Linux reports a forked child's RSS high-water mark across exec).

    .venv/bin/python benchmarks/merge.py [--workdir DIR] [--repeat N] [--device cpu|cuda] [--layers 8|16]
                                         [--skip-peft] [--skip-fp8]

At the sizes users have (`--size`, `--cold`, `--memory-limit`; see `sized_main`): a checkpoint shaped
like Llama-3-8B (hidden 4096, intermediate 14336, 32/8 heads, vocabulary 128256, 2 GB shards; layers,
and below one layer plus embeddings the vocabulary, chosen to reach SIZE), r=16 on all seven
projections; `cp -r` of the same folder, loratool merge and transformers + PEFT each in a memory cgroup
of their own (`limits.py`), caches dropped before each with `--cold` (root):

    .venv/bin/python benchmarks/merge.py --size 8GB --cold --memory-limit 2GiB --repeat 2

Contenders run interleaved (one of each, then again), and each run records the
machine's load average: on a shared machine, compare runs taken at the same load.
`LORATOOL_TRACE=1` on a loratool run shows where its time goes (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from contender import run_contender, scratch_folder
from limits import parse_bytes, run_limited

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=32)
LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8)
LLAMA3_VOCAB = 128256

BUILD = f"""
import json, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from synthetic import write_llama_checkpoint, write_lora_adapter
work, shape = Path(sys.argv[1]), json.loads(sys.argv[2])
vocab, shard = shape.pop("vocab", 32000), shape.pop("shard", 5_000_000_000)
write_llama_checkpoint(work / "base", vocab=vocab, max_shard_bytes=shard, **shape)
write_lora_adapter(work / "lora", rank=16, **shape)
"""

FP8 = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from safetensors.torch import load_file, save_file
from lora_tools.quant.fp8_codec import quantize_blocks
import torch
work = Path(sys.argv[1])
state = {{}}
for shard in sorted((work / "base").glob("*.safetensors")):
    for name, tensor in load_file(shard).items():
        if name.endswith("_proj.weight"):
            state[name], state[name + "_scale_inv"] = quantize_blocks(tensor.float(), (128, 128), torch.float32)
        else:
            state[name] = tensor
(work / "base-fp8").mkdir()
save_file(state, work / "base-fp8" / "model.safetensors", metadata={{"format": "pt"}})
config = json.loads((work / "base" / "config.json").read_text())
config["quantization_config"] = {{"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
(work / "base-fp8" / "config.json").write_text(json.dumps(config, indent=2))
"""

PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def _measured(label: str, command: list, out: Path) -> dict:
    """`run_contender`, plus the child's CPU seconds and the 1-minute load average before and after."""
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    result = run_contender(label, command, out)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**result, "cpu_seconds": cpu, "load": (load, os.getloadavg()[0])}


def _print_rounds(bf16_runs: list[dict], fp8_runs: list[dict]) -> None:
    """FP8 against the bf16 run of the same round (they run back to back, so under similar load)."""
    print(
        f"{'round':>5} {'bf16 s':>7} {'FP8 s':>7} {'time ×':>7} {'CPU ×':>6} {'RSS MB bf16/FP8':>16} {'load 1 min':>11}"
    )
    for index, (bf16, fp8) in enumerate(zip(bf16_runs, fp8_runs, strict=True)):
        print(
            f"{index + 1:5} {bf16['seconds']:7.2f} {fp8['seconds']:7.2f} {fp8['seconds'] / bf16['seconds']:7.2f} "
            f"{fp8['cpu_seconds'] / bf16['cpu_seconds']:6.2f} {bf16['peak_rss_mb']:7.0f} / {fp8['peak_rss_mb']:<6.0f} "
            f"{bf16['load'][0]:5.1f}-{fp8['load'][1]:<5.1f}"
        )


def sized_shape(size: int) -> dict:
    """Llama-3-8B's shape with the layers (and, below one layer plus the embeddings, the vocabulary) for `size` bytes."""
    hidden, intermediate, kv = LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"], 1024
    layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden)  # bf16 bytes
    embeddings = 2 * 2 * LLAMA3_VOCAB * hidden  # embed_tokens and lm_head, untied
    layers = max(1, round((size - embeddings) / layer))
    vocab = LLAMA3_VOCAB if size >= embeddings + layer else max(1024, (size - layer) // (4 * hidden))
    return {**LLAMA3_8B, "layers": layers, "vocab": vocab, "shard": 2_000_000_000}


def sized_main(args) -> None:
    """`--size`/`--cold`/`--memory-limit`: cp -r, loratool merge and PEFT, each in a memory cgroup of its own."""
    shape = sized_shape(parse_bytes(args.size or "8GB"))
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    python = sys.executable
    if not (work / "base").exists():
        subprocess.run([python, "-c", BUILD, work, json.dumps(shape)], check=True)
    size = sum(f.stat().st_size for f in (work / "base").iterdir())
    subprocess.run([python, "-m", "compileall", "-q", REPO / "lora_tools"], check=True)
    contenders = [
        ("cp -r", ["cp", "-r", work / "base", work / "cp"], work / "cp"),
        ("loratool merge", [python, "-m", "lora_tools", "merge", work / "base", work / "lora", "-o", work / "ours", "-q", "--device", args.device], work / "ours"),
    ]  # fmt: skip
    if not args.skip_peft:
        contenders.append(
            ("transformers + PEFT", [python, "-c", PEFT, work / "base", work / "lora", work / "peft"], work / "peft")
        )
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved rounds: each contender meets the same machine
        for label, command, out in contenders:
            runs.setdefault(label, []).append(run_limited(label, command, out, limit=limit, cold=args.cold))
    for _, _, out in contenders:
        subprocess.run(["rm", "-rf", out], check=True)
    best = {label: min(r, key=lambda run: (run["outcome"] != "ok", run["seconds"])) for label, r in runs.items()}
    floor = best["cp -r"]["seconds"]
    conditions = f"{'cold' if args.cold else 'warm'} page cache, memory limit {args.memory_limit or 'none'}"
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {shape}, adapter r=16 on 7 projections")
    print(f"{conditions}; best of {args.repeat} interleaved round(s); load average (1 min) shown per run")
    print(
        f"{'contender':22} {'wall s':>7} {'× cp -r':>8} {'GB/s':>6} {'peak anon MB':>13} {'peak RSS MB':>12} {'load':>5}  outcome"
    )
    for label, r in best.items():
        anon = f"{r['peak_anon_mb']:13.0f}" if r["peak_anon_mb"] is not None else f"{'-':>13}"
        print(
            f"{label:22} {r['seconds']:7.2f} {r['seconds'] / floor:8.2f} {size / 1e9 / r['seconds']:6.2f} {anon} "
            f"{r['peak_rss_mb']:12.0f} {r['load']:5.1f}  {r['outcome']}"
        )
    print(json.dumps({"size_bytes": size, "shape": shape, "runs": runs}))
    if not args.keep:  # the generated checkpoint and adapter (and the folder, when this run made it)
        subprocess.run(["rm", "-rf", work / "base", work / "lora"], check=True)
        if args.workdir is None:
            work.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="8: 1.1 GB, 16: 2.1 GB")
    parser.add_argument("--size", help="A Llama-3-8B-shaped checkpoint of about this size (8GB, 16GB...)")
    parser.add_argument("--cold", action="store_true", help="Drop the page cache before each contender (root).")
    parser.add_argument("--memory-limit", help="Run each contender in a memory cgroup of this size (2GiB; root).")
    parser.add_argument("--keep", action="store_true", help="Keep the generated models (without --workdir: removed).")
    args = parser.parse_args()
    if args.size or args.cold or args.memory_limit:
        sized_main(args)
        return
    SHAPE["layers"] = args.layers
    work = args.workdir or scratch_folder("loratool-bench-", args.keep)
    python = sys.executable
    if not (work / "base").exists():
        subprocess.run([python, "-c", BUILD, work, json.dumps(SHAPE)], check=True)
    if not args.skip_fp8 and not (work / "base-fp8").exists():
        subprocess.run([python, "-c", FP8, work], check=True)
    size = sum(f.stat().st_size for f in (work / "base").iterdir())
    # An installed lora_tools has its bytecode (pip compiles it, as it did torch's, transformers' and
    # peft's); a checkout run under PYTHONDONTWRITEBYTECODE=1 would recompile it in every run.
    subprocess.run([python, "-m", "compileall", "-q", REPO / "lora_tools"], check=True)
    subprocess.run(["sync"], check=True)

    contenders = [
        ("floor: cp -r + import torch", ["bash", "-c", f'cp -r "{work}/base" "{work}/cp" && "{python}" -c "import torch"'], work / "cp"),
        ("loratool merge", [python, "-m", "lora_tools", "merge", work / "base", work / "lora", "-o", work / "ours", "-q", "--device", args.device], work / "ours"),
        ("loratool merge, FP8 block base", [python, "-m", "lora_tools", "merge", work / "base-fp8", work / "lora", "-o", work / "ours-fp8", "-q", "--device", args.device], work / "ours-fp8"),
    ]  # fmt: skip
    if args.skip_fp8:
        contenders = [c for c in contenders if "FP8" not in c[0]]
    if not args.skip_peft:
        contenders.append(
            ("transformers + PEFT", [python, "-c", PEFT, work / "base", work / "lora", work / "peft"], work / "peft")
        )
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for label, command, out in contenders:
            results.setdefault(label, []).append(_measured(label, command, out))
    best = {label: min(runs, key=lambda r: r["seconds"]) for label, runs in results.items()}
    floor = best[contenders[0][0]]["seconds"]
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {SHAPE}, adapter r=16 on 7 projections; best of {args.repeat}")
    print(f"{'contender':32} {'wall s':>8} {'× floor':>8} {'GB/s':>6} {'CPU s':>6} {'load':>5} {'peak RSS MB':>12}")
    for label, r in best.items():
        print(
            f"{label:32} {r['seconds']:8.2f} {r['seconds'] / floor:8.2f} {size / 1e9 / r['seconds']:6.2f} "
            f"{r['cpu_seconds']:6.2f} {max(r['load']):5.1f} {r['peak_rss_mb']:12.0f}"
        )
    if "loratool merge, FP8 block base" in best:
        fp8, bf16 = best["loratool merge, FP8 block base"], best["loratool merge"]
        print(
            f"FP8 block merge vs bf16 merge: {fp8['seconds'] / bf16['seconds']:.2f}× the time, "
            f"{fp8['peak_rss_mb'] / bf16['peak_rss_mb']:.2f}× the peak RSS (best runs)"
        )
        _print_rounds(results["loratool merge"], results["loratool merge, FP8 block base"])
    if "transformers + PEFT" in best:
        ratio = best["transformers + PEFT"]["seconds"] / best["loratool merge"]["seconds"]
        print(f"loratool is {ratio:.1f}× faster than transformers + PEFT")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
