"""kohya / LyCORIS / diffusers adapters on a tiny Stable-Diffusion-shaped pipeline, checked against
independent fp64 computations of each format's formula (and against diffusers where it reads the file).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from conftest import load_state, run_cli
from diffusion_models import clip_l as _text_encoder
from diffusion_models import sd1_unet as _unet
from safetensors.torch import save_file
from ulp import max_ulp

import lora_tools

R = 4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A diffusers-layout pipeline folder: unet/, text_encoder/, scheduler/, model_index.json."""
    root = tmp_path_factory.mktemp("pipeline") / "sd-tiny"
    unet, text_encoder = _unet(), _text_encoder()
    unet.save_pretrained(root / "unet")
    text_encoder.save_pretrained(root / "text_encoder")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, unet, text_encoder


def _kohya_name(prefix: str, module_path: str) -> str:
    """sd-scripts' rule: prefix + the module path with dots as underscores."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def _targets(unet, text_encoder):
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attentions" in n]
    convs = [
        (n, m)
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and "resnets" in n
    ]
    te = [(n, m) for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears, convs, te


def _rand(generator, *shape):
    return torch.randn(*shape, generator=generator) * 0.1


def _write_kohya(pipeline, tmp_path, kind: str):
    """A kohya / LyCORIS file of the given kind, and the fp64 ΔW (or full new weight) it implies per base tensor."""
    root, unet, text_encoder = pipeline
    linears, convs, te = _targets(unet, text_encoder)
    g = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    tensors, expected = {}, {}
    state = {f"unet/{k}": v.double() for k, v in unet.state_dict().items()}
    state.update({f"text_encoder/{k}": v.double() for k, v in text_encoder.state_dict().items()})

    def add_lora(component, prefix, path, weight, conv=False, alpha=None, tucker=False, spelled=None):
        name = _kohya_name(prefix, spelled or path)
        out, inp = weight.shape[:2]
        if tucker:
            down, mid, up = _rand(g, R, inp, 1, 1), _rand(g, R, R, 3, 3), _rand(g, out, R, 1, 1)
            tensors[f"{name}.lora_mid.weight"] = mid
            delta = torch.einsum("mnhw,om,ni->oihw", mid.double(), up.double()[:, :, 0, 0], down.double()[:, :, 0, 0])
        elif conv:
            down, up = _rand(g, R, inp, 3, 3), _rand(g, out, R, 1, 1)
            delta = torch.einsum("or,rihw->oihw", up.double()[:, :, 0, 0], down.double())
        else:
            down, up = _rand(g, R, inp), _rand(g, out, R)
            delta = up.double() @ down.double()
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        scale = (alpha if alpha is not None else R) / R
        expected[f"{component}/{path}.weight"] = state[f"{component}/{path}.weight"] + scale * delta

    if kind in ("lora", "locon"):
        for i, (path, module) in enumerate(linears):
            add_lora("unet", "lora_unet", path, module.weight, alpha=2.0 if i % 2 else None)
        for path, module in te:
            # real SD files spell text-encoder modules with text_model_, whether or not the base's keys have it
            spelled = path if path.startswith("text_model.") else f"text_model.{path}"
            add_lora("text_encoder", "lora_te", path, module.weight, alpha=8.0, spelled=spelled)
        if kind == "locon":
            for i, (path, module) in enumerate(convs):
                add_lora("unet", "lora_unet", path, module.weight, conv=True, tucker=i % 2 == 1, alpha=3.0)
    elif kind == "loha":
        for path, _module in linears[:4] + convs[:2]:
            name, weight = _kohya_name("lora_unet", path), state[f"unet/{path}.weight"]
            out, flat = weight.shape[0], math.prod(weight.shape[1:])
            w1a, w1b, w2a, w2b = _rand(g, out, R), _rand(g, R, flat), _rand(g, out, R), _rand(g, R, flat)
            tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                            f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(2.0)})  # fmt: skip
            delta = ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double())).reshape(weight.shape)
            expected[f"unet/{path}.weight"] = weight + (2.0 / R) * delta
    elif kind == "lokr":
        for path, _module in linears[:4]:
            name, weight = _kohya_name("lora_unet", path), state[f"unet/{path}.weight"]
            out, inp = weight.shape
            a, c = 4, 4
            w1, w2a, w2b = _rand(g, a, c), _rand(g, out // a, R), _rand(g, R, inp // c)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
                            f"{name}.alpha": torch.tensor(1.0)})  # fmt: skip
            expected[f"unet/{path}.weight"] = weight + (1.0 / R) * torch.kron(w1.double(), w2a.double() @ w2b.double())
    elif kind == "dora":
        for path, _module in linears[:3]:
            name, weight = _kohya_name("lora_unet", path), state[f"unet/{path}.weight"]
            out, inp = weight.shape
            down, up, scale_in = _rand(g, R, inp), _rand(g, out, R), 1 + _rand(g, 1, inp)
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": scale_in})  # fmt: skip
            combined = weight + (2.0 / R) * (up.double() @ down.double())
            norm = combined.norm(dim=0, keepdim=True)  # per input column, LyCORIS' default axis
            expected[f"unet/{path}.weight"] = combined / norm * scale_in.double()
    path = tmp_path / f"{kind}.safetensors"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        path,
        metadata={"ss_network_dim": str(R), "ss_network_module": "networks.lora"},
    )
    return path, expected


@pytest.mark.parametrize("kind", ["lora", "locon", "loha", "lokr", "dora"])
def test_kohya_and_lycoris_merge_matches_fp64_formula(pipeline, tmp_path, kind):
    root = pipeline[0]
    adapter, expected = _write_kohya(pipeline, tmp_path, kind)
    out = tmp_path / "merged"
    report = lora_tools.merge(root, [adapter], out, device="cpu")
    assert report.tensors_changed == len(expected)
    merged = {f"unet/{k}": v for k, v in load_state(out / "unet").items()}
    merged.update({f"text_encoder/{k}": v for k, v in load_state(out / "text_encoder").items()})
    base = {f"unet/{k}": v for k, v in load_state(root / "unet").items()}
    base.update({f"text_encoder/{k}": v for k, v in load_state(root / "text_encoder").items()})
    for name, tensor in merged.items():
        if name in expected:
            torch.testing.assert_close(tensor.double(), expected[name], rtol=2e-6, atol=2e-7, msg=name)
        else:
            assert torch.equal(tensor, base[name]), name
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "model_index.json").is_file()
    assert (out / "unet" / "config.json").is_file()
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(out / "unet")


def test_inspect_shows_kohya_metadata_and_variants(pipeline, tmp_path):
    adapter, _ = _write_kohya(pipeline, tmp_path, "locon")
    report = json.loads(run_cli(["inspect", adapter, "--json"]).stdout)
    assert report["format"] == "kohya"
    assert report["metadata"]["ss_network_module"] == "networks.lora"
    assert {m["variant"] for m in report["modules"]} == {"lora", "tucker"}
    assert {m["component"] for m in report["modules"]} == {"unet", "text_encoder"}
    checked = run_cli(["inspect", adapter, "--base", pipeline[0] / "unet", "--json"])
    assert checked.exit_code == 3  # the text-encoder modules have nothing to match in the unet alone


def test_unmatched_kohya_names_are_listed_or_skipped(pipeline, tmp_path):
    root = pipeline[0]
    adapter, expected = _write_kohya(pipeline, tmp_path, "lora")
    from safetensors.torch import load_file

    tensors = load_file(adapter)
    tensors["lora_unet_down_blocks_9_nonexistent.lora_down.weight"] = torch.zeros(R, 32)
    tensors["lora_unet_down_blocks_9_nonexistent.lora_up.weight"] = torch.zeros(32, R)
    save_file(tensors, adapter)
    refused = run_cli(["merge", root, adapter, "-o", tmp_path / "out", "-q"])
    assert refused.exit_code == 3
    assert (
        "down_blocks_9_nonexistent: no such module in the base" in refused.stderr
        and "--allow-unmatched" in refused.stderr
    )
    assert not (tmp_path / "out").exists()
    allowed = run_cli(["merge", root, adapter, "-o", tmp_path / "out", "-q", "--allow-unmatched", "--json"])
    assert allowed.exit_code == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert report["tensors_changed"] == len(expected)
    assert any("1 of" in w and "match nothing" in w for w in report["warnings"])


def test_diffusers_spellings_merge_like_the_formula(pipeline, tmp_path):
    root, unet, _ = pipeline
    linears, _, _ = _targets(unet, pipeline[2])
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    spellings = [".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight"]
    for i, (path, module) in enumerate(linears[:6]):
        down_suffix = spellings[i % 3]
        up_suffix = down_suffix.replace("down", "up").replace("lora_A", "lora_B")
        out, inp = module.weight.shape
        down, up = _rand(g, R, inp), _rand(g, out, R)
        tensors[f"unet.{path}{down_suffix}"], tensors[f"unet.{path}{up_suffix}"] = down, up
        tensors[f"unet.{path}.alpha"] = torch.tensor(8.0)
        expected[f"{path}.weight"] = module.weight.double() + 2.0 * (up.double() @ down.double())
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors")
    lora_tools.merge(root, [tmp_path / "pytorch_lora_weights.safetensors"], tmp_path / "merged", device="cpu")
    merged = load_state(tmp_path / "merged" / "unet")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=2e-6, atol=2e-7)
    assert lora_tools.inspect(tmp_path / "pytorch_lora_weights.safetensors").format == "diffusers"


def test_merge_agrees_with_diffusers_own_kohya_loading(pipeline, tmp_path):
    """diffusers converts a kohya LoRA and fuses it into the UNet; our merge gives the same weights.

    This diffusers reads one alpha for the whole UNet correctly, but applies its most common
    alpha to every module when they differ (its alpha_pattern keys miss the converted names)
    and another module's alpha where one is missing (kohya's rule is alpha = rank). So the file
    given to both uses one alpha throughout, which is what diffusers understands.
    """
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from safetensors.torch import load_file

    root = pipeline[0]
    adapter, _ = _write_kohya(pipeline, tmp_path, "lora")
    tensors = load_file(adapter)
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        tensors[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)
    save_file(tensors, adapter)
    lora_tools.merge(root, [adapter], tmp_path / "merged", device="cpu")
    ours = load_state(tmp_path / "merged" / "unet")
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(adapter))
    unet = _unet()
    unet.load_state_dict(load_state(root / "unet"))
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    theirs, base = unet.state_dict(), load_state(root / "unet")
    changed = [name for name in ours if not torch.equal(ours[name], base[name])]
    assert len(changed) == sum(1 for k in tensors if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


FIXTURE_BASE = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
FIXTURE_ADAPTER = FIXTURE_BASE.parent / "tiny-llama-lora"


def test_peft_kohya_peft_round_trip_is_exact(tmp_path):
    from lora_tools.adapters.registry import read_adapter

    kohya = tmp_path / "kohya.safetensors"
    first = run_cli(["convert", FIXTURE_ADAPTER, "--to", "kohya", "--component", "unet", "-o", kohya, "-q"])
    assert first.exit_code == 0, first.stderr
    read = lora_tools.inspect(kohya)
    assert read.format == "kohya" and read.metadata["ss_network_module"] == "networks.lora"
    back = run_cli(["convert", kohya, "--to", "peft", "--base", FIXTURE_BASE, "-o", tmp_path / "peft", "-q"])
    assert back.exit_code == 0, back.stderr
    original, returned = read_adapter(FIXTURE_ADAPTER), read_adapter(tmp_path / "peft")
    pairs = {m.name: m for m in returned.modules}
    assert pairs.keys() == {m.name for m in original.modules}
    for module in original.modules:
        other = pairs[module.name]
        assert other.scale == module.scale and other.rank == module.rank
        assert torch.equal(returned.read(other.a_key), original.read(module.a_key))
        assert torch.equal(returned.read(other.b_key), original.read(module.b_key))
    for adapter in (FIXTURE_ADAPTER, tmp_path / "peft", kohya):
        lora_tools.merge(FIXTURE_BASE, [adapter], tmp_path / f"merged-{adapter.name}", device="cpu")
    reference = (tmp_path / "merged-tiny-llama-lora" / "model.safetensors").read_bytes()
    assert (tmp_path / "merged-peft" / "model.safetensors").read_bytes() == reference
    assert (tmp_path / "merged-kohya.safetensors").read_bytes() == reference  # a .safetensors OUT is one file


def test_bake_alpha_keeps_delta(tmp_path):
    kohya = tmp_path / "baked.safetensors"
    assert (
        run_cli(
            ["convert", FIXTURE_ADAPTER, "--to", "kohya", "--component", "unet", "--bake-alpha", "-o", kohya]
        ).exit_code
        == 0
    )
    from safetensors.torch import load_file

    alphas = {k: v for k, v in load_file(kohya).items() if k.endswith(".alpha")}
    assert {float(v) for v in alphas.values()} == {8.0, 4.0}  # alpha = rank (8, and 4 for down_proj): scale 1
    lora_tools.merge(FIXTURE_BASE, [kohya], tmp_path / "a", device="cpu")
    lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], tmp_path / "b", device="cpu")
    ours, reference = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    for name in reference:  # B·s rounded once in fp32, then one more rounding to bf16
        assert max_ulp(ours[name], reference[name]) <= 1, name


def test_kohya_to_peft_loads_in_peft_and_matches(pipeline, tmp_path):
    from peft import PeftModel

    root, _, _ = pipeline
    adapter, _ = _write_kohya(pipeline, tmp_path, "locon")
    refused = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / "peft", "--base", root])
    assert refused.exit_code == 3 and "--component" in refused.stderr
    lora = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / "peft", "--base", root, "--component", "unet",
                    "--rank", "4", "--json"])  # fmt: skip
    assert lora.exit_code == 0, lora.stderr
    notes = json.loads(lora.stdout)["notes"]
    assert notes and all("re-factorised" in n for n in notes)  # the Tucker modules
    unet = _unet()
    unet.load_state_dict(load_state(root / "unet"))
    merged = PeftModel.from_pretrained(unet, tmp_path / "peft").merge_and_unload().state_dict()
    lora_tools.merge(root / "unet", [tmp_path / "peft"], tmp_path / "ours", device="cpu")
    ours = load_state(tmp_path / "ours")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_loha_and_lokr_become_lora_by_refactorising(pipeline, tmp_path):
    root, _, _ = pipeline
    for kind in ("loha", "lokr"):
        adapter, expected = _write_kohya(pipeline, tmp_path, kind)
        needs_rank = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / f"{kind}-x", "--base", root])
        assert needs_rank.exit_code == 3 and "--rank" in needs_rank.stderr
        full_rank = 64
        done = run_cli(
            ["convert", adapter, "--to", "peft", "-o", tmp_path / kind, "--base", root, "--rank", full_rank, "--json"]
        )
        assert done.exit_code == 0, done.stderr
        lora_tools.merge(root / "unet", [tmp_path / kind], tmp_path / f"{kind}-merged", device="cpu")
        merged = load_state(tmp_path / f"{kind}-merged")
        for name, value in expected.items():  # at full rank the re-factorisation is exact up to rounding
            torch.testing.assert_close(merged[name.removeprefix("unet/")].double(), value, rtol=1e-5, atol=1e-6)


def _single_module_file(tmp_path, name: str, tensors: dict) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def test_loha_tucker_lokr_decomposed_and_dora_out_axis(pipeline, tmp_path):
    """The remaining spellings, each against a formula built another way (tensordot / loops / kron by blocks)."""
    root, unet, _ = pipeline
    linears, convs, _ = _targets(unet, pipeline[2])
    g = torch.Generator().manual_seed(11)
    base = {k: v.double() for k, v in load_state(root / "unet").items()}
    tensors, expected = {}, {}

    conv_path = convs[0][0]
    name, weight = _kohya_name("lora_unet", conv_path), base[f"{conv_path}.weight"]
    out, inp = weight.shape[:2]
    t1, t2 = _rand(g, R, R, 3, 3), _rand(g, R, R, 3, 3)
    w1a, w1b, w2a, w2b = _rand(g, R, out), _rand(g, R, inp), _rand(g, R, out), _rand(g, R, inp)
    tensors.update({f"{name}.hada_t1": t1, f"{name}.hada_t2": t2, f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b,
                    f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(2.0)})  # fmt: skip

    def tucker(t, down, up):  # Σ_ij t[i,j] · up[i,p] · down[j,r], built with tensordot
        inner = torch.tensordot(t.double(), down.double(), dims=([1], [0]))  # i, h, w, r
        return torch.tensordot(up.double(), inner, dims=([0], [0])).permute(0, 3, 1, 2)  # p, r, h, w

    expected[f"{conv_path}.weight"] = weight + 0.5 * tucker(t1, w1b, w1a) * tucker(t2, w2b, w2a)

    lin_path = linears[1][0]
    name, weight = _kohya_name("lora_unet", lin_path), base[f"{lin_path}.weight"]
    out, inp = weight.shape
    w1a_, w1b_ = _rand(g, 4, 2), _rand(g, 2, 4)
    w2 = _rand(g, out // 4, inp // 4)
    tensors.update(
        {
            f"{name}.lokr_w1_a": w1a_,
            f"{name}.lokr_w1_b": w1b_,
            f"{name}.lokr_w2": w2,
            f"{name}.alpha": torch.tensor(1.0),
        }
    )
    w1 = w1a_.double() @ w1b_.double()
    lokr = torch.zeros(out, inp, dtype=torch.float64)
    bo, bi = w2.shape
    for i in range(4):  # the Kronecker product block by block
        for j in range(4):
            lokr[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = w1[i, j] * w2.double()
    expected[f"{lin_path}.weight"] = weight + (1.0 / 2) * lokr  # rank 2 from lokr_w1_a

    dora_path = linears[2][0]
    name, weight = _kohya_name("lora_unet", dora_path), base[f"{dora_path}.weight"]
    out, inp = weight.shape
    down, up, magnitude = _rand(g, R, inp), _rand(g, out, R), 1 + _rand(g, out, 1)
    tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.dora_scale": magnitude})
    combined = weight + up.double() @ down.double()
    rows = torch.stack([combined[o] / combined[o].norm() * magnitude[o, 0].double() for o in range(out)])
    expected[f"{dora_path}.weight"] = rows

    adapter = _single_module_file(tmp_path, "mixed", tensors)
    lora_tools.merge(root / "unet", [adapter], tmp_path / "merged", device="cpu")
    merged = load_state(tmp_path / "merged")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=2e-6, atol=2e-7, msg=name)


def test_attention_processor_spelling(pipeline, tmp_path):
    root, unet, _ = pipeline
    block = next(n for n, _ in unet.named_modules() if n.endswith("attn1"))
    g = torch.Generator().manual_seed(5)
    base = {k: v.double() for k, v in load_state(root / "unet").items()}
    tensors, expected = {}, {}
    for proj, module_path in (("to_q", f"{block}.to_q"), ("to_out", f"{block}.to_out.0")):
        weight = base[f"{module_path}.weight"]
        down, up = _rand(g, R, weight.shape[1]), _rand(g, weight.shape[0], R)
        tensors[f"unet.{block}.processor.{proj}_lora.down.weight"] = down
        tensors[f"unet.{block}.processor.{proj}_lora.up.weight"] = up
        expected[f"{module_path}.weight"] = weight + up.double() @ down.double()
    adapter = _single_module_file(tmp_path, "processors", tensors)
    lora_tools.merge(root, [adapter], tmp_path / "merged", device="cpu")
    merged = load_state(tmp_path / "merged" / "unet")
    for name, value in expected.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=2e-6, atol=2e-7)


def test_inspect_validates_against_a_pipeline(pipeline, tmp_path):
    root = pipeline[0]
    adapter, _ = _write_kohya(pipeline, tmp_path, "locon")
    fits = run_cli(["inspect", adapter, "--base", root, "--json"])
    assert fits.exit_code == 0, fits.stderr
    report = json.loads(fits.stdout)
    assert report["validation"]["compatible"] is True
    assert any(m["name"].startswith("down_blocks.") and "." in m["name"] for m in report["modules"])
    from safetensors.torch import load_file

    tensors = load_file(adapter)
    tensors["lora_te2_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(R, 32)
    tensors["lora_te2_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(64, R)
    tensors["lora_unet_mystery.weird_suffix"] = torch.zeros(1)
    save_file(tensors, adapter)
    broken = run_cli(["inspect", adapter, "--base", root, "--json"])
    assert broken.exit_code == 3
    problems = json.loads(broken.stdout)["validation"]["problems"]
    assert any("text_encoder_2: the pipeline has no such component" in p for p in problems)
    assert any("lora_unet_mystery.weird_suffix: not a key" in p for p in problems)
    merged = run_cli(["merge", root, adapter, "-o", tmp_path / "out", "-q"])
    assert merged.exit_code == 3 and "weird_suffix" in merged.stderr and "text_encoder_2" in merged.stderr
    del tensors["lora_unet_mystery.weird_suffix"]
    save_file(tensors, adapter)
    allowed = run_cli(["merge", root, adapter, "-o", tmp_path / "out", "-q", "--allow-unmatched", "--json"])
    assert allowed.exit_code == 0, allowed.stderr
    assert any("1 modules for text_encoder_2 were left out" in w for w in json.loads(allowed.stdout)["warnings"])


def test_lokr_with_tucker_core_on_a_conv(pipeline, tmp_path):
    root, unet, _ = pipeline
    _, convs, _ = _targets(unet, pipeline[2])
    path = convs[0][0]
    weight = load_state(root / "unet")[f"{path}.weight"].double()
    out, inp, kh, kw = weight.shape
    g = torch.Generator().manual_seed(21)
    w1, t2, w2a, w2b = _rand(g, 4, 4), _rand(g, R, R, kh, kw), _rand(g, R, out // 4), _rand(g, R, inp // 4)
    name = _kohya_name("lora_unet", path)
    adapter = _single_module_file(tmp_path, "lokr_t2", {f"{name}.lokr_w1": w1, f"{name}.lokr_t2": t2,
                                                        f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
                                                        f"{name}.alpha": torch.tensor(2.0)})  # fmt: skip
    # w2[p, r, h, w] = Σ_ij t2[i, j, h, w] · w2a[i, p] · w2b[j, r], by loops; ΔW = w1 ⊗ w2 · alpha / rank
    w2 = torch.zeros(out // 4, inp // 4, kh, kw, dtype=torch.float64)
    for i in range(R):
        for j in range(R):
            w2 += t2[i, j].double() * torch.outer(w2a[i].double(), w2b[j].double())[:, :, None, None]
    delta = torch.zeros_like(weight)
    for a in range(4):
        for c in range(4):
            delta[a * (out // 4) : (a + 1) * (out // 4), c * (inp // 4) : (c + 1) * (inp // 4)] = w1[a, c].double() * w2
    lora_tools.merge(root / "unet", [adapter], tmp_path / "merged", device="cpu")
    merged = load_state(tmp_path / "merged")[f"{path}.weight"].double()
    torch.testing.assert_close(merged, weight + (2.0 / R) * delta, rtol=2e-6, atol=2e-7)
