"""The corpus of adapter configs found in public repositories (docs/pages/wild.md), as data, and the run that
merges each into a tiny random base of its real architecture and compares with PEFT 0.21's `merge_and_unload`.

Only the configs are kept (the fields that are not PEFT defaults, as written); the factors are random, of the
shapes PEFT makes for the config on that architecture. `python tests/wild_corpus.py` prints the table.
"""

from __future__ import annotations

import json
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

_TEXT = dict(
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=100,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: model type → (tiny config values, Auto class per task type or None for the default causal LM)
ARCHS: dict[str, dict] = {
    "llama": dict(_TEXT, tie_word_embeddings=False),
    "qwen2": dict(_TEXT),
    "qwen3": dict(_TEXT),
    "mistral": dict(_TEXT),
    "gemma2": dict(_TEXT, num_hidden_layers=2),
    "phi": dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=64, partial_rotary_factor=0.5),
    "hunyuan_v1_dense": dict(_TEXT),
    "t5": dict(d_model=32, d_ff=24, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=100,
               decoder_start_token_id=0),
    "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                 max_position_embeddings=40, num_labels=2),
    "roberta": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                    max_position_embeddings=40, num_labels=3),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0),
    "whisper": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=100,
                    num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
}  # fmt: skip

_AUTO = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
         "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification"}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One adapter folder found in a public repository: where, its config as written, the architecture it names."""

    repo: str
    commit: str
    path: str
    arch: str | None  # a model type in ARCHS, or None when no tiny base can be built offline (custom code)
    config: dict
    why: str = ""  # what the case teaches, or why it cannot run
    auto: str | None = None
    weights: str = "adapter_model.safetensors"
    extra: dict = field(default_factory=dict)


def _c(r, alpha, targets, task="CAUSAL_LM", **more) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "task_type": task,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, **more}  # fmt: skip


# fmt: off
CORPUS: list[Case] = [
    Case("1350562074/LLM", "df925e8a4c0c212998cf83308652272c85f15ce1", "adapter_config.json", "llama",
         _c(8, 16, ["q_proj", "v_proj"]), "PEFT 0.6-era config (no peft_version), Llama-2 chat"),
    Case("2025ae05587-oss/LLM_Assignment_1B_IT_Helpdesk", "2483981008f93825ef703941d4a63335b5184da5",
         "adapter_config.json", "llama", _c(16, 32, ["v_proj", "q_proj"], peft_version="0.21.1"),
         "SmolLM2 (llama architecture), PEFT 0.21.1"),
    Case("3L0L0/FLAN-T5-Motivation-Model", "033581dbb0b75870e906c1bc46cf3e18504fa0c0", "adapter_config.json", "t5",
         _c(16, 32, ["o", "k", "q", "v"], "SEQ_2_SEQ_LM", peft_version="0.18.1"),
         "T5 one-letter names: suffix matching must not take `o` for `…wo`"),
    Case("ABISHEAK-std/TinyLlama-structured-output-finetuned-using-Lora", "87dacb4173cb59d07b045a05b3f11289d1ff07d2",
         "adapter_config.json", "llama", _c(16, 32, _ALL7, peft_version="0.19.1"), "TinyLlama, all seven projections"),
    Case("Aakashkuragayala/AIT-st125050-Master-Research", "38d789f681f8aafdfd2e8d227ae8f197849598e3",
         "adapter_config.json", "llama", _c(4, 8, ["k_proj", "v_proj", "q_proj", "o_proj"]),
         "base_model_name_or_path is a Colab snapshot path (no Hub id): the base must be given"),
    Case("Adarsh5557/qwen7b-finetuned-Smart-MCQ-Solver", "f05940725c38abc9ddbede4e6112d119eb17b1ef",
         "adapter_config.json", "qwen2", _c(16, 32, _ALL7, peft_version="0.18.1"), "Qwen2.5 (q/k/v biases in the base)"),
    Case("AdelaCorbeanu/Fine-Tuning-Llama-3.2-3B-for-Romanian-Contextual-Question-Answering-via-LoRA",
         "bc2ff135d0c2a38269a4c33d85b16795a4c4972f", "adapter_config.json", "llama",
         _c(8, 32, ["q_proj", "v_proj"]), "Llama 3.2"),
    Case("AliAbdien/Fine-Tuning-LLaMA-2-7B-", "3f7f4d060e0b873229e0ed432c768dd741b89b10", "adapter_config.json",
         "llama", _c(64, 16, ["q_proj", "v_proj"]), "PEFT 0.5-era config (no rank_pattern keys), alpha < r"),
    Case("GQ131/-fine-tuned-Llama-2-model-on-IMDB-sentiment-analysis-dataset",
         "261b3104924cae8a69e664f9cf948e7822300b31", "adapter_config.json", "llama", _c(64, 16, _ALL7),
         "sentiment task trained as CAUSAL_LM (no head)"),
    Case("Hareshjethani/BERT-GPT2-Multitask-Finetuning", "03c2fb1a03318e735ac4bb994b2a788cb0744613",
         "adapter_config.json", "bert", _c(8, 32, ["query", "value"], "SEQ_CLS", modules_to_save=["classifier", "score"]),
         "SEQ_CLS head written into modules_to_save by PEFT itself (`score` matches nothing in BERT)"),
    Case("GowthamNats/MicrosoftPhi1_5_finetuned-", "a430b5959518d1a4a31cd9e887a28212ed7bf360", "adapter_config.json",
         "phi", _c(16, 16, ["fc1", "fc2", "Wqkv", "out_proj"]),
         "phi-1.5 trained on the old remote-code `PhiForCausalLM` (Wqkv, out_proj): in transformers' phi only "
         "fc1/fc2 exist, so PEFT and lora_tools both find modules the base lacks"),
    Case("AliSajid55/Fine-tuning-Gemma-2-9b-it-on-Healthcare-Dataset-using-QLoRA-TRL-Kaggle-P100-",
         "9036e66808007b772f44c9e57e0fde70952720e3", "adapter_config.json", "gemma2",
         _c(16, 32, _ALL7, layers_to_transform=[1], peft_version="0.18.1"),
         "layers_to_transform (16–41 of 42; here layer 1 of 2): only those layers carry factors"),
    Case("Alneyadi-Abdulla/DPO_train", "0c17d58d6d476e4a5be44ec16dc429b03d0df6eb", "adapter_config.json", "llama",
         _c(16, 16, _ALL7, auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library":
            "transformers.models.llama.modeling_llama", "unsloth_fixed": True}, peft_version="0.18.1"),
         "unsloth DPO on a bnb-4bit base name: merge into the full-precision base"),
    Case("ChisomOkwor/homework4-vlm", "cca469e542653e57e5482274f9e08d2b30586f24", "adapter_config.json", None,
         _c(16, 64, ["gate_proj", "up_proj", "fc1", "out_proj", "q_proj", "v_proj", "proj", "fc2", "k_proj",
                     "down_proj", "o_proj"]),
         "SmolVLM (idefics3): vision and text towers in one target list; not run (tiny VLM base left out)"),
    Case("D3voz/joy-caption-alpha-two-gui-mod", "7782b687db73e8b524e262a6a8d7d708dacb4783", "adapter_config.json",
         "llama", _c(64, 16, _ALL7), "unsloth Llama 3.1, r=64 α=16"),
    Case("DigitalIntelligenceCenter-of-ICMM/Baize-Traditional-Chinese-Medicine-Large-Language-Model",
         "dc3232a911cc080bc32649fe2a465c6cfbb62594", "adapter_config.json", "qwen3", _c(16, 16, _ALL7),
         "unsloth Qwen3"),
    Case("DreamVu/Cosmos-Reason2-2B-Retail-Grocery-EgoExo", "db5fa8ff780e117799478062ca0a35976e02910d",
         "adapter_config.json", None, _c(32, 64, _ALL7, peft_version="0.18.1"),
         "Cosmos-Reason2 (a Qwen3-VL): not run (tiny VLM base left out)"),
    Case("EDLlyc/kangya-glm4-lora", "98f84eabf239a9ec469f1bf10c36c3e9708da399", "adapter_config.json", None,
         _c(8, 16, ["dense", "dense_h_to_4h", "query_key_value", "dense_4h_to_h"]),
         "glm-4-9b-chat remote code (query_key_value): not runnable offline"),
    Case("Elyorcode/SPEECH-TO-TEXT-MODEL", "a1a01feb940dfae0b75cd5de943fa49e6ead93ad", "adapter_config.json",
         "whisper", _c(32, 64, ["v_proj", "q_proj"], None), "Whisper, task_type null",
         auto="WhisperForConditionalGeneration"),
    Case("HashirDS/smart-tutor-phi2-model", "676434c90d0f206557f97fbfd135bdcbf18562c0", "adapter_config.json", "phi",
         _c(16, 32, ["q_proj", "v_proj"], peft_version="0.18.0"), "phi-2 in transformers' naming"),
    Case("KZ-Shi/LLaMA-E", "6b5b9305c923935414145934bb7fdb4a88b38237", "adapter_config.json", "llama",
         _c(8, 16, ["q_proj", "v_proj", "k_proj", "o_proj"], enable_lora=None, merge_weights=False),
         "PEFT 0.2-era config (enable_lora: null, merge_weights): plain LoRA factors", weights="adapter_model.bin"),
    Case("LTtt456c/InternLM_AdapterModel", "9c55980e24bcd542870bc6a9b408f2b5800a50c0", "adapter_config.json", None,
         _c(64, 16, _ALL7), "internlm-chat-7b remote code: not runnable offline"),
    Case("Iamjuhwan/HY-MT1.5-yoruba-pidgin-lora", "8dd93f8e66eacbb804d9587fd34bfd2379a6e500", "adapter_config.json",
         "hunyuan_v1_dense", _c(16, 32, _ALL7, peft_version="0.18.1"), "Hunyuan dense (HY-MT1.5)"),
    Case("IMJONEZZ/USU-LLM-Class", "d8fb2d216719598c77dc252a792e6e44172e5cfb", "adapter_config.json", "llama",
         _c(32, 32, _ALL7), "unsloth Llama 3.1 8B bnb-4bit base name"),
    Case("JaimeMitchell/Mom_Painting_Style_GenAI", "9621163bfa9cbd3ff797b4a1236a3571332cec9d", "adapter_config.json",
         "unet", _c(16, 40, ["to_q", "0.proj_in", "to_v", "0.proj_out", "to_out.0", "to_k"], None),
         "a PEFT folder on a diffusers UNet (auto_mapping UNet2DConditionModel, targets `0.proj_in`, `to_out.0`)"),
    Case("JustinaChano04/text-summarization", "daa4f20965fa6b8ec536a3ad4c7c70426471c0ef", "adapter_config.json", None,
         _c(16, 32, ["query_key_value"]), "a local base path only (falcon / bloom / neox naming): base unknown"),
    Case("KamilaTrinkenschuh/Minstral-Model", "ce963d71aa35b1ba7c65d6b298a3a0c34ce01df0", "adapter_config.json",
         "mistral", _c(16, 16, ["k_proj", "o_proj", "q_proj", "lm_head", "gate_proj", "down_proj", "v_proj",
                                "up_proj"]), "LoRA on lm_head (untied Mistral)"),
    Case("LamKelly/Fine-tune-LLM-for-Verilog-HDL-Generation", "95170d13ba0eaa69fb7ec329cb0eecd308fa996f",
         "adapter_config.json", "llama", _c(64, 16, _ALL7), "unsloth Llama 3.2 1B (tied embeddings in the base)",
         extra={"tie_word_embeddings": True}),
    Case("CogniX-LTD/Cogni-OpenModel", "9a5f99ce4de2a1ecd945a315c81c4634b483ebbc", "adapter_config.json", "llama",
         _c(16, 16, _ALL7 + _ALL7), "target_modules listed twice (unsloth)"),
    Case("Electrosquib/LLM-Based-Predictive-Text-Compression-Ham-Radio", "6560918381cc460726d0c05d85dd3f6fcd24507e",
         "adapter_config.json", "qwen3", _c(16, 32, ["v_proj", "q_proj"], peft_version="0.18.0"),
         "Qwen3 0.6B (tied embeddings)", extra={"tie_word_embeddings": True}),
    Case("April-48/Deep-Learning-Competition-1", "b5fcadcbb13d8f2d32aa6d0ed85521891c0c62b5", "adapter_config.json",
         "qwen2", _c(8, 16, _ALL7, peft_version="0.18.1"), "Qwen2.5-Coder"),
    Case("EllaHxyz/LLama2_Finetuning", "18d0974b3f481ab87ad1515ff90e3c76d28d44bb", "adapter_config.json", "llama",
         _c(2, 32, [f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")]),
         "full module paths in target_modules (the last layer only)"),
    Case("Ey-luccas/chatbot_unsloth", "346bf8ee528609e4fd4a058a9edd754e1e8fe99b", "adapter_config.json", "llama",
         _c(16, 16, _ALL7), "unsloth Llama 3.2 3B"),
    Case("Ahsan-Asim/FineTune_GPT2_Math_Riddles", "a6d98e87918ec5d1df40b7668579b17243ef26ad",
         "model/adapter_config.json", "gpt2", _c(16, 64, ["c_proj", "c_attn"], None, fan_in_fan_out=True,
         auto_mapping={"base_model_class": "GPT2LMHeadModel", "parent_library": "transformers.models.gpt2.modeling_gpt2"}),
         "GPT-2 Conv1D (square attn.c_proj): orientation from the base", auto="GPT2LMHeadModel"),
    Case("Muhammad-Ahmad092/Math-Riddle-Generator-with-Fine-Tuning", "e51be57b0c4c2f1948cf2bb7ca3f74c7e4bfc773",
         "model/adapter_config.json", "gpt2", _c(8, 16, ["c_attn", "c_proj"], fan_in_fan_out=True),
         "GPT-2 c_attn + c_proj (attention and MLP c_proj both matched by suffix)"),
    Case("Kartik87580/Text_Classification", "07afaf6f400adfd065ae7f92d8cb1bfb80bee581", "model/adapter_config.json",
         "roberta", _c(16, 32, ["value", "query"], "SEQ_CLS", modules_to_save=["classifier", "score"] * 2,
                       peft_version="0.18.0"),
         "RoBERTa SEQ_CLS: modules_to_save listed twice; the classifier is a tree (dense, out_proj)"),
    Case("serhandenizhan/ariza-tespit-siniflandirici", "a5d8a24e0b7ac076c7157d7641a3ff28252d271f",
         "model/adapter_config.json", "bert", _c(16, 32, ["query", "value"], "SEQ_CLS",
                                                 modules_to_save=["classifier", "classifier", "score"],
                                                 peft_version="0.20.0"), "BERT SEQ_CLS, PEFT 0.20"),
    Case("Neoville026/chatbotkesehatanmentalbertpeftlora", "1c45ae020503b322d8edeb6a4ecb0b72c22a6404",
         "model/adapter_config.json", "bert", _c(64, 128, ["value", "query"], "SEQ_CLS",
                                                 modules_to_save=["classifier", "score"]), "BERT SEQ_CLS, r=64"),
    Case("armaan-vala/hinglish-toxicity-detector", "a315f426fe54da690064930afa3482f6384fd7fc",
         "model/adapter_config.json", "llama", _c(16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"],
         peft_version="0.19.1", auto_mapping={"base_model_class": "LlamaForCausalLM", "unsloth_fixed": True}),
         "unsloth's llamafied Phi-3.5 (split q/k/v, auto_mapping LlamaForCausalLM): merge into that base, not "
         "transformers' phi3 (fused qkv_proj)"),
    Case("sherryxzhao/lora_alpaca", "813e17dd0b511bf51319c2fa7282d087d37bf240", "output/adapter_config.json",
         "llama", _c(8, 32, ["q_proj", "v_proj"], enable_lora=None, merge_weights=False),
         "alpaca-lora (PEFT 0.2/0.3 config, LLaMA-1)", weights="adapter_model.bin"),
    Case("darwinj07/KoAlpaca-lora", "6aa8c1885fb7b68ff75f66e9d93b18e51cb509fc", "output/adapter_config.json",
         "llama", _c(8, 16, ["q_proj", "v_proj"], enable_lora=None, merge_weights=False, init_lora_weights=True),
         "KoAlpaca (PEFT 0.3 config)", weights="adapter_model.bin"),
    Case("yangtianyo/Hate-Speech-Detection-20221082009", "1ad7e35d7580e3762856ba669c533c60922a1f5d",
         "output/adapter_config.json", "qwen2", _c(8, 16, ["k_proj", "o_proj", "v_proj", "q_proj"]),
         "base_model_name_or_path \"models\" (a local folder): the base must be given"),
    Case("mnenadoeloo/t5-base-sum", "205c853593883715a150f08be4aaa793778a54be", "model/adapter_config.json", "t5",
         _c(16, 32, ["k", "q", "v"], "SEQ_2_SEQ_LM"), "flan-t5 q/k/v only"),
    Case("Azreal18/Phi2-finetuning", "c9025a7adb0255b11484c36717265894c0c79756", "model/adapter_config.json", "phi",
         _c(8, 16, ["fc1", "q_proj", "v_proj", "fc2"]), "phi-2 attention + MLP"),
    Case("Umar-khan4260/Text-Classification", "164bde172ae8df4dc768e0be034436a5fa1d0bf8", "model/adapter_config.json",
         None, {}, "skipped: adapter_config.json is a Git LFS pointer"),
    Case("AnHuanAo/qwythos-9b-math-sft", "ec386c6d9063c3e560259084b263b836d6891095", "adapter_config.json", None,
         _c(16, 32, ["q_proj", "v_proj", "down_proj", "linear_fc2", "in_proj_qkv", "attn.proj"], "SEQ_2_SEQ_LM"),
         "a hybrid (linear-attention + vision) 9B with task_type SEQ_2_SEQ_LM on a causal model: not run"),
]
# fmt: on


def _build(case: Case, seed: int):
    import transformers

    torch.manual_seed(seed)
    if case.arch == "unet":
        from diffusion_models import sd1_unet

        return sd1_unet(seed)
    config = transformers.AutoConfig.for_model(case.arch, **{**ARCHS[case.arch], **case.extra})
    auto = case.auto or _AUTO.get(case.config.get("task_type") or "CAUSAL_LM", "AutoModelForCausalLM")
    model_class = getattr(transformers, auto)
    return (model_class.from_config(config) if auto.startswith("Auto") else model_class(config)).eval()


def _write_adapter(case: Case, folder: Path) -> None:
    """PEFT's own adapter for the config as written (PEFT reads the config), saved, then the config put back."""
    from conftest import randomize_adapter
    from peft import PeftConfig, get_peft_model

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(case.config))
    config = PeftConfig.from_pretrained(folder)
    model = get_peft_model(_build(case, 0), config)
    randomize_adapter(model, 1)
    model.save_pretrained(folder, safe_serialization=case.weights.endswith(".safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(case.config))  # as written, not as PEFT re-wrote it


def _peft_merged(case: Case, base: Path, adapter: Path) -> dict:
    from peft import PeftModel

    model = _build(case, 0)
    model.load_state_dict(_load(base), strict=False)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload(safe_merge=True)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _load(base: Path) -> dict:
    from conftest import load_state

    return load_state(base)


def run_case(case: Case, root: Path) -> tuple[str, str]:
    """(outcome, detail) for one case: merged equal to PEFT (max ulp), refused by both, or not run."""
    from ulp import max_ulp

    import lora_tools

    if case.arch is None:
        return "not run", case.why
    base, adapter = root / "base", root / "adapter"
    _build(case, 0).save_pretrained(base)
    try:
        _write_adapter(case, adapter)
    except Exception as exc:  # PEFT cannot build the adapter for this config on this architecture
        ours = _ours_without_weights(case)
        return "PEFT refuses", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}{ours}"
    try:
        report = lora_tools.merge(base, [adapter], root / "merged", device="cpu")
    except Exception as exc:
        return "lora_tools refuses", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    ours, theirs = _load(root / "merged"), _peft_merged(case, base, adapter)
    worst = max(max_ulp(t, theirs[n].to(t.dtype)) for n, t in ours.items() if n in theirs)
    missing = sorted(set(ours) - set(theirs))
    note = f"; warnings: {report.warnings}" if report.warnings else ""
    return (
        "merged = PEFT" if worst <= 1 else f"differs ({worst} ulp)"
    ), f"{report.tensors_changed} tensors, max {worst} ulp{note}{' missing ' + str(missing) if missing else ''}"


def _ours_without_weights(case: Case) -> str:
    return ""


def main() -> None:
    rows = []
    for case in CORPUS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome, detail = run_case(case, Path(tmp))
            except Exception:
                outcome, detail = "harness error", traceback.format_exc().splitlines()[-1]
        rows.append((case, outcome, detail))
        print(f"| {case.repo} | `{case.commit[:10]}` | {case.path} | {outcome} | {case.why}; {detail} |", flush=True)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
