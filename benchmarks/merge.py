"""Benchmark: loratool merge against transformers + PEFT, with `cp -r` as the I/O floor.

Builds a Llama-shaped 1.1 GB bf16 checkpoint (hidden 2048, intermediate 5632,
vocab 32000, 8 layers) and a rank-16 LoRA on all seven projections, then times
each contender in its own process, side by side, reporting wall time and peak
RSS. This parent process never imports torch, so the children's peak RSS is
their own (Linux reports a forked child's RSS high-water mark across exec).

    .venv/bin/python benchmarks/merge.py [--workdir DIR] [--repeat N] [--device cpu|cuda] [--layers 8|16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from contender import run_contender

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=2048, intermediate=5632, layers=8, heads=32)

BUILD = f"""
import json, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from synthetic import write_llama_checkpoint, write_lora_adapter
work, shape = Path(sys.argv[1]), json.loads(sys.argv[2])
write_llama_checkpoint(work / "base", vocab=32000, max_shard_bytes=5_000_000_000, **shape)
write_lora_adapter(work / "lora", rank=16, **shape)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="8: 1.1 GB, 16: 2.1 GB")
    args = parser.parse_args()
    SHAPE["layers"] = args.layers
    work = args.workdir or Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    python = sys.executable
    if not (work / "base").exists():
        subprocess.run([python, "-c", BUILD, work, json.dumps(SHAPE)], check=True)
    size = sum(f.stat().st_size for f in (work / "base").iterdir())
    subprocess.run(["sync"], check=True)

    contenders = [
        ("floor: cp -r + import torch", ["bash", "-c", f'cp -r "{work}/base" "{work}/cp" && "{python}" -c "import torch"'], work / "cp"),
        ("loratool merge", [python, "-m", "lora_tools", "merge", work / "base", work / "lora", "-o", work / "ours", "-q", "--device", args.device], work / "ours"),
    ]  # fmt: skip
    if not args.skip_peft:
        contenders.append(
            ("transformers + PEFT", [python, "-c", PEFT, work / "base", work / "lora", work / "peft"], work / "peft")
        )
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeat):
        for label, command, out in contenders:
            results.setdefault(label, []).append(run_contender(label, command, out))
    best = {label: min(runs, key=lambda r: r["seconds"]) for label, runs in results.items()}
    floor = best[contenders[0][0]]["seconds"]
    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {SHAPE}, adapter r=16 on 7 projections; best of {args.repeat}")
    print(f"{'contender':32} {'wall s':>8} {'× floor':>8} {'GB/s':>6} {'peak RSS MB':>12}")
    for label, r in best.items():
        print(
            f"{label:32} {r['seconds']:8.2f} {r['seconds'] / floor:8.2f} {size / 1e9 / r['seconds']:6.2f} {r['peak_rss_mb']:12.0f}"
        )
    if "transformers + PEFT" in best:
        ratio = best["transformers + PEFT"]["seconds"] / best["loratool merge"]["seconds"]
        print(f"loratool is {ratio:.1f}× faster than transformers + PEFT")
    print(json.dumps(best))


if __name__ == "__main__":
    main()
