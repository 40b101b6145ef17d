"""Quantized bases: FP8 block / per-channel / per-tensor and MXFP4, merged against fp64 references.

Exactness: our requantization runs in fp32 as the producers' does, the references
in fp64, so a value whose exact result lies within fp32 rounding of a tie between
two codes may land on either: stored values are checked to be within one
quantization step (one code) of the reference everywhere and bit-identical for
at least 98% of them; scales within 2^-20 relative (fp32) or one bf16 step.
Quantizing the same fp32 input (no merge) is checked bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, lora_config, randomize_adapter, run_cli, traced_merge
from quant_models import (
    dequantize_fp8_fp64,
    dequantize_mxfp4_fp64,
    e4m3_bytes,
    e4m3_ordinal,
    fp8_block_fp64,
    fp8_scaled_fp64,
    mxfp4_fp64,
    quantize_gpt_oss,
    quantize_llama,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_tools import merge, unmerge
from lora_tools.quant import fp8_codec, mxfp4

BLOCK = (16, 16)
LLAMA = dict(hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEMES = {  # name → (scheme, scale dtype)
    "block-f32": ("fp8-block", torch.float32),
    "block-bf16": ("fp8-block", torch.bfloat16),
    "channel": ("fp8-channel", torch.float32),
    "tensor": ("fp8-tensor", torch.bfloat16),
    "block-ue8m0": ("fp8-block", torch.float32),  # DeepSeek-V3.1: power-of-two scales (`scale_fmt: ue8m0`)
}


@pytest.fixture(scope="session")
def plain_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "llama"
    build_model("llama", **LLAMA).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def fp8_models(tmp_path_factory, plain_llama) -> dict[str, tuple[Path, Path, Path]]:
    """name → (quantized base, dequantized twin, PEFT adapter); one adapter fits every twin (same architecture)."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(plain_llama), lora_config(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    randomize_adapter(peft_model, seed=3)
    peft_model.save_pretrained(root / "lora")
    models = {}
    for name, (scheme, scale_dtype) in SCHEMES.items():
        base, twin = quantize_llama(plain_llama, root / name, scheme, scale_dtype, BLOCK, name == "block-ue8m0")
        models[name] = (base, twin, root / "lora")
    return models


def _adapter_delta(adapter: Path, weight: str) -> torch.Tensor:
    state = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    module = "base_model.model." + weight.removesuffix(".weight")
    a, b = state[f"{module}.lora_A.weight"].double(), state[f"{module}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * (b @ a)


def _raw(folder: Path, file: str = "model.safetensors") -> dict[str, bytes]:
    out = {}
    with safe_open(folder / file, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            out[key] = f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return out


def _scale_name(scheme: str, weight: str) -> str:
    return f"{weight}_scale_inv" if scheme == "fp8-block" else f"{weight}_scale"


def _assert_within_one_step(ours: torch.Tensor, reference: torch.Tensor) -> None:
    steps = (e4m3_ordinal(ours) - e4m3_ordinal(reference)).abs()
    assert int(steps.max()) <= 1
    assert float((steps == 0).double().mean()) >= 0.98


def _reference(scheme: str, merged: torch.Tensor, scale_dtype, pow2: bool = False):
    if scheme == "fp8-block":
        return fp8_block_fp64(merged, BLOCK, scale_dtype, pow2)
    return fp8_scaled_fp64(merged, scheme == "fp8-channel", scale_dtype)


def _check_fp8_against_reference(name: str, base: Path, adapter: Path, after: dict) -> list[str]:
    """The merged weights in `after` against requantize(dequantize(base) + ΔW) in fp64; returns their names."""
    scheme, scale_dtype = SCHEMES[name]
    before = load_file(base / "model.safetensors")
    targeted = [n for n in before if n.endswith(".weight") and n.split(".")[-2] in TARGETS]
    for weight in targeted:
        scale = _scale_name(scheme, weight)
        merged = dequantize_fp8_fp64(before[weight], before[scale], scheme, BLOCK) + _adapter_delta(adapter, weight)
        q, s = _reference(scheme, merged, scale_dtype, pow2=name == "block-ue8m0")
        assert after[weight].dtype == torch.float8_e4m3fn and after[scale].dtype == scale_dtype
        if name == "block-ue8m0":  # powers of two, equal to the reference's; then x / s is exact
            assert bool((torch.frexp(after[scale])[0] == 0.5).all()) and torch.equal(after[scale], s)
        assert after[scale].shape == before[scale].shape
        rtol = 2**-20 if scale_dtype == torch.float32 else 2**-7
        torch.testing.assert_close(after[scale].double(), s.double(), rtol=rtol, atol=0)
        _assert_within_one_step(after[weight], q)
    return targeted


@pytest.mark.parametrize("name", list(SCHEMES))
def test_fp8_merge_requantizes_like_fp64_reference(tmp_path, fp8_models, name):
    scheme, scale_dtype = SCHEMES[name]
    base, _, adapter = fp8_models[name]
    report = merge(base, [adapter], tmp_path / "out", device="cpu")
    targeted = _check_fp8_against_reference(name, base, adapter, load_file(tmp_path / "out" / "model.safetensors"))
    assert len(targeted) == 6 and report.tensors_changed == 6
    raw_before, raw_after = _raw(base), _raw(tmp_path / "out")
    changed = set(targeted) | {_scale_name(scheme, w) for w in targeted}
    assert set(raw_after) == set(raw_before)
    assert all(raw_after[n] == raw_before[n] for n in raw_before if n not in changed)  # scales, input_scale too
    config = json.loads((base / "config.json").read_text())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config
    (summary,) = report.quantization.values()
    assert summary["tensors"] == 6 and 0 < summary["mean"] <= summary["max"]


def _e4m3_step(values: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """One e4m3 quantization step at each value on the grid of `scale` (subnormal spacing 2^-9 at the bottom)."""
    full = dequantize_fp8_fp64(torch.ones(values.shape).to(torch.float8_e4m3fn), scale, scheme, BLOCK)
    exponent = torch.floor(torch.log2((values.abs() / full).clamp(min=2**-6)))
    return full * torch.pow(2.0, exponent - 3)


@pytest.mark.parametrize("name", ["block-f32", "channel", "tensor"])
def test_fp8_merge_then_unmerge_returns_base_within_one_step(tmp_path, fp8_models, name):
    """Each requantization rounds by at most half a step (at the value it rounds, on its own grid), so the round
    trip lands within one step: the largest of the steps at the base, merged and restored values."""
    scheme, _ = SCHEMES[name]
    base, _, adapter = fp8_models[name]
    merge(base, [adapter], tmp_path / "merged", device="cpu")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back", device="cpu")
    states = [load_file(p / "model.safetensors") for p in (base, tmp_path / "merged", tmp_path / "back")]
    for weight in (n for n in states[0] if states[0][n].dtype == torch.float8_e4m3fn):
        scales = [state[_scale_name(scheme, weight)] for state in states]
        values = [
            dequantize_fp8_fp64(state[weight], scale, scheme, BLOCK)
            for state, scale in zip(states, scales, strict=True)
        ]
        original, restored = values[0], values[2]
        step = torch.stack([_e4m3_step(v, scale, scheme) for v, scale in zip(values, scales, strict=True)]).amax(dim=0)
        assert bool(((restored - original).abs() <= step).all()), weight
        if weight.split(".")[-2] not in TARGETS:
            assert torch.equal(states[2][weight].view(torch.uint8), states[0][weight].view(torch.uint8))


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_fp8_dtype_output_loads_as_plain_model_with_peft_logits(tmp_path, fp8_models, dtype, atol):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base, twin, adapter = fp8_models["block-bf16"]
    merge(base, [adapter], tmp_path / "out", dtype=dtype, device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert not any("scale" in n for n in state) and {t.dtype for t in state.values()} == {
        torch.float32 if dtype == "fp32" else torch.bfloat16
    }
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(twin, dtype=torch.float32), adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference.eval()(ids).logits, atol=atol, rtol=0)


def test_fp8_untouched_weights_dequantize_exactly_with_dtype(tmp_path, fp8_models):
    base, twin, adapter = fp8_models["channel"]
    merge(base, [adapter], tmp_path / "out", dtype="fp32", device="cpu")
    out, plain = load_file(tmp_path / "out" / "model.safetensors"), load_file(twin / "model.safetensors")
    assert set(out) == set(plain)
    for name in (n for n in plain if n.split(".")[-2] in ("k_proj", "o_proj", "gate_proj", "up_proj")):
        assert torch.equal(out[name], plain[name]), name


def test_e4m3_decode_is_torch_conversion_bit_for_bit():
    """Every finite e4m3 code (±0 and subnormals included) decodes as torch converts it; NaN codes are refused."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn)
    out = torch.empty(finite.shape)
    assert fp8_codec.decode(finite, out)
    assert torch.equal((out * 2.0**120).view(torch.int32), finite.float().view(torch.int32))
    for nan in (0x7F, 0xFF):
        assert not fp8_codec.decode(torch.tensor([0x10, nan], dtype=torch.uint8).view(torch.float8_e4m3fn), out[:2])
    base = torch.tensor([[1.5, float("nan")], [0.25, -3.0]]).to(torch.float8_e4m3fn)
    values = fp8_codec.dequantize_scaled(base, torch.tensor([2.0]))  # a NaN code falls back to torch's conversion
    assert torch.equal(values.isnan(), torch.tensor([[False, True], [False, False]])) and float(values[1, 1]) == -6.0


def test_quantizers_agree_bit_for_bit_on_same_input():
    """No merge, so no fp32-vs-fp64 rounding: our quantizers give the spec quantizers' exact bytes."""
    torch.manual_seed(0)
    x = torch.randn(40, 56) * torch.logspace(-3, 1, 56)
    x[3, :] = 0.0  # an all-zero block row
    q, s = fp8_codec.quantize_blocks(x, BLOCK, torch.float32)
    q_ref, s_ref = fp8_block_fp64(x.double(), BLOCK, torch.float32)
    assert torch.equal(s, s_ref)
    # x / s in fp32 then e4m3 vs in fp64: equal unless the fp32 quotient rounded onto a tie
    assert float((q.view(torch.uint8) == q_ref.view(torch.uint8)).double().mean()) >= 0.999
    # UE8M0: x / 2^k is exact, so every byte agrees
    q, s = fp8_codec.quantize_blocks(x, BLOCK, torch.float32, pow2=True)
    q_ref, s_ref = fp8_block_fp64(x.double(), BLOCK, torch.float32, pow2=True)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert bool((x.abs() <= s.repeat_interleave(16, 0).repeat_interleave(16, 1)[:40, :56] * 448).all())
    experts = torch.randn(3, 64, 48) * torch.logspace(-4, 2, 48)
    blocks, scales = mxfp4.quantize(experts)
    blocks_ref, scales_ref = mxfp4_fp64(experts.double())
    assert torch.equal(blocks, blocks_ref) and torch.equal(scales, scales_ref)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -5.0] + [6.0] * 22).reshape(1, 32, 1)
    assert torch.equal(mxfp4.quantize(ties)[0], mxfp4_fp64(ties.double())[0])
    assert torch.equal(e4m3_bytes(torch.tensor([1.0625, 1.1875]).double()).float(), torch.tensor([1.0, 1.25]))


def test_block_amax_is_the_largest_magnitude_of_each_block():
    """max(max x, −min x) per block, edge blocks included, is max |x|; a NaN makes its block's amax NaN."""
    torch.manual_seed(2)
    x = torch.randn(40, 56) * torch.logspace(-30, 30, 56)
    x[:16, :16] = -x[:16, :16].abs()  # all negative: the magnitude comes from the minimum
    x[17, 50], x[35, 5], x[36, 20] = float("nan"), float("inf"), float("-inf")
    grid = fp8_codec.block_grid(tuple(x.shape), BLOCK)
    padded = torch.full((grid[0] * 16, grid[1] * 16), float("-inf"))
    padded[:40, :56] = x.abs()
    reference = padded.unflatten(1, (grid[1], 16)).unflatten(0, (grid[0], 16)).amax(dim=(1, 3))
    amax = fp8_codec.block_amax(x, BLOCK)
    torch.testing.assert_close(amax, reference, rtol=0, atol=0, equal_nan=True)
    assert bool(amax[1, 3].isnan()) and float(amax[2, 0]) == float(amax[2, 1]) == float("inf")


def test_one_block_row_paths_agree_with_the_general_ones():
    """A chunk of one row of blocks (full or partial height, edge block partial) takes a shorter path through
    `block_amax` and `_scale_blocks`: it gives the general path's values bit for bit."""
    torch.manual_seed(3)
    x = torch.randn(40, 56) * torch.logspace(-3, 3, 56)
    whole_amax = fp8_codec.block_amax(x, BLOCK)
    scale = fp8_codec.scale_from_amax(whole_amax, torch.float32)
    divided = fp8_codec._scale_blocks(x, scale, BLOCK, divide=True, out=torch.empty(x.shape))
    for first, stop in ((0, 16), (16, 32), (32, 40)):  # 40 rows: the last row of blocks is 8 high
        tile = first // BLOCK[0]
        part = x[first:stop]
        assert torch.equal(fp8_codec.block_amax(part, BLOCK), whole_amax[tile : tile + 1])
        out = fp8_codec._scale_blocks(part, scale[tile : tile + 1], BLOCK, divide=True, out=torch.empty(part.shape))
        assert torch.equal(out, divided[first:stop])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_requantize_skips_the_clamp_only_where_no_value_can_round_past_448(scale_dtype):
    """`requantize_blocks` skips the clamp when every scale is its block's finite amax / 448 rounded to a normal
    number: then no |x / s| reaches 464, the midpoint to the NaN code. Its bytes equal `quantize_blocks'` (which
    always clamps) with no NaN code made, for a scale that rounds down (bf16), scales that round to subnormals
    (fp16: clamp kept), and a block holding a NaN (its scale is 1, so 1000 / 1 must still clamp to 448)."""
    torch.manual_seed(4)
    x = torch.randn(16, 64) * 0.01
    x[0, 0] = 448 * (1 + 2**-9 * 0.99)  # amax / 448 rounds down to 1 in bf16: x / s ≈ 448.9
    x[1, 16] = 448 * (1 - 2**-12)
    x[:, 32:48] *= 1e-6  # fp16: amax / 448 is subnormal, rounded coarsely
    x[2, 48], x[3, 49] = float("nan"), 1000.0
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scale, _ = fp8_codec.requantize_blocks(x, BLOCK, scale_dtype, out, torch.empty(x.shape), torch.empty(x.shape))
    expected, expected_scale = fp8_codec.quantize_blocks(x, BLOCK, scale_dtype)
    codes = out.view(torch.uint8)
    assert torch.equal(codes, expected.view(torch.uint8)) and torch.equal(scale, expected_scale)
    nan_codes = (codes & 0x7F) == 0x7F
    assert int(nan_codes.sum()) == 1 and bool(nan_codes[2, 48]) and int(codes[3, 49]) == 0x7E  # 448
    clean = x[:, :48]
    amax = fp8_codec.block_amax(clean, BLOCK)
    assert fp8_codec.within_range(amax, fp8_codec.scale_from_amax(amax, scale_dtype).float(), scale_dtype) == (
        scale_dtype != torch.float16
    )
    amax = fp8_codec.block_amax(x, BLOCK)
    assert not fp8_codec.within_range(amax, fp8_codec.scale_from_amax(amax, scale_dtype).float(), scale_dtype)


@pytest.mark.parametrize("name", ["block-f32", "block-bf16", "block-ue8m0"])
@pytest.mark.parametrize("chunk", [None, 16 * 48])  # default: whole 48-row weights; 768: one row of blocks each
def test_fused_block_rows_requantize_like_fp64_reference(tmp_path, fp8_models, monkeypatch, name, chunk):
    """The fused path (`quant.block_rows`) takes the pieces of whole blocks merged with one LoRA term (here q_proj
    [48, 48]; v_proj [24, 48] and down_proj [48, 40] keep the general path) and meets the fp64 reference."""
    from lora_tools.quant import block_rows, chunks

    if chunk is not None:
        monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", chunk)
    calls = []
    fused = block_rows.merge_block_row
    monkeypatch.setattr(block_rows, "merge_block_row", lambda *args: calls.append(args[4]) or fused(*args))
    base, _, adapter = fp8_models[name]
    merge(base, [adapter], tmp_path / "out", device="cpu")
    assert calls and {cols.stop - (cols.start or 0) for cols in calls if cols.stop} <= {48}
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert len(_check_fp8_against_reference(name, base, adapter, after)) == 6


def test_fused_block_row_is_the_general_path_with_one_rounding_less():
    """On one row of 128×128 blocks: scales and codes as the general path's (to an fp32 ulp where the general
    path's extra rounding of W lands on the other side), closer to the fp64 reference, the same error
    norm to 1e-6, and a NaN code in the base handed back to the general path."""
    from lora_tools.merging.chunk_terms import merge_lora
    from lora_tools.quant import block_rows
    from lora_tools.quant.chunks import Chunk

    torch.manual_seed(5)
    width, block = 2048, (128, 128)
    weight = torch.randn(128, width) * 0.02
    codes, scales = fp8_codec.quantize_blocks(weight, block, torch.float32)
    left, right = torch.randn(128, 16) * 0.05, torch.randn(16, width) * 0.05
    pair = (1.0, 1.0, left, right)
    buffers = [torch.empty(128, width) for _ in range(3)]
    out = torch.empty(128, width, dtype=torch.float8_e4m3fn)
    everything = slice(None)
    fresh, largest, change, error = block_rows.merge_block_row(
        codes, fp8_codec.fold(scales), pair, everything, everything, block, torch.float32, False, out, buffers
    )
    base = fp8_codec.dequantize_blocks(codes, scales, block)
    merged = torch.empty_like(base)
    largest_ref, change_ref = merge_lora([pair], Chunk(0, 128), base, merged, torch.empty_like(base))
    out_ref = torch.empty_like(out)
    scale_ref, error_ref = fp8_codec.requantize_blocks(merged, block, torch.float32, out_ref, *buffers[:2])
    assert largest == largest_ref and change == change_ref and error == pytest.approx(error_ref, rel=1e-6)
    torch.testing.assert_close(fresh, scale_ref, rtol=2**-23, atol=0)
    differ = out.view(torch.uint8) != out_ref.view(torch.uint8)
    assert int(differ.sum()) <= width  # a few codes in 262,144, each one step apart
    assert int((out.view(torch.uint8).int() - out_ref.view(torch.uint8).int()).abs().max()) <= 1
    exact = dequantize_fp8_fp64(codes, scales, "fp8-block", block) + left.double() @ right.double()
    q64, _ = fp8_block_fp64(exact, block, torch.float32)
    assert int((out.view(torch.uint8) != q64.view(torch.uint8)).sum()) <= int(
        (out_ref.view(torch.uint8) != q64.view(torch.uint8)).sum()
    )
    codes.view(torch.uint8)[3, 7] = 0x7F  # NaN
    assert (
        block_rows.merge_block_row(
            codes, fp8_codec.fold(scales), pair, everything, everything, block, torch.float32, False, out, buffers
        )
        is None
    )


def test_nan_code_in_a_merged_fp8_weight_is_refused_unless_allowed(tmp_path, fp8_models):
    """A NaN code (0x7F) in a targeted FP8 block weight: exit 3 naming the tensor, nothing left behind; with
    --allow-nonfinite the merge completes and only that block is NaN (its scale is 1, the others requantized)."""
    import shutil

    base, _, adapter = fp8_models["block-f32"]
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    state = load_file(broken / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"  # [48, 48]: the fused path's shape
    state[name].view(torch.uint8)[20, 30] = 0x7F
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    result = run_cli(["merge", broken, adapter, "-o", tmp_path / "out"])
    assert result.exit_code == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and name.removesuffix(".weight") in errors[0] and "NaN or Inf" in errors[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]
    result = run_cli(["merge", broken, adapter, "-o", tmp_path / "out", "--allow-nonfinite"])
    assert result.exit_code == 0, result.stderr
    after = load_file(tmp_path / "out" / "model.safetensors")
    codes = after[name].view(torch.uint8)
    nan = (codes & 0x7F) == 0x7F
    assert bool(nan[20, 30]) and not bool(nan[:16].any()) and not bool(nan[32:].any())
    assert after[name + "_scale_inv"][1, 1] == 1.0  # amax NaN: the scale any value stores with


def test_fp8_merge_copies_while_torch_imports(tmp_path, fp8_models):
    """Planning a quantized merge needs no torch: the untouched tensors' copies start before torch's import ends
    (the executor is built after it), as for a plain merge."""
    from lora_tools import trace

    base, _, adapter = fp8_models["block-f32"]
    spans = trace.summary(traced_merge(base, adapter, tmp_path / "out", tmp_path / "trace.jsonl"))
    imported = spans["import torch"]
    assert imported["seconds"] > 0.05  # torch came in here, not while planning
    assert spans["copy"]["first"] < imported["first"] + imported["seconds"]


def _tensor_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(_raw(folder, file.name))
    return out


def test_quantized_bytes_do_not_depend_on_workers_or_shards(tmp_path, fp8_models, gpt_oss, monkeypatch):
    """Chunks of one block row (one channel, one expert) dealt to 1, 2 or 3 row workers, written across small
    shards, give the same bytes and the same requantization report. (The chunk size itself is fixed per weight:
    BLAS rounds a product of a few rows differently from a product of many, so it may change low bits.)"""
    from lora_tools.compute import pool as pool_module
    from lora_tools.quant import chunks

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1)
    cases = {name: (fp8_models[name][0], fp8_models[name][2]) for name in ("block-f32", "channel", "tensor")}
    cases["mxfp4"] = (gpt_oss[0], gpt_oss[2])
    for name, (base, adapter) in cases.items():
        outputs, reports = {}, {}
        for workers in (1, 2, 3):
            monkeypatch.setattr(pool_module, "usable_cores", lambda workers=workers: workers)
            out = tmp_path / f"{name}-{workers}"
            reports[workers] = merge(base, [adapter], out, device="cpu", max_shard_size=20_000).quantization
            assert len(list(out.glob("*.safetensors"))) > 1
            outputs[workers] = _tensor_bytes(out)
        assert outputs[1] == outputs[2] == outputs[3], name
        assert reports[1] == reports[2] == reports[3], name
        after = {k: v for file in (tmp_path / f"{name}-1").glob("*.safetensors") for k, v in load_file(file).items()}
        if name == "mxfp4":
            differing, total = _check_mxfp4_against_reference(gpt_oss, after)
            assert differing <= total // 1000
        else:
            assert len(_check_fp8_against_reference(name, base, adapter, after)) == 6


# ---- MXFP4 (gpt-oss) ----------------------------------------------------------------------------------------------


def gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


EXPERTS = ("layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj")  # layer 0's experts stay untouched


@pytest.fixture(scope="session")
def gpt_oss(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(MXFP4 base, dequantized twin, PEFT adapter trained on the twin: q_proj, and layer 1's experts through
    PEFT 0.21 `target_parameters`)."""
    from peft import get_peft_model
    from transformers import GptOssForCausalLM

    root = tmp_path_factory.mktemp("gpt_oss")
    torch.manual_seed(0)
    GptOssForCausalLM(gpt_oss_config()).save_pretrained(root / "plain")
    base, twin = quantize_gpt_oss(root / "plain", root / "mxfp4")
    config = lora_config(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=list(EXPERTS))
    peft_model = get_peft_model(GptOssForCausalLM.from_pretrained(twin), config)
    randomize_adapter(peft_model, seed=5)
    peft_model.save_pretrained(root / "lora")
    return base, twin, root / "lora"


def _peft_expert_deltas(twin: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW of every expert parameter PEFT's ParamWrapper adapts, in fp64 and the [E, in, out] layout of the model."""
    from peft import PeftModel
    from peft.tuners.lora.layer import ParamWrapper
    from transformers import GptOssForCausalLM

    model = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(twin, dtype=torch.float32), adapter).double()
    deltas = {}
    for path, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = path.removeprefix("base_model.model.").replace(".base_layer", "")
            with torch.no_grad():
                deltas[f"{owner}.{module.parameter_name}"] = module.get_delta_weight("default").double()
    return deltas


def _near_power_of_two(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    return (x / torch.pow(2.0, torch.round(torch.log2(x))) - 1).abs() <= tolerance


def _near_e2m1_tie(scaled: torch.Tensor, tolerance: float) -> torch.Tensor:
    middles = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    return ((scaled.abs().unsqueeze(-1) - middles).abs() <= tolerance).any(dim=-1)


def test_mxfp4_expert_lora_requantizes_like_fp64_reference(tmp_path, gpt_oss):
    """requantize(dequantize(base) + ΔW) with ΔW from PEFT's own ParamWrapper in fp64 and the spec quantizer in fp64,
    against our stored bytes. We compute in fp32, so a stored code may differ only where the fp64 value lies within
    fp32 rounding (2^-16 here, far above it) of a tie between two E2M1 codes, and a shared exponent only where the
    group's amax lies that close to a power of two. With continuous random ΔW such near-ties are rare (about 1 in
    10^5 values); the test proves every difference is one, and that there are almost none."""
    base, twin, adapter = gpt_oss
    report = merge(base, [adapter], tmp_path / "out", device="cpu")
    differing, total = _check_mxfp4_against_reference(gpt_oss, load_file(tmp_path / "out" / "model.safetensors"))
    assert differing <= total // 1000, f"{differing} of {total} values differ from the fp64 reference"
    assert report.quantization["mxfp4"]["tensors"] == 2


def _check_mxfp4_against_reference(gpt_oss, after: dict) -> tuple[int, int]:
    """The merged experts in `after` against the fp64 reference: every difference a near-tie; (differing, total)."""
    base, twin, adapter = gpt_oss
    deltas = _peft_expert_deltas(twin, adapter)
    assert sorted(deltas) == [f"model.{e}" for e in sorted(EXPERTS)]
    before = load_file(base / "model.safetensors")
    differing = total = 0
    for stem, delta in deltas.items():
        merged = dequantize_mxfp4_fp64(before[f"{stem}_blocks"], before[f"{stem}_scales"]) + delta
        blocks, scales = mxfp4_fp64(merged)
        ours_blocks, ours_scales = after[f"{stem}_blocks"], after[f"{stem}_scales"]
        assert ours_blocks.shape == blocks.shape and ours_scales.dtype == torch.uint8
        groups = merged.transpose(-1, -2).reshape(*scales.shape, 32)
        bad_scale = ours_scales != scales
        assert bool(_near_power_of_two(groups.abs().amax(-1)[bad_scale], 2**-16).all()), stem
        codes = [torch.stack((b & 15, b >> 4), -1).reshape(*scales.shape, 32) for b in (ours_blocks, blocks)]
        bad_code = (codes[0] != codes[1]) & ~bad_scale.unsqueeze(-1)
        scaled = groups / torch.pow(2.0, scales.double() - 127).unsqueeze(-1)
        assert bool(_near_e2m1_tie(scaled[bad_code], 2**-16).all()), stem
        differing += int(bad_code.sum()) + 32 * int(bad_scale.sum())
        total += scaled.numel()
    return differing, total


def test_mxfp4_dequantization_equals_transformers(gpt_oss):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(gpt_oss[0] / "model.safetensors")
    stems = [n.removesuffix("_blocks") for n in state if n.endswith("_blocks")]
    assert len(stems) == 4
    for stem in stems:
        blocks, scales = state[f"{stem}_blocks"], state[f"{stem}_scales"]
        ours = mxfp4.dequantize(blocks, scales)
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
        assert torch.equal(ours.bfloat16(), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
        assert torch.equal(ours, dequantize_mxfp4_fp64(blocks, scales).float())


def test_mxfp4_expert_merge_keeps_untouched_tensors_and_unmerges_within_one_step(tmp_path, gpt_oss):
    base, _, adapter = gpt_oss
    merge(base, [adapter], tmp_path / "merged", device="cpu")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back", device="cpu")
    raw_before, raw_after = _raw(base), _raw(tmp_path / "merged")
    experts = tuple(f"model.{e}_{part}" for e in EXPERTS for part in ("blocks", "scales"))
    changed = {n for n in raw_before if n in experts or n.endswith("q_proj.weight")}
    assert len(changed) == 6 and set(raw_after) == set(raw_before)
    assert all(raw_after[n] == raw_before[n] for n in raw_before if n not in changed)  # layer 0's experts, scales
    assert all(raw_after[n] != raw_before[n] for n in changed if not n.endswith("_scales"))
    states = [load_file(p / "model.safetensors") for p in (base, tmp_path / "merged", tmp_path / "back")]
    deltas = _peft_expert_deltas(gpt_oss[1], adapter)
    for stem in (f"model.{e}" for e in EXPERTS):
        values = [dequantize_mxfp4_fp64(s[f"{stem}_blocks"], s[f"{stem}_scales"]) for s in states]
        exponents = [s[f"{stem}_scales"].double().repeat_interleave(32, -1).transpose(-1, -2) - 127 for s in states]
        # one E2M1 step at each value on its own grid: 0.5 below 2, 1 below 4, 2 above (times 2^exponent)
        steps = [torch.pow(2.0, e) * _e2m1_step(v / torch.pow(2.0, e)) for v, e in zip(values, exponents, strict=True)]
        step = torch.stack(steps).amax(dim=0)
        # the un-merge starts from the merged value, off the exact W + ΔW by its quantization error: half a step,
        # or more where the spec's shared exponent (floor(log2 amax) − 2) leaves the group's largest values above
        # 6·2^e, which E2M1 clips to 6·2^e; back − W is that error plus the un-merge's own rounding
        merge_error = (values[1] - (values[0] + deltas[stem])).abs()
        assert bool(((values[2] - values[0]).abs() <= merge_error + step).all()), stem
        clipped = merge_error > step / 2
        assert bool((values[1][clipped].abs() == 6 * torch.pow(2.0, exponents[1][clipped])).all()), stem


def _e2m1_step(scaled: torch.Tensor) -> torch.Tensor:
    magnitude = scaled.abs()
    return torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0)).double()


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-5), ("bf16", 5e-2)])
def test_mxfp4_expert_merge_with_dtype_loads_as_plain_gpt_oss_with_peft_logits(tmp_path, gpt_oss, dtype, atol):
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    base, twin, adapter = gpt_oss
    merge(base, [adapter], tmp_path / "plain", dtype=dtype, device="cpu")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    state = load_file(tmp_path / "plain" / "model.safetensors")
    assert not any(n.endswith(("_blocks", "_scales")) for n in state)
    assert state["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    merged = GptOssForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(twin, dtype=torch.float32), adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference.eval()(ids).logits, atol=atol, rtol=0)


def test_inspect_places_expert_lora_on_mxfp4_base(gpt_oss):
    from lora_tools import inspect

    validation = inspect(gpt_oss[2], base=gpt_oss[0]).validation
    assert validation.compatible, validation.problems


# ---- refusals -----------------------------------------------------------------------------------------------------


def _packed_base(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": config}))
    return folder


PACKED = {
    "bnb-4bit": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(512, 1, dtype=torch.uint8),
         "model.layers.0.self_attn.q_proj.weight.absmax": torch.ones(16),
         "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)},
        "bitsandbytes 4-bit (nf4)",
    ),
    "gptq": (
        {"quant_method": "gptq", "bits": 4, "group_size": 128},
        {"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 32, dtype=torch.int32),
         "model.layers.0.self_attn.q_proj.qzeros": torch.zeros(1, 4, dtype=torch.int32),
         "model.layers.0.self_attn.q_proj.scales": torch.ones(1, 32, dtype=torch.float16)},
        "GPTQ 4-bit",
    ),
    "gptq-no-config": (None, None, "GPTQ/AWQ"),
    "nvfp4-modelopt": (
        {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16},
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32, dtype=torch.uint8),
         "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(64, 4).to(torch.float8_e4m3fn),
         "model.layers.0.self_attn.q_proj.weight_scale_2": torch.ones(())},
        "ModelOpt NVFP4",
    ),
    "nvfp4-compressed-tensors": (
        {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"},
        {"model.layers.0.self_attn.q_proj.weight_packed": torch.zeros(64, 32, dtype=torch.uint8),
         "model.layers.0.self_attn.q_proj.weight_scale": torch.ones(64, 4).to(torch.float8_e4m3fn),
         "model.layers.0.self_attn.q_proj.weight_global_scale": torch.ones(1)},
        "compressed-tensors NVFP4",
    ),
    "nvfp4-no-config": (None, "nvfp4-modelopt", "NVFP4 (ModelOpt)"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(PACKED))
def test_packed_integer_bases_are_refused_naming_the_method(tmp_path, fp8_models, kind):
    config, tensors, method = PACKED[kind]
    if config is None:  # no (or a misleading) config: the tensor names give the format away
        config, tensors = {"quant_method": "fp8"}, PACKED[tensors or "gptq"][1]
    base = _packed_base(tmp_path / "base", config, tensors)
    adapter = fp8_models["channel"][2]
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "out"])
    assert result.exit_code == 3, result.output
    assert method in result.output and "merge into the unquantized base model, then quantize" in result.output
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_gguf_base_is_refused(tmp_path, fp8_models):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    result = run_cli(["merge", tmp_path / "model.gguf", fp8_models["channel"][2], "-o", tmp_path / "out"])
    assert result.exit_code == 3 and "GGUF" in result.output and not (tmp_path / "out").exists()


def test_inspect_shows_quantization(fp8_models):
    from lora_tools import inspect

    report = inspect(fp8_models["block-bf16"][0])
    assert report.quantization["method"] == "fp8"
    assert report.quantization["formats"] == {"fp8 block 16×16, BF16 scales": 14}
    result = run_cli(["inspect", fp8_models["channel"][0]])
    assert result.exit_code == 0 and "quantization: compressed-tensors" in result.output
    assert "fp8 per-channel, F32 scales ×14" in result.output
    validation = inspect(fp8_models["channel"][2], base=fp8_models["channel"][0]).validation
    assert validation.compatible, validation.problems


def test_extract_dequantizes_quantized_base_and_tuned(tmp_path, fp8_models):
    from lora_tools import extract

    base, twin, adapter = fp8_models["block-f32"]
    merge(base, [adapter], tmp_path / "tuned", dtype="fp32", device="cpu")
    report = extract(base, tmp_path / "tuned", tmp_path / "lora", rank=4, device="cpu")
    assert sorted(m.name.rsplit(".", 1)[-1] for m in report.modules) == sorted(TARGETS * 2)
    state = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for module in (m.name for m in report.modules):
        key = f"base_model.model.{module}"
        extracted = state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
        expected = _adapter_delta(adapter, f"{module}.weight")
        assert float((extracted - expected).norm() / expected.norm()) < 1e-5, module
    # a quantized TUNED: its requantized weights against the dequantized base carry ΔW plus requantization noise
    merge(base, [adapter], tmp_path / "tuned-fp8", device="cpu")
    report = extract(twin, tmp_path / "tuned-fp8", tmp_path / "lora-fp8", rank=4, device="cpu")
    assert len(report.modules) == 6 and all(m.relative_error < 0.5 for m in report.modules)


def test_cli_reports_requantization_error_and_warns_when_it_swamps_the_adapter(tmp_path, fp8_models):
    base, _, adapter = fp8_models["channel"]
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "big", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "requantized 6 tensor(s) as fp8 per-channel, F32 scales" in result.output and "warning" not in result.output
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "small", "-w", "0.001", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "warning: fp8 per-channel, F32 scales: requantizing the merged weights adds error up to" in output
    assert "--dtype bf16 writes a plain model that keeps all of it" in output
