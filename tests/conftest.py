"""Shared fixtures: tiny real-architecture models and PEFT adapters, built once per session."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Never read a real token or cache."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    for name in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_WORKSPACE"):  # run in Actions, tests see no runner
        monkeypatch.delenv(name, raising=False)


def llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    values = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    values.update(overrides)
    return GPT2Config(**values)


def build_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(**overrides))
    else:
        model = GPT2LMHeadModel(gpt2_config(**overrides))
    return model.to(dtype).eval()


def randomize_adapter(model: torch.nn.Module, seed: int) -> None:
    """PEFT starts B at zero (ΔW = 0); give every adapter tensor random values so merges mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_", "modules_to_save", "trainable_tokens")):
                noise = torch.randn(param.shape, generator=generator) * 0.1
                param.copy_(param + noise.to(param.dtype))


def save_base(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def save_adapter(model_factory: Callable, lora_config, path: Path, seed: int = 1) -> Path:
    from peft import get_peft_model

    peft_model = get_peft_model(model_factory(), lora_config)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(path)
    return path


def peft_model_for(base_path: Path, adapter_path: Path, model_class):
    from peft import PeftModel

    model = model_class.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_path).eval()


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder or file (tests only: the models are tiny)."""
    from safetensors.torch import load_file

    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("loratool_merge"))
    )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def run_cli(args: list[str]):
    """Invoke loratool in-process; returns Click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from lora_tools.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def traced_merge(base: Path, adapter: Path, out: Path, events_file: Path) -> list[dict]:
    """Merge in a fresh process (so torch is not yet imported) with `LORATOOL_TRACE`; returns the trace events."""
    import os
    import subprocess
    import sys

    script = "import sys, lora_tools; lora_tools.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], device='cpu')"
    env = {**os.environ, "LORATOOL_TRACE": str(events_file)}
    done = subprocess.run(
        [sys.executable, "-c", script, base, adapter, out], env=env, capture_output=True, timeout=120
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in events_file.read_text().splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return save_base(build_model("llama"), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_tied_base(tmp_path_factory) -> Path:
    return save_base(build_model("llama", tie_word_embeddings=True), tmp_path_factory.mktemp("llama_tied") / "base")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    return save_base(build_model("gpt2"), tmp_path_factory.mktemp("gpt2") / "base")


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**kwargs)


ADAPTER_VARIANTS: dict[str, tuple[str, dict]] = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "rslora_patterns": (
        "llama",
        dict(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
            alpha_pattern={"o_proj": 3, r"layers\.0\.mlp\.up_proj": 5},
        ),
    ),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
    "embedding_save": (
        "llama",
        dict(r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    ),
    "trainable_tokens": ("llama", dict(r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=[3, 7])),
    "gpt2_fan_in_fan_out": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, lora_bias=True),
    ),
}


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, llama_base, gpt2_base) -> dict[str, tuple[Path, Path]]:
    """Every adapter variant, saved once: name → (base folder, adapter folder)."""
    built = {}
    for name, (arch, kwargs) in ADAPTER_VARIANTS.items():
        base = llama_base if arch == "llama" else gpt2_base
        path = tmp_path_factory.mktemp(f"adapter_{name}") / name
        save_adapter(
            lambda arch=arch: build_model(arch), lora_config(**kwargs), path, seed=zlib.crc32(name.encode()) % 1000
        )
        built[name] = (base, path)
    return built
