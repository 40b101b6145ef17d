"""LoRA inits that rewrite the base (PiSSA, OLoRA, CorDA, LoftQ, …), aLoRA, layer_replication, older configs.

Adapters are built by PEFT 0.21's own `get_peft_model(init_lora_weights=...)`, nudged like a few
training steps, and saved by `save_pretrained`; PEFT's `PeftModel.from_pretrained(...).merge_and_unload()`
is the oracle, with fp64 references computed here from the files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import typing

import pytest
import torch
from conftest import build_model, load_state, run_cli
from gguf import GGUFReader
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM
from ulp import max_ulp

import lora_tools
from lora_tools.adapters.inits import INITS, init_of

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peft_init_values() -> list:
    """Every `init_lora_weights` value the installed PEFT's LoraConfig accepts (0.21, 0.22): its type's Literal (a niter variant
    with 4 iterations), true and false, and any init a `*_config` field's help names (LoRA-GA)."""
    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    values: list = []
    for arg in typing.get_args(hint):
        if arg is bool:
            values += [True, False]
        else:
            values += [v.replace("[number of iters]", "4") for v in typing.get_args(arg)]
    for field in dataclasses.fields(LoraConfig):
        if field.name.endswith("_config"):
            values += re.findall(r"init_lora_weights='(\w+)'", field.metadata.get("help", ""))
    return list(dict.fromkeys(values))


INIT_VALUES = peft_init_values()


def _nudge(model, seed: int) -> None:
    """A few training-like steps: small random changes to every LoRA tensor (B leaves zero, A moves)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _build(init, dtype: torch.dtype, path, arch: str = "llama", **extra):
    """Save a PEFT adapter initialised with `init` on the tiny model; returns whether PEFT rewrote its base."""
    model = build_model(arch, dtype)
    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init) | extra
    if init == "loftq":  # needs scipy and bitsandbytes: the config as PEFT writes it, on a plain LoRA
        _build(True, dtype, path, arch)
        written = json.loads((path / "adapter_config.json").read_text())
        written |= {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
        (path / "adapter_config.json").write_text(json.dumps(written))
        return True  # LoftQ replaces W by its quantised residual (peft.utils.loftq_utils.loftq_init)
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config["corda_config"] = CordaConfig()
        preprocess_corda(model, LoraConfig(**config), run_model=lambda: model(TOKENS))
    if init == "astra":  # PEFT 0.22: eigenvectors of the output activations' covariance, like CorDA's
        from peft.tuners.lora.astra import preprocess_astra
        from peft.tuners.lora.config import AstraConfig

        config["astra_config"] = AstraConfig()
        preprocess_astra(model, LoraConfig(**config), run_model=lambda: model(TOKENS))
    if init == "lora_ga":
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config["lora_ga_config"] = LoraGAConfig()
        preprocess_loraga(model, LoraConfig(**config), train_step=lambda: model(TOKENS, labels=TOKENS).loss.backward())
    before = _base_weights(build_model(arch, dtype))
    peft_model = get_peft_model(model, LoraConfig(**config))
    after = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in _base_weights(peft_model).items()
    }
    _nudge(peft_model, seed=7)
    peft_model.save_pretrained(path)
    return any(not torch.equal(after[n], w) for n, w in before.items())


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("init_bases")
    built = {}
    for label, dtype in DTYPES.items():
        built[label] = root / label
        build_model("llama", dtype).save_pretrained(built[label])
    built["gpt2"] = root / "gpt2"
    build_model("gpt2").save_pretrained(built["gpt2"])
    return built


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(init, dtype label) → (adapter folder, PEFT rewrote the base), each built once."""
    cache: dict = {}

    def get(init, label: str = "fp32"):
        if (init, label) not in cache:
            path = tmp_path_factory.mktemp("init_adapter") / f"{init}_{label}"
            cache[init, label] = (path, _build(init, DTYPES[label], path))
        return cache[init, label]

    return get


def _peft_loaded(base, adapter, dtype, model_class=LlamaForCausalLM):
    return PeftModel.from_pretrained(model_class.from_pretrained(base, dtype=dtype), adapter).eval()


def _peft_merged(base, adapter, dtype, model_class=LlamaForCausalLM) -> dict[str, torch.Tensor]:
    merged = _peft_loaded(base, adapter, dtype, model_class).merge_and_unload(safe_merge=True)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _deltas(adapter) -> dict[str, torch.Tensor]:
    """s·B·A in fp64 per base weight, from the adapter's files."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    state = load_file(adapter / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in state.items():
        if key.endswith("lora_A.weight"):
            b = state[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = scale * (b.double() @ a.double())
    return deltas


def _exact_residual(weight: torch.Tensor, init: str, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W − s·B₀A₀ in fp64 by numpy's own SVD (PiSSA: s·B₀A₀ = V_r·S_r·U_rᵀ) or QR (OLoRA: s·Q_r·R_r), unrounded."""
    import numpy as np

    matrix = weight.double().numpy()
    matrix = matrix.T if fan_in_fan_out else matrix
    if init == "pissa":
        left, values, right = np.linalg.svd(matrix, full_matrices=False)
        top = (left[:, :RANK] * values[:RANK]) @ right[:RANK]
    else:
        q, r = np.linalg.qr(matrix)
        top = ALPHA / RANK * (q[:, :RANK] @ r[:RANK])
    residual = torch.from_numpy(matrix - top)
    return residual.T if fan_in_fan_out else residual


def _naive(base, adapter) -> dict[str, torch.Tensor]:
    """W + s·B·A, the wrong merge for an init that rewrote W."""
    state = load_state(base)
    return {n: (state[n].double() + d).to(state[n].dtype) for n, d in _deltas(adapter).items()}


def _assert_as_peft(ours, expected, reference=None):
    """Within 1 ulp of PEFT's merge, or within PEFT's fp32 factorisation noise (64·eps·max|W|) and at least as close
    as PEFT to the fp64 reference."""
    for name, tensor in ours.items():
        assert name in expected, name
        if max_ulp(tensor, expected[name].to(tensor.dtype)) <= 1:
            continue
        noise = 64 * torch.finfo(tensor.dtype).eps * float(expected[name].abs().max())
        assert float((tensor.double() - expected[name].double()).abs().max()) <= noise, name
        assert reference is not None and name in reference, name
        ours_error = (tensor.double() - reference[name]).abs().max()
        peft_error = (expected[name].double() - reference[name]).abs().max()
        assert ours_error <= peft_error, (name, ours_error, peft_error)


@pytest.mark.parametrize("label", DTYPES)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_merge_as_peft(init, label, bases, built, tmp_path):
    adapter, rewrote = built(init, label)
    assert rewrote
    out = tmp_path / "merged"
    lora_tools.merge(bases[label], [adapter], out, device="cpu")
    ours, dtype = load_state(out), DTYPES[label]

    state = load_state(bases[label])
    reference = {n: _exact_residual(state[n], init) + d for n, d in _deltas(adapter).items()}
    _assert_as_peft(ours, _peft_merged(bases[label], adapter, dtype), reference)

    naive = _naive(bases[label], adapter)
    for name, wrong in naive.items():  # the merge the issue found: 54–65 % of ‖ΔW‖ away
        delta = _deltas(adapter)[name]
        assert (ours[name].double() - wrong.double()).norm() > 0.2 * delta.norm(), name
    assert all(torch.equal(ours[n], t) for n, t in state.items() if n not in naive)

    if label == "fp32":
        loaded = _peft_loaded(bases[label], adapter, dtype)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(model(TOKENS).logits, loaded(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_pissa_on_conv1d_fan_in_fan_out(bases, tmp_path):
    """GPT-2's Conv1D weights are stored in×out: PEFT's PiSSA takes the SVD of the transposed weight."""
    adapter = tmp_path / "adapter"
    config = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert _build("pissa", torch.float32, adapter, arch="gpt2", **config)
    out = tmp_path / "merged"
    lora_tools.merge(bases["gpt2"], [adapter], out, device="cpu")
    state = load_state(bases["gpt2"])
    deltas = {n: d.T for n, d in _deltas(adapter).items()}  # Conv1D: ΔW is stored in×out too
    reference = {n: _exact_residual(state[n], "pissa", fan_in_fan_out=True) + d for n, d in deltas.items()}
    _assert_as_peft(load_state(out), _peft_merged(bases["gpt2"], adapter, torch.float32, GPT2LMHeadModel), reference)


def test_residual_init_with_weight_and_another_adapter(bases, built, tmp_path):
    """A weighted PiSSA adapter beside a plain one: W + w·((W_res − W) + s·B·A) + s'·B'·A', one rounding."""
    pissa, _ = built("pissa")
    plain, _ = built(True)
    out = tmp_path / "merged"
    lora_tools.merge(bases["fp32"], [pissa, plain], out, weights=[0.5, 1.0], device="cpu")
    ours, state = load_state(out), load_state(bases["fp32"])
    for name, delta in _deltas(pissa).items():
        w = state[name].double()
        residual = _exact_residual(state[name], "pissa").float().double()  # W_res as the base dtype holds it
        expected = w + 0.5 * ((residual - w) + delta) + _deltas(plain)[name]
        error = float((ours[name].double() - expected).abs().max())
        assert error <= 2 * torch.finfo(torch.float32).eps * float(expected.abs().max()), name


@pytest.mark.parametrize("init", INIT_VALUES, ids=str)
def test_no_base_rewriting_init_merges_plainly(init, bases, built, tmp_path):
    """For every init PEFT accepts: if PEFT rewrote the base at init, loratool never exits 0 with W + s·B·A.

    Whether the base was rewritten is PEFT's own doing, observed on the model `get_peft_model` returns.
    A merge that exits 0 must equal PEFT's load-and-merge; a refusal exits 3 naming the init, writing nothing.
    """
    adapter, rewrote = built(init)
    assert init_of(json.loads((adapter / "adapter_config.json").read_text())).rewrites_base == rewrote
    out = tmp_path / "merged"
    result = run_cli(["merge", bases["fp32"], adapter, "-o", out])
    naive = _naive(bases["fp32"], adapter)
    if result.exit_code == 0:
        ours = load_state(out)
        same_as_naive = all(max_ulp(ours[n], t) <= 1 for n, t in naive.items())
        assert not (rewrote and same_as_naive), f"{init}: merged as W + s*B*A although PEFT rewrote the base"
        state = load_state(bases["fp32"])
        reference = None
        if rewrote:  # the residual inits loratool recomputes
            reference = {n: _exact_residual(state[n], init) + d for n, d in _deltas(adapter).items()}
        _assert_as_peft(ours, _peft_merged(bases["fp32"], adapter, torch.float32), reference)
    else:
        assert rewrote, result.output
        assert result.exit_code == 3, result.output
        assert f"init_lora_weights={init!r}" in result.output
        assert "path_initial_model_for_weight_conversion" in result.output
        assert not out.exists() and not list(tmp_path.glob(".*"))


def test_unreproducible_inits_are_the_refused_ones():
    """PiSSA and OLoRA are recomputed; the niter variant, CorDA, ASTRA (PEFT 0.22), LoftQ and LoRA-GA refused;
    unknown values too."""
    refused = {v for v in INIT_VALUES if not init_of({"init_lora_weights": v}).mergeable}
    assert refused == {"pissa_niter_4", "corda", "loftq", "lora_ga"} | ({"astra"} & set(INIT_VALUES))
    assert all(init_of({"init_lora_weights": v}).name in {*INITS, "pissa_niter_4"} for v in INIT_VALUES)
    assert not init_of({"init_lora_weights": "pissa_fast"}).mergeable  # PEFT raises on it: never merged plainly


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unmerge_of_a_rewriting_init_is_refused(init, bases, built, tmp_path):
    adapter, _ = built(init)
    merged = tmp_path / "merged"
    lora_tools.merge(bases["fp32"], [adapter], merged, device="cpu")
    out = tmp_path / "unmerged"
    result = run_cli(["unmerge", merged, adapter, "-o", out])
    assert result.exit_code == 3, result.output
    assert "un-merge" in result.output and repr(init) in result.output
    assert not out.exists()


@pytest.fixture(scope="session")
def alora(tmp_path_factory, bases):
    path = tmp_path_factory.mktemp("alora") / "adapter"
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        alora_invocation_tokens=[5, 9])  # fmt: skip
    model = get_peft_model(build_model("llama"), config)
    _nudge(model, seed=3)
    model.save_pretrained(path)
    return path


def test_alora_is_not_merged(alora, bases, tmp_path):
    with pytest.raises(NotImplementedError, match="aLoRA does not support"):  # PEFT refuses as well
        _peft_loaded(bases["fp32"], alora, torch.float32).merge_and_unload()
    for command in ("merge", "unmerge"):
        out = tmp_path / command
        result = run_cli([command, bases["fp32"], alora, "-o", out])
        assert result.exit_code == 3, result.output
        assert "aLoRA" in result.output and "invocation" in result.output
        assert not out.exists()


def test_alora_still_inspects_and_converts(alora, bases, tmp_path):
    result = run_cli(["inspect", alora, "--json"])
    assert result.exit_code == 0, result.output
    init = json.loads(result.stdout)["init"]
    assert init["merge"] == "refused" and "aLoRA" in init["refusal"]
    assert "aLoRA" in run_cli(["inspect", alora]).output
    # PEFT folders and GGUF files keep the invocation tokens: the converted adapter is still an aLoRA
    peft_out = tmp_path / "peft"
    assert run_cli(["convert", alora, "--to", "peft", "-o", peft_out]).exit_code == 0
    assert PeftConfig.from_pretrained(peft_out).alora_invocation_tokens == [5, 9]  # PEFT reads it back as one
    gguf_out = tmp_path / "a.gguf"
    assert run_cli(["convert", alora, "--to", "gguf", "--base", bases["fp32"], "-o", gguf_out]).exit_code == 0
    field = GGUFReader(str(gguf_out)).get_field("adapter.alora.invocation_tokens")  # llama.cpp's key
    assert field is not None and [int(t) for t in field.contents()] == [5, 9]
    for converted in (peft_out, gguf_out):
        result = run_cli(["merge", bases["fp32"], converted, "-o", tmp_path / "merged"])
        assert result.exit_code == 3 and "aLoRA" in result.output, result.output
    # formats with no place for them: refused, never a plain LoRA that acts on every token
    for target, out in (("mlx", tmp_path / "mlx"), ("kohya", tmp_path / "k.safetensors")):
        result = run_cli(["convert", alora, "--to", target, "-o", out])
        assert result.exit_code == 3 and "aLoRA" in result.output and "invocation" in result.output, result.output
        assert not out.exists()
    assert not (tmp_path / "merged").exists()


def test_layer_replication_is_refused_by_name(bases, tmp_path):
    """PEFT 0.21 gives no merge to match: its merge_and_unload adds each copy's LoRA into the weights the
    copies share, and the merged model's logits differ from the adapted model's."""
    adapter = tmp_path / "adapter"
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, layer_replication=[[0, 2], [1, 2]])
    model = get_peft_model(build_model("llama"), config)
    _nudge(model, seed=5)
    model.save_pretrained(adapter)
    loaded = _peft_loaded(bases["fp32"], adapter, torch.float32)
    adapted = loaded(TOKENS).logits
    merged = loaded.merge_and_unload()
    assert merged.config.num_hidden_layers == 3
    assert (merged(TOKENS).logits - adapted).abs().max() > 1e-3
    out = tmp_path / "merged"
    result = run_cli(["merge", bases["fp32"], adapter, "-o", out, "--dry-run"])
    assert result.exit_code == 3, result.output
    assert "layer_replication" in result.output and "no such module" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("init", "merge", "rewrites"), [("pissa", "residual", True), ("pissa_niter_4", "refused", True),
                                                          (True, "plain", False)])  # fmt: skip
def test_inspect_names_the_init(init, merge, rewrites, built):
    adapter, _ = built(init)
    result = run_cli(["inspect", adapter, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["init"]
    assert (found["name"], found["merge"], found["rewrites_base"]) == (str(init).lower(), merge, rewrites)
    text = run_cli(["inspect", adapter]).output
    assert ("rewritten at init" in text or "rewrote the base" in text) == rewrites


#: The fields an adapter_config.json of PEFT 0.6 (2023) carried; everything newer is left out.
OLD_FIELDS = {"base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "init_lora_weights",
              "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type",
              "r", "revision", "target_modules", "task_type"}  # fmt: skip


@pytest.mark.parametrize(("init", "keep_init"), [(True, True), (True, False), ("pissa", True)], ids=str)
def test_older_configs_read_with_peft_defaults(init, keep_init, bases, built, tmp_path):
    """A config trimmed to an older PEFT's fields merges as PEFT reads it (missing fields: PEFT's defaults)."""
    adapter, _ = built(init)
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    kept = OLD_FIELDS - (set() if keep_init else {"init_lora_weights"})
    (old / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k in kept}))

    full, trimmed = tmp_path / "full", tmp_path / "trimmed"
    lora_tools.merge(bases["fp32"], [adapter], full, device="cpu")
    lora_tools.merge(bases["fp32"], [old], trimmed, device="cpu")
    ours, state = load_state(trimmed), load_state(bases["fp32"])
    assert all(torch.equal(ours[n], t) for n, t in load_state(full).items())
    reference = (
        {n: _exact_residual(state[n], "pissa") + d for n, d in _deltas(old).items()} if init == "pissa" else None
    )
    _assert_as_peft(ours, _peft_merged(bases["fp32"], old, torch.float32), reference)


def test_bad_init_field_is_named(built, bases, tmp_path):
    adapter, _ = built(True)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": 3}))
    result = run_cli(["merge", bases["fp32"], bad, "-o", tmp_path / "out"])
    assert result.exit_code == 3, result.output
    assert "init_lora_weights" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "command",
    [["convert", "--to", "peft"], ["convert", "--to", "mlx"], ["resize", "-r", "2"], ["combine"]],
    ids=lambda c: "-".join(c[:3:2]),
)
@pytest.mark.parametrize("init", ["pissa", "corda"])
def test_writing_a_rewriting_init_as_plain_lora_is_refused(init, command, built, tmp_path):
    """convert, resize and combine write adapters that mean W + s·B·A: a PiSSA or CorDA adapter is refused."""
    adapter, _ = built(init)
    out = tmp_path / "out"
    inputs = [adapter, built(True)[0]] if command == ["combine"] else [adapter]
    result = run_cli([command[0], *inputs, *command[1:], "-o", out])
    assert result.exit_code == 3, result.output
    assert f"init_lora_weights={init!r}" in result.output and "W_res" in result.output
    assert not out.exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("init", ["corda", "pissa_niter_4", "pissa"])
def test_residual_base_flag_merges_onto_the_saved_residual(init, tmp_path):
    """--residual-base: BASE is the model PEFT left after init (W_res), saved then; the merge is plain and
    equals PEFT's in-memory merge of the trained model, and un-merging gives that residual back."""
    import copy

    adapter, residual = tmp_path / "adapter", tmp_path / "residual"
    model = build_model("llama")
    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init)
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config["corda_config"] = CordaConfig()
        preprocess_corda(model, LoraConfig(**config), run_model=lambda: model(TOKENS))
    peft_model = get_peft_model(model, LoraConfig(**config))
    _nudge(peft_model, seed=11)
    peft_model.save_pretrained(adapter)
    copy.deepcopy(peft_model).unload().save_pretrained(residual)
    expected = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}

    out = tmp_path / "merged"
    result = run_cli(["merge", residual, adapter, "-o", out, "--residual-base"])
    assert result.exit_code == 0, result.output
    ours = load_state(out)
    assert all(max_ulp(t, expected[n]) <= 1 for n, t in ours.items())

    back = tmp_path / "back"
    result = run_cli(["unmerge", out, adapter, "-o", back, "--residual-base"])
    assert result.exit_code == 0, result.output
    restored, saved = load_state(back), load_state(residual)
    for name, tensor in restored.items():  # one quantum of the merged value: the merge rounded there
        quantum = torch.finfo(tensor.dtype).eps * float(ours[name].abs().max())
        assert float((tensor - saved[name]).abs().max()) <= quantum, name


@pytest.mark.parametrize(
    ("init", "extra"),
    [
        ("pissa", dict(use_dora=True)),
        (
            "olora",
            dict(use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 5}),
        ),
        ("pissa", dict(rank_pattern={"v_proj": 6}, alpha_pattern={"down_proj": 3})),
    ],
    ids=["pissa-dora", "olora-rslora-patterns", "pissa-patterns"],
)
def test_residual_inits_with_dora_and_patterns(init, extra, bases, tmp_path):
    """Per-module rank and scale (patterns, rsLoRA) reach W_res as PEFT uses them; DoRA's norm is of W_res + s·B·A."""
    adapter = tmp_path / "adapter"
    assert _build(init, torch.float32, adapter, **extra)
    out = tmp_path / "merged"
    lora_tools.merge(bases["fp32"], [adapter], out, device="cpu")
    expected = _peft_merged(bases["fp32"], adapter, torch.float32)
    for name, tensor in load_state(out).items():  # within PEFT's fp32 factorisation noise
        noise = 64 * torch.finfo(torch.float32).eps * float(expected[name].abs().max())
        assert float((tensor - expected[name]).abs().max()) <= noise, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_inits_on_cuda(init, bases, built, tmp_path):
    """On a GPU the residual comes from the same fp64 factorisation (staged base or not): as on the CPU."""
    adapter, _ = built(init)
    lora_tools.merge(bases["fp32"], [adapter], tmp_path / "cpu", device="cpu")
    lora_tools.merge(bases["fp32"], [adapter], tmp_path / "cuda", device="cuda")
    cpu, cuda = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for name, tensor in cuda.items():
        torch.testing.assert_close(tensor, cpu[name], rtol=1e-5, atol=1e-6)


def _with_init(adapter, folder, value):
    """A copy of `adapter` whose config says init_lora_weights=value (as a hand-edited or future config)."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": value}))
    return folder


def test_residual_init_bad_inputs_are_refused_before_writing(bases, built, tmp_path):
    """fp64 base (PEFT refuses PiSSA there), OLoRA on GPT-2's in×out Conv1D, an init PEFT does not know."""
    fp64 = tmp_path / "fp64"
    build_model("llama", torch.float64).save_pretrained(fp64)
    gpt2 = tmp_path / "gpt2_adapter"
    _build(True, torch.float32, gpt2, arch="gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    cases = [
        (fp64, built("pissa")[0], "F64"),
        (bases["gpt2"], _with_init(gpt2, tmp_path / "olora_gpt2", "olora"), "fan_in_fan_out"),
        (bases["fp32"], _with_init(built(True)[0], tmp_path / "unknown", "pissa_fast"), "'pissa_fast'"),
    ]
    for base, adapter, named in cases:
        out = tmp_path / "out"
        result = run_cli(["merge", base, adapter, "-o", out])
        assert result.exit_code == 3, result.output
        assert named in result.output, result.output
        assert not out.exists() and not list(tmp_path.glob(".out*"))
