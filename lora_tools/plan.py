"""Pure planning: which adapter tensors change which base tensors, and where outputs go.

Nothing here reads tensor data. Functions take names, shapes and dtypes (the
`TensorInfo`s of headers) and return plain data, so they are tested with
hand-written shapes and no torch work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from .adapters.reading import Adapter, LoraModule, Replacement
from .errors import IncompatibleError, InvalidInputError, UnsupportedError
from .fp8 import fp8_problems, mergeable_dtype
from .io.safetensors_io import DTYPE_SIZES, TensorInfo
from .layouts.relayout import LayoutTargets, Located, Piece, located_problems
from .layouts.transformers import tied_names
from .layouts.vocab import resized_base

__all__ = [
    "OUTPUT_DTYPES",
    "Term",
    "TensorTask",
    "MergePlan",
    "resolve_module",
    "compatibility_problems",
    "Targets",
    "variant_delta_shape",
    "weight_tensor",
    "with_tied_head",
    "head_name",
    "plan_merge",
    "plan_shards",
    "shard_file_names",
]

#: `--dtype` spellings → safetensors dtype names.
OUTPUT_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}

HEAD_NAME = "lm_head.weight"  # a text model's; `head_name(config)` is the checkpoint's own (a VLM's is nested)
#: Ends the origin of an embedding replacement whose lm_head copy is identical, so the tie holds.
TIED = "(tied)"


def resolve_module(module: str, base_names: Mapping[str, object] | set[str]) -> str | None:
    """The base module path an adapter module names, or None.

    Tries the path as is, then with leading components dropped (adapters saved
    from a wrapper model), then base paths that extend it at the front (bases
    saved from a wrapper). A suffix that fits several base modules is None.
    """
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if f"{candidate}.weight" in base_names:
            return candidate
    matches = [n[: -len(".weight")] for n in base_names if n.endswith(f".{module}.weight")]
    return matches[0] if len(matches) == 1 else None


def _expected_ab(module: LoraModule, weight_shape: tuple[int, ...]) -> tuple[tuple, tuple] | None:
    """The A and B shapes the base weight demands, or None when the layouts cannot match."""
    r = module.rank
    if module.kind == "embedding":
        if len(weight_shape) != 2:
            return None
        num, dim = weight_shape
        return (r, num), (dim, r)
    if module.kind == "conv":
        if len(weight_shape) < 3:
            return None
        out, rest = weight_shape[0], weight_shape[1:]
        return (r, *rest), (out, r, *([1] * (len(weight_shape) - 2)))
    if len(weight_shape) != 2:
        return None
    out, inp = (weight_shape[1], weight_shape[0]) if module.fan_in_fan_out else weight_shape
    return (r, inp), (out, r)


def _out_features(module: LoraModule, weight_shape: tuple[int, ...]) -> int:
    if module.kind == "embedding":
        return weight_shape[1]
    return weight_shape[1] if module.fan_in_fan_out else weight_shape[0]


def with_tied_head(base: Mapping[str, TensorInfo], config: dict | None) -> Mapping[str, TensorInfo]:
    """`base` plus the lm_head a tied checkpoint omits, so adapters on lm_head find their target."""
    tied, head = tied_embedding(base, config), head_name(config)
    if tied is None:
        return base
    return {**base, head: replace(base[tied], name=head)}


class Targets:
    """Finds the base module an adapter module names: dotted paths, or kohya's underscored ones.

    kohya names are matched the way sd-scripts makes them: the base's own dotted
    module paths with dots turned into underscores (with or without a leading
    `text_model.`, which transformers versions disagree on). A name two base
    modules share is ambiguous and matches neither.
    """

    def __init__(self, base: Mapping[str, TensorInfo]) -> None:
        self.base = base
        self._kohya: dict[str, str | None] | None = None
        self.layout = LayoutTargets(base)

    def located(self, module: LoraModule) -> Located | None:
        """Where a module lands through the base's diffusion layout (the other naming, fused projections)."""
        if self.layout.layout is None or (not self.layout.original_side and self._own(module) is not None):
            return None
        return self.layout.locate(module)

    def find(self, module: LoraModule) -> str | None:
        if module.variant == "experts":  # names its fused tensor itself (`…experts.gate_up_proj`)
            return module.name if module.name in self.base else None
        located = self.located(module)
        return located.whole if located is not None else self._own(module)

    def _own(self, module: LoraModule) -> str | None:
        if not module.kohya_name:
            return resolve_module(module.name, self.base)
        return self.kohya_index().get(module.name)

    def ambiguous(self, module: LoraModule) -> bool:
        return module.kohya_name and module.name in self.kohya_index() and self.kohya_index()[module.name] is None

    def kohya_index(self) -> dict[str, str | None]:
        if self._kohya is None:
            index: dict[str, str | None] = {}
            for name in self.base:
                if not name.endswith(".weight"):
                    continue
                path = name[: -len(".weight")]
                spellings = {path.replace(".", "_")}
                if path.startswith("text_model."):
                    spellings.add(path[len("text_model.") :].replace(".", "_"))
                else:
                    spellings.add("text_model_" + path.replace(".", "_"))
                for spelling in spellings:
                    index[spelling] = path if index.get(spelling, path) == path else None
            self._kohya = index
        return self._kohya


def weight_tensor(module: LoraModule, target: str) -> str:
    """The base tensor a module's ΔW lands on: `{target}.weight`, or a fused experts tensor itself."""
    return target if module.variant == "experts" else f"{target}.weight"


def variant_delta_shape(module: LoraModule, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of ΔW a Tucker / LoHa / LoKr module builds, from its factor shapes alone."""
    try:
        if module.variant == "experts":
            a, b = shapes["A"], shapes["B"]
            inner_outer = (a[1], b[0]) if module.fan_in_fan_out else (b[0], a[1])
            return (a[0] // module.rank, *inner_outer)
        if module.variant == "tucker":
            up, mid, down = shapes["up"], shapes["mid"], shapes["down"]
            return (up[0], down[1], *mid[2:])
        if module.variant == "loha":
            if "t1" in shapes:
                return (shapes["w1a"][1], shapes["w1b"][1], *shapes["t1"][2:])
            return (shapes["w1a"][0], math.prod(shapes["w1b"][1:]))
        if module.variant == "full":
            return tuple(shapes["diff"]) if "diff" in shapes else None
        if module.variant == "lokr":
            w1 = shapes["k1"] if "k1" in shapes else (shapes["k1a"][0], shapes["k1b"][1])
            if "k2" in shapes:
                w2 = shapes["k2"]
            elif "kt2" in shapes:
                w2 = (shapes["k2a"][1], shapes["k2b"][1], *shapes["kt2"][2:])
            else:
                w2 = (shapes["k2a"][0], *shapes["k2b"][1:])
            w1 = tuple(w1) + (1,) * (len(w2) - len(w1))
            return tuple(a * b for a, b in zip(w1, w2, strict=True))
    except (KeyError, IndexError, ValueError):
        return None
    return None


def _fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """ΔW fits a weight of the same shape, or a conv weight it equals once flattened (LoHa on conv)."""
    return tuple(delta) == tuple(weight) or (
        len(delta) >= 2 and delta[0] == weight[0] and math.prod(delta) == math.prod(weight)
    )


def _module_problems(adapter: Adapter, module: LoraModule, base: Mapping[str, TensorInfo], target: str) -> list[str]:
    weight = base[weight_tensor(module, target)]
    if mergeable_dtype(weight.dtype):  # a plain float8 cast: merged in fp32, rounded back once
        problems = fp8_problems(module.name, target, base)
        if problems:
            return problems
    elif not weight.is_float:
        return [f"{module.name}: base weight is {weight.dtype}, not a float tensor"]
    if module.variant == "full":
        return _full_problems(adapter, module, base, target)
    if module.variant != "lora":
        shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
        shapes.update({"up": module.b_shape, "down": module.a_shape} if module.variant == "tucker" else {})
        delta = variant_delta_shape(module, shapes)
        if delta is None or not _fits(delta, weight.shape):
            found = ", ".join(f"{role} {list(shape)}" for role, shape in sorted(shapes.items()))
            return [
                f"{module.name}: shape mismatch, base {target}.weight is {list(weight.shape)} but the "
                f"{module.variant} factors ({found}) make {list(delta) if delta else 'no valid'} ΔW"
            ]
        return _dora_problems(adapter, module, weight.shape)
    a_shape, b_shape = module.a_shape, module.b_shape
    if len(b_shape) < 2 or b_shape[1] != module.rank:
        return [f"{module.name}: rank mismatch, A {list(a_shape)} has rank {module.rank} but B is {list(b_shape)}"]
    expected = _expected_ab(module, weight.shape)
    if expected is None or (tuple(a_shape), tuple(b_shape)) != expected:
        want = f"A {list(expected[0])}, B {list(expected[1])}" if expected else f"a {module.kind} weight"
        return [
            f"{module.name}: shape mismatch, base {target}.weight is {list(weight.shape)} so expected {want}, "
            f"found A {list(a_shape)}, B {list(b_shape)}"
        ]
    problems = _dora_problems(adapter, module, weight.shape)
    if module.bias_key is not None:
        out = _out_features(module, weight.shape)
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
        channels, what = _out_features(module, weight_shape), "outputs"
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
    base = with_tied_head(base, config)
    targets = Targets(base)
    problems = [f"{key}: not a key lora_tools understands" for key in adapter.unknown_keys]
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
        problems.extend(_module_problems(adapter, module, base, target))
    for item in adapter.replacements:
        problems.extend(_replacement_problems(adapter, item, base))
    return problems


def _replacement_problems(adapter: Adapter, item: Replacement, base: Mapping[str, TensorInfo]) -> list[str]:
    target = _resolve_tensor(item.target, base)
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


def _resolve_tensor(name: str, base: Mapping[str, TensorInfo]) -> str | None:
    if name in base:
        return name
    module, _, leaf = name.rpartition(".")
    resolved = resolve_module(module, base) if leaf == "weight" else None
    return f"{resolved}.weight" if resolved is not None else None


@dataclass(frozen=True)
class Term:
    """Adapter `adapter` contributes weight·ΔW of `module` to a tensor (`bias` for lora_B.bias)."""

    adapter: int
    module: LoraModule
    weight: float
    bias: bool = False
    piece: Piece | None = None


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is produced from the base (`source`) and the adapters."""

    name: str
    source: str
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    terms: tuple[Term, ...] = ()
    replacements: tuple[tuple[int, Replacement, float], ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.terms or self.replacements)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.out_dtype]

    @property
    def dora(self) -> Term | None:
        return next((t for t in self.terms if t.module.dora and not t.bias), None)


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor in order, the shards they go to, and what the config must say."""

    tasks: list[TensorTask]
    shards: list[list[int]]
    untie_embeddings: bool = False
    warnings: list[str] = field(default_factory=list)
    vocab_size: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


def tied_embedding(base: Mapping[str, TensorInfo], config: dict | None) -> str | None:
    """The input-embedding tensor lm_head shares, when the base ties them and omits lm_head."""
    embeddings, head = tied_names(config)
    if head in base or not (config or {}).get("tie_word_embeddings", True):
        return None
    return next((name for name in embeddings if name in base), None)


def head_name(config: dict | None) -> str:
    """The lm_head tensor as the checkpoint names it (`language_model.lm_head.weight` for a Llava or Gemma 3)."""
    return tied_names(config)[1]


def plan_merge(
    base: Mapping[str, TensorInfo],
    config: dict | None,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    output_dtype: str | None = None,
    max_shard_size: int = 5_000_000_000,
    unmerge: bool = False,
    allow_unmatched: bool = False,
) -> MergePlan:
    """Pair every adapter tensor with the base tensor it changes.

    Args:
        base: the base checkpoint's tensors, in storage order.
        config: the base's config.json, for weight tying.
        adapters, weights: the adapters and their weights wᵢ (W' = W + Σ wᵢ·ΔWᵢ).
        output_dtype: a safetensors dtype for every float tensor, or None to keep each.
        max_shard_size: bytes per output shard.
        unmerge: plan W = W' − Σ wᵢ·ΔWᵢ instead.
        allow_unmatched: leave out (with a warning) adapter modules that match nothing in the base.

    Raises:
        IncompatibleError: listing every adapter tensor that does not fit.
        UnsupportedError: a combination that cannot be computed faithfully.
    """
    if len(weights) != len(adapters):
        raise InvalidInputError(
            f"got {len(weights)} --weight values for {len(adapters)} adapters; give one per adapter"
        )
    base, vocab_size = resized_base(base, adapters, _resolve_tensor)  # embeddings an adapter grows (new tokens)
    problems = []
    for adapter in adapters:
        found = compatibility_problems(adapter, base, config, allow_unmatched=allow_unmatched)
        problems += [f"{adapter.path}: {p}" for p in found]
    if problems:
        hint = "" if allow_unmatched else " (--allow-unmatched merges the rest when names match nothing)"
        raise IncompatibleError(f"{len(problems)} problem(s) between adapter and base{hint}", problems)
    targets = Targets(with_tied_head(base, config))

    sign = -1.0 if unmerge else 1.0
    terms: dict[str, list[Term]] = {}
    replaced: dict[str, list[tuple[int, Replacement, float]]] = {}
    warnings: list[str] = []
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        unmatched = 0
        for module in adapter.modules:
            located = targets.located(module)
            if located is not None and located.whole is None:  # row blocks of other weights (fused projections)
                for weight_name, bias_name, piece in located.parts:
                    if module.variant != "full" or module.factor("diff") is not None:
                        terms.setdefault(weight_name, []).append(Term(index, module, sign * weight, piece=piece))
                    if module.bias_key is not None:
                        terms.setdefault(bias_name, []).append(Term(index, module, sign * weight, True, piece))
                continue
            target = targets.find(module)
            if target is None:
                unmatched += 1
                continue
            if module.variant != "full" or module.factor("diff") is not None:  # `.diff_b` alone: the bias only
                terms.setdefault(weight_tensor(module, target), []).append(Term(index, module, sign * weight))
            if module.bias_key is not None:
                terms.setdefault(f"{target}.bias", []).append(Term(index, module, sign * weight, bias=True))
        for item in adapter.replacements:
            replaced.setdefault(_resolve_tensor(item.target, targets.base), []).append((index, item, weight))
        if unmatched:
            warnings.append(
                f"{adapter.path}: {unmatched} of {len(adapter.modules)} modules match nothing in the base and were "
                "left out (--allow-unmatched)"
            )

    _check_combinations(adapters, terms, replaced, unmerge)

    tied, head = tied_embedding(base, config), head_name(config)
    untie = tied is not None and (head in terms or head in replaced or _changes_embedding(tied, terms, replaced))
    tasks: list[TensorTask] = []

    def add(name: str, source: str) -> None:
        info = base[source]
        castable = info.is_float or mergeable_dtype(info.dtype)
        out_dtype = output_dtype if output_dtype is not None and castable else info.dtype
        tasks.append(
            TensorTask(
                name,
                source,
                info.shape,
                info.dtype,
                out_dtype,
                tuple(terms.get(name, ())),
                tuple(replaced.get(name, ())),
            )
        )

    for name in base:
        add(name, name)
        if untie and name == tied:
            add(head, tied)
            warnings.append(
                f"the base ties lm_head to {tied} and an adapter changes one of them: "
                "both are written and tie_word_embeddings is set to false in config.json"
            )
    shards = plan_shards([task.nbytes for task in tasks], max_shard_size)
    return MergePlan(tasks, shards, untie, warnings, vocab_size)


def _changes_embedding(tied: str, terms: dict, replaced: dict) -> bool:
    """True when the tied embedding changes in a way lm_head must not follow (trainable tokens it follows)."""
    if tied in terms:
        return True
    return any(item.rows is None and not item.origin.endswith(TIED) for _, item, _ in replaced.get(tied, ()))


def _check_combinations(adapters: Sequence[Adapter], terms: dict, replaced: dict, unmerge: bool) -> None:
    problems: list[str] = []
    for name, items in terms.items():
        dora = [t for t in items if t.module.dora and not t.bias]
        if dora and (len(items) > 1 or abs(dora[0].weight) != 1.0):
            problems.append(f"{name}: a DoRA module merges alone with weight 1 (DoRA is not additive)")
    for name, items in replaced.items():
        whole = [i for i in items if i[1].rows is None and i[1].origin != "saved base layer"]
        if len(whole) > 1:
            problems.append(f"{name}: replaced by {len(whole)} adapters' modules_to_save; merge them separately")
        if unmerge and any(i[1].origin != "saved base layer" for i in items):
            origin = items[0][1].origin
            problems.append(
                f"{name}: {adapters[items[0][0]].path} replaced it ({origin}); the original values are not in the "
                "merged model, so it cannot be un-merged"
            )
    if problems:
        raise UnsupportedError("; ".join(problems))


def plan_shards(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Cut tensors (by index, in order) into shards of at most `max_bytes`, like transformers.

    A tensor larger than `max_bytes` gets a shard of its own.
    """
    if max_bytes <= 0:
        raise InvalidInputError(f"--max-shard-size must be positive, got {max_bytes}")
    shards: list[list[int]] = [[]]
    current = 0
    for index, size in enumerate(sizes):
        if shards[-1] and current + size > max_bytes:
            shards.append([])
            current = 0
        shards[-1].append(index)
        current += size
    return shards


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    """`model.safetensors` for one shard, else `model-0000i-of-0000N.safetensors`."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
