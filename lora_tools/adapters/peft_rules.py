r"""PEFT's rules for what an adapter folder means, as data: read from PEFT's source, with the version each is from.

PEFT decides several things from the model it loads into, not from `adapter_config.json`
alone. A merge that reads only the config gets them wrong, silently in one case (a square
GPT-2 `Conv1D` merged untransposed). The rules here are the ones a loader must apply to
read a folder the way `PeftModel.from_pretrained` does:

| rule | what PEFT does | where (PEFT version read) |
|---|---|---|
| Conv1D orientation | `fan_in_fan_out` is forced to true on transformers' `Conv1D` and to false on `nn.Linear`, whatever the config says (a warning, then the forced value) | `tuners/lora/layer.py` `dispatch_default` (0.21.2) |
| implicit modules to save | `SEQ_CLS` and `TOKEN_CLS` add `classifier` and `score` to `modules_to_save`, `QUESTION_ANS` adds `qa_outputs`, even when the config says `null` | `peft_model.py` `PeftModelFor….__init__` (0.21.2) |
| suffix matching of `modules_to_save` | a module is saved when its path *ends with* a listed name as a string: `classifier` also covers DistilBERT's `pre_classifier` | `utils/other.py` `_set_trainable` (0.21.2) |
| whole sub-module trees | a saved module is saved whole: RoBERTa's `classifier` is `classifier.dense.*` and `classifier.out_proj.*` | `utils/other.py` `ModulesToSaveWrapper` (0.21.2) |
| suffix matching of `target_modules` | a list entry matches the whole path or a dotted suffix (`q_proj` matches `….q_proj`, not `…xq_proj`); a string is a full regex match; factors of modules it does not match are dropped on loading (lora_tools merges them and warns) | `tuners/tuners_utils.py` `check_target_module_exists` (0.21.2) |
| trained biases | `bias: "all"` saves every `.bias` of the model, `"lora_only"` the biases of adapted layers (keys `….base_layer.bias`); loading puts them back | `tuners/tuners_utils.py` `_get_learnable_bias_state_dict` (0.21.2) |
| DoRA magnitude key | `lora_magnitude_vector` was a parameter in early DoRA releases; it is `lora_magnitude_vector.weight` in memory now and files keep the old key (both are read) | `tuners/lora/model.py` `_remap_adapter_state_dict_for_load` (0.21.2) |
| rank / alpha patterns | a `rank_pattern` / `alpha_pattern` key is a regex matched against the module path at a dot boundary (`(.*\.)?(key)$`), first key wins | `tuners/lora/model.py` via `get_pattern_key` (0.21.2) |
| diffusers metadata | diffusers (0.32+) writes the PEFT `LoraConfig` into the file's `lora_adapter_metadata`, keyed `unet.r`, `transformer.lora_alpha` … in a pipeline's file and unprefixed in a model's | diffusers 0.42 `loaders/lora_base.py` `_save_lora_weights`, `loaders/peft.py` `save_lora_adapter` |
| missing alpha (diffusers) | a diffusers-keyed file with neither alpha tensors nor metadata is scale 1 (alpha = rank for every module); so is kohya's missing `.alpha` | diffusers 0.42 `utils/peft_utils.py` `get_peft_kwargs`, `lora_conversion_utils.py` |
| configured rank | a LoRA layer is built with `r` (or its `rank_pattern` entry) and scaled by alpha over it; factors of another rank do not load (size mismatch) | `tuners/lora/model.py` `_create_and_replace` (0.21.2) |
| PEFT 0.2 `MergedLinear` | `enable_lora` with grouped `lora_B` (a Conv1d of shape [out, r, 1]); current PEFT has no such layer and 0.21 cannot load it (size mismatch) | PEFT 0.2.0 `tuners/lora.py` |

Everything here is names and data; `peft.py` and `planning/orientation.py` apply it.
"""

from __future__ import annotations

__all__ = [
    "CONV1D_MODULES",
    "CONV1D_ARCHITECTURES",
    "TASK_MODULES_TO_SAVE",
    "LEGACY_KEY_SUFFIXES",
    "MERGED_LINEAR_REASON",
    "conv1d_names",
    "known_class",
    "implicit_modules_to_save",
    "saved_module",
    "target_module_matches",
    "WRAPPER_COPY",
    "saved_tensor",
    "merged_linear_modules",
    "pattern_key",
    "METADATA_KEY",
    "metadata_config",
    "alpha_is_rank",
]

#: transformers model types whose listed module names are `pytorch_utils.Conv1D` (weight stored in×out).
#: Read from transformers 5 `models/*/modeling_*.py`; every other layer of these models, and every layer of
#: every other transformers model, is `nn.Linear` (gpt_bigcode uses the same names as `nn.Linear`).
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "q_attn", "c_proj", "c_fc"}),
    "clvp": frozenset({"c_fc", "c_proj"}),  # the decoder's MLP only
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}

#: An `architectures` class name prefix → its model type, for configs that name a class but no model type.
CONV1D_ARCHITECTURES: dict[str, str] = {
    "GPT2": "gpt2",
    "OpenAIGPT": "openai-gpt",
    "ImageGPT": "imagegpt",
    "DecisionTransformer": "decision_transformer",
    "Clvp": "clvp",
}

#: task_type → the module names PEFT adds to `modules_to_save` (PeftModelFor… classes, PEFT 0.21.2).
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

#: Key endings older PEFT versions wrote that mean the same as today's (old → new role name).
LEGACY_KEY_SUFFIXES: dict[str, str] = {
    ".lora_magnitude_vector": "magnitude",  # early DoRA's parameter, still the file key in 0.21
}

#: Why a PEFT 0.2 `MergedLinear` adapter (`enable_lora`, `lora_B` [out, r, 1]) is refused by inspect and merge.
MERGED_LINEAR_REASON = (
    "a PEFT 0.2 MergedLinear adapter (enable_lora, lora_B as a grouped conv [out, r, 1]): current PEFT has no such "
    "layer and PEFT 0.21 cannot load it; re-train or re-save it with a current PEFT"
)


def _model_types(config: dict | None) -> set[str]:
    """Every model type a config names, its sub-configs (text, decoder, encoder…) and architectures included."""
    found: set[str] = set()
    stack = [config] if isinstance(config, dict) else []
    while stack:
        current = stack.pop()
        if isinstance(current.get("model_type"), str):
            found.add(current["model_type"])
        for arch in current.get("architectures") or []:
            found |= {
                t for prefix, t in CONV1D_ARCHITECTURES.items() if isinstance(arch, str) and arch.startswith(prefix)
            }
        stack += [value for value in current.values() if isinstance(value, dict)]
    return found


def conv1d_names(config: dict | None) -> frozenset[str]:
    """Module names that are transformers `Conv1D` in the model this config describes."""
    names: set[str] = set()
    for model_type in _model_types(config):
        names |= CONV1D_MODULES.get(model_type, frozenset())
    return frozenset(names)


def known_class(config: dict | None) -> bool:
    """True when the config names a transformers model whose layer classes we know (no custom code)."""
    return bool(_model_types(config)) and not (config or {}).get("auto_map")


def implicit_modules_to_save(config: dict) -> list[str]:
    """`modules_to_save` as PEFT uses it: the config's names plus those its task type adds."""
    listed = config.get("modules_to_save") or []
    listed = [listed] if isinstance(listed, str) else list(listed)
    extra = TASK_MODULES_TO_SAVE.get(str(config.get("task_type") or ""), ())
    return listed + [name for name in extra if name not in listed]


def saved_module(path: str, names: list[str]) -> str | None:
    """The module of `path` PEFT saves whole, or None: the shortest leading part that ends with a listed name.

    PEFT's test is a plain string suffix (`key.endswith(name)`), so `classifier` also covers `pre_classifier`,
    and a saved module's sub-modules (`classifier.dense`) are saved with it.
    """
    parts = path.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if any(candidate.endswith(name) for name in names):
            return candidate
    return None


def target_module_matches(target_modules: str | list[str] | None, path: str) -> bool:
    """PEFT's `target_modules` test: a regex fully matching the path, or a name equal to it or a dotted suffix."""
    import re

    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return path in target_modules or any(path.endswith(f".{name}") for name in target_modules)


#: `saved_tensor`'s answer for a copy PEFT's wrapper saves beside the trained tensor (nothing to merge).
WRAPPER_COPY = ("", "wrapper copy")

_BIAS_MODES = ("all", "lora_only")


def saved_tensor(stripped_key: str, config: dict, to_save: list[str]) -> tuple[str, str] | None:
    """What a non-LoRA key of a PEFT file replaces, by PEFT's rules: (base tensor, origin), `WRAPPER_COPY`, or None.

    `stripped_key` is the key without `base_model.model.`; `to_save` is `implicit_modules_to_save(config)`.
    """
    parts = stripped_key.split(".")
    for index, part in enumerate(parts[:-1]):
        if part in ("modules_to_save", "original_module") and saved_module(".".join(parts[:index]), to_save):
            return WRAPPER_COPY  # `X.modules_to_save.default.…` / `X.original_module.…`: `X.…` holds the values
    if saved_module(stripped_key.rpartition(".")[0], to_save) is not None:
        return stripped_key, "modules_to_save"
    if parts[-1] == "bias" and config.get("bias") in _BIAS_MODES:
        return stripped_key.replace(".base_layer.bias", ".bias"), f"trained bias (bias: {config['bias']})"
    return None


def merged_linear_modules(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> list[str]:
    """Modules whose factors are PEFT 0.2 `MergedLinear`'s: a 2-D lora_A with a 3-D lora_B ([out, r, 1])."""
    return [name for name, (a, b) in shapes.items() if len(a) == 2 and len(b) == 3]


def pattern_key(patterns: dict, module: str) -> str | None:
    """The first key of a PEFT rank/alpha pattern that matches `module` (PEFT's rule: regex anchored at a dot)."""
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


#: The safetensors metadata entry where diffusers records the PEFT LoraConfig of the LoRA it saved.
METADATA_KEY = "lora_adapter_metadata"


def metadata_config(metadata: dict[str, str], component: str | None) -> dict | None:
    """The PEFT config diffusers recorded for `component` (its `unet.` … entries; unprefixed ones for a lone model).

    None when the file has no `lora_adapter_metadata`, or it is not a JSON object, or it says nothing for the component.
    """
    import json

    raw = metadata.get(METADATA_KEY)
    try:
        recorded = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(recorded, dict):
        return None
    prefixed = {k.partition(".")[0] for k in recorded if "." in k and not k.startswith(".")}
    if component is not None and component in prefixed:
        return {k[len(component) + 1 :]: v for k, v in recorded.items() if k.startswith(f"{component}.")}
    own = {k: v for k, v in recorded.items() if "." not in k}
    return own or None


def alpha_is_rank(ranks: dict[str, int]) -> dict:
    """Config entries giving every module alpha = its own rank (scale 1): diffusers' rule for a missing alpha."""
    import re
    from collections import Counter

    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    return {
        "lora_alpha": common,
        "alpha_pattern": {f"^{re.escape(m)}": r for m, r in ranks.items() if r != common},
    }
