"""Diffusion checkpoints as the community holds them: single files, fused projections, LyCORIS on convs.

The layout tables are proven against diffusers' own single-file conversion (run on our output, it
must give back the diffusers model bit for bit, or, where diffusers hard-codes Flux-dev's sizes, on
a key probe). Merges into single files are checked against the same LoRA merged into the diffusers
folder and mapped: bit-exact in fp32. LyCORIS adapters are built by the LyCORIS library.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_state
from diffusion_models import (
    clip_l,
    diffusers_to_original,
    flux_transformer,
    open_clip_g,
    open_clip_h,
    sd1_unet,
    sd2_unet,
    sd3_transformer,
    sdxl_unet,
)
from safetensors.torch import save_file

import lora_tools
from lora_tools.layouts.diffusion import block_rows, detect_layout, open_clip_links

R = 4
OPEN_CLIP = "conditioner.embedders.1.model."


# --- LyCORIS-built adapters on convs (LoHa / LoKr DoRA crash) -------------------------------------------

_LYCORIS = {
    "locon": dict(algo="locon"),
    "locon-tucker": dict(algo="locon", use_tucker=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-both": dict(algo="lokr", factor=4, decompose_both=True),
    "lokr-tucker": dict(algo="lokr", factor=4, use_tucker=True, decompose_both=True),
    "lokr-full": dict(algo="lokr", full_matrix=True),
}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "unet"
    sd1_unet().save_pretrained(path)
    return path


@pytest.fixture
def lycoris_class():
    """LyCORIS keeps its preset on the class: restore it afterwards."""
    from lycoris import LycorisNetwork

    saved = {k: v for k, v in vars(LycorisNetwork).items() if k.isupper()}
    yield LycorisNetwork
    for key, value in saved.items():
        setattr(LycorisNetwork, key, value)


def _forward_weight(module, layer) -> torch.Tensor:
    """The weight LyCORIS' forward pass uses (its get_merged_weight applies α/r twice for LoHa / LoKr)."""
    with torch.no_grad():
        if type(module).__name__ == "LoConModule":
            return module.get_merged_weight(shape=layer.weight.shape)[0]
        merged = layer.weight + module.get_weight(layer.weight.shape) * module.scalar
        return module.apply_weight_decompose(merged, module.multiplier)


def _lycoris_layers(unet) -> list[list[str]]:
    """For each configuration its own 3×3 conv, 1×1 conv and linear, so all merge in one call."""
    convs3 = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels >= 8]  # fmt: skip
    convs1 = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    linears = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n]
    return [[convs3[i], convs1[i], linears[i]] for i in range(len(_LYCORIS))]


@pytest.mark.parametrize("axis", ["out", "in"])
def test_lycoris_dora_on_convs_matches_lycoris_forward(unet_folder, tmp_path, lycoris_class, axis):
    """LoCon / LoHa / LoKr in every factorisation, DoRA on `axis`: merged = LyCORIS' forward weight."""
    import copy
    import re

    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris

    unet = UNet2DConditionModel.from_pretrained(unet_folder).eval()
    torch.manual_seed(7)
    networks, paths = [], []
    for (config, options), layers in zip(_LYCORIS.items(), _lycoris_layers(unet), strict=True):
        lycoris_class.apply_preset({"target_module": [], "target_name": [re.escape(n) + "$" for n in layers],
                                    "enable_conv": True, "lora_prefix": "lora_unet"})  # fmt: skip
        model = copy.deepcopy(unet)
        network = create_lycoris(model, 1.0, linear_dim=R, linear_alpha=2, conv_dim=R, conv_alpha=2, dora_wd=True,
                                 wd_on_output=axis == "out", **options)  # fmt: skip
        network.apply_to()
        with torch.no_grad():
            for name, param in network.named_parameters():
                param.copy_(param * (1 + 0.1 * torch.rand_like(param)) if "dora_scale" in name else torch.randn_like(param) * 0.2)  # fmt: skip
        assert len(network.loras) == 3, config
        paths.append(tmp_path / f"{config}.safetensors")
        network.save_weights(str(paths[-1]), torch.float32, None)
        networks.append((config, model, network))
    lora_tools.merge(unet_folder, paths, tmp_path / "merged", device="cpu")
    merged = load_state(tmp_path / "merged")
    for config, model, network in networks:
        names = {id(m): n for n, m in model.named_modules()}
        for module in network.loras:
            layer = module.org_module[0]
            name, expected = names[id(layer)], _forward_weight(module, layer)
            ours = merged[f"{name}.weight"]
            relative = ((ours - expected).norm() / expected.norm()).item()
            assert relative <= 1e-5, (config, name, relative)
            x = torch.randn(2, layer.weight.shape[1], *([6, 6] if layer.weight.dim() == 4 else []))
            with torch.no_grad():
                theirs = module(x)
                if layer.weight.dim() == 4:
                    mine = torch.nn.functional.conv2d(x, ours, layer.bias, layer.stride, layer.padding)
                else:
                    mine = torch.nn.functional.linear(x, ours, layer.bias)
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=f"{config} {name}")


# --- Stable Diffusion single files ------------------------------------------------------------------


def _unet_oracle_names(unet, single: dict) -> dict[str, str]:
    """diffusers key → single-file key, read off diffusers' own conversion run on an id-tagged copy."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_keys = [k for k in single if k.startswith("model.diffusion_model.")]
    probe = {k: torch.full((1,), float(i)) for i, k in enumerate(unet_keys)}
    converted = convert_ldm_unet_checkpoint(probe, dict(unet.config))
    return {k: unet_keys[int(v.item())] for k, v in converted.items()}


def _sd_single(root, build, *, with_text_encoder: bool, prefix: str):
    unet = build()
    state = unet.state_dict()
    single = diffusers_to_original(state, detect_layout(set(state)).links)
    text = clip_l() if with_text_encoder else None
    unet.save_pretrained(root / "folder" / "unet")
    if text is not None:  # as transformers writes it (on disk: text_model.…), under the single file's prefix
        text.save_pretrained(root / "folder" / "text_encoder")
        encoder = load_state(root / "folder" / "text_encoder")
        single.update({f"{prefix}{_text_model(k)}": v for k, v in encoder.items()})
    if build is sdxl_unet:  # OpenCLIP bigG as conditioner.embedders.1: fused in_proj, transposed projection
        open_clip_g().save_pretrained(root / "folder" / "text_encoder_2")
        encoder = load_state(root / "folder" / "text_encoder_2")
        extras = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_projection.weight": "text_projection"}  # fmt: skip
        layers = {k: v for k, v in encoder.items() if k not in extras}
        single.update(diffusers_to_original(layers, open_clip_links(OPEN_CLIP, 2, "text_encoder_2")))
        single[OPEN_CLIP + "positional_embedding"] = encoder["text_model.embeddings.position_embedding.weight"]
        single[OPEN_CLIP + "text_projection"] = encoder["text_projection.weight"].T.contiguous()
    (root / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    save_file(single, root / "model.safetensors")
    return unet, text, single


def _text_model(key: str) -> str:
    """Single files keep CLIP under `text_model.`; transformers 5 writes the folder without it."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


@pytest.fixture(scope="module", params=["SD 1.x", "SDXL"])
def sd_single(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param.replace(" ", ""))
    build = sd1_unet if request.param == "SD 1.x" else sdxl_unet
    prefix = "cond_stage_model.transformer." if request.param == "SD 1.x" else "conditioner.embedders.0.transformer."
    unet, text, single = _sd_single(root, build, with_text_encoder=True, prefix=prefix)
    return request.param, root, unet, text, single, prefix


def test_sd_single_file_tables_invert_diffusers_conversion(sd_single):
    """diffusers' from_single_file conversion turns our single-file UNet back into the model, bit for bit."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    family, _, unet, _, single, _ = sd_single
    assert detect_layout(set(single)).family == family
    back = convert_ldm_unet_checkpoint(dict(single), dict(unet.config))
    state = unet.state_dict()
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_open_clip_tables_invert_diffusers_conversion(sd_single):
    """SDXL's OpenCLIP encoder: diffusers' convert_open_clip_checkpoint gives back the transformers weights."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    family, root, _, _, single, _ = sd_single
    if family != "SDXL":
        pytest.skip("OpenCLIP is SDXL's second encoder (SD 2.x's only one)")
    model = open_clip_g()
    back = convert_open_clip_checkpoint(model, single, prefix=OPEN_CLIP)
    state = load_state(root / "folder" / "text_encoder_2")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _lora_tensors(targets: dict[str, tuple[int, ...]], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in targets.items():
        down = torch.randn(R, *shape[1:], generator=g) * 0.1
        up = torch.randn(shape[0], R, *([1] * (len(shape) - 2)), generator=g) * 0.1
        out[name] = (down, up)
    return out


def _unet_targets(state: dict) -> dict[str, tuple[int, ...]]:
    wanted = ("attn1.to_q", "attn2.to_v", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj",
              "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "time_embedding.linear_1")  # fmt: skip
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in state.items() if k.endswith(".weight") and any(k.endswith(f"{w}.weight") for w in wanted)}  # fmt: skip


def _write_kohya(path, loras: dict, prefix: str, rename=lambda n: n):
    tensors = {}
    for name, (down, up) in loras.items():
        key = f"{prefix}_{rename(name).replace('.', '_')}"
        tensors.update(
            {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        )
    save_file(tensors, path)
    return path


def _sd_adapters(tmp_path, loras: dict, encoders: dict, oracle: dict) -> dict:
    """The same LoRA in three namings: kohya from diffusers paths, kohya from single-file paths, diffusers.

    `encoders` maps (component, kohya prefix) → that text encoder's LoRAs.
    """
    tensors = {}
    for component, group in (("unet", loras), *((c, g) for (c, _), g in encoders.items())):
        for name, (down, up) in group.items():
            tensors.update({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up,
                            f"{component}.{name}.alpha": torch.tensor(2.0)})  # fmt: skip
    save_file(tensors, tmp_path / "diffusers.safetensors")
    paths = {"diffusers": tmp_path / "diffusers.safetensors"}
    original = lambda n: oracle[f"{n}.weight"].removeprefix("model.diffusion_model.")[: -len(".weight")]  # noqa: E731
    for naming, rename in (("kohya-diffusers", lambda n: n), ("kohya-original", original)):
        merged = load_state(_write_kohya(tmp_path / "unet.safetensors", loras, "lora_unet", rename))
        for (_, kohya), group in encoders.items():
            merged |= load_state(_write_kohya(tmp_path / "te.safetensors", group, kohya))
        paths[naming] = tmp_path / f"{naming}.safetensors"
        save_file(merged, paths[naming])
    return paths


def test_sd_lora_into_single_file_equals_folder_merge(sd_single, tmp_path):
    """kohya (either naming) and diffusers LoRAs into the single file = the folder merge, mapped, bit for bit
    (UNet, the embedded CLIP, and for SDXL the OpenCLIP encoder whose q/k/v share one in_proj_weight)."""
    family, root, unet, text, single, prefix = sd_single
    state = unet.state_dict()
    loras = _lora_tensors(_unet_targets(state), seed=3)
    layer = "text_model.encoder.layers"
    encoders = {("text_encoder", "lora_te" if family == "SD 1.x" else "lora_te1"): _lora_tensors({f"{layer}.0.self_attn.q_proj": (32, 32), f"{layer}.1.mlp.fc2": (32, 64)}, 4)}  # fmt: skip
    if family == "SDXL":
        names = ("0.self_attn.q_proj", "0.self_attn.v_proj", "1.self_attn.out_proj", "1.mlp.fc1")
        shapes = {f"{layer}.{n}": (64, 32) if n.endswith("fc1") else (32, 32) for n in names}
        encoders[("text_encoder_2", "lora_te2")] = _lora_tensors(shapes, 6)
    oracle = _unet_oracle_names(unet, single)
    adapters = _sd_adapters(tmp_path, loras, encoders, oracle)
    # the folder takes the single-file-named kohya LoRA too
    lora_tools.merge(root / "folder", [adapters["kohya-original"]], tmp_path / "folder-out", device="cpu")
    folder_unet = load_state(tmp_path / "folder-out" / "unet")
    folder_text = load_state(tmp_path / "folder-out" / "text_encoder")
    expected = {oracle[k]: v for k, v in folder_unet.items()}
    expected |= {f"{prefix}{_text_model(k)}": v for k, v in folder_text.items()}
    changed = len(loras) + 2
    if family == "SDXL":
        folder_open_clip = load_state(tmp_path / "folder-out" / "text_encoder_2")
        layers = {k: v for k, v in folder_open_clip.items() if "position_embedding" not in k and "projection" not in k}
        expected |= diffusers_to_original(layers, open_clip_links(OPEN_CLIP, 2, "text_encoder_2"))
        expected |= {k: single[k] for k in (OPEN_CLIP + "positional_embedding", OPEN_CLIP + "text_projection")}
        changed += 3  # q and v land in one in_proj_weight
    for naming, adapter in adapters.items():
        output = tmp_path / f"{naming}-out.safetensors"
        report = lora_tools.merge(root / "model.safetensors", [adapter], output, device="cpu")
        assert report.tensors_changed == changed, naming
        ours = load_state(output)
        assert set(ours) == set(single)
        for key, value in ours.items():
            assert torch.equal(value, expected[key]), (naming, key)


def test_diffusers_from_single_file_on_our_output_equals_its_own_lora_fuse(sd_single, tmp_path):
    """diffusers loads our merged single file; its output equals diffusers' own load_lora_adapter + fuse_lora."""
    from diffusers import UNet2DConditionModel

    family, root, unet, _, _, _ = sd_single
    if family != "SDXL":
        pytest.skip("one family is enough for this slower oracle (SD 1.x is bit-equal to the folder merge above)")
    loras = _lora_tensors(_unet_targets(unet.state_dict()), seed=8)
    tensors = {}
    for name, (down, up) in loras.items():
        tensors.update({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up})
    save_file(tensors, tmp_path / "lora.safetensors")
    lora_tools.merge(root / "model.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors", device="cpu")  # fmt: skip
    ours = UNet2DConditionModel.from_single_file(str(tmp_path / "out.safetensors"), config=str(root / "folder"), subfolder="unet")  # fmt: skip
    theirs = UNet2DConditionModel.from_pretrained(root / "folder" / "unet")
    theirs.load_lora_adapter({k.removeprefix("unet."): v for k, v in tensors.items()}, adapter_name="lora", prefix=None)
    theirs.fuse_lora(lora_scale=1.0)
    torch.manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}}
    with torch.no_grad():
        expected = theirs(sample, 3, context, **extra).sample
        found = ours(sample, 3, context, **extra).sample
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert (found - UNet2DConditionModel.from_pretrained(root / "folder" / "unet")(sample, 3, context, **extra).sample).abs().max() > 1e-3  # fmt: skip


# --- SD 2.x: OpenCLIP ViT-H under cond_stage_model.model., linear proj_in / proj_out ----------------------------

SD2_CLIP = "cond_stage_model.model."


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2")
    unet, text = sd2_unet(), open_clip_h()
    unet.save_pretrained(root / "folder" / "unet")
    text.save_pretrained(root / "folder" / "text_encoder")
    (root / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    encoder = {_text_model(k): v for k, v in load_state(root / "folder" / "text_encoder").items()}
    position = "text_model.embeddings.position_embedding.weight"
    single = diffusers_to_original(unet.state_dict(), detect_layout(set(unet.state_dict())).links)
    single |= diffusers_to_original({k: v for k, v in encoder.items() if k != position}, open_clip_links(SD2_CLIP, 2, "text_encoder"))  # fmt: skip
    single[SD2_CLIP + "positional_embedding"] = encoder[position]
    single[SD2_CLIP + "text_projection"] = torch.randn(32, 32)  # ViT-H files carry it; CLIPTextModel does not use it
    save_file(single, root / "sd2.safetensors")
    return root, unet, text, encoder, single


def test_sd2_tables_invert_diffusers_conversion(sd2):
    """diffusers' convert_ldm_unet_checkpoint and convert_open_clip_checkpoint give back both models bit for bit."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    _, unet, text, encoder, single = sd2
    assert detect_layout(set(single)).family == "SD 2.x"
    assert single["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2  # linear projection
    back = convert_ldm_unet_checkpoint(dict(single), dict(unet.config))
    assert set(back) == set(unet.state_dict()) and all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    back = convert_open_clip_checkpoint(text, dict(single), prefix=SD2_CLIP)
    back = {_text_model(k): v for k, v in back.items() if k in encoder or _text_model(k) in encoder}
    assert set(back) == set(encoder) and all(torch.equal(back[k], encoder[k]) for k in encoder)


def test_sd2_kohya_lora_into_single_file_equals_folder_merge(sd2, tmp_path):
    """lora_te_ q/v (one fused in_proj_weight), fc1 and lora_unet_ on linear proj_in / attn2: the single-file merge
    equals the folder merge, mapped, bit for bit."""
    root, unet, _, _, single = sd2
    state = unet.state_dict()
    layer = "text_model.encoder.layers.0"
    text = _lora_tensors({f"{layer}.self_attn.q_proj": (32, 32), f"{layer}.self_attn.v_proj": (32, 32), f"{layer}.mlp.fc1": (64, 32)}, 51)  # fmt: skip
    names = ["down_blocks.0.attentions.0.proj_in", "up_blocks.1.attentions.1.proj_out",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]  # fmt: skip
    loras = _lora_tensors({n: tuple(state[f"{n}.weight"].shape) for n in names}, 52)
    adapter = tmp_path / "kohya.safetensors"
    save_file(load_state(_write_kohya(tmp_path / "te.safetensors", text, "lora_te")) | load_state(_write_kohya(tmp_path / "u.safetensors", loras, "lora_unet")), adapter)  # fmt: skip
    report = lora_tools.merge(root / "sd2.safetensors", [adapter], tmp_path / "out.safetensors", device="cpu")
    assert report.tensors_changed == 5  # q and v share in_proj_weight
    lora_tools.merge(root / "folder", [adapter], tmp_path / "folder", device="cpu")
    expected = diffusers_to_original(load_state(tmp_path / "folder" / "unet"), detect_layout(set(state)).links)
    encoder = {_text_model(k): v for k, v in load_state(tmp_path / "folder" / "text_encoder").items()}
    position = "text_model.embeddings.position_embedding.weight"
    expected |= diffusers_to_original({k: v for k, v in encoder.items() if k != position}, open_clip_links(SD2_CLIP, 2, "text_encoder"))  # fmt: skip
    ours = load_state(tmp_path / "out.safetensors")
    assert set(ours) == set(single)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


# --- Flux: BFL single files and fused projections ---------------------------------------------------------


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    model = flux_transformer()
    state = model.state_dict()
    links = detect_layout(set(state)).links
    single = diffusers_to_original(state, links)
    save_file(single, root / "flux1-tiny.safetensors")
    model.save_pretrained(root / "transformer")
    return root, model, state, single


def test_flux_tables_agree_with_diffusers_conversion_on_a_key_probe(flux):
    """diffusers' Flux converter hard-codes Flux-dev's 3072 hidden size, so it runs on id-tagged rows of those sizes."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    _, _, state, single = flux
    layout = detect_layout(set(single))
    assert layout.family == "Flux" and layout.side == "original"
    hidden, rows = 3072, {"qkv": 3 * 3072, "linear1": 3 * 3072 + 4 * 3072, "adaLN_modulation": 2 * 3072}
    probe, start = {}, 0
    for key in single:
        n = next((v for k, v in rows.items() if f".{k}." in f".{key}"), 1)
        probe[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(n, 1)
        start += n
    converted = convert_flux_transformer_checkpoint_to_diffusers({**probe})
    assert set(converted) == set(state)
    by_diffusers: dict[str, list] = {}
    for link in layout.links:
        by_diffusers.setdefault(link.diffusers, []).append(link)
    for key, value in converted.items():
        module, leaf = key.rsplit(".", 1)
        parts = sorted(by_diffusers[module], key=lambda link: (block_rows(link.diffusers_block, 2 * hidden, hidden) or (0,))[0])  # fmt: skip
        pieces = []
        for link in parts:
            source = probe[link.original_weight if leaf == "weight" else link.original_bias]
            span = block_rows(link.block, source.shape[0], hidden) or (0, source.shape[0])
            pieces.append(source[span[0] : span[1]])
        assert torch.equal(torch.cat(pieces), value), key


def _flux_diffusers_lora(state: dict) -> dict:
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_q",
             "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp",
             "single_transformer_blocks.1.proj_out", "norm_out.linear", "x_embedder"]  # fmt: skip
    return _lora_tensors({n: tuple(state[f"{n}.weight"].shape) for n in names}, seed=9)


def test_flux_diffusers_lora_into_bfl_single_file(flux, tmp_path):
    """to_q / to_k / to_v land in their thirds of qkv, proj_mlp in linear1's last rows, norm_out in swapped halves."""
    root, _, state, single = flux
    loras = _flux_diffusers_lora(state)
    tensors = {}
    for name, (down, up) in loras.items():
        tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    adapter = tmp_path / "lora.safetensors"
    save_file(tensors, adapter)
    lora_tools.merge(root / "flux1-tiny.safetensors", [adapter], tmp_path / "out.safetensors", device="cpu")
    lora_tools.merge(root / "transformer", [adapter], tmp_path / "folder", device="cpu")
    ours = load_state(tmp_path / "out.safetensors")
    expected = diffusers_to_original(load_state(tmp_path / "folder"), detect_layout(set(state)).links)
    assert set(ours) == set(single)
    for key in ours:
        assert torch.equal(ours[key], expected[key]), key
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    qkv = ours["double_blocks.0.img_attn.qkv.weight"]
    for third, proj in enumerate(("to_q", "to_k", "to_v")):  # the formula, row block by row block
        down, up = loras[f"transformer_blocks.0.attn.{proj}"]
        w = state[f"transformer_blocks.0.attn.{proj}.weight"]
        assert torch.equal(qkv[third * d : (third + 1) * d], w + up @ down)
    untouched = [k for k in ours if torch.equal(ours[k], single[k])]
    assert "double_blocks.0.txt_attn.qkv.weight" not in untouched and "single_blocks.1.linear1.weight" in untouched


def test_flux_bfl_named_kohya_qkv_lora_into_diffusers_folder(flux, tmp_path):
    """A fused-qkv LoRA (kohya BFL names) into split weights: B's rows split, A shared — exact per row."""
    root, _, state, single = flux
    shapes = {"double_blocks.0.img_attn.qkv": single["double_blocks.0.img_attn.qkv.weight"].shape,
              "single_blocks.0.linear1": single["single_blocks.0.linear1.weight"].shape,
              "final_layer.adaLN_modulation.1": single["final_layer.adaLN_modulation.1.weight"].shape}  # fmt: skip
    loras = _lora_tensors(shapes, seed=12)
    adapter = _write_kohya(tmp_path / "kohya.safetensors", loras, "lora_unet")
    lora_tools.merge(root / "transformer", [adapter], tmp_path / "folder", device="cpu")
    lora_tools.merge(root / "flux1-tiny.safetensors", [adapter], tmp_path / "out.safetensors", device="cpu")
    merged = load_state(tmp_path / "folder")
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    down, up = loras["double_blocks.0.img_attn.qkv"]
    for third, proj in enumerate(("to_q", "to_k", "to_v")):
        w = state[f"transformer_blocks.0.attn.{proj}.weight"]
        assert torch.equal(
            merged[f"transformer_blocks.0.attn.{proj}.weight"], w + (up[third * d : (third + 1) * d] @ down) * 0.5
        )
    down, up = loras["single_blocks.0.linear1"]
    mlp = state["single_transformer_blocks.0.proj_mlp.weight"]
    assert torch.equal(merged["single_transformer_blocks.0.proj_mlp.weight"], mlp + (up[3 * d :] @ down) * 0.5)
    down, up = loras["final_layer.adaLN_modulation.1"]  # stored (shift, scale); diffusers keeps (scale, shift)
    half = up.shape[0] // 2
    swapped = torch.cat([up[half:], up[:half]])
    assert torch.equal(merged["norm_out.linear.weight"], state["norm_out.linear.weight"] + (swapped @ down) * 0.5)
    mapped = diffusers_to_original(merged, detect_layout(set(state)).links)
    ours = load_state(tmp_path / "out.safetensors")
    for key in ours:
        torch.testing.assert_close(ours[key], mapped[key], rtol=0, atol=0, msg=key)


def test_kohya_flux_text_encoder_spellings_onto_embedded_and_folder_encoders(flux, tmp_path):
    """sd-scripts' Flux names — `lora_unet_` BFL, `lora_te1_` CLIP-L, `lora_te3_` T5 — into an all-in-one file
    (`model.diffusion_model.`, `text_encoders.clip_l/t5xxl.transformer.`) and into a FluxPipeline folder, where T5
    is text_encoder_2: the two merges agree, mapped, bit for bit."""
    from diffusion_models import t5_encoder

    root, model, state, single = flux
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "transformer")
    clip_l().save_pretrained(pipeline / "text_encoder")
    t5_encoder().save_pretrained(pipeline / "text_encoder_2")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    clip = {_text_model(k): v for k, v in load_state(pipeline / "text_encoder").items()}
    t5 = load_state(pipeline / "text_encoder_2")
    prefixes = {"clip": "text_encoders.clip_l.transformer.", "t5": "text_encoders.t5xxl.transformer."}
    aio = {f"model.diffusion_model.{k}": v for k, v in single.items()}
    aio |= {prefixes["clip"] + k: v for k, v in clip.items()} | {prefixes["t5"] + k: v for k, v in t5.items()}
    save_file(aio, tmp_path / "flux-aio.safetensors")
    shapes = {"lora_unet": {"double_blocks.0.img_attn.qkv": tuple(single["double_blocks.0.img_attn.qkv.weight"].shape)},
              "lora_te1": {"text_model.encoder.layers.1.self_attn.q_proj": (32, 32)},
              "lora_te3": {"encoder.block.0.layer.0.SelfAttention.q": tuple(t5["encoder.block.0.layer.0.SelfAttention.q.weight"].shape),
                           "encoder.block.0.layer.1.DenseReluDense.wi_0": tuple(t5["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape)}}  # fmt: skip
    tensors = {}
    for seed, (prefix, group) in enumerate(shapes.items()):
        tensors |= load_state(_write_kohya(tmp_path / f"{prefix}.safetensors", _lora_tensors(group, 60 + seed), prefix))
    save_file(tensors, tmp_path / "kohya.safetensors")
    report = lora_tools.merge(tmp_path / "flux-aio.safetensors", [tmp_path / "kohya.safetensors"], tmp_path / "out.safetensors", device="cpu")  # fmt: skip
    assert report.tensors_changed == 4
    lora_tools.merge(pipeline, [tmp_path / "kohya.safetensors"], tmp_path / "merged", device="cpu")
    merged = diffusers_to_original(load_state(tmp_path / "merged" / "transformer"), detect_layout(set(state)).links)
    expected = {f"model.diffusion_model.{k}": v for k, v in merged.items()}
    expected |= {prefixes["clip"] + _text_model(k): v for k, v in load_state(tmp_path / "merged" / "text_encoder").items()}  # fmt: skip
    expected |= {prefixes["t5"] + k: v for k, v in load_state(tmp_path / "merged" / "text_encoder_2").items()}
    ours = load_state(tmp_path / "out.safetensors")
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
    assert not torch.equal(ours[prefixes["t5"] + "encoder.block.0.layer.0.SelfAttention.q.weight"], t5["encoder.block.0.layer.0.SelfAttention.q.weight"])  # fmt: skip


def test_full_difference_keys_diff_and_diff_b(flux, tmp_path):
    """LyCORIS full / ComfyUI `.diff` (ΔW) and `.diff_b` (bias Δ), in either naming, fused rows included."""
    root, _, state, single = flux
    g = torch.Generator().manual_seed(5)
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    diffs = {
        "lora_transformer_transformer_blocks_0_attn_to_k.diff": torch.randn(d, d, generator=g),
        "lora_transformer_transformer_blocks_0_attn_to_k.diff_b": torch.randn(d, generator=g),
        "lora_transformer_transformer_blocks_0_attn_add_v_proj.diff_b": torch.randn(d, generator=g),  # bias only
        "lora_unet_single_blocks_0_norm_query_norm.diff": torch.randn(
            state["single_transformer_blocks.0.attn.norm_q.weight"].shape, generator=g
        ),  # fmt: skip
        "lora_unet_final_layer_linear.diff_b": torch.randn(state["proj_out.bias"].shape, generator=g),
    }
    adapter = tmp_path / "full.safetensors"
    save_file(diffs, adapter)
    report = lora_tools.merge(root / "flux1-tiny.safetensors", [adapter], tmp_path / "out.safetensors", device="cpu")
    ours = load_state(tmp_path / "out.safetensors")
    expected = dict(single)
    expected["double_blocks.0.img_attn.qkv.weight"] = single["double_blocks.0.img_attn.qkv.weight"].clone()
    expected["double_blocks.0.img_attn.qkv.weight"][d : 2 * d] += diffs[
        "lora_transformer_transformer_blocks_0_attn_to_k.diff"
    ]
    expected["double_blocks.0.img_attn.qkv.bias"] = single["double_blocks.0.img_attn.qkv.bias"].clone()
    expected["double_blocks.0.img_attn.qkv.bias"][d : 2 * d] += diffs[
        "lora_transformer_transformer_blocks_0_attn_to_k.diff_b"
    ]
    expected["double_blocks.0.txt_attn.qkv.bias"] = single["double_blocks.0.txt_attn.qkv.bias"].clone()
    expected["double_blocks.0.txt_attn.qkv.bias"][2 * d :] += diffs[
        "lora_transformer_transformer_blocks_0_attn_add_v_proj.diff_b"
    ]
    expected["single_blocks.0.norm.query_norm.scale"] = single["single_blocks.0.norm.query_norm.scale"] + diffs["lora_unet_single_blocks_0_norm_query_norm.diff"]  # fmt: skip
    expected["final_layer.linear.bias"] = (
        single["final_layer.linear.bias"] + diffs["lora_unet_final_layer_linear.diff_b"]
    )
    for key in ours:
        assert torch.equal(ours[key], expected[key]), key
    assert report.tensors_changed == 5


# --- SD3 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    model = sd3_transformer()
    state = model.state_dict()
    weights = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}  # a buffer, not a module weight
    single = diffusers_to_original(weights, detect_layout(set(state)).links) | {
        "pos_embed": state["pos_embed.pos_embed"]
    }
    save_file(single, root / "sd3-tiny.safetensors")
    model.save_pretrained(root / "transformer")
    return root, model, state, single


def test_sd3_tables_invert_diffusers_conversion(sd3):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    _, _, state, single = sd3
    assert detect_layout(set(single)).family == "SD3"
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sd3_loras_both_ways(sd3, tmp_path):
    """diffusers-named LoRA into the single file, original-named (fused qkv) kohya LoRA into the folder: each
    equals the other layout's merge, mapped, bit for bit."""
    root, _, state, single = sd3
    links = detect_layout(set(state)).links
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn2.to_k", "transformer_blocks.1.norm1_context.linear", "norm_out.linear",
             "transformer_blocks.1.ff.net.2"]  # fmt: skip
    loras = _lora_tensors({n: tuple(state[f"{n}.weight"].shape) for n in names}, seed=21)
    tensors = {}
    for name, (down, up) in loras.items():
        tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    save_file(tensors, tmp_path / "diffusers.safetensors")
    originals = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.attn.qkv",
                 "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.1.context_block.adaLN_modulation.1"]  # fmt: skip
    kohya = _write_kohya(tmp_path / "kohya.safetensors", _lora_tensors({n: tuple(single[f"{n}.weight"].shape) for n in originals}, 22), "lora_unet")  # fmt: skip
    for adapter in (tmp_path / "diffusers.safetensors", kohya):
        lora_tools.merge(
            root / "sd3-tiny.safetensors", [adapter], tmp_path / f"{adapter.stem}-out.safetensors", device="cpu"
        )
        lora_tools.merge(root / "transformer", [adapter], tmp_path / f"{adapter.stem}-folder", device="cpu")
        folder = load_state(tmp_path / f"{adapter.stem}-folder")
        expected = diffusers_to_original({k: v for k, v in folder.items() if k != "pos_embed.pos_embed"}, links)
        ours = load_state(tmp_path / f"{adapter.stem}-out.safetensors")
        changed = [k for k in ours if not torch.equal(ours[k], single[k])]
        assert len(changed) >= 4, adapter
        for key, value in expected.items():
            assert torch.equal(ours[key], value), (adapter.stem, key)


# --- FP8 single files -------------------------------------------------------------------------------


def test_fp8_single_file_merges_in_fp32_and_casts_back(flux, tmp_path):
    """merged = cast(fp32 W + ΔW) in the file's float8 format, untouched tensors byte-identical, rounding reported."""
    from safetensors import safe_open

    root, _, state, single = flux
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in single.items()}
    save_file(fp8, tmp_path / "flux-fp8.safetensors")
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    loras = _lora_tensors({"transformer_blocks.0.attn.to_v": (d, d), "x_embedder": tuple(state["x_embedder.weight"].shape)}, 31)  # fmt: skip
    tensors = {}
    for name, (down, up) in loras.items():
        tensors.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    save_file(tensors, tmp_path / "lora.safetensors")
    report = lora_tools.merge(tmp_path / "flux-fp8.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors", device="cpu")  # fmt: skip
    ours = load_state(tmp_path / "out.safetensors")
    qkv = fp8["double_blocks.0.img_attn.qkv.weight"].float()
    qkv[2 * d :] += loras["transformer_blocks.0.attn.to_v"][1] @ loras["transformer_blocks.0.attn.to_v"][0]
    down, up = loras["x_embedder"]
    exact = {"double_blocks.0.img_attn.qkv.weight": qkv, "img_in.weight": fp8["img_in.weight"].float() + up @ down}
    for key, value in exact.items():
        assert ours[key].dtype == torch.float8_e4m3fn
        assert torch.equal(ours[key].view(torch.uint8), value.to(torch.float8_e4m3fn).view(torch.uint8)), key
    errors = {change.tensor: change.rounding_error for change in report.changes}
    for key, value in exact.items():
        assert errors[key] == pytest.approx(float((ours[key].float() - value).abs().max()), rel=0, abs=0), key
    with (
        safe_open(tmp_path / "out.safetensors", "pt") as out,
        safe_open(tmp_path / "flux-fp8.safetensors", "pt") as base,
    ):
        for key in set(fp8) - set(exact):
            assert out.get_slice(key).get_dtype() == base.get_slice(key).get_dtype()
            assert torch.equal(out.get_tensor(key).view(torch.uint8), base.get_tensor(key).view(torch.uint8)), key
    lora_tools.merge(tmp_path / "flux-fp8.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "bf16.safetensors", device="cpu", dtype="bf16")  # fmt: skip
    plain = load_state(tmp_path / "bf16.safetensors")
    assert {v.dtype for v in plain.values()} == {torch.bfloat16}
    assert torch.equal(plain["img_in.weight"], exact["img_in.weight"].to(torch.bfloat16))


def _comfy_scaled_fp8(single: dict) -> dict:
    """A file as ComfyUI's scaled-fp8 exporters write it: per linear an e4m3 weight and fp32 scale amax/448."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in single.items():
        if value.dim() == 2:
            scale = value.abs().max().float() / 448
            out[key] = (value / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[key.replace(".weight", ".scale_weight")] = scale.reshape(())
        else:
            out[key] = value.to(torch.bfloat16)
    out["img_in.scale_input"] = torch.tensor(1.0)
    return out


def test_comfy_scaled_fp8_merges_with_a_fresh_scale(flux, tmp_path):
    """W = weight·scale_weight; W + ΔW requantised with scale amax/448: within e4m3's rounding of an fp64 reference,
    the report's error exact, untouched tensors byte-identical; --dtype bf16 drops scales and the marker."""
    from safetensors import safe_open

    root, _, state, single = flux
    scaled = _comfy_scaled_fp8(single)
    save_file(scaled, tmp_path / "flux-scaled.safetensors")
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    loras = _lora_tensors({"transformer_blocks.0.attn.to_v": (d, d), "x_embedder": tuple(state["x_embedder.weight"].shape)}, 33)  # fmt: skip
    tensors = {}
    for name, (down, up) in loras.items():  # large enough to move amax: a kept scale would saturate
        tensors.update({f"transformer.{name}.lora_A.weight": down * 8, f"transformer.{name}.lora_B.weight": up * 8})
    save_file(tensors, tmp_path / "lora.safetensors")
    report = lora_tools.merge(tmp_path / "flux-scaled.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "out.safetensors", device="cpu")  # fmt: skip
    ours = load_state(tmp_path / "out.safetensors")
    assert set(ours) == set(scaled)
    deltas = {"double_blocks.0.img_attn.qkv": (slice(2 * d, 3 * d), loras["transformer_blocks.0.attn.to_v"]),
              "img_in": (slice(None), loras["x_embedder"])}  # fmt: skip
    ratios = []
    for module, (rows, (down, up)) in deltas.items():
        weight = scaled[f"{module}.weight"].double() * scaled[f"{module}.scale_weight"].double()
        exact = weight.clone()
        exact[rows] += (up.double() * 8) @ (down.double() * 8)
        scale = ours[f"{module}.scale_weight"]
        assert (
            scale.dtype == torch.float32 and scale.shape == () and ours[f"{module}.weight"].dtype == torch.float8_e4m3fn
        )
        assert float(scale) == pytest.approx(float(exact.abs().max()) / 448, rel=1e-6)
        assert float(scale) > float(scaled[f"{module}.scale_weight"])  # the fresh scale grew with amax
        stored = ours[f"{module}.weight"].double() * float(scale)
        assert bool(((stored - exact).abs() <= exact.abs() / 16 + float(scale) * 2**-9).all()), (
            module
        )  # e4m3's half ulp
        ratios.append(float((stored - exact).norm() / (exact - weight).norm()))
    assert report.quantization["fp8 per-tensor, F32 scales"]["max"] == pytest.approx(max(ratios), rel=1e-4)
    with (
        safe_open(tmp_path / "out.safetensors", "pt") as out,
        safe_open(tmp_path / "flux-scaled.safetensors", "pt") as base,
    ):
        for key in set(scaled) - {f"{m}.{leaf}" for m in deltas for leaf in ("weight", "scale_weight")}:
            assert out.get_slice(key).get_dtype() == base.get_slice(key).get_dtype(), key
            assert (
                out.get_tensor(key)
                .reshape(-1)
                .view(torch.uint8)
                .equal(base.get_tensor(key).reshape(-1).view(torch.uint8))
            ), key
    lora_tools.merge(tmp_path / "flux-scaled.safetensors", [tmp_path / "lora.safetensors"], tmp_path / "bf16.safetensors", device="cpu", dtype="bf16")  # fmt: skip
    plain = load_state(tmp_path / "bf16.safetensors")
    assert not any(k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8" for k in plain)
    assert {v.dtype for v in plain.values()} == {torch.bfloat16}
    untouched = scaled["txt_in.weight"].float() * scaled["txt_in.scale_weight"]
    assert torch.equal(plain["txt_in.weight"], untouched.to(torch.bfloat16))
    img_in = scaled["img_in.weight"].double() * scaled["img_in.scale_weight"].double() + (loras["x_embedder"][1].double() * 8) @ (loras["x_embedder"][0].double() * 8)  # fmt: skip
    torch.testing.assert_close(plain["img_in.weight"].double(), img_in, rtol=2**-8, atol=1e-6)


def test_dora_across_a_fused_projection_is_refused_and_nothing_written(flux, tmp_path):
    from conftest import run_cli

    root, _, state, _ = flux
    d = state["transformer_blocks.0.attn.to_q.weight"].shape[0]
    down, up = _lora_tensors({"q": (d, d)}, 3)["q"]
    name = "lora_transformer_transformer_blocks_0_attn_to_q"
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.dora_scale": torch.ones(d, 1)}
    save_file(tensors, tmp_path / "dora.safetensors")
    output = tmp_path / "out.safetensors"
    result = run_cli(["merge", str(root / "flux1-tiny.safetensors"), str(tmp_path / "dora.safetensors"), "-o", str(output)])  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "DoRA across a fused projection (double_blocks.0.img_attn.qkv.weight)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora.safetensors"]


# --- VAE -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_with_vae(tmp_path_factory):
    """An SD 1.x single file with its VAE under first_stage_model. (mid attention as 1×1 convs), and the folder."""
    from diffusion_models import vae

    root = tmp_path_factory.mktemp("sd-vae")
    unet, autoencoder = sd1_unet(), vae()
    state = autoencoder.state_dict()
    single = diffusers_to_original(unet.state_dict(), detect_layout(set(unet.state_dict())).links)
    single |= diffusers_to_original(state, detect_layout(set(state)).links)
    save_file(single, root / "model.safetensors")
    unet.save_pretrained(root / "folder" / "unet")
    autoencoder.save_pretrained(root / "folder" / "vae")
    (root / "folder" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, autoencoder, state, single


def test_vae_tables_invert_diffusers_conversion(sd_with_vae):
    """diffusers' convert_ldm_vae_checkpoint on our single file gives back the diffusers VAE bit for bit."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, autoencoder, state, single = sd_with_vae
    assert single["first_stage_model.decoder.mid.attn_1.q.weight"].dim() == 4
    back = convert_ldm_vae_checkpoint(dict(single), dict(autoencoder.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_vae_loras_merge_into_single_file_and_folder_alike(sd_with_vae, tmp_path):
    """A diffusers-named VAE LoRA (Linear to_q on the mid attention, convs) into the single file, and an LDM-named one
    (1×1-conv factors on attn_1.q) into the folder: each equals the other layout's merge, mapped, bit for bit."""
    root, _, state, single = sd_with_vae
    names = ["decoder.mid_block.attentions.0.to_q", "encoder.mid_block.attentions.0.to_out.0",
             "decoder.up_blocks.0.resnets.0.conv1", "encoder.down_blocks.1.resnets.0.conv_shortcut", "post_quant_conv"]  # fmt: skip
    loras = _lora_tensors({n: tuple(state[f"{n}.weight"].shape) for n in names}, seed=41)
    tensors = {}
    for name, (down, up) in loras.items():
        tensors |= {f"vae.{name}.lora_A.weight": down, f"vae.{name}.lora_B.weight": up}
    save_file(tensors, tmp_path / "diffusers.safetensors")
    ldm = {"decoder.mid.attn_1.q": (32, 1), "encoder.mid.attn_1.v": (16, 2), "decoder.up.1.block.0.conv1": (16, 3)}
    ldm_loras = _lora_tensors({n: tuple(single[f"first_stage_model.{n}.weight"].shape) for n in ldm}, seed=42)
    tensors = {}
    for name, (down, up) in ldm_loras.items():
        tensors |= {f"vae.{name}.lora_A.weight": down, f"vae.{name}.lora_B.weight": up}
    save_file(tensors, tmp_path / "ldm.safetensors")
    vae_links = detect_layout(set(state)).links
    for adapter in (tmp_path / "diffusers.safetensors", tmp_path / "ldm.safetensors"):
        report = lora_tools.merge(root / "model.safetensors", [adapter], tmp_path / f"{adapter.stem}-out.safetensors", device="cpu")  # fmt: skip
        assert report.tensors_changed == (5 if adapter.stem == "diffusers" else 3), adapter.stem
        lora_tools.merge(root / "folder", [adapter], tmp_path / f"{adapter.stem}-folder", device="cpu")
        folder = load_state(tmp_path / f"{adapter.stem}-folder" / "vae")
        expected = {f"first_stage_model.{k.removeprefix('first_stage_model.')}": v for k, v in diffusers_to_original(folder, vae_links).items()}  # fmt: skip
        ours = load_state(tmp_path / f"{adapter.stem}-out.safetensors")
        for key, value in expected.items():
            assert torch.equal(ours[key], value), (adapter.stem, key)
    down, up = loras["decoder.mid_block.attentions.0.to_q"]
    q = load_state(tmp_path / "diffusers-out.safetensors")["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert torch.equal(q, (state["decoder.mid_block.attentions.0.to_q.weight"] + up @ down).reshape(q.shape))


def test_comfy_scale_weight_that_is_not_one_number_is_refused_and_nothing_written(flux, tmp_path):
    from conftest import run_cli

    _, _, state, single = flux
    scaled = _comfy_scaled_fp8(single)
    scaled["img_in.scale_weight"] = torch.ones(2)
    save_file(scaled, tmp_path / "scaled.safetensors")
    down, up = _lora_tensors({"x_embedder": tuple(state["x_embedder.weight"].shape)}, 2)["x_embedder"]
    save_file({"transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": up}, tmp_path / "l.safetensors")  # fmt: skip
    result = run_cli(["merge", str(tmp_path / "scaled.safetensors"), str(tmp_path / "l.safetensors"), "-o", str(tmp_path / "out.safetensors")])  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "img_in.scale_weight has shape [2]; ComfyUI scales are one number" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "scaled.safetensors"]
