"""`convert --naming`: LoRA modules between diffusers names and the original (LDM / BFL / SD3) ones, exactly.

The same `Link` tables the merge uses (`layouts.diffusion`) say which row block of which module on one
side is which row block on the other. Each adapter module is first spread over the links it covers
(its rows per link), then each target module gathers the links it is made of:

- fused → split (BFL `img_attn.qkv` → `to_q`/`to_k`/`to_v`): each part takes B's rows, A is shared;
  rank and alpha are kept, nothing is re-factorised.
- split → fused (`to_q`/`to_k`/`to_v` → `qkv`; q/k/v/`proj_mlp` → `linear1`): parts that share one A
  (the adapter was fused once) keep rank r, B's rows are concatenated. Otherwise the A's are stacked
  and B is block-diagonal, so the rank is the sum of the parts' ranks; the report lists every such
  module (`block_diagonal`) and a note says so. Parts with different scales have them folded into B.
- rows no adapter module covers stay zero in B: ΔW there is zero, as it was.

Text-encoder modules keep transformers' names (what kohya and diffusers both write) and pass through.
Everything but the tensor arithmetic in `fuse` is pure: names, rows and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import InvalidInputError, UnsupportedError
from .diffusion import UNET_PREFIX, VAE_PREFIX, Layout, Link, block_rows

__all__ = ["NAMINGS", "Span", "Part", "Target", "link_spans", "plan_renaming", "fuse"]

NAMINGS = ("diffusers", "original")
_DENOISERS = ("unet", "transformer", None)


@dataclass(frozen=True)
class Span:
    """Where one link's rows sit: (start, stop) of the original module's rows and of the diffusers module's."""

    original: tuple[int, int]
    original_total: int
    diffusers: tuple[int, int]
    diffusers_total: int


@dataclass(frozen=True)
class Part:
    """Rows `source_rows` of adapter module `module` (its ΔW) are rows `target_rows` of the target."""

    target_rows: tuple[int, int]
    module: object
    source_rows: tuple[int, int]


@dataclass(frozen=True)
class Target:
    """One module of the converted adapter: its name, component, rows, and the parts that make its ΔW."""

    name: str
    component: str | None
    rows: int
    parts: tuple[Part, ...]

    @property
    def renamed_only(self) -> bool:
        """One adapter module, whole, onto the whole target: a rename."""
        part = self.parts[0]
        return (
            len(self.parts) == 1
            and part.target_rows == (0, self.rows)
            and part.source_rows == (0, part.module.b_shape[0])
        )


def _cols(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) > 1 else 1


def link_spans(layout: Layout, shapes: Mapping[str, tuple[int, ...]]) -> dict[Link, Span]:
    """Each link's rows on both sides, from the base's shapes (either side's tensors will do)."""
    original_side = layout.side == "original"
    groups: dict[str, list[Link]] = {}
    for link in layout.links:
        groups.setdefault(link.diffusers if original_side else link.original, []).append(link)
    spans = {}
    for links in groups.values():
        shape = [shapes.get(link.original_weight if original_side else f"{link.diffusers}.weight") for link in links]
        if any(s is None for s in shape):
            continue
        # rows of each link on the side the base has, then the other side's module is their sum
        own = [block_rows(link.block if original_side else link.diffusers_block, s[0], _cols(s)) or (0, s[0])
               for link, s in zip(links, shape, strict=True)]  # fmt: skip
        total, cols = sum(stop - start for start, stop in own), _cols(shape[0])
        for link, rows, s in zip(links, own, shape, strict=True):
            other = block_rows(link.diffusers_block if original_side else link.block, total, cols) or (0, total)
            spans[link] = Span(rows, s[0], other, total) if original_side else Span(other, total, rows, s[0])
    return spans


def _spellings(name: str) -> set[str]:
    return {name, name.replace(".", "_")}


def _stripped(layout: Layout, original: str) -> str:
    """An original module's name as adapters write it: without the single file's prefix."""
    for _, prefix in layout.prefixes:
        if prefix and original.startswith(prefix):
            return original[len(prefix) :]
    return original.removeprefix(UNET_PREFIX).removeprefix(VAE_PREFIX)


def _sides(layout: Layout, spans: Mapping[Link, Span]) -> tuple[dict, dict[str, tuple[str, str]]]:
    """links per (side, module name), and every spelling adapters use → (side, module name)."""
    by_side: dict[tuple[str, str], list[Link]] = {}
    index: dict[str, tuple[str, str]] = {}
    for link in layout.links:
        if link.component not in _DENOISERS or link not in spans:
            continue
        for side, name, spellings in (
            ("diffusers", link.diffusers, _spellings(link.diffusers)),
            ("original", link.original, _spellings(link.original) | _spellings(_stripped(layout, link.original))),
        ):
            by_side.setdefault((side, name), []).append(link)
            for spelling in spellings:
                index.setdefault(spelling, (side, name))
    return by_side, index


def plan_renaming(adapter, layout: Layout, spans: Mapping[Link, Span], naming: str) -> list[Target]:
    """The target modules of `adapter` in `naming`, each with the parts of adapter modules it is made of.

    Raises:
        InvalidInputError: a denoiser module the tables do not name, or whose rows do not fit the base.
    """
    by_side, index = _sides(layout, spans)
    covered: dict[Link, list[tuple[object, tuple[int, int]]]] = {}
    passthrough, unknown = [], []
    for module in adapter.modules:
        found = index.get(module.name)
        if found is None or module.component not in _DENOISERS:
            (unknown if module.component in _DENOISERS else passthrough).append(module)
            continue
        side, name = found
        for link in by_side[side, name]:
            span = spans[link]
            rows, total = (span.diffusers, span.diffusers_total) if side == "diffusers" else (span.original, span.original_total)  # fmt: skip
            if module.variant == "lora" and module.b_shape[0] != total:
                raise InvalidInputError(
                    f"{adapter.path}: {module.name} has {module.b_shape[0]} output rows, but the base's {name} has "
                    f"{total}; is --base the model this adapter was trained for?"
                )
            covered.setdefault(link, []).append((module, rows))
    if unknown:
        raise InvalidInputError(
            f"{adapter.path}: the {layout.family} tables do not name {', '.join(m.name for m in unknown[:5])}"
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    targets: dict[tuple[str | None, str], Target] = {}
    for (side, name), links in by_side.items():
        if side != naming:
            continue
        parts = []
        for link in links:
            span = spans[link]
            rows = span.diffusers if naming == "diffusers" else span.original
            parts += [Part(rows, module, source) for module, source in covered.get(link, [])]
        if parts:
            span = spans[links[0]]
            total = span.diffusers_total if naming == "diffusers" else span.original_total
            out = name if naming == "diffusers" else _stripped(layout, name)
            targets[links[0].component, out] = Target(out, links[0].component, total, tuple(parts))
    passed = [Target(m.name, m.component, m.b_shape[0], (Part((0, m.b_shape[0]), m, (0, m.b_shape[0])),)) for m in passthrough]  # fmt: skip
    return passed + sorted(targets.values(), key=lambda t: (t.component or "", t.name))


def _module_order(parts: tuple[Part, ...]) -> list:
    modules = []
    for part in parts:
        if all(part.module is not m for m in modules):
            modules.append(part.module)
    return modules


def fuse(target: Target, read: Callable[[str], object]) -> tuple[object, object, float, str]:
    """(A, B, alpha, method) of `target`: ΔW = alpha/rank · B·A equals the parts' ΔW row by row, exactly.

    One module, or several sharing one A: rank r, B's rows placed (scales folded into B only when they
    differ). Otherwise A's stacked and B block-diagonal: rank Σr.

    Raises:
        UnsupportedError: a LoHa / LoKr / full / DoRA module that would have to be split or fused.
    """
    import torch

    modules = _module_order(target.parts)
    for module in modules:
        if module.variant != "lora" or module.fan_in_fan_out or module.kind == "embedding":
            raise UnsupportedError(
                f"{module.name}: {module.variant} modules cannot be renamed into another layout; merge the adapter "
                "into the base instead, or convert it to LoRA first (convert --rank)"
            )
        if module.magnitude_key is not None and not target.renamed_only:
            raise UnsupportedError(f"{module.name}: DoRA across a fused projection ({target.name}) cannot be converted")
    downs = [read(m.a_key) for m in modules]
    ups = {id(m): read(m.b_key) for m in modules}
    scales = {m.scale for m in modules}
    fold = len(scales) > 1
    shared = all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs)
    if target.renamed_only:
        (module,) = modules
        return downs[0], ups[id(module)], module.scale * module.rank, "renamed"
    ranks = [m.rank for m in modules]
    offsets = [0] * len(modules) if shared else [sum(ranks[:i]) for i in range(len(modules))]
    rank = ranks[0] if shared else sum(ranks)
    first = ups[id(modules[0])]
    up = torch.zeros((target.rows, rank, *first.shape[2:]), dtype=first.dtype)
    for part in target.parts:
        index = next(i for i, m in enumerate(modules) if m is part.module)
        rows = ups[id(part.module)][part.source_rows[0] : part.source_rows[1]]
        if fold:
            rows = (rows.double() * part.module.scale).to(first.dtype)
        start, stop = part.target_rows
        up[start:stop, offsets[index] : offsets[index] + ranks[index]] += rows
    down = downs[0] if shared else torch.cat(downs)
    method = f"fused, block-diagonal (rank {'+'.join(map(str, ranks))})"
    if shared or len(modules) == 1:
        method = "rows placed" if len(modules) == 1 else "fused (shared A)"
    used = up.flatten(1).ne(0).any(dim=0)  # a part of a block-diagonal LoRA uses only its own columns of B
    if len(modules) == 1 and 0 < int(used.sum()) < rank:
        up, down, method = (
            up[:, used],
            down[used],
            f"rows placed, rank {rank} → {int(used.sum())} (B's zero columns dropped)",
        )
        rank = up.shape[1]
    alpha = float(rank) if fold else next(iter(scales)) * rank
    return down, up, alpha, method
