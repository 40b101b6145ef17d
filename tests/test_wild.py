"""Adapters as the wild writes them (old configs, `.bin`, heads saved without `modules_to_save`, GPT-2 with
`fan_in_fan_out: false`), merged into tiny real architectures and compared with PEFT 0.21's `merge_and_unload`.

Each case is a synthetic fixture reproducing one quirk met in public repositories (docs/pages/wild.md): the
config as written there, factors of the right shapes, values random.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_state, randomize_adapter, run_cli
from ulp import max_ulp

import lora_tools
from lora_tools.errors import IncompatibleError


def _tiny(model_type: str, auto: str, seed: int = 0, **values):
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **values)
    model_class = getattr(transformers, auto)
    model = model_class.from_config(config) if auto.startswith("Auto") else model_class(config)
    return model.eval()


_GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)


def _save_peft(model, config_kwargs: dict, path: Path, task_type: str | None = None, seed: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, **config_kwargs))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(path)
    return path


def _edit_config(adapter: Path, **changes) -> None:
    """Rewrite adapter_config.json the way an older PEFT or another trainer wrote it."""
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def _peft_merged(base: Path, adapter: Path, auto: str) -> dict[str, torch.Tensor]:
    import transformers
    from peft import PeftModel

    model = getattr(transformers, auto).from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _assert_matches_peft(base: Path, adapter: Path, out: Path, auto: str) -> dict[str, torch.Tensor]:
    lora_tools.merge(base, [adapter], out, device="cpu")
    ours, expected = load_state(out), _peft_merged(base, adapter, auto)
    for name, tensor in ours.items():
        assert max_ulp(tensor, expected[name].to(tensor.dtype)) <= 1, name
    return ours


# --- Conv1D orientation: decided by the base, never by the config alone ------------------------------------------


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wild_gpt2") / "base"
    _tiny("gpt2", "GPT2LMHeadModel", **_GPT2).save_pretrained(base)
    return base


@pytest.mark.parametrize("written", [False, True])
def test_conv1d_orientation_comes_from_the_base(written, gpt2_base, tmp_path):
    """Square attn.c_proj (32×32) and rectangular c_attn / mlp.c_fc with either fan_in_fan_out: as PEFT merges."""
    adapter = _save_peft(
        _tiny("gpt2", "GPT2LMHeadModel", **_GPT2), dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
        tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, fan_in_fan_out=written)  # PEFT saved true; older trainers wrote false
    base_state = load_state(gpt2_base)
    ours = _assert_matches_peft(gpt2_base, adapter, tmp_path / "merged", "GPT2LMHeadModel")
    square = "transformer.h.0.attn.c_proj.weight"
    assert ours[square].shape == (32, 32) and not torch.equal(ours[square], base_state[square])


def test_no_conv1d_is_ever_merged_transposed(gpt2_base, tmp_path):
    """Every Conv1D layer's ΔW, recomputed in fp64 from the factors, lands in×out, whatever the config says."""
    adapter = _save_peft(
        _tiny("gpt2", "GPT2LMHeadModel", **_GPT2),
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]), tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, fan_in_fan_out=False)
    lora_tools.merge(gpt2_base, [adapter], tmp_path / "merged", device="cpu")
    ours, base, factors = load_state(tmp_path / "merged"), load_state(gpt2_base), load_state(adapter)
    conv1d = [n for n in base if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert len(conv1d) == 8
    for name in conv1d:
        prefix = "base_model.model." + name.removesuffix(".weight")
        a, b = factors[f"{prefix}.lora_A.weight"].double(), factors[f"{prefix}.lora_B.weight"].double()
        exact = base[name].double() + (2.0 * (b @ a)).T  # in×out: Conv1D's layout
        error = (ours[name].double() - exact).abs().max()
        assert error <= torch.finfo(torch.float32).eps * exact.abs().max(), name


def test_square_conv1d_without_a_base_config_is_refused(gpt2_base, tmp_path):
    """A bare weights file says nothing of its layer classes: the square c_proj is refused, nothing written."""
    adapter = _save_peft(
        _tiny("gpt2", "GPT2LMHeadModel", **_GPT2), dict(r=4, lora_alpha=8, target_modules=["c_proj"]),
        tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, fan_in_fan_out=False)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((gpt2_base / "model.safetensors").read_bytes())
    out = tmp_path / "merged.safetensors"
    result = run_cli(["merge", bare, adapter, "-o", out])
    assert result.exit_code == 3, result.output
    assert "attn.c_proj: square layer whose orientation the base does not establish" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == sorted(tmp_path.iterdir())
    with pytest.raises(IncompatibleError):
        lora_tools.merge(bare, [adapter], tmp_path / "again.safetensors", device="cpu")


def test_linear_named_like_conv1d_is_not_transposed(tmp_path):
    """gpt_bigcode's c_attn/c_proj are nn.Linear: PEFT forces fan_in_fan_out false even when the config says true."""
    values = dict(_GPT2, n_layer=1, multi_query=False)
    base = tmp_path / "base"
    _tiny("gpt_bigcode", "AutoModelForCausalLM", **values).save_pretrained(base)
    adapter = _save_peft(
        _tiny("gpt_bigcode", "AutoModelForCausalLM", **values),
        dict(r=4, lora_alpha=8, target_modules=["c_proj"]), tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, fan_in_fan_out=True)
    _assert_matches_peft(base, adapter, tmp_path / "merged", "AutoModelForCausalLM")
