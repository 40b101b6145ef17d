"""Serving formats: GGUF LoRA (llama.cpp), mlx-lm adapters, and `check --for ENGINE`.

Oracles: gguf-py's own GGUFReader and GGUFWriter, ΔW products computed here in fp64
with the rotary permutation re-derived index by index, PEFT's saved factors, and
mlx-lm's own tuner (it writes adapters and loads ours).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, load_state, lora_config, run_cli, save_adapter
from safetensors.torch import load_file
from serving_models import build, save_mlx_adapter, save_mlx_moe_adapter, save_peft
from ulp import max_ulp

GGUF_NAMES = {  # HF projection → llama.cpp tensor (gguf-py's TENSOR_NAMES), for the three test architectures
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "qkv_proj": "attn_qkv",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "gate_up_proj": "ffn_up",
}  # fmt: skip
ARCH_NAMES = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}
HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """kind → (base folder, PEFT adapter folder), built once."""
    root = tmp_path_factory.mktemp("serving")
    made = {}
    for kind in ("llama", "qwen2", "phi3"):
        base = root / f"{kind}-base"
        build(kind).save_pretrained(base)
        made[kind] = (base, save_peft(kind, root / f"{kind}-lora"))
    return made


def _peft_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module → s·B·A in fp64, from a PEFT folder (uniform alpha/r)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    state = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            deltas[module] = scale * (b.double() @ a.double())
    return deltas


def _rotary_order(rows: int, heads: int) -> list[int]:
    """llama.cpp's q/k row order, derived from the RoPE pairing: new row 2i+t of a head is old row i + t·d/2."""
    size = rows // heads
    return [h * size + t * (size // 2) + i for h in range(heads) for i in range(size // 2) for t in (0, 1)]


def _gguf_tensors(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: reader.get_field(name).contents() for name in reader.fields}
    return fields, {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_gguf_export_matches_llama_cpp_layout_and_round_trips(tiny, kind, tmp_path):
    base, adapter = tiny[kind]
    out = tmp_path / "adapter.gguf"
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", out])
    assert result.exit_code == 0, result.output
    fields, tensors = _gguf_tensors(out)
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    assert fields["general.architecture"] == ARCH_NAMES[kind]
    deltas = _peft_deltas(adapter)
    assert len(tensors) == 2 * len(deltas)
    for module, delta in deltas.items():
        layer, projection = module.split(".")[2], module.rsplit(".", 1)[-1]
        name = f"blk.{layer}.{GGUF_NAMES[projection]}.weight"
        a, b = tensors[f"{name}.lora_a"].double(), tensors[f"{name}.lora_b"].double()
        assert a.shape == (4, delta.shape[1]) and b.shape == (delta.shape[0], 4)  # [r, in], [out, r]
        expected = delta
        if kind == "llama" and projection in ("q_proj", "k_proj"):
            expected = delta[_rotary_order(delta.shape[0], HEADS if projection == "q_proj" else KV_HEADS)]
        assert torch.equal(8.0 / 4 * (b @ a), expected), module
    back = tmp_path / "back"
    result = run_cli(["convert", out, "--to", "peft", "-o", back])
    assert result.exit_code == 0, result.output
    returned = _peft_deltas(back)
    assert returned.keys() == deltas.keys()
    assert all(torch.equal(returned[m], deltas[m]) for m in deltas)


def test_gguf_merge_equals_peft_merge(tiny, tmp_path):
    from lora_tools import merge

    base, adapter = tiny["llama"]
    run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf"])
    merge(base, [tmp_path / "a.gguf"], tmp_path / "from-gguf")
    merge(base, [adapter], tmp_path / "from-peft")
    ours, theirs = load_state(tmp_path / "from-gguf"), load_state(tmp_path / "from-peft")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _strip_to_llama_cpp(source: Path, target: Path) -> None:
    """Rewrite our GGUF as llama.cpp's convert_lora_to_gguf.py writes it: no head counts, no HF names."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_cpp_written_gguf_reads_back_with_base_config(tiny, tmp_path):
    base, adapter = tiny["llama"]
    run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "ours.gguf"])
    _strip_to_llama_cpp(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    inspected = run_cli(["inspect", tmp_path / "theirs.gguf", "--json"])
    assert inspected.exit_code == 0 and "model.layers.1.self_attn.q_proj" in inspected.stdout
    refused = run_cli(["convert", tmp_path / "theirs.gguf", "--to", "peft", "-o", tmp_path / "no"])
    assert refused.exit_code == 3
    assert "head counts; pass --base" in refused.stderr and not (tmp_path / "no").exists()
    result = run_cli(["convert", tmp_path / "theirs.gguf", "--to", "peft", "--base", base, "-o", tmp_path / "yes"])
    assert result.exit_code == 0, result.output
    deltas, returned = _peft_deltas(adapter), _peft_deltas(tmp_path / "yes")
    assert all(torch.equal(returned[m], deltas[m]) for m in deltas)


def test_gguf_folds_differing_scales_into_b(tmp_path, tiny):
    base, _ = tiny["llama"]
    adapter = save_peft("llama", tmp_path / "patterns", r=4, lora_alpha=8, alpha_pattern={"o_proj": 2})
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf", "--json"])
    assert result.exit_code == 0, result.output
    assert any("folded into lora_b" in n for n in json.loads(result.stdout)["notes"])
    _, tensors = _gguf_tensors(tmp_path / "a.gguf")
    state = load_file(adapter / "adapter_model.safetensors")
    a = state["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].double()
    b = state["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].double()
    product = (
        2.0 * tensors["blk.0.attn_output.weight.lora_b"].double() @ tensors["blk.0.attn_output.weight.lora_a"].double()
    )
    assert torch.allclose(product, 0.5 * b @ a, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("lora", "named"),
    [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(use_dora=True), "DoRA magnitude vector"),
        (dict(lora_bias=True), "lora_B bias"),
    ],
)
def test_gguf_refuses_what_it_cannot_carry_and_drops_on_request(tmp_path, tiny, lora, named):
    base, _ = tiny["llama"]
    adapter = save_peft("llama", tmp_path / "extra", **lora)
    out = tmp_path / "a.gguf"
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", out])
    assert result.exit_code == 3 and named in result.stderr and "--drop-unsupported" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".a.gguf*"))
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", out, "--drop-unsupported", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped"] and any(named in s["reason"] for s in report["skipped"])
    assert out.is_file()


def test_gguf_bad_inputs(tmp_path, tiny, monkeypatch):
    base, adapter = tiny["llama"]
    cases = [
        (["--base", base, "-o", tmp_path / "a.safetensors"], 3, "ending in .gguf"),
        (["-o", tmp_path / "a.gguf"], 3, "--to gguf needs --base"),
        (["--base", tmp_path, "-o", tmp_path / "a.gguf"], 3, "no config.json"),
    ]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    cases.append((["--base", gpt2, "-o", tmp_path / "a.gguf"], 3, "GPT2LMHeadModel has no GGUF LoRA layout"))
    for args, code, message in cases:
        result = run_cli(["convert", adapter, "--to", "gguf", *args])
        assert result.exit_code == code and message in result.stderr, (args, result.output)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    result = run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "a.gguf"])
    assert result.exit_code == 4 and "pip install 'lora_tools[gguf]'" in result.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".a.gguf*"))


# --- check --for ENGINE -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def check_adapters(tmp_path_factory, tiny):
    """One PEFT adapter per rule (plus a clean one), built once."""
    root = tmp_path_factory.mktemp("check")
    attention_mlp = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    variants = {
        "plain": dict(target_modules=attention_mlp),
        "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
        "dora": dict(target_modules=["q_proj", "v_proj"], use_dora=True),
        "bias": dict(target_modules=["q_proj"], lora_bias=True),
        "rank512": dict(target_modules=["q_proj"], r=512, lora_alpha=512),
        "mixed": dict(target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 8}),
        "lm_head": dict(target_modules=["q_proj", "lm_head"]),
    }
    made = {name: save_peft("llama", root / name, **options) for name, options in variants.items()}
    made["phi3"] = tiny["phi3"][1]
    made["gpt2"] = save_adapter(lambda: build_model("gpt2"), lora_config(r=4, target_modules=["c_attn"]), root / "gpt2")
    return made


def _rules(adapter, engine, **options) -> dict[str, list[str]]:
    from lora_tools.commands.check import check

    return {f.rule: f.items for f in check(adapter, engine=engine, **options).findings}


@pytest.mark.parametrize(
    ("variant", "rule", "options"),
    [
        ("modules_to_save", "modules_to_save", {}),
        ("embedding", "embedding_lora", {}),
        ("lm_head", "embedding_lora", {}),
        ("dora", "dora", {}),
        ("bias", "bias", {}),
        ("rank512", "rank_limit", {"max_lora_rank": 256}),
        ("phi3", "unmatched_target", {"base": "llama"}),
    ],
)
def test_check_vllm_flags_each_rule(check_adapters, tiny, variant, rule, options):
    if options.get("base"):
        options = {**options, "base": tiny[options["base"]][0]}
    found = _rules(check_adapters[variant], "vllm", **options)
    assert rule in found, found
    assert rule not in _rules(check_adapters["plain"], "vllm", **options)


def test_check_vllm_rank_default_and_cli(check_adapters, tiny):
    assert "rank 512 > 16" in _rules(check_adapters["rank512"], "vllm")["rank_limit"][0]  # vLLM's default 16
    result = run_cli(["check", check_adapters["rank512"], "--for", "vllm", "--max-lora-rank", "256", "--json"])
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert report["ready"] is False and report["findings"][0]["rule"] == "rank_limit"
    assert "resize --rank" in report["findings"][0]["fix"]
    result = run_cli(["check", check_adapters["plain"], "--for", "vllm", "--base", tiny["llama"][0]])
    assert result.exit_code == 0 and "ready" in result.stderr
    result = run_cli(["inspect", check_adapters["dora"], "--for", "vllm"])
    assert result.exit_code == 3 and "DoRA magnitude vectors" in result.stderr
    assert run_cli(["check", check_adapters["plain"]]).exit_code == 2
    result = run_cli(["check", check_adapters["plain"], "--for", "vllm", "--max-lora-rank", "0"])
    assert result.exit_code == 3 and "--max-lora-rank must be a positive integer" in result.stderr


def test_check_other_engines(check_adapters, tiny, tmp_path):
    assert _rules(check_adapters["embedding"], "sglang")["embedding_lora"] == ["model.embed_tokens"]
    assert _rules(check_adapters["gpt2"], "sglang")["unsupported_target"] == ["c_attn"]
    assert _rules(check_adapters["dora"], "sglang")["dora"]  # loads, but the magnitudes are ignored
    assert not _rules(check_adapters["plain"], "sglang")
    assert _rules(check_adapters["mixed"], "mlx").keys() >= {"mixed_ranks", "mixed_scales"}
    assert _rules(check_adapters["dora"], "mlx").keys() == {"format"}  # mlx-lm serves DoRA, once converted
    config_only = tmp_path / "gpt2"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert _rules(check_adapters["plain"], "llama.cpp", base=config_only)["no_gguf_tensor"] == [
        "architecture GPT2LMHeadModel"
    ]
    assert _rules(check_adapters["plain"], "llama.cpp", base=tiny["llama"][0]) == {
        "format": ["peft adapter, llama.cpp loads gguf"]
    }
    assert "modules_to_save" in _rules(check_adapters["modules_to_save"], "llama.cpp")


def test_check_flags_unknown_and_non_lora_tensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "loha.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_proj.hada_w1_a": torch.ones(8, 2),
            "lora_unet_down_blocks_0_proj.hada_w1_b": torch.ones(2, 8),
            "lora_unet_down_blocks_0_proj.hada_w2_a": torch.ones(8, 2),
            "lora_unet_down_blocks_0_proj.hada_w2_b": torch.ones(2, 8),
            "lora_unet_down_blocks_0_proj.alpha": torch.tensor(2.0),
            "lora_unet_something.else": torch.ones(1),
        },
        path,
    )
    found = _rules(path, "vllm")
    assert found["not_lora"] == ["down_blocks_0_proj (loha)"]
    assert found["unknown_tensors"] == ["lora_unet_something.else"]


# --- mlx-lm -------------------------------------------------------------------------------------------


def _mlx_fused(base: Path, adapter: Path | None = None) -> dict[str, torch.Tensor]:
    """mlx-lm's own answer: its Llama with BASE's weights, our adapter loaded by load_adapters, fused."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from serving_models import mlx_llama

    model = mlx_llama()
    model.load_weights([(k, mx.array(v.numpy())) for k, v in load_state(base).items()])
    if adapter is not None:
        load_adapters(model, str(adapter))
        fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    return {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}


@pytest.fixture(scope="session")
def mlx_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    return {"lora": save_mlx_adapter(root / "lora"), "dora": save_mlx_adapter(root / "dora", dora=True)}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_adapter_merges_like_its_peft_conversion_and_like_mlx_lm(mlx_adapters, tiny, tmp_path, kind):
    from lora_tools import merge

    base, adapter = tiny["llama"][0], mlx_adapters[kind]
    result = run_cli(["convert", adapter, "--to", "peft", "-o", tmp_path / "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is (kind == "dora") and config["r"] == 4 and config["lora_alpha"] == 3.5 * 4
    merge(base, [adapter], tmp_path / "from-mlx")
    merge(base, [tmp_path / "peft"], tmp_path / "from-peft")
    ours, theirs = load_state(tmp_path / "from-mlx"), load_state(tmp_path / "from-peft")
    assert ours.keys() == theirs.keys() and all(max_ulp(ours[k], theirs[k]) <= 1 for k in ours)
    mlx_lm = _mlx_fused(base, adapter)
    for name, value in ours.items():
        assert torch.allclose(value, mlx_lm[name], rtol=1e-5, atol=1e-6), name


def test_mlx_lm_loads_our_conversion(tiny, tmp_path):
    from lora_tools import merge

    base, adapter = tiny["llama"]
    result = run_cli(["convert", adapter, "--to", "mlx", "-o", tmp_path / "mlx", "--base", base])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 2.0 and config["num_layers"] == 2
    merge(base, [adapter], tmp_path / "merged")
    ours, mlx_lm = load_state(tmp_path / "merged"), _mlx_fused(base, tmp_path / "mlx")
    for name, value in ours.items():
        assert torch.allclose(value, mlx_lm[name], rtol=1e-5, atol=1e-6), name
    assert run_cli(["inspect", tmp_path / "mlx", "--for", "mlx"]).exit_code == 0
    assert _rules(tmp_path / "mlx", "vllm") == {"format": ["mlx adapter, vLLM loads peft"]}


def test_mlx_adapter_inspect_resize_unmerge(mlx_adapters, tiny, tmp_path):
    from lora_tools import merge, unmerge

    adapter, base = mlx_adapters["lora"], tiny["llama"][0]
    report = json.loads(run_cli(["inspect", adapter, "--json"]).stdout)
    assert report["format"] == "mlx" and {m["scale"] for m in report["modules"]} == {3.5}
    assert len(report["modules"]) == 2 * 7  # mlx-lm's default keys: every linear of both blocks
    result = run_cli(["resize", adapter, "--rank", "2", "-o", tmp_path / "small"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 2
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    original, back = load_state(base), load_state(tmp_path / "back")
    assert all(torch.allclose(back[k], original[k], atol=1e-6) for k in original)


def test_mlx_export_refusals(check_adapters, tmp_path):
    mixed = check_adapters["mixed"]
    result = run_cli(["convert", mixed, "--to", "mlx", "-o", tmp_path / "out"])
    assert result.exit_code == 3 and "resize --rank" in result.stderr and not (tmp_path / "out").exists()
    same_rank = save_peft(
        "llama", tmp_path / "scales", target_modules=["q_proj", "o_proj"], alpha_pattern={"o_proj": 2}
    )
    result = run_cli(["convert", same_rank, "--to", "mlx", "-o", tmp_path / "out"])
    assert result.exit_code == 3 and "--bake-alpha" in result.stderr and not (tmp_path / "out").exists()
    result = run_cli(["convert", same_rank, "--to", "mlx", "-o", tmp_path / "out", "--bake-alpha"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 1.0
    result = run_cli(["convert", same_rank, "--to", "mlx", "-o", tmp_path / "x.safetensors"])
    assert result.exit_code == 3 and "adapters are folders" in result.stderr


def test_mlx_switch_experts_read_as_per_expert_modules(tmp_path):
    from lora_tools import read_adapter

    folder, deltas = save_mlx_moe_adapter(tmp_path / "moe")
    adapter = read_adapter(folder)
    names = {"gate_proj": "w1", "down_proj": "w2"}
    assert len(adapter.modules) == 2 * 3
    for module in adapter.modules:
        expert, weight = int(module.name.split(".")[-2]), module.name.split(".")[-1]
        projection = next(p for p, w in names.items() if w == weight)
        assert module.name == f"model.layers.0.block_sparse_moe.experts.{expert}.{weight}"
        ours = module.scale * (adapter.read(module.b_key).double() @ adapter.read(module.a_key).double())
        assert torch.allclose(ours, deltas[projection][expert].double(), rtol=1e-5, atol=1e-7)
    result = run_cli(["convert", folder, "--to", "peft", "-o", tmp_path / "peft"])
    assert result.exit_code == 0, result.output
    state = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.2.w2.lora_B.weight" in state


def test_serving_readers_refuse_bad_files(tmp_path, mlx_adapters, tiny):
    import gguf

    base, adapter = tiny["llama"]
    good = tmp_path / "good.gguf"
    run_cli(["convert", adapter, "--to", "gguf", "--base", base, "-o", good])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:300])
    model = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(model), arch="llama")
    writer.add_tensor("token_embd.weight", torch.ones(4, 4).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4}}))
    (broken / "adapters.safetensors").write_bytes((mlx_adapters["lora"] / "adapters.safetensors").read_bytes())
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "adapter_config.json").write_text((mlx_adapters["lora"] / "adapter_config.json").read_text())
    state = load_file(mlx_adapters["lora"] / "adapters.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if not k.endswith("lora_b")}, lonely / "adapters.safetensors")
    cases = [
        (truncated, "not a readable GGUF file"),
        (model, "a GGUF file, but not a LoRA adapter"),
        (broken, "lora_parameters must hold 'rank' and 'scale'"),
        (lonely, "lacks lora_b"),
    ]
    for path, message in cases:
        result = run_cli(["convert", path, "--to", "peft", "-o", tmp_path / "out"])
        assert result.exit_code == 3 and message in result.stderr, (path, result.output)
        assert not (tmp_path / "out").exists()


def test_gguf_embedding_lora_in_llama_cpp_orientation(check_adapters, tiny, tmp_path):
    """llama.cpp gathers token rows of token_embd.lora_a ([vocab, r]); lora_b is [hidden, r]."""
    base, adapter = tiny["llama"][0], check_adapters["embedding"]
    args = ["convert", adapter, "--to", "gguf", "--base", base, "-o", tmp_path / "e.gguf", "--json"]
    assert "saved base layer" in run_cli(args).stderr  # PEFT saved the whole embedding beside its LoRA
    result = run_cli([*args, "--drop-unsupported"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == [
        {"name": "model.embed_tokens.weight", "reason": "saved base layer (whole-tensor replacement)"}
    ]
    _, tensors = _gguf_tensors(tmp_path / "e.gguf")
    a, b = tensors["token_embd.weight.lora_a"].double(), tensors["token_embd.weight.lora_b"].double()
    assert a.shape == (96, 4) and b.shape == (32, 4)
    state = load_file(adapter / "adapter_model.safetensors")
    emb_a = state["base_model.model.model.embed_tokens.lora_embedding_A"].double()  # [r, vocab]
    emb_b = state["base_model.model.model.embed_tokens.lora_embedding_B"].double()  # [hidden, r]
    assert torch.allclose(a @ b.T, (emb_b @ emb_a).T, rtol=1e-12, atol=0)  # ΔE [vocab, hidden], as PEFT
    result = run_cli(["convert", tmp_path / "e.gguf", "--to", "peft", "-o", tmp_path / "back"])
    assert result.exit_code == 0, result.output
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert torch.equal(back["base_model.model.model.embed_tokens.lora_embedding_A"].double(), emb_a)
    assert torch.equal(back["base_model.model.model.embed_tokens.lora_embedding_B"].double(), emb_b)
