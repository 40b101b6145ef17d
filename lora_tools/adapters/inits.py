"""How a PEFT LoRA was initialised (`init_lora_weights`), and the LoRA config features a merge cannot keep.

Some initialisations rewrite the base before training (W_res = W − s·B₀A₀); the
adapter then means W_res + s·B·A, not W + s·B·A. The table says, per value PEFT
0.21–0.22 accepts, whether the base was rewritten and whether a merge can recompute W_res
from W alone (PiSSA's full SVD, OLoRA's QR: yes; randomised SVD, CorDA, ASTRA, LoftQ,
LoRA-GA: no, they need random draws, activations, a quantiser or gradients).
aLoRA (`alora_invocation_tokens`) and `layer_replication` are not merged at all: PEFT
0.21 refuses aLoRA, and its merge of replicated layers adds each copy's LoRA into the
weights the copies share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import UnsupportedError

__all__ = [
    "Init",
    "INITS",
    "init_of",
    "merge_refusal",
    "config_features",
    "with_base_init",
    "check_init_field",
    "describe_init",
    "refuse_rewritten_base",
    "ALORA_TOKENS",
    "invocation_tokens",
    "refuse_alora",
]

#: The PEFT config field of an activated LoRA; GGUF carries it as `adapter.alora.invocation_tokens`.
ALORA_TOKENS = "alora_invocation_tokens"

#: What to do with an adapter whose init cannot be recomputed from files.
_CONVERT = (
    "convert it to a plain LoRA when saving it (PEFT: save_pretrained(..., "
    "path_initial_model_for_weight_conversion=<the adapter saved right after init>)) and merge that, "
    "or, if BASE is the residual model saved right after init, pass --residual-base"
)


@dataclass(frozen=True)
class Init:
    """One `init_lora_weights` value and what it means for a merge.

    Attributes:
        name: the value as the config spells it (`True` as "true", a niter variant as "pissa_niter_K").
        title: the method's name for messages ("PiSSA", "OLoRA", …).
        rewrites_base: the base was changed to W − s·B₀A₀ before training.
        redo: for a base-rewriting init that the merge recomputes from W: `lowrank.residual`'s name
            for it ("pissa", "olora"); None otherwise.
        why: for a base-rewriting init that cannot be recomputed, what it needed that files do not hold.
    """

    name: str
    title: str
    rewrites_base: bool = False
    redo: str | None = None
    why: str = ""

    @property
    def mergeable(self) -> bool:
        """A merge from files gives what the trained adapter means."""
        return not self.rewrites_base or self.redo is not None


#: Every `init_lora_weights` value PEFT 0.21–0.22's LoraConfig accepts (pissa_niter_K under "pissa_niter").
INITS: dict[str, Init] = {
    "true": Init("true", "default (Kaiming A, zero B)"),
    "false": Init("false", "random A and B (debugging)"),
    "gaussian": Init("gaussian", "Gaussian"),
    "eva": Init("eva", "EVA"),
    "orthogonal": Init("orthogonal", "orthogonal"),
    "mica": Init("mica", "MiCA"),
    "nora": Init("nora", "NoRA (A's columns normalised, zero B)"),
    "pissa": Init("pissa", "PiSSA", rewrites_base=True, redo="pissa"),
    "olora": Init("olora", "OLoRA", rewrites_base=True, redo="olora"),
    "pissa_niter": Init(
        "pissa_niter",
        "PiSSA (randomised SVD)",
        rewrites_base=True,
        why="its W_res comes from a randomised SVD whose random draws are not saved",
    ),  # fmt: skip
    "corda": Init(
        "corda",
        "CorDA",
        rewrites_base=True,
        why="its W_res comes from covariances of activations on a calibration set that are not saved",
    ),  # fmt: skip
    "astra": Init(
        "astra",
        "ASTRA",
        rewrites_base=True,
        why="its W_res comes from eigenvectors of output activations' covariances on a calibration set that are not saved",
    ),  # fmt: skip
    "loftq": Init(
        "loftq",
        "LoftQ",
        rewrites_base=True,
        why="its W_res is the base quantised by LoftQ's alternating steps, not saved with the adapter",
    ),  # fmt: skip
    "lora_ga": Init(
        "lora_ga",
        "LoRA-GA",
        rewrites_base=True,
        why="its W_res comes from gradients of a training batch that are not saved",
    ),  # fmt: skip
}

_NITER = re.compile(r"pissa_niter_(\d+)")


def init_of(config: dict) -> Init:
    """The init an adapter config names; a missing or null field is PEFT's default (True, and null acts as False).

    An unknown value comes back with `rewrites_base=True` and no `redo`: loratool cannot tell
    what it did to the base, so a merge refuses it (PEFT refuses to load it too).
    """
    value = config.get("init_lora_weights", True)
    if value is None or isinstance(value, bool):
        return INITS["true" if value else "false"]
    key = _key(str(value))
    if key == "pissa_niter":
        known = INITS[key]
        iterations = str(value).rsplit("_", 1)[1]
        return Init(str(value), f"{known.title}, {iterations} iterations", True, None, known.why)
    if key is not None:
        return INITS[key]
    return Init(str(value), repr(value), rewrites_base=True, why="PEFT (up to 0.22) does not know this init")


def _key(value: str) -> str | None:
    """The `INITS` key PEFT 0.22's `update_layer` would dispatch a string value to (its own tests: some
    compare lower-cased, CorDA and ASTRA by prefix), or None for a value it raises on."""
    lowered = value.lower()
    if lowered in ("olora", "mica", "gaussian"):
        return lowered
    if value.startswith("corda"):
        return "corda"
    if value.startswith("astra"):
        return "astra"
    if _NITER.fullmatch(value):
        return "pissa_niter"
    return value if value in INITS and value not in ("true", "false", "pissa_niter") else None


def config_features(config: dict) -> list[str]:
    """The config's LoRA features a merged model cannot keep (aLoRA, layer_replication), as messages."""
    found = []
    tokens = config.get("alora_invocation_tokens")
    if tokens is not None:
        found.append(
            f"it is an activated LoRA (aLoRA, alora_invocation_tokens={tokens}): the adapter acts only on the "
            "tokens after its invocation sequence, so a merged model would change every token before it too "
            "(PEFT: 'aLoRA does not support merging'); serve it unmerged with PEFT or vLLM"
        )
    replicated = config.get("layer_replication")
    if replicated:
        found.append(
            f"it uses layer_replication={replicated}: PEFT builds extra decoder layers that share the base's "
            "weights, each with its own LoRA, so a merge would have to write every copy as a layer of its own; "
            "loratool does not, and PEFT 0.21's merge_and_unload adds every copy's LoRA into the one shared "
            "weight, which changes the model; serve it unmerged with PEFT"
        )
    return found


def merge_refusal(config: dict, operation: str, residual_base: bool = False) -> str | None:
    """Why `operation` ("merge" or "unmerge") must refuse an adapter with this config, or None.

    Base-rewriting inits: a merge recomputes W_res for PiSSA and OLoRA and refuses the others; an
    un-merge refuses them all (W cannot be recovered from W_res: the part of W that was subtracted
    is what the init computed from W). With `residual_base` (the base given is the W_res PEFT saved at
    init) no init is refused.
    """
    features = config_features(config)
    if features:
        return f"cannot {operation} this adapter: {features[0]}"
    init = init_of(config)
    if not init.rewrites_base or residual_base:
        return None
    if operation == "unmerge":
        return (
            f"cannot un-merge an adapter initialised with init_lora_weights={init.name!r} ({init.title}): that "
            "init replaced the base W by W - s*B0*A0 computed from W, which a merged model no longer holds; "
            "un-merge gives W_res, not W (keep the original base instead, or pass --residual-base to get W_res)"
        )
    if init.redo is None:
        return (
            f"cannot merge an adapter initialised with init_lora_weights={init.name!r} ({init.title}): that init "
            f"rewrote the base before training and {init.why}, so W + s*B*A would be wrong; {_CONVERT}"
        )
    return None


def check_init_field(config: dict) -> str | None:
    """What is wrong with the config's `init_lora_weights` (PEFT needs true, false, null or a name), or None."""
    value = config.get("init_lora_weights", True)
    if value is None or isinstance(value, bool | str):
        return None
    return f"must be true, false or the name of an init, found {value!r}"


def with_base_init(config: dict, modules: list) -> list:
    """`modules` (`LoraModule`s) with `base_init` set where PEFT rewrote the base at init: the Linear
    modules of a PiSSA or OLoRA adapter (PEFT's Embedding and Conv layers leave their base alone)."""
    redo = init_of(config).redo
    if redo is None:
        return modules
    return [replace(m, base_init=redo) if m.kind == "linear" else m for m in modules]


def describe_init(config: dict) -> dict:
    """What `inspect` reports: the init's value and method, whether it rewrote the base, what a merge does
    (`plain`, `residual` — W_res recomputed from W —, or `refused`), and the reason a merge refuses, if any."""
    init = init_of(config)
    refusal = merge_refusal(config, "merge")
    merge = "refused" if refusal else "residual" if init.redo else "plain"
    return {"name": init.name, "method": init.title, "rewrites_base": init.rewrites_base, "merge": merge,
            "refusal": refusal}  # fmt: skip


def refuse_rewritten_base(adapter, operation: str) -> None:
    """Refuse to write an adapter whose init rewrote the base (PiSSA, OLoRA, CorDA, …) as a plain LoRA.

    `convert`, `resize` and `combine` write adapters that mean W + s·B·A; this one means
    W_res + s·B·A, W_res depending on W and on the rank, so the written adapter would be silently wrong.

    Raises:
        UnsupportedError: naming the adapter, the init and what to do instead.
    """
    init = init_of(adapter.config) if "peft_type" in adapter.config else None
    if init is None or not init.rewrites_base:
        return
    raise UnsupportedError(
        f"{adapter.path}: cannot {operation} an adapter initialised with init_lora_weights={init.name!r} "
        f"({init.title}): it means W_res + s*B*A on the base PEFT rewrote at init (W_res = W - s*B0*A0), and "
        "the output would mean W + s*B*A; merge it with `loratool merge`"
        + (" (which recomputes W_res)" if init.redo else "")
        + ", or convert it to a plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
    )


def invocation_tokens(config: dict) -> list[int] | None:
    """An activated LoRA's invocation token ids (`alora_invocation_tokens`), or None for any other adapter."""
    tokens = config.get(ALORA_TOKENS)
    return [int(t) for t in tokens] if tokens else None


def refuse_alora(adapter, target: str) -> None:
    """Refuse to write an activated LoRA (aLoRA) into a format that cannot carry its invocation tokens.

    A kohya, diffusers or mlx-lm file has no field for them: the written adapter would act on every
    token, a different model from the one trained. PEFT folders keep the field; GGUF files carry it as
    llama.cpp's `adapter.alora.invocation_tokens`.

    Raises:
        UnsupportedError: naming the adapter, its tokens and the formats that keep them.
    """
    tokens = invocation_tokens(adapter.config)
    if tokens is None:
        return
    raise UnsupportedError(
        f"{adapter.path}: cannot convert an activated LoRA (aLoRA, alora_invocation_tokens={tokens}) to {target}: "
        f"{target} has no place for the invocation tokens, so the adapter would act on every token; convert it "
        "to peft or gguf (llama.cpp reads adapter.alora.invocation_tokens), or serve it with PEFT or vLLM"
    )
