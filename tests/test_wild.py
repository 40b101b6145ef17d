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


# --- heads PEFT saves without the config saying so, and whole sub-module trees --------------------------------------

_BERTISH = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                max_position_embeddings=40, num_labels=3)  # fmt: skip
_DISTIL = dict(dim=32, hidden_dim=37, n_layers=1, n_heads=4, vocab_size=99, max_position_embeddings=40, num_labels=3)
_LLAMA = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=99, max_position_embeddings=40, num_labels=3, pad_token_id=0)  # fmt: skip

#: (model type, Auto class, config values, LoRA targets, task type, config as the wild wrote it)
HEADS = {
    # Llama SEQ_CLS from PEFT ≤ 0.5-era configs: `score` saved, modules_to_save null
    "llama_score": ("llama", "AutoModelForSequenceClassification", _LLAMA, ["q_proj", "v_proj"], "SEQ_CLS", {}),
    # DistilBERT: `classifier` also covers `pre_classifier` (PEFT matches by string suffix)
    "distilbert_pre_classifier": (
        "distilbert", "AutoModelForSequenceClassification", _DISTIL, ["q_lin", "v_lin"], "SEQ_CLS", {},
    ),
    # RoBERTa: the classifier is a tree (dense, out_proj); `bias: all` saves every bias and wrapper copies
    "roberta_tree_bias_all": (
        "roberta", "AutoModelForSequenceClassification", _BERTISH, ["query", "value"], "SEQ_CLS", {"bias": "all"},
    ),
    "roberta_bias_lora_only": (
        "roberta", "AutoModelForSequenceClassification", _BERTISH, ["query", "value"], "SEQ_CLS",
        {"bias": "lora_only"},
    ),
    "bert_token_cls": ("bert", "AutoModelForTokenClassification", _BERTISH, ["query", "value"], "TOKEN_CLS", {}),
    "bert_qa_outputs": ("bert", "AutoModelForQuestionAnswering", _BERTISH, ["query", "key"], "QUESTION_ANS", {}),
    # GPT-2 classifier: Conv1D targets with fan_in_fan_out false, the `score` head implicit
    "gpt2_score_conv1d": (
        "gpt2", "AutoModelForSequenceClassification", dict(_GPT2, num_labels=3, pad_token_id=0), ["c_attn", "c_proj"],
        "SEQ_CLS", {"fan_in_fan_out": False},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HEADS))
def test_heads_peft_saves_implicitly_merge_as_peft_does(case, tmp_path):
    model_type, auto, values, targets, task_type, written = HEADS[case]
    base = tmp_path / "base"
    _tiny(model_type, auto, **values).save_pretrained(base)
    config = dict(r=4, lora_alpha=8, target_modules=targets, **{k: v for k, v in written.items() if k == "bias"})
    adapter = _save_peft(_tiny(model_type, auto, **values), config, tmp_path / "adapter", task_type=task_type)
    _edit_config(adapter, modules_to_save=None, **written)  # as older PEFT wrote it: the heads are implicit
    ours = _assert_matches_peft(base, adapter, tmp_path / "merged", auto)
    heads = [n for n in ours if n.rsplit(".", 2)[-2] in ("score", "classifier", "pre_classifier", "qa_outputs",
                                                          "dense", "out_proj")]  # fmt: skip
    before = load_state(base)
    assert any(not torch.equal(ours[n], before[n]) for n in heads if n.startswith(("score", "classifier", "qa")))


def test_roberta_tree_is_read_as_replacements(tmp_path):
    """inspect lists the sub-modules of the implicit `classifier` as modules_to_save, and finds no problem."""
    model_type, auto, values, targets, task_type, written = HEADS["roberta_tree_bias_all"]
    base = tmp_path / "base"
    _tiny(model_type, auto, **values).save_pretrained(base)
    adapter = _save_peft(
        _tiny(model_type, auto, **values), dict(r=4, lora_alpha=8, target_modules=targets, bias="all"),
        tmp_path / "adapter", task_type=task_type,
    )  # fmt: skip
    _edit_config(adapter, modules_to_save=None)
    result = run_cli(["inspect", adapter, "--base", base, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    origins = {r["target"]: r["origin"] for r in report["replacements"]}
    assert origins["classifier.out_proj.weight"] == "modules_to_save"
    assert origins["roberta.encoder.layer.0.attention.self.query.bias"] == "trained bias (bias: all)"
    assert report["validation"]["problems"] == []


# --- PEFT 0.2 MergedLinear: refused by inspect and merge alike, as PEFT 0.21 refuses it ------------------------------

_PEFT_02_CONFIG = {
    "base_model_name_or_path": "gpt2", "bias": "none", "enable_lora": [True, False, True], "fan_in_fan_out": True,
    "inference_mode": True, "lora_alpha": 16, "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None,
    "peft_type": "LORA", "r": 8, "target_modules": ["c_attn"], "task_type": "CAUSAL_LM",
}  # fmt: skip


def _merged_linear_adapter(folder: Path) -> Path:
    """c_attn (q, k, v of 32 each) with enable_lora [q, v]: lora_A [2r, in], lora_B a grouped conv [2·32, r, 1]."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(_PEFT_02_CONFIG))
    state = {}
    for layer in range(2):
        prefix = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        state[f"{prefix}.lora_A.weight"] = torch.randn(16, 32)
        state[f"{prefix}.lora_B.weight"] = torch.randn(64, 8, 1)
    torch.save(state, folder / "adapter_model.bin")
    return folder


def test_peft_02_merged_linear_is_refused_by_inspect_and_merge(gpt2_base, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    adapter = _merged_linear_adapter(tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT 0.21 cannot load it either
        PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_base), adapter)
    why = "is a PEFT 0.2 MergedLinear adapter (enable_lora, lora_B as a grouped conv [out, r, 1])"
    for args in (
        ["inspect", adapter],
        ["inspect", adapter, "--base", gpt2_base],
        ["merge", gpt2_base, adapter, "-o", tmp_path / "merged"],
    ):
        result = run_cli(args)
        assert result.exit_code == 3, result.output
        assert "transformer.h.0.attn.c_attn (lora_A [16, 32], lora_B [64, 8, 1] and 1 more)" in result.output
        assert why in result.output
    assert not (tmp_path / "merged").exists()


# --- hints that are true -------------------------------------------------------------------------------------------


def test_allow_unmatched_is_suggested_only_when_it_helps(gpt2_base, tmp_path):
    """A stray whole tensor: no hint (the flag would not help); a module naming nothing: the hint, and it works."""
    adapter = _save_peft(
        _tiny("gpt2", "GPT2LMHeadModel", **_GPT2), dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        tmp_path / "adapter",
    )  # fmt: skip
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    state["base_model.model.score.weight"] = torch.zeros(3, 32)  # a head the config does not claim (no task_type)
    save_file(state, weights)
    stray = run_cli(["merge", gpt2_base, adapter, "-o", tmp_path / "out"])
    assert stray.exit_code == 3 and "--allow-unmatched" not in stray.output, stray.output
    assert "add its module to modules_to_save in adapter_config.json" in stray.output

    del state["base_model.model.score.weight"]
    state["base_model.model.transformer.h.9.attn.c_attn.lora_A.weight"] = torch.zeros(4, 32)
    state["base_model.model.transformer.h.9.attn.c_attn.lora_B.weight"] = torch.zeros(96, 4)
    save_file(state, weights)
    unmatched = run_cli(["merge", gpt2_base, adapter, "-o", tmp_path / "out"])
    assert unmatched.exit_code == 3 and "--allow-unmatched merges the rest" in unmatched.output, unmatched.output
    assert run_cli(["merge", gpt2_base, adapter, "-o", tmp_path / "out", "--allow-unmatched"]).exit_code == 0


# --- diffusers' own files, as diffusers reads them ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory) -> Path:
    """A diffusers pipeline folder with a tiny SD-1.x UNet (and only what the merge needs beside it)."""
    from diffusion_models import sd1_unet

    root = tmp_path_factory.mktemp("wild_sd") / "pipeline"
    sd1_unet().save_pretrained(root / "unet")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]


def _trained_unet(r: int = 4, lora_alpha: float = 8, use_dora: bool = False):
    """A UNet with a PEFT LoRA added as diffusers' training scripts add it, B random (a trained adapter)."""
    from diffusion_models import sd1_unet
    from peft import LoraConfig

    unet = sd1_unet()
    unet.add_adapter(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=_UNET_TARGETS, use_dora=use_dora))
    randomize_adapter(unet, seed=7)
    return unet


def _save_pipeline_lora(unet, folder: Path, safe: bool, metadata: bool) -> Path:
    """`StableDiffusionPipeline.save_lora_weights`, as train_text_to_image_lora.py calls it."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=safe,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict() if metadata else None,
    )  # fmt: skip
    return folder / ("pytorch_lora_weights.safetensors" if safe else "pytorch_lora_weights.bin")


def _diffusers_fused(pipeline: Path, lora: Path, prefix: str | None = "unet") -> dict[str, torch.Tensor]:
    """What diffusers itself makes of the file: lora_state_dict → load_lora_adapter → fuse_lora, the UNet's tensors."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(lora, return_lora_metadata=True)
    unet.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, metadata=metadata, adapter_name="wild")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return {k: v.detach() for k, v in unet.state_dict().items()}


def _assert_close_to_diffusers(ours: dict, theirs: dict, base: dict) -> None:
    changed = [n for n in ours if not torch.equal(ours[n], base[n])]
    assert len(changed) == sum(not torch.equal(theirs[n], base[n]) for n in base) > 0
    for name in changed:
        assert max_ulp(ours[name], theirs[name]) <= 1, name


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors_metadata"])
def test_diffusers_trainer_files_merge_as_diffusers_loads_them(safe, sd_pipeline, tmp_path):
    """`pytorch_lora_weights.bin` (no alpha: scale 1, as diffusers reads it) and `.safetensors` whose
    lora_adapter_metadata records r=4, lora_alpha=8 (scale 2): the merge equals diffusers' own fuse."""
    lora = _save_pipeline_lora(_trained_unet(), tmp_path / "lora", safe=safe, metadata=safe)
    lora_tools.merge(sd_pipeline, [lora], tmp_path / "merged", device="cpu")
    ours, base = load_state(tmp_path / "merged" / "unet"), load_state(sd_pipeline / "unet")
    _assert_close_to_diffusers(ours, _diffusers_fused(sd_pipeline, lora), base)
    report = run_cli(["inspect", lora, "--base", sd_pipeline, "--json"])
    assert report.exit_code == 0, report.output
    inspected = json.loads(report.stdout)
    assert inspected["format"] == "diffusers" and inspected["validation"]["problems"] == []
    assert {m["scale"] for m in inspected["modules"]} == {2.0 if safe else 1.0}
    assert {m["target"] for m in inspected["modules"]} == {"to_q", "to_k", "to_v", "to_out", "proj_in", "net.2"}


def test_a_diffusers_lora_folder_is_read_through_its_weights_file(sd_pipeline, tmp_path):
    lora = _save_pipeline_lora(_trained_unet(), tmp_path / "lora", safe=False, metadata=False)
    assert lora_tools.inspect(lora.parent).format == "diffusers"


def test_unprefixed_keys_are_the_denoisers_on_every_base_kind(sd_pipeline, tmp_path):
    """`unet.save_lora_adapter` writes unprefixed keys and metadata: the pipeline and the UNet folder merge them
    the same, as diffusers' model loader (prefix=None) reads them."""
    unet = _trained_unet(r=4, lora_alpha=12)
    unet.save_lora_adapter(tmp_path / "lora")
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    lora_tools.merge(sd_pipeline, [lora], tmp_path / "merged", device="cpu")
    lora_tools.merge(sd_pipeline / "unet", [lora], tmp_path / "merged_unet", device="cpu")
    ours, alone = load_state(tmp_path / "merged" / "unet"), load_state(tmp_path / "merged_unet")
    assert all(torch.equal(ours[n], alone[n]) for n in ours)
    _assert_close_to_diffusers(ours, _diffusers_fused(sd_pipeline, lora, prefix=None), load_state(sd_pipeline / "unet"))


def test_no_alpha_anywhere_is_scale_one_on_every_naming(sd_pipeline, tmp_path):
    """An unprefixed diffusers-keyed file with no alpha and no metadata: diffusers' rule, alpha = rank."""
    from safetensors.torch import load_file, save_file

    unet = _trained_unet(r=4, lora_alpha=4)
    unet.save_lora_adapter(tmp_path / "lora")
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    save_file(load_file(lora), tmp_path / "bare.safetensors")  # the same tensors, no metadata
    lora_tools.merge(sd_pipeline, [tmp_path / "bare.safetensors"], tmp_path / "merged", device="cpu")
    ours = load_state(tmp_path / "merged" / "unet")
    theirs = _diffusers_fused(sd_pipeline, tmp_path / "bare.safetensors", prefix=None)
    _assert_close_to_diffusers(ours, theirs, load_state(sd_pipeline / "unet"))


def test_ai_toolkit_flux_file_without_alpha_is_scale_one(tmp_path):
    """ai-toolkit's Flux LoRA (`diffusion_model.` + BFL names, lora_A/lora_B, no alpha): scale 1 like diffusers' own
    naming, where it used to be refused; fp64 formula on the BFL single file."""
    from diffusion_models import diffusers_to_original, flux_transformer
    from safetensors.torch import save_file

    from lora_tools.layouts.diffusion import detect_layout

    state = flux_transformer().state_dict()
    single = diffusers_to_original(state, detect_layout(set(state)).links)
    save_file(single, tmp_path / "flux1-tiny.safetensors")
    generator, tensors, expected = torch.Generator().manual_seed(4), {}, {}
    for name in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear2", "double_blocks.0.txt_mlp.0"):
        out, inp = single[f"{name}.weight"].shape
        down, up = torch.randn(3, inp, generator=generator), torch.randn(out, 3, generator=generator)
        tensors[f"diffusion_model.{name}.lora_A.weight"], tensors[f"diffusion_model.{name}.lora_B.weight"] = down, up
        expected[f"{name}.weight"] = single[f"{name}.weight"].double() + up.double() @ down.double()
    save_file(tensors, tmp_path / "ai-toolkit.safetensors")
    lora_tools.merge(tmp_path / "flux1-tiny.safetensors", [tmp_path / "ai-toolkit.safetensors"], tmp_path / "out.safetensors",
                     device="cpu")  # fmt: skip
    ours = load_state(tmp_path / "out.safetensors")
    for name, exact in expected.items():
        assert (ours[name].double() - exact).abs().max() <= torch.finfo(torch.float32).eps * exact.abs().max(), name
    assert {m.scale for m in lora_tools.inspect(tmp_path / "ai-toolkit.safetensors").modules} == {1.0}


def test_modules_outside_target_modules_are_merged_and_said(tmp_path):
    """A config whose target_modules omits a module the file holds (hand-edited or an older trainer's config):
    PEFT drops those factors on loading; lora_tools merges them and says so in the report's warnings."""
    base = tmp_path / "base"
    _tiny("llama", "AutoModelForCausalLM", **dict(_LLAMA, num_labels=2)).save_pretrained(base)
    adapter = _save_peft(
        _tiny("llama", "AutoModelForCausalLM", **dict(_LLAMA, num_labels=2)),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, target_modules=["q_proj"])
    report = lora_tools.merge(base, [adapter], tmp_path / "merged", device="cpu")
    assert any("1 module(s) (model.layers.0.self_attn.v_proj) are not in" in w for w in report.warnings)
    ours, theirs, before = (
        load_state(tmp_path / "merged"),
        _peft_merged(base, adapter, "LlamaForCausalLM"),
        load_state(base),
    )
    v, q = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(theirs[v], before[v]) and not torch.equal(ours[v], before[v])  # PEFT dropped it, we did not
    assert max_ulp(ours[q], theirs[q]) <= 1


def test_2023_attention_processor_bin_on_a_pipeline(sd_pipeline, tmp_path):
    """`unet.save_attn_procs` (diffusers 0.14–0.16 training scripts): an unprefixed `pytorch_lora_weights.bin` of
    `…attn1.processor.to_q_lora.down.weight` keys, no alpha. Names as diffusers converts them
    (`convert_unet_state_dict_to_peft`), scale 1, into the pipeline's UNet; fp64 formula."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    base = load_state(sd_pipeline / "unet")
    generator, state = torch.Generator().manual_seed(11), {}
    blocks = sorted({k.rsplit(".", 2)[0] for k in base if k.endswith(("attn1.to_q.weight", "attn2.to_k.weight"))})
    for block in blocks:
        for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            out, inp = base[f"{block}.{module}.weight"].shape
            state[f"{block}.processor.{proj}_lora.down.weight"] = torch.randn(4, inp, generator=generator)
            state[f"{block}.processor.{proj}_lora.up.weight"] = torch.randn(out, 4, generator=generator)
    torch.save(state, tmp_path / "pytorch_lora_weights.bin")
    lora_tools.merge(sd_pipeline, [tmp_path / "pytorch_lora_weights.bin"], tmp_path / "merged", device="cpu")
    ours = load_state(tmp_path / "merged" / "unet")
    converted = {k.replace(".processor.", "."): v for k, v in convert_unet_state_dict_to_peft(state).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in converted})
    assert len(modules) == 4 * len(blocks) > 0
    for module in modules:
        a, b = converted[f"{module}.lora_A.weight"].double(), converted[f"{module}.lora_B.weight"].double()
        exact = base[f"{module}.weight"].double() + b @ a
        fuse = base[f"{module}.weight"] + b.float() @ a.float()  # fp32 the way fuse_lora computes it
        error, fuse_error = ((t.double() - exact).abs().max() for t in (ours[f"{module}.weight"], fuse))
        assert error <= fuse_error, module  # as close to fp64 as fp32 arithmetic gets, or closer
    inspected = run_cli(["inspect", tmp_path / "pytorch_lora_weights.bin", "--base", sd_pipeline, "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert {m["target"] for m in json.loads(inspected.stdout)["modules"]} == {"to_q", "to_k", "to_v", "to_out"}


# --- the corpus run (docs/pages/wild.md) ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in __import__("wild_corpus").CORPUS if c.arch], ids=lambda c: c.repo)
def test_corpus_case_merges_as_peft_does(case, tmp_path):
    """Each runnable config of the corpus, PEFT's factors for it on a tiny base of its architecture: ≤ 1 ulp."""
    from wild_corpus import run_case

    outcome, detail = run_case(case, tmp_path)
    assert outcome == "merged = PEFT", detail


def test_rank_the_config_contradicts_is_refused_by_inspect_and_merge(gpt2_base, tmp_path):
    """Factors of rank 4 under `r: 8` (a config copied from another run): PEFT cannot load them (size mismatch), and
    the scale is ambiguous; inspect and merge both refuse, naming the module and both ranks."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    adapter = _save_peft(
        _tiny("gpt2", "GPT2LMHeadModel", **_GPT2), dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        tmp_path / "adapter",
    )  # fmt: skip
    _edit_config(adapter, r=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(gpt2_base), adapter)
    for args in (["inspect", adapter], ["merge", gpt2_base, adapter, "-o", tmp_path / "merged"]):
        result = run_cli(args)
        assert result.exit_code == 3, result.output
        assert "transformer.h.0.attn.c_attn (factors rank 4, config 8) and 1 more" in result.output
    assert not (tmp_path / "merged").exists()
