"""`combine` against PEFT's `add_weighted_adapter` (cat, svd, ties_svd, magnitude_prune_svd) and
merge_utils (DARE), fp64 Eckart–Young references, diffusers' kohya loader, and bad inputs.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TARGETS, build_model, load_state, lora_config, run_cli, save_adapter
from safetensors.torch import load_file, save_file
from test_formats import _unet  # the tiny Stable-Diffusion UNet of the format tests
from transformers import LlamaForCausalLM
from ulp import max_ulp, ulp_at

import lora_tools
from lora_tools.combining.methods import combine_deltas

WEIGHTS = [0.7, -0.4, 1.3]
TRIO = {
    # the first is plain LoRA: PEFT's cat copies adapters[0]'s config, and with rsLoRA there its scale would be √r, not 1
    "plain": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    "rslora_partial": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(
        r=2, lora_alpha=16, target_modules=LLAMA_TARGETS, rank_pattern={"o_proj": 3}, alpha_pattern={"up_proj": 5}
    ),
}


@pytest.fixture(scope="module")
def trio(tmp_path_factory, llama_base) -> tuple[Path, list[Path]]:
    """Three PEFT adapters whose ΔW is a few percent of W, as trained LoRAs are."""
    root = tmp_path_factory.mktemp("trio")
    paths = []
    for name, kwargs in TRIO.items():
        path = save_adapter(lambda: build_model("llama"), lora_config(**kwargs), root / name, zlib.crc32(name.encode()))
        state = load_file(path / "adapter_model.safetensors")
        save_file({k: v * 0.03 if "lora_B" in k else v for k, v in state.items()}, path / "adapter_model.safetensors")
        paths.append(path)
    return llama_base, paths


@pytest.fixture(scope="module")
def peft_trio(trio):
    """One PeftModel holding the three inputs as a0, a1, a2; tests add their combinations and outputs to it."""
    from peft import PeftModel

    base, paths = trio
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), paths[0], "a0")
    for index, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{index}")
    return model


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n: layer.get_delta_weight(adapter).double()
        for n, layer in _lora_layers(model).items()
        if adapter in layer.lora_A
    }


def _peft_combined(model, combination_type: str, **kwargs) -> dict[str, torch.Tensor]:
    """ΔW per module of PEFT's add_weighted_adapter."""
    name = f"mix_{len(model.peft_config)}"
    model.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, name, combination_type=combination_type, **kwargs)
    return _deltas(model, name)


def _ours(model, output: Path) -> dict[str, torch.Tensor]:
    """ΔW per module of our output, as PEFT loads it (no missing or unexpected keys)."""
    name = f"ours_{len(model.peft_config)}"
    result = model.load_adapter(output, adapter_name=name)
    assert result.unexpected_keys == [] and result.missing_keys == []
    return _deltas(model, name)


@pytest.fixture(scope="module")
def exact(peft_trio) -> dict[str, torch.Tensor]:
    return _exact(peft_trio)


def _exact(model, magnitude: bool = False) -> dict[str, torch.Tensor]:
    """Σ wᵢ·sᵢ·BᵢAᵢ (or, with `magnitude`, Σ |wᵢ·sᵢ|·|Bᵢ|·|Aᵢ|, the size of its summands) in fp64 from the
    factors and scales PEFT loaded."""
    result = {}
    for name, layer in _lora_layers(model).items():
        for index, weight in enumerate(WEIGHTS):
            key = f"a{index}"
            if key in layer.lora_A:
                up, down = layer.lora_B[key].weight.double(), layer.lora_A[key].weight.double()
                term = abs(weight * layer.scaling[key]) * (up.abs() @ down.abs()) if magnitude else up @ down
                result[name] = result.get(name, 0) + (term if magnitude else weight * layer.scaling[key] * term)
    return result


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_cat_is_peft_cat_and_merges_like_the_inputs(trio, peft_trio, exact, tmp_path):
    base, paths = trio
    report = lora_tools.combine(paths, tmp_path / "cat", weights=WEIGHTS, device="cpu")
    ours, theirs = _ours(peft_trio, tmp_path / "cat"), _peft_combined(peft_trio, "cat")
    assert set(ours) == set(theirs) == set(exact)
    for name in ours:
        assert _relative(ours[name], theirs[name]) <= 1e-6, name
        assert _relative(ours[name], exact[name]) <= 1e-6, name
    ranks = {m.name: m.rank_out for m in report.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 6 + 2
    assert ranks["model.layers.0.self_attn.o_proj"] == 4 + 3
    assert ranks["model.layers.0.mlp.gate_proj"] == 4 + 2
    assert max(m.relative_error for m in report.modules) < 1e-6
    partial = {item["module"]: item["adapters"] for item in report.partial}
    assert partial["model.layers.1.mlp.up_proj"] == [1, 3] and "model.layers.1.mlp.down_proj" not in partial
    lora_tools.merge(base, [tmp_path / "cat"], tmp_path / "merged_out", device="cpu")
    lora_tools.merge(base, paths, tmp_path / "merged_in", weights=WEIGHTS, device="cpu")
    merged_out, merged_in = load_state(tmp_path / "merged_out"), load_state(tmp_path / "merged_in")
    # errors in ulps at the size of the summands |W| + Σ|wᵢsᵢ|·|Bᵢ|·|Aᵢ| (fp32 products err by that much wherever
    # W + ΔW cancels, however the factors are stored): OUT merges as close to exact as the inputs do
    base_state, sizes = load_state(base), _exact(peft_trio, magnitude=True)
    worst_out = worst_in = 0.0
    for name, merged in merged_in.items():
        module = name.removesuffix(".weight")
        if module not in exact:
            assert max_ulp(merged_out[name], merged) == 0, name
            continue
        reference = base_state[name].double() + exact[module]
        ulp = ulp_at((base_state[name].abs().double() + sizes[module]).float())
        worst_out = max(worst_out, float(((merged_out[name].double() - reference).abs() / ulp).max()))
        worst_in = max(worst_in, float(((merged.double() - reference).abs() / ulp).max()))
        assert float(((merged_out[name].double() - merged.double()).abs() / ulp).max()) <= 2.0, name
    assert worst_out <= max(worst_in, 1.0) + 0.25, (worst_out, worst_in)
    card = (tmp_path / "cat" / "README.md").read_text()
    assert "| plain | 0.7 |" in card and "| rslora_partial | -0.4 |" in card and "--weight -0.4" in card


def _eckart_young(matrix: torch.Tensor, rank: int) -> float:
    values = torch.linalg.svdvals(matrix)
    return float(values[rank:].pow(2).sum().sqrt())


def test_svd_is_the_best_rank_k_and_no_worse_than_peft(trio, peft_trio, exact, tmp_path):
    _, paths = trio
    report = lora_tools.combine(paths, tmp_path / "svd", weights=WEIGHTS, method="svd", rank=3, device="cpu")
    ours, theirs = _ours(peft_trio, tmp_path / "svd"), _peft_combined(peft_trio, "svd", svd_rank=3)
    routes = {m.route for m in report.modules}
    assert "qr-svd" in routes and any(r.startswith("dense") for r in routes)  # k/v_proj: Σr = 12 > 16 / 2
    for m in report.modules:
        target = exact[m.name]
        optimal = _eckart_young(target, 3)
        error = float((ours[m.name] - target).norm())
        assert error <= 1.001 * optimal + 1e-7 * float(target.norm()), m.name
        assert error <= float((theirs[m.name] - target).norm()) * 1.0001 + 1e-9, m.name
        assert m.relative_error == pytest.approx(error / float(target.norm()), rel=1e-3, abs=1e-7)
        assert m.rank_out == 3


def test_default_rank_is_the_largest_input_rank_capped_by_max_rank(trio, tmp_path):
    _, paths = trio
    defaults = lora_tools.combine(paths, tmp_path / "default", method="svd", device="cpu")
    capped = lora_tools.combine(paths, tmp_path / "capped", method="magnitude-prune", density=0.5, max_rank=3)
    expected = {"q_proj": 6, "v_proj": 6, "down_proj": 6, "o_proj": 4, "k_proj": 4, "gate_proj": 4, "up_proj": 4}
    for report, cap in ((defaults, 99), (capped, 3)):
        for module in report.modules:
            assert module.rank_out == min(expected[module.name.rsplit(".", 1)[1]], cap), module.name
    assert "--max-rank 3" in (tmp_path / "capped" / "README.md").read_text()


@pytest.mark.parametrize(
    ("method", "peft_type", "sign"),
    [
        ("ties", "ties_svd", "total"),
        ("ties", "ties_svd", "frequency"),
        ("magnitude-prune", "magnitude_prune_svd", "total"),
    ],
)
def test_pruning_methods_equal_peft_at_full_rank(trio, peft_trio, tmp_path, method, peft_type, sign):
    _, paths = trio
    out = tmp_path / "out"
    lora_tools.combine(
        paths, out, weights=WEIGHTS, method=method, rank=64, density=0.3, majority_sign=sign, device="cpu"
    )
    ours = _ours(peft_trio, out)
    theirs = _peft_combined(
        peft_trio, peft_type, svd_rank=64, density=0.3, majority_sign_method=sign, svd_full_matrices=False
    )
    for name in ours:
        assert _relative(ours[name], theirs[name]) <= 1e-5, name


def _random_deltas(count: int = 3, shape=(16, 24), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize(
    ("method", "peft_name"),
    [
        ("ties", "ties"),
        ("dare-linear", "dare_linear"),
        ("dare-ties", "dare_ties"),
        ("magnitude-prune", "magnitude_prune"),
    ],
)
def test_methods_match_peft_merge_utils(method, peft_name):
    from peft.utils import merge_utils

    deltas = _random_deltas()
    generator = torch.Generator().manual_seed(1234)
    ours = combine_deltas(deltas, WEIGHTS, method, density=0.4, generator=generator)
    torch.manual_seed(1234)  # PEFT draws DARE's masks from the global generator, in the same order
    theirs = getattr(merge_utils, peft_name)(deltas, torch.tensor(WEIGHTS), 0.4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_dare_linear_is_unbiased():
    """The mean of many seeded DARE draws converges to Σ wᵢ·ΔWᵢ at the rate (1 − D)/D predicts."""
    deltas, density, draws = _random_deltas(), 0.5, 400
    exact = sum(w * d.double() for w, d in zip(WEIGHTS, deltas, strict=True))
    total = torch.zeros_like(exact)
    for seed in range(draws):
        total += combine_deltas(
            deltas, WEIGHTS, "dare-linear", density=density, generator=torch.Generator().manual_seed(seed)
        ).double()
    variance = sum(w * w * d.double() ** 2 for w, d in zip(WEIGHTS, deltas, strict=True)) * (1 - density) / density
    z = (total / draws - exact) / (variance / draws).sqrt()
    assert float(z.abs().max()) < 5.0
    assert 0.85 < float(z.pow(2).mean().sqrt()) < 1.15


def test_dare_is_reproducible_byte_for_byte(trio, peft_trio, exact, tmp_path):
    _, paths = trio
    files = []
    for name, seed in (("first", 7), ("again", 7), ("other", 8)):
        lora_tools.combine(
            paths, tmp_path / name, weights=WEIGHTS, method="dare-ties", density=0.5, seed=seed, device="cpu"
        )
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] and files[0] != files[2]
    assert set(_ours(peft_trio, tmp_path / "first")) == set(exact)


def test_energy_rule_and_json_report(trio, exact, tmp_path):
    _, paths = trio
    result = run_cli(
        ["combine", *paths, "-o", tmp_path / "e", "--method", "svd", "--energy", "0.9", "-q", "--json",
         "-w", "0.7", "-w", "-0.4", "-w", "1.3"]
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    for module in report["modules"]:
        values = torch.linalg.svdvals(exact[module["name"]])
        kept = values.pow(2).cumsum(0) / values.pow(2).sum()
        assert module["rank_out"] == int((kept < 0.9 - 1e-12).sum()) + 1, module["name"]
        assert module["relative_error"] <= (1 - 0.9) ** 0.5 + 1e-6
    assert report["method"] == "svd" and len(report["inputs"]) == 3 and report["partial"]


# --- kohya / diffusers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    """A UNet folder and two kohya LoRAs (ranks 2 and 3, different alphas) on its attention linears."""
    root = tmp_path_factory.mktemp("unet_case")
    unet = _unet()
    unet.save_pretrained(root / "unet")
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attentions" in n]
    generator = torch.Generator().manual_seed(3)
    files, deltas = [], {}
    for index, (rank, alpha) in enumerate(((2, 1.0), (3, 6.0))):
        tensors = {}
        for path, module in linears:
            name = f"lora_unet_{path.replace('.', '_')}"
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(alpha)})  # fmt: skip
            term = WEIGHTS[index] * alpha / rank * (up.double() @ down.double())
            deltas[path] = deltas.get(path, 0) + term
        files.append(root / f"lora{index}.safetensors")
        save_file(tensors, files[-1])
    return root, files, deltas


def test_kohya_output_loads_in_diffusers(unet_case, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    root, files, deltas = unet_case
    out = tmp_path / "combined.safetensors"
    report = lora_tools.combine(files, out, weights=WEIGHTS[:2], to="kohya", device="cpu")
    assert {m.rank_out for m in report.modules} == {5}
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(out))
    unet = _unet()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="combined")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    fused = unet.state_dict()
    for path, delta in deltas.items():
        expected = base[f"{path}.weight"].double() + delta
        torch.testing.assert_close(fused[f"{path}.weight"].double(), expected, rtol=1e-5, atol=1e-6, msg=path)


def test_mixed_kohya_and_peft_with_base(unet_case, tmp_path):
    """A kohya file and a PEFT folder (the other LoRA converted) combine once --base maps the names."""
    root, files, deltas = unet_case
    lora_tools.convert(files[1], tmp_path / "peft", to="peft", base=root, component="unet")
    out = tmp_path / "mixed.safetensors"
    result = run_cli(["combine", files[0], tmp_path / "peft", "-o", out, "-w", "0.7", "-w", "-0.4",
                      "--base", root, "--component", "unet", "--to", "kohya", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    state = load_file(out)
    for path, delta in deltas.items():
        name = f"lora_unet_{path.replace('.', '_')}"
        up, down = state[f"{name}.lora_up.weight"].double(), state[f"{name}.lora_down.weight"].double()
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        torch.testing.assert_close(scale * up @ down, delta, rtol=1e-6, atol=1e-7, msg=path)


def test_loha_input_is_formed_into_delta(unet_case, tmp_path):
    root, files, deltas = unet_case
    path = next(iter(deltas))
    shape = deltas[path].shape
    generator = torch.Generator().manual_seed(9)
    factors = {
        "hada_w1_a": torch.randn(shape[0], 2, generator=generator), "hada_w1_b": torch.randn(2, shape[1], generator=generator),
        "hada_w2_a": torch.randn(shape[0], 2, generator=generator), "hada_w2_b": torch.randn(2, shape[1], generator=generator),
    }  # fmt: skip
    name = f"lora_unet_{path.replace('.', '_')}"
    loha = tmp_path / "loha.safetensors"
    save_file({**{f"{name}.{k}": v * 0.1 for k, v in factors.items()}, f"{name}.alpha": torch.tensor(1.0)}, loha)
    hadamard = (factors["hada_w1_a"] @ factors["hada_w1_b"]) * (factors["hada_w2_a"] @ factors["hada_w2_b"])
    loha_delta = 1e-4 * hadamard.double() * (1.0 / 2)
    for method in ("cat", "svd"):
        out = tmp_path / f"{method}.safetensors"
        report = lora_tools.combine(
            [files[0], loha], out, weights=[1.0, 2.0], method=method, to="kohya", device="cpu",
            **({"rank": 64} if method == "svd" else {}),
        )  # fmt: skip
        module = next(m for m in report.modules if m.name == name.removeprefix("lora_unet_"))
        assert module.adapters == [1, 2] and module.relative_error < 1e-6
        state = load_file(out)
        up, down = state[f"{name}.lora_up.weight"].double(), state[f"{name}.lora_down.weight"].double()
        first = load_file(files[0])
        plain = (first[f"{name}.lora_up.weight"].double() @ first[f"{name}.lora_down.weight"].double()) * 0.5
        torch.testing.assert_close(up @ down * float(state[f"{name}.alpha"]) / down.shape[0], plain + 2 * loha_delta,
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


# --- bad inputs ------------------------------------------------------------------------------------


def _refused(result, needle: str, code: int = 3):
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["--method", "ties", "--density", "0"], "--density must be in (0, 1]", 3),
        (["--method", "ties", "--density", "1.5"], "--density must be in (0, 1]", 3),
        (["--method", "dare-linear"], "needs --density", 3),
        (["--method", "svd", "--rank", "0"], "--rank must be a positive integer", 3),
        (["--method", "svd", "--rank", "-2"], "--rank must be a positive integer", 3),
        (["--rank", "4"], "--method cat keeps every rank", 3),
        (["--max-rank", "4"], "--method cat keeps every rank", 3),
        (["--method", "svd", "--max-rank", "0"], "--max-rank must be a positive integer", 3),
        (["-w", "1", "-w", "2"], "got 2 --weight value(s) for 3 adapters", 3),
        (["--method", "svd", "--density", "0.5"], "--density applies to", 3),
        (["--method", "bogus"], "Invalid value for '--method'", 2),
        (["--to", "kohya"], "ending in .safetensors", 3),
    ],
)
def test_bad_options_are_refused(trio, tmp_path, args, needle, code):
    _, paths = trio
    _refused(run_cli(["combine", *paths, "-o", tmp_path / "out", "-q", *args]), needle, code)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_adapters_for_different_bases_are_refused(trio, tmp_path):
    _, paths = trio
    wide = save_adapter(
        lambda: build_model("llama", hidden_size=48, intermediate_size=96), lora_config(r=4, target_modules=["q_proj"]),
        tmp_path / "inputs" / "wide",
    )  # fmt: skip
    result = run_cli(["combine", paths[0], wide, "-o", tmp_path / "out", "-q"])
    _refused(result, "differ between the adapters (made for different base models?)")
    assert "model.layers.0.self_attn.q_proj: adapter 1 has ΔW [32, 32], adapter 2 [48, 48]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dora_input_is_refused(adapters, trio, tmp_path):
    _, dora = adapters["dora"]
    result = run_cli(["combine", trio[1][0], dora, "-o", tmp_path / "out", "-q"])
    _refused(result, "DoRA")
    assert not (tmp_path / "out").exists()


def test_combine_reads_from_and_pushes_to_the_hub(tmp_path):
    """A Hub input and a local one, combined and published as one commit with a card naming both."""
    from hub_server import FakeHub
    from test_hub import FIXTURE_ADAPTER, TOKEN, _folder_files, loratool

    with FakeHub(TOKEN) as hub:
        hub.add_files("org/tiny-lora", _folder_files(FIXTURE_ADAPTER), private=True)
        result = loratool(
            ["combine", "org/tiny-lora", FIXTURE_ADAPTER, "-w", "0.25", "-w", "0.75", "--method", "svd", "-o",
             tmp_path / "out", "-q", "--push-to-hub", "me/combined", "--json"],
            hub.url, tmp_path / "hf", token_env=True,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        files = hub.files("me/combined")
    assert json.loads(result.stdout)["push"]["repo_id"] == "me/combined"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert "| org/tiny-lora | 0.25 |" in card and "| tiny-llama-lora | 0.75 |" in card
    assert "loratool combine org/tiny-lora tiny-llama-lora --output OUTPUT --method svd" in card
    combined = load_state(tmp_path / "out")
    source = lora_tools.read_adapter(FIXTURE_ADAPTER)
    for module in source.modules:
        # 0.25·ΔW + 0.75·ΔW = ΔW at the input's rank, which the svd route reproduces (output scale 1)
        expected = module.scale * source.read(module.b_key).double() @ source.read(module.a_key).double()
        found = combined[module.b_key].double() @ combined[module.a_key].double()
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-7, msg=module.name)
