"""Every way an adapter fits a base badly, as readable lines: names, shapes, dtypes, DoRA, replacements (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ..adapters.model import Adapter, LoraModule, Replacement
from ..adapters.tuners import tuner_of_variant, tuner_problems
from ..io.safetensors_header import TensorInfo
from ..layouts.relayout import Located
from ..quant.float8_casts import fp8_problems, mergeable_dtype
from .orientation import oriented
from .shapes import expected_factor_shapes, fits, out_features, variant_delta_shape
from .targets import Targets, resolve_tensor, weight_tensor, with_tied_head

__all__ = ["compatibility_problems", "module_problems", "located_problems", "unknown_key_problem"]


def module_problems(adapter: Adapter, module: LoraModule, base: Mapping[str, TensorInfo], target: str) -> list[str]:
    weight = base[weight_tensor(module, target)]
    if mergeable_dtype(weight.dtype):  # a plain float8 cast: merged in fp32, rounded back once
        problems = fp8_problems(module.name, target, base)
        if problems:
            return problems
    elif not weight.is_float:
        return [f"{module.name}: base weight is {weight.dtype}, not a float tensor"]
    if module.variant == "full":
        return _full_problems(adapter, module, base, target)
    if tuner_of_variant(module.variant) is not None:  # PEFT's other tuners: their own rows
        found = tuner_problems(module, {role: adapter.tensors[key].shape for role, key in module.factors}, weight.shape)
        return [f"{module.name}: does not fit base {target}.weight {list(weight.shape)}: {found}"] if found else []
    if module.variant != "lora":
        shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
        shapes.update({"up": module.b_shape, "down": module.a_shape} if module.variant == "tucker" else {})
        delta = variant_delta_shape(module, shapes)
        if delta is None or not fits(delta, weight.shape):
            found = ", ".join(f"{role} {list(shape)}" for role, shape in sorted(shapes.items()))
            return [
                f"{module.name}: shape mismatch, base {target}.weight is {list(weight.shape)} but the "
                f"{module.variant} factors ({found}) make {list(delta) if delta else 'no valid'} ΔW"
            ]
        return _dora_problems(adapter, module, weight.shape)
    a_shape, b_shape = module.a_shape, module.b_shape
    if len(b_shape) < 2 or b_shape[1] != module.rank:
        return [f"{module.name}: rank mismatch, A {list(a_shape)} has rank {module.rank} but B is {list(b_shape)}"]
    expected = expected_factor_shapes(module, weight.shape)
    if expected is None or (tuple(a_shape), tuple(b_shape)) != expected:
        want = f"A {list(expected[0])}, B {list(expected[1])}" if expected else f"a {module.kind} weight"
        return [
            f"{module.name}: shape mismatch, base {target}.weight is {list(weight.shape)} so expected {want}, "
            f"found A {list(a_shape)}, B {list(b_shape)}"
        ]
    problems = _dora_problems(adapter, module, weight.shape)
    if module.bias_key is not None:
        out = out_features(module, weight.shape)
        bias = base.get(f"{target}.bias")
        found = adapter.tensors[module.bias_key].shape
        if bias is None:
            problems.append(f"{module.name}: adapter has lora_B.bias but base has no {target}.bias")
        elif tuple(found) != (out,) or tuple(bias.shape) != (out,):
            problems.append(f"{module.name}: lora_B.bias is {list(found)}, base bias is {list(bias.shape)}")
    return problems


def _full_problems(adapter: Adapter, module: LoraModule, base: Mapping[str, TensorInfo], target: str) -> list[str]:
    """`.diff` must be the weight's shape and `.diff_b` the bias' (LyCORIS full / ComfyUI difference keys)."""
    problems = []
    for key, tensor in ((module.factor("diff"), f"{target}.weight"), (module.bias_key, f"{target}.bias")):
        if key is None:
            continue
        found, want = adapter.tensors[key].shape, base[tensor].shape if tensor in base else None
        if want is None or tuple(found) != tuple(want):
            problems.append(f"{key}: is {list(found)} but base {tensor} is {list(want) if want else 'missing'}")
    return problems


def _dora_problems(adapter: Adapter, module: LoraModule, weight_shape: tuple[int, ...]) -> list[str]:
    if module.magnitude_key is None:
        return []
    if module.kind == "embedding":
        return [f"{module.name}: DoRA on embedding layers is not supported"]
    if module.dora_axis == "in":
        channels, what = weight_shape[1], "inputs"
    else:
        channels, what = out_features(module, weight_shape), "outputs"
    entries = adapter.tensors[module.magnitude_key].numel
    if entries != channels:
        return [f"{module.name}: DoRA magnitude has {entries} entries, the layer has {channels} {what}"]
    return []


def compatibility_problems(
    adapter: Adapter, base: Mapping[str, TensorInfo], config: dict | None = None, *, allow_unmatched: bool = False
) -> list[str]:
    """Every way `adapter` fits `base` badly, as readable lines (empty when it fits).

    With `allow_unmatched`, modules that match no base module are not problems
    (the merge leaves them out and says how many).
    """
    adapter, problems = oriented(adapter, base, config)  # Conv1D or nn.Linear: the base decides
    base = with_tied_head(base, config)
    targets = Targets(base)
    problems = [unknown_key_problem(key) for key in adapter.unknown_keys] + problems
    for module in adapter.modules:
        located = targets.located(module)
        if located is not None and located.whole is None:
            problems.extend(located_problems(adapter, module, base, located))
            continue
        target = targets.find(module)
        if target is None:
            if targets.ambiguous(module):
                problems.append(f"{module.name}: matches several base modules (ambiguous kohya name)")
            elif not allow_unmatched:
                looked = (
                    f"any module named {module.name} (dots as underscores)" if module.kohya_name else module.weight_name
                )
                problems.append(f"{module.name}: no such module in the base (looked for {looked})")
            continue
        problems.extend(module_problems(adapter, module, base, target))
    for item in adapter.replacements:
        problems.extend(_replacement_problems(adapter, item, base))
    return problems


def unknown_key_problem(key: str) -> str:
    """The problem line for an adapter key no rule reads, saying what it looks like and what to do."""
    if key.startswith("base_model.model.") and key.rsplit(".", 1)[-1] in ("weight", "bias"):
        return (
            f"{key}: not a key lora_tools understands: a whole tensor that neither modules_to_save, the task_type's "
            "heads nor bias claims; if it should replace the base's, add its module to modules_to_save in "
            "adapter_config.json"
        )
    return f"{key}: not a key lora_tools understands"


def _replacement_problems(adapter: Adapter, item: Replacement, base: Mapping[str, TensorInfo]) -> list[str]:
    target = resolve_tensor(item.target, base)
    found = adapter.tensors[item.key].shape
    if target is None:
        return [f"{item.key}: {item.origin} targets {item.target}, which the base does not have"]
    shape = base[target].shape
    if item.rows is None:
        if tuple(found) != tuple(shape):
            return [f"{item.key}: {item.origin} tensor is {list(found)} but base {target} is {list(shape)}"]
        return []
    if len(shape) != 2 or tuple(found) != (len(item.rows), shape[1]):
        return [f"{item.key}: {len(item.rows)} trainable token rows of {list(found)} do not fit {target} {list(shape)}"]
    bad = [r for r in item.rows if not 0 <= r < shape[0]]
    return [f"{item.key}: token indices {bad} are outside {target}'s {shape[0]} rows"] if bad else []


def located_problems(adapter, module, base: Mapping, located: Located) -> list[str]:
    """What is wrong with merging `module` through `located`: checked as if the base had the module whole."""
    weights = ", ".join(weight for weight, _, _ in located.parts)
    if module.dora:
        return [f"{module.name}: DoRA across a fused projection ({weights}) is not supported; merge into a base "
                "in the adapter's own layout"]  # fmt: skip
    virtual = {f"{module.name}.weight": replace(base[located.parts[0][0]], shape=located.shape)}
    if module.bias_key is not None and all(bias in base for _, bias, _ in located.parts):
        virtual[f"{module.name}.bias"] = replace(base[located.parts[0][1]], shape=located.shape[:1])
    return module_problems(adapter, module, virtual, module.name)
