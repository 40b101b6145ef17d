"""A tiny module with every layer kind PEFT's tuners adapt, and one PEFT adapter per tuner setting.

`Tiny` holds an Embedding, two Linears (one with a bias), a Conv2d and a GPT-2 Conv1D; each
case in `CASES` is a PEFT config for the layer kinds PEFT supports for that tuner, saved by
PEFT's own `save_pretrained` with every adapter tensor randomised (PEFT starts most of them
at the identity, where a merge proves nothing).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LINEARS = ["lin", "ff"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.lin = nn.Linear(32, 48)
        self.ff = nn.Linear(48, 32, bias=False)
        self.conv = nn.Conv2d(8, 16, 3)
        self.c1d = Conv1D(48, 32)  # GPT-2's layer: weight stored in×out (32×48)
        self.head = nn.Linear(32, 8)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.emb(tokens)
        hidden = self.ff(torch.tanh(self.lin(hidden))) + self.c1d(hidden)[..., :32]
        pooled = self.conv(image).mean(dim=(-1, -2)).sum(-1, keepdim=True)
        return self.head(hidden) + pooled.unsqueeze(-1)


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype).eval()


def _cases() -> dict:
    import peft

    c1d = {"target_modules": ["c1d"], "fan_in_fan_out": True}
    return {
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=6,
                                              target_modules=LINEARS),
        "adalora-conv1d": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, **c1d),
        "ia3": lambda: peft.IA3Config(target_modules=[*LINEARS, "conv"], feedforward_modules=["ff"]),
        "ia3-conv1d": lambda: peft.IA3Config(feedforward_modules=[], **c1d),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=[*LINEARS, "conv"], use_effective_conv2d=True,
                                        rank_pattern={"ff": 2}, alpha_pattern={"ff": 3}),
        "lokr": lambda: peft.LoKrConfig(r=2, alpha=5, target_modules=[*LINEARS, "conv"], decompose_both=True),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=LINEARS),
        "vera-conv1d": lambda: peft.VeraConfig(r=4, **c1d),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=[*LINEARS, "conv", "emb"]),
        "oft-cayley": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=LINEARS, coft=True, eps=0.05,
                                             block_share=True, use_cayley_neumann=False),
        "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=LINEARS),
        "hra": lambda: peft.HRAConfig(r=4, target_modules=[*LINEARS, "conv"]),
        "hra-gs": lambda: peft.HRAConfig(r=4, target_modules=LINEARS, apply_GS=True),
        "fourierft": lambda: peft.FourierFTConfig(n_frequency=50, target_modules=LINEARS, scaling=10.0),
        "fourierft-conv1d": lambda: peft.FourierFTConfig(n_frequency=40, random_loc_seed=5, **c1d),
        "miss": lambda: peft.MissConfig(r=5, target_modules=LINEARS),
        "miss-bat": lambda: peft.MissConfig(r=4, init_weights="bat", target_modules=LINEARS),
        "miss-mini": lambda: peft.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=LINEARS),
        "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=LINEARS, randlora_alpha=8),
        "randlora-conv1d": lambda: peft.RandLoraConfig(r=4, randlora_alpha=8, **c1d),
        "shira": lambda: peft.ShiraConfig(r=2, target_modules=LINEARS),
        "c3a": lambda: peft.C3AConfig(block_size=16, target_modules=LINEARS),
        **({"paca": lambda: peft.PacaConfig(r=3, paca_alpha=6, target_modules=LINEARS),
            "paca-pattern": lambda: peft.PacaConfig(r=3, paca_alpha=5, target_modules=LINEARS,
                                                    paca_indices_pattern={"ff": [1, 7, 30, 47, 3]})}
           if hasattr(peft, "PacaConfig") else {}),  # PEFT 0.22
    }  # fmt: skip


CASES = _cases()


def randomize(model: nn.Module, seed: int) -> None:
    """Every trainable (adapter) tensor moved off PEFT's identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_(param + noise.to(param.dtype))


def save_tuner(case: str, folder: Path, seed: int = 1) -> Path:
    """PEFT's `save_pretrained` of `case` on `tiny()`, randomised."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny(), CASES[case]())
        randomize(model, seed)
        model.save_pretrained(folder)
    return folder


def save_base(path: Path, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny(dtype).state_dict().items()}, path)
    return path


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's own merge: `PeftModel.from_pretrained(base, adapter).merge_and_unload()` on a `dtype` base."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file

    model = tiny(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(base).items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
