"""Draw the pictures the README shows, from the fixtures (and a 32-layer synthetic adapter to look at).

python benchmarks/pictures.py            # writes benchmarks/pictures/*.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import write_lora_adapter  # noqa: E402

from lora_tools.analysis.plot import plot_stats  # noqa: E402
from lora_tools.commands.stats import adapter_stats  # noqa: E402


def _shaped_adapter(folder: Path, layers: int) -> Path:
    """A rank-16 adapter whose deeper layers change more and use fewer directions, with one broken module."""
    write_lora_adapter(folder, hidden=64, intermediate=128, layers=layers, rank=16, heads=4)
    tensors = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for key, tensor in tensors.items():
        layer = int(key.split(".layers.")[1].split(".")[0])
        if key.endswith("lora_A.weight"):
            decay = torch.exp(-torch.arange(tensor.shape[0]) * (0.2 + layer / layers))
            tensor.mul_(decay[:, None])
        else:
            tensor.mul_(1 + 3 * layer / layers + 0.2 * torch.rand(1, generator=generator))
    tensors[f"base_model.model.model.layers.{layers // 2}.mlp.up_proj.lora_B.weight"] *= 40
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def main() -> None:
    out = ROOT / "benchmarks" / "pictures"
    out.mkdir(exist_ok=True)
    fixture = adapter_stats(ROOT / "fixtures/tiny-llama-lora", base=ROOT / "fixtures/tiny-llama")
    print(plot_stats(fixture, out / "inspect-stats-tiny-llama.png"))
    with tempfile.TemporaryDirectory() as scratch:
        adapter = _shaped_adapter(Path(scratch) / "adapter-32-layers", 32)
        print(plot_stats(adapter_stats(adapter), out / "inspect-stats-32-layers.png"))


if __name__ == "__main__":
    main()
