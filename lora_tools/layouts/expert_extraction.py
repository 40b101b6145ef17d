"""`extract` for mixture-of-experts models: one PEFT `target_parameters` LoRA per fused expert parameter.

transformers v5 holds experts fused in memory (`mlp.experts.gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I]; gpt-oss [E, in, out]) while checkpoints keep
them per expert (`experts.N.gate_proj.weight`, Mixtral's `w1/w3/w2`) or fused
(gpt-oss). PEFT adapts such a parameter through its ParamWrapper, so an
extracted adapter must say the same: per expert e, ΔW_e (out × in; gate rows
then up rows) is factorised by the truncated SVD into B_e [out, r_e] and
A_e [r_e, in]; A stacks them as [E·R, in] (expert e at rows e·R…), B as
[out, E·R] with the expert index varying fastest along its columns, as
`experts.fused_delta` reads them. Experts whose rule picks fewer than R = max r_e
are padded with zero rows and columns, which add exactly nothing.

Two targeted parameters on one module nest in PEFT: the parameter the module
registers first (gate_up_proj) is wrapped first and saved under
`…experts.base_layer.lora_A`, the next one under `…experts.lora_A`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..io.safetensors_header import TensorInfo
from .transformers import FusedExperts, Layout, to_memory_path

__all__ = ["ExpertTask", "expert_tasks", "extract_expert_factors", "relative_error", "peft_expert_fields"]

_NOT_A_WEIGHT = "not a weight PEFT can carry as LoRA"


@dataclass(frozen=True)
class ExpertTask:
    """One fused in-memory expert parameter to factorise, from its on-disk tensors.

    Attributes:
        module: the in-memory module path PEFT saves the factors under (nested `base_layer`s included).
        tensor: the first on-disk tensor (reports, progress); sources: all of them, by expert then part.
        parameter: the in-memory parameter (`model.layers.0.mlp.experts.gate_up_proj`), as `target_parameters`
            and `rank_pattern` name it.
        shape: the in-memory parameter's shape [E, d1, d2].
        in_first: laid out [E, in, out] (gpt-oss); fused_on_disk: `sources` is the one fused tensor.
        parts: per expert, how many on-disk tensors stack (by rows) into ΔW_e.
    """

    module: str
    tensor: str
    sources: tuple[str, ...]
    parameter: str
    shape: tuple[int, int, int]
    in_first: bool
    fused_on_disk: bool
    parts: int
    kind: str = "experts"
    fan_in_fan_out: bool = False
    embedding_like: bool = False


def _group_key(name: str, spec: FusedExperts) -> tuple[str, int, int] | None:
    """(experts prefix on disk, expert, part index) of an on-disk expert tensor of `spec`, or None."""
    if not spec.parts:
        return (name[: -len(spec.param) - 1], -1, 0) if name.endswith(f".experts.{spec.param}") else None
    parts = "|".join(map(re.escape, spec.parts))
    found = re.match(rf"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<part>{parts})\.weight$", name)
    return (found["prefix"], int(found["e"]), spec.parts.index(found["part"])) if found else None


def expert_tasks(plan, layout: Layout, base: Mapping[str, TensorInfo]) -> tuple[list, list, list[dict]]:
    """Split an extraction plan's expert tensors off into `ExpertTask`s.

    Returns:
        (other tasks, expert tasks, skipped entries: the plan's, less the fused tensors now taken, plus expert
        groups that cannot be extracted whole, e.g. when --include/--exclude selected only some experts).
    """
    groups: dict[tuple[str, str], dict[tuple[int, int], str]] = {}
    specs = {spec.param: spec for spec in layout.experts}
    rest = []
    candidates = [(t.tensor, t) for t in plan.tasks] + [
        (s["name"], s) for s in plan.skipped if s["reason"] == _NOT_A_WEIGHT and len(base[s["name"]].shape) == 3
    ]
    for name, item in candidates:
        key = next(((spec, k) for spec in layout.experts if (k := _group_key(name, spec))), None)
        if key is None:
            if not isinstance(item, dict):
                rest.append(item)
            continue
        spec, (prefix, expert, part) = key
        groups.setdefault((prefix, spec.param), {})[(expert, part)] = name
    taken = {name for members in groups.values() for name in members.values()}
    skipped = [entry for entry in plan.skipped if entry["name"] not in taken]
    tasks = []
    order = [spec.param for spec in layout.experts]  # the order the experts module registers its parameters
    for (prefix, param), members in sorted(groups.items(), key=lambda g: (g[0][0], order.index(g[0][1]))):
        task = _task(prefix, specs[param], members, base, layout)
        if isinstance(task, str):
            skipped += [{"name": name, "reason": task} for name in members.values()]
        else:
            tasks.append(task)
    return rest, _nest(tasks), skipped


def _task(
    prefix: str, spec: FusedExperts, members: dict, base: Mapping[str, TensorInfo], layout: Layout
) -> ExpertTask | str:
    """The task for one fused parameter, or why it cannot be extracted."""
    memory = to_memory_path(prefix, layout)
    if not spec.parts:
        name = members[(-1, 0)]
        return ExpertTask(memory, name, (name,), f"{memory}.{spec.param}", tuple(base[name].shape), spec.in_first,
                          True, 1)  # fmt: skip
    experts = 0
    while all(f"{prefix}.{experts}.{part}.weight" in base for part in spec.parts):
        experts += 1
    wanted = [(e, p) for e in range(experts) for p in range(len(spec.parts))]
    if sorted(members) != wanted:
        return f"only part of the fused experts.{spec.param} is selected; PEFT carries it whole (all {experts} experts)"
    sources = tuple(members[key] for key in wanted)
    shapes = [base[name].shape for name in sources]
    out = sum(shape[0] for shape in shapes[: len(spec.parts)])
    return ExpertTask(memory, sources[0], sources, f"{memory}.{spec.param}", (experts, out, shapes[0][1]),
                      spec.in_first, False, len(spec.parts))  # fmt: skip


def _nest(tasks: list[ExpertTask]) -> list[ExpertTask]:
    """PEFT's nesting of several targeted parameters on one module: earlier ones sit under `base_layer`s."""
    by_module: dict[str, list[ExpertTask]] = {}
    for task in tasks:
        by_module.setdefault(task.module, []).append(task)
    nested = []
    for module, group in by_module.items():
        for depth, task in enumerate(reversed(group)):  # the last one PEFT wraps is outermost
            nested.append(replace(task, module=module + ".base_layer" * depth))
    return nested


def extract_expert_factors(task: ExpertTask, read_base: Callable, read_tuned: Callable, factorize: Callable):
    """(B [out, E·R], A [E·R, in], the per-expert ΔW_e, method), or None when no expert changed.

    `factorize(matrix, seed_name)` returns (B_e, A_e, method) for one expert's ΔW_e laid out [out, in].
    """
    import torch

    deltas = _expert_deltas(task, read_base, read_tuned)
    if not any(bool(d.any()) for d in deltas):
        return None
    factors = [factorize(delta, f"{task.parameter}.{e}") for e, delta in enumerate(deltas)]
    experts, rank = len(deltas), max(1, max(a.shape[0] for _, a, _ in factors))
    out, inner = deltas[0].shape
    b_all = torch.zeros(out, rank, experts, dtype=deltas[0].dtype)
    a_all = torch.zeros(experts, rank, inner, dtype=deltas[0].dtype)
    for e, (b, a, _) in enumerate(factors):
        b_all[:, : b.shape[1], e], a_all[e, : a.shape[0]] = b, a
    methods = sorted({m for _, _, m in factors})
    return b_all.reshape(out, rank * experts), a_all.reshape(experts * rank, inner), deltas, "+".join(methods)


def _expert_deltas(task: ExpertTask, read_base: Callable, read_tuned: Callable) -> list:
    """ΔW_e laid out [out, in] per expert, in fp32 (fp64 for fp64 checkpoints)."""
    import torch

    def delta(name: str):
        base = read_base(name)
        compute = torch.float64 if base.dtype == torch.float64 else torch.float32
        return read_tuned(name).to(compute) - base.to(compute)

    if task.fused_on_disk:
        whole = delta(task.sources[0])
        return [whole[e].T if task.in_first else whole[e] for e in range(whole.shape[0])]
    deltas = [delta(name) for name in task.sources]
    return [torch.cat(deltas[i : i + task.parts]) for i in range(0, len(deltas), task.parts)]


def relative_error(b, a, deltas) -> float:
    """‖Δ − B·A‖ / ‖Δ‖ over all experts, for the (rounded) stacked factors as PEFT will read them."""
    import torch

    experts = len(deltas)
    rank = a.shape[0] // experts
    rebuilt = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], rank, experts).to(deltas[0].dtype),
                           a.reshape(experts, rank, a.shape[1]).to(deltas[0].dtype))  # fmt: skip
    stacked = torch.stack(deltas)
    norm = float(torch.linalg.vector_norm(stacked))
    return float(torch.linalg.vector_norm(stacked - rebuilt)) / norm if norm else 0.0


def peft_expert_fields(tasks: Sequence, ranks: Mapping[str, int], layout: Layout) -> tuple[dict[str, int], dict]:
    """adapter_config.json for extracted experts and routers: ranks keyed as PEFT's rank_pattern sees them, and
    `target_modules` / `target_parameters` with fused experts (`…experts.gate_up_proj`) and routers
    (`…mlp.gate.weight`, bare parameters in memory) moved from the one to the other."""
    parameters = {task.module: task.parameter for task in tasks if isinstance(task, ExpertTask)}
    parameters.update({module: f"{module}.weight" for module in ranks if layout.is_router(module)})
    renamed = {parameters.get(module, module): rank for module, rank in ranks.items()}
    extra = {"target_modules": sorted(m for m in ranks if m not in parameters)}
    targeted = [parameters[m] for m in ranks if m in parameters]
    if targeted:
        extra["target_parameters"] = sorted(targeted)
    return renamed, extra
