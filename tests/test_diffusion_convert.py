"""`convert --naming`: diffusion LoRAs between diffusers and original (BFL / LDM) names, through the Link tables.

Round trips are checked as ΔW per diffusers module in fp64; diffusers' own kohya readers
(`FluxLoraLoaderMixin.lora_state_dict`, `StableDiffusionXLLoraLoaderMixin.lora_state_dict`) loading our
converted files must fuse to the same weights as the original diffusers LoRA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_state, run_cli
from diffusion_models import clip_l, diffusers_to_original, flux_transformer, sd3_transformer, sdxl_unet
from safetensors.torch import save_file

import lora_tools
from lora_tools.adapters.registry import read_adapter
from lora_tools.layouts.diffusion import detect_layout

R = 4


def _both_layouts(model, single_file, folder) -> dict:
    """Save `model` as a diffusers folder and as the single file its tables describe; return its state."""
    state = model.state_dict()
    weights = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}  # SD3's buffer, no module weight
    save_file(diffusers_to_original(weights, detect_layout(set(state)).links), single_file)
    model.save_pretrained(folder)
    return state


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-convert")
    return root, _both_layouts(flux_transformer(), root / "flux1-tiny.safetensors", root / "transformer")


def _loras(shapes: dict, seed: int, alphas: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(R, shape[1], generator=g) * 0.1, torch.randn(shape[0], R, generator=g) * 0.1,
                   (alphas or {}).get(name, 2.0)) for name, shape in shapes.items()}  # fmt: skip


def _diffusers_file(path, loras: dict, component: str, *, alphas: bool = True):
    tensors = {}
    for name, (down, up, alpha) in loras.items():
        tensors |= {f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up}
        if alphas:
            tensors[f"{component}.{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def _deltas(path) -> dict[str, torch.Tensor]:
    """ΔW in fp64 per module name as the file spells it (kohya underscored or dotted)."""
    adapter = read_adapter(path)
    return {
        m.name: (adapter.read(m.b_key).double().flatten(1) @ adapter.read(m.a_key).double().flatten(1)) * m.scale
        for m in adapter.modules
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


FLUX_MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.norm1.linear",
                "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
                "single_transformer_blocks.1.proj_out", "norm_out.linear", "x_embedder")  # fmt: skip


def test_flux_diffusers_to_bfl_kohya_and_back_keeps_every_delta(flux, tmp_path):
    """diffusers → kohya BFL → diffusers: ΔW per module identical (fp64, ≤1e-6 rel); separate A's fuse
    block-diagonally (rank 3r for qkv, 4r for linear1), different alphas folded into B, and it is reported."""
    root, state = flux
    alphas = {"transformer_blocks.0.attn.to_k": 1.0, "single_transformer_blocks.0.proj_mlp": 8.0}
    loras = _loras({n: tuple(state[f"{n}.weight"].shape) for n in FLUX_MODULES}, 3, alphas)
    original = _diffusers_file(tmp_path / "lora.safetensors", loras, "transformer")
    kohya = tmp_path / "bfl.safetensors"
    report = lora_tools.convert(original, kohya, to="kohya", naming="original", base=root / "flux1-tiny.safetensors")
    ranks = {m.name: m.rank for m in report.modules}
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 3 * R
    assert ranks["lora_unet_single_blocks_0_linear1"] == 4 * R
    assert ranks["lora_unet_double_blocks_0_txt_attn_qkv"] == R  # only add_v_proj: its rows, the rest zero
    assert sorted(report.block_diagonal) == ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]  # fmt: skip
    assert any("block-diagonally" in note for note in report.notes)
    names = set(_deltas(kohya))
    assert "double_blocks_0_img_mod_lin" in names and "final_layer_adaLN_modulation_1" in names
    back = tmp_path / "back.safetensors"
    lora_tools.convert(kohya, back, to="diffusers", base=root / "transformer")
    theirs = {n: (up.double() @ down.double()) * alpha / R for n, (down, up, alpha) in loras.items()}
    ours = _deltas(back)
    assert set(ours) == set(theirs)
    assert {m.rank for m in read_adapter(back).modules} == {R}  # each part keeps only its own columns of B
    for name, delta in theirs.items():
        assert _relative(ours[name], delta) <= 1e-6, name
    # the BFL file merged into the single file equals the diffusers LoRA merged there
    lora_tools.merge(root / "flux1-tiny.safetensors", [kohya], tmp_path / "a.safetensors", device="cpu")
    lora_tools.merge(root / "flux1-tiny.safetensors", [original], tmp_path / "b.safetensors", device="cpu")
    a, b = load_state(tmp_path / "a.safetensors"), load_state(tmp_path / "b.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def test_sd3_diffusers_to_original_and_back_keeps_every_delta(tmp_path):
    """SD3: q/k/v → joint_blocks' qkv (and attn2), the last context block's swapped adaLN halves, and back."""
    state = _both_layouts(sd3_transformer(), tmp_path / "sd3.safetensors", tmp_path / "transformer")
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn2.to_v", "transformer_blocks.1.attn.add_k_proj",
             "transformer_blocks.1.norm1_context.linear", "norm_out.linear", "context_embedder"]  # fmt: skip
    loras = _loras({n: tuple(state[f"{n}.weight"].shape) for n in names}, 17)
    original = _diffusers_file(tmp_path / "lora.safetensors", loras, "transformer")
    report = lora_tools.convert(original, tmp_path / "sd3-kohya.safetensors", to="kohya", naming="original", base=tmp_path / "sd3.safetensors")  # fmt: skip
    assert report.block_diagonal == ["lora_unet_joint_blocks_0_x_block_attn_qkv"]
    lora_tools.convert(tmp_path / "sd3-kohya.safetensors", tmp_path / "back.safetensors", to="diffusers", base=tmp_path / "transformer")  # fmt: skip
    ours = _deltas(tmp_path / "back.safetensors")
    assert set(ours) == set(loras)
    for name, (down, up, alpha) in loras.items():
        assert _relative(ours[name], (up.double() @ down.double()) * alpha / R) <= 1e-6, name


def test_fused_lora_splits_and_fuses_back_at_its_own_rank(flux, tmp_path):
    """A kohya BFL qkv / linear1 LoRA → diffusers shares A across parts; back to BFL it stays rank r, bit for bit."""
    root, state = flux
    single = load_state(root / "flux1-tiny.safetensors")
    shapes = {n: tuple(single[f"{n}.weight"].shape) for n in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
              "final_layer.adaLN_modulation.1", "double_blocks.0.txt_mlp.0")}  # fmt: skip
    tensors = {}
    for name, (down, up, _) in _loras(shapes, 5).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "bfl.safetensors")
    report = lora_tools.convert(tmp_path / "bfl.safetensors", tmp_path / "split.safetensors", to="kohya",
                                naming="diffusers", base=root / "transformer")  # fmt: skip
    assert {m.rank for m in report.modules} == {R} and not report.block_diagonal
    assert "lora_transformer_single_transformer_blocks_1_proj_mlp" in {m.name for m in report.modules}
    report = lora_tools.convert(tmp_path / "split.safetensors", tmp_path / "again.safetensors", to="kohya",
                                naming="original", base=root / "flux1-tiny.safetensors")  # fmt: skip
    assert {m.rank for m in report.modules} == {R} and not report.block_diagonal
    again = load_state(tmp_path / "again.safetensors")
    assert set(again) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(again[key], value), key


def _fused_alike(load, ours, theirs, state: dict) -> int:
    """diffusers fuses the LoRA `load(path)` put on a model: ours equals theirs; returns how many weights changed."""
    fused = {}
    for label, path in (("ours", ours), ("theirs", theirs)):
        model = load(path)
        model.fuse_lora(lora_scale=1.0)
        model.unload_lora()
        fused[label] = model.state_dict()
    for key, value in fused["theirs"].items():
        torch.testing.assert_close(fused["ours"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    return sum(not torch.equal(value, state[key]) for key, value in fused["theirs"].items())


def test_diffusers_loads_our_bfl_file_like_the_original(flux, tmp_path):
    """diffusers' own kohya-Flux reader on our converted file fuses to the weights its PEFT reader gives for the
    original (double blocks: diffusers hard-codes Flux-dev's linear1 split sizes, so single blocks stay out)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root, state = flux
    names = [n for n in FLUX_MODULES if not n.startswith("single_transformer_blocks.0")]
    loras = _loras({n: tuple(state[f"{n}.weight"].shape) for n in names}, 7)
    original = _diffusers_file(tmp_path / "lora.safetensors", {n: (d, u * a / R, R) for n, (d, u, a) in loras.items()}, "transformer", alphas=False)  # fmt: skip
    kohya = tmp_path / "bfl.safetensors"
    lora_tools.convert(original, kohya, to="kohya", naming="original", base=root / "flux1-tiny.safetensors")

    def load(path):
        model = FluxTransformer2DModel.from_pretrained(root / "transformer")
        loaded = FluxPipeline.lora_state_dict(str(path))
        # diffusers 0.42 leaves the embedders it converts (img_in → x_embedder, …) without `transformer.`
        loaded = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in loaded.items()}
        model.load_lora_adapter(loaded, prefix="transformer", adapter_name="x")
        return model

    assert _fused_alike(load, kohya, original, state) >= len(names)


def test_naming_needs_a_diffusion_base_and_nothing_is_written(flux, tmp_path):
    root, state = flux
    loras = _loras({"x_embedder": tuple(state["x_embedder.weight"].shape)}, 1)
    adapter = _diffusers_file(tmp_path / "lora.safetensors", loras, "transformer")
    output = tmp_path / "out.safetensors"
    result = run_cli(["convert", str(adapter), "--to", "kohya", "--naming", "original", "-o", str(output)])
    assert result.exit_code == 3 and "--naming needs --base" in result.stderr
    result = run_cli(["convert", str(adapter), "--to", "peft", "--naming", "original", "--base",
                      str(root / "transformer"), "-o", str(tmp_path / "peft")])  # fmt: skip
    assert result.exit_code == 3 and "--to kohya|diffusers" in result.stderr
    bad = _diffusers_file(tmp_path / "bad.safetensors", {"transformer_blocks.0.attn.to_zz": loras["x_embedder"]}, "transformer")  # fmt: skip
    result = run_cli(["convert", str(bad), "--to", "kohya", "--naming", "original", "--base",
                      str(root / "flux1-tiny.safetensors"), "-o", str(output)])  # fmt: skip
    assert result.exit_code == 3 and "do not name transformer_blocks.0.attn.to_zz" in result.stderr
    down, up, alpha = loras["x_embedder"]
    wrong = _diffusers_file(tmp_path / "wrong.safetensors", {"x_embedder": (down, torch.cat([up, up]), alpha)}, "transformer")  # fmt: skip
    result = run_cli(
        ["convert", str(wrong), "--to", "diffusers", "--base", str(root / "transformer"), "-o", str(output)]
    )
    assert result.exit_code == 3 and f"x_embedder has {2 * up.shape[0]} output rows, but the base's x_embedder has {up.shape[0]}" in result.stderr  # fmt: skip
    result = run_cli(["convert", str(adapter), "--to", "diffusers", "--base", str(root / "transformer"), "-o", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 3 and "ending in .safetensors" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "lora.safetensors", "wrong.safetensors"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-convert")
    unet = sdxl_unet()
    state = _both_layouts(unet, root / "sdxl-tiny.safetensors", root / "unet")
    unet.save_pretrained(root / "pipeline" / "unet")
    clip_l().save_pretrained(root / "pipeline" / "text_encoder")
    (root / "pipeline" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return root, unet, state


SDXL_MODULES = ("attn1.to_q", "attn2.to_k", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "add_embedding.linear_1")  # fmt: skip


def _conv_loras(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and value.dim() in (2, 4) and name.endswith(SDXL_MODULES):
            down = torch.randn(R, *value.shape[1:], generator=g) * 0.1
            out[name] = (down, torch.randn(value.shape[0], R, *([1] * (value.dim() - 2)), generator=g) * 0.1, R)
    return out


def test_sdxl_diffusers_lora_to_ldm_kohya_loads_in_diffusers_like_the_original(sdxl, tmp_path):
    """diffusers → kohya with LDM names (`lora_unet_input_blocks_4_1_…`, as sd-scripts writes SDXL): diffusers'
    SDXL kohya reader fuses it to the original's weights; and back to diffusers names ΔW is unchanged."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    root, unet, state = sdxl
    loras = _conv_loras(state, 11)
    text = _loras({"text_model.encoder.layers.0.self_attn.q_proj": (32, 32)}, 12)
    original = _diffusers_file(tmp_path / "lora.safetensors", loras, "unet", alphas=False)
    save_file(load_state(original) | load_state(_diffusers_file(tmp_path / "te.safetensors", text, "text_encoder", alphas=False)), original)  # fmt: skip
    kohya = tmp_path / "ldm.safetensors"
    report = lora_tools.convert(original, kohya, to="kohya", naming="original", base=root / "sdxl-tiny.safetensors")
    assert len(report.modules) == len(loras) + 1 and {m.method for m in report.modules} == {"renamed"}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in {m.name for m in report.modules}
    assert any(m.name.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1") for m in report.modules)

    def load(path):
        model = UNet2DConditionModel.from_pretrained(root / "unet")
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=model.config)
        StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, model, adapter_name="x")
        return model

    assert _fused_alike(load, kohya, original, state) == len(loras)
    lora_tools.convert(kohya, tmp_path / "back.safetensors", to="diffusers", base=root / "pipeline")
    back = load_state(tmp_path / "back.safetensors")
    expected = {f"unet.{n}": v for n, v in loras.items()} | {f"text_encoder.{n}": v for n, v in text.items()}
    assert len(back) == 2 * len(expected)
    for name, (down, up, _) in expected.items():
        assert torch.equal(back[f"{name}.lora_A.weight"], down) and torch.equal(back[f"{name}.lora_B.weight"], up)
