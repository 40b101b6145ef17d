"""Adapter modules named in one layout, merged into a base in another: targets and row blocks.

A LoRA on diffusers' `to_q` lands in the first third of the rows of a BFL `img_attn.qkv` weight
(ΔW's rows go to a row block of the target); a LoRA on a fused `qkv` merged into split q/k/v
weights gives each its block of ΔW's rows (B's rows, A shared). Both are exact: ΔW = B·A row by row,
no re-factorisation. The names come from `layouts.diffusion`; this module only resolves them against
one base's tensors (pure: names and shapes) and slices ΔW for the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .diffusion import UNET_PREFIX, VAE_PREFIX, Layout, Link, block_rows, detect_layout

__all__ = ["Piece", "Located", "LayoutTargets", "piece_delta"]

#: components one network goes by (kohya calls a Flux / SD3 transformer `lora_unet_`).
_DENOISER = {"unet": "denoiser", "transformer": "denoiser", None: None}


@dataclass(frozen=True)
class Piece:
    """Rows `source_rows` of a module's ΔW (of `source_total` rows) go to rows `target_rows` of a base tensor.

    None means all rows. The columns (and kernel axes) are the base tensor's own.
    """

    target_rows: tuple[int, int] | None
    source_rows: tuple[int, int] | None
    source_total: int


@dataclass(frozen=True)
class Located:
    """Where one adapter module lands: its own ΔW shape, and (base weight, base bias, piece) per part."""

    shape: tuple[int, ...]
    parts: tuple[tuple[str, str, Piece | None], ...]

    @property
    def whole(self) -> str | None:
        """The base module when the module lands whole on one weight named `<module>.weight`, else None."""
        if len(self.parts) != 1 or self.parts[0][2] is not None or not self.parts[0][0].endswith(".weight"):
            return None
        return self.parts[0][0][: -len(".weight")]

    def describe(self) -> str:
        """The base modules (and rows) the module lands in, e.g. `double_blocks.0.img_attn.qkv[0:3072]`."""
        if self.whole is not None:
            return self.whole
        return " + ".join(
            weight.removesuffix(".weight")
            + (f"[{piece.target_rows[0]}:{piece.target_rows[1]}]" if piece and piece.target_rows else "")
            for weight, _, piece in self.parts
        )


def _spellings(name: str) -> set[str]:
    """The dotted name and kohya's underscored one."""
    return {name, name.replace(".", "_")}


class LayoutTargets:
    """Resolves adapter modules against one base through its diffusion layout (None layout: never)."""

    def __init__(self, base: Mapping[str, object], layout: Layout | None = None) -> None:
        self.base = base
        self.layout = layout if layout is not None else detect_layout(list(base))
        self._index: dict[str, dict[str | None, list[Link]]] | None = None

    @property
    def original_side(self) -> bool:
        return self.layout is not None and self.layout.side == "original"

    def index(self) -> dict[str, dict[str | None, list[Link]]]:
        """spelling → component → links; spellings are of the naming the base does not use."""
        if self._index is None:
            index: dict[str, dict[str | None, list[Link]]] = {}

            def add(component: str | None, name: str, link: Link) -> None:
                for spelling in _spellings(name):
                    links = index.setdefault(spelling, {}).setdefault(_DENOISER.get(component, component), [])
                    if link not in links:
                        links.append(link)

            originals = {}
            for link in self.layout.links if self.layout else ():
                for name in [link.diffusers] if self.original_side else self._original_names(link):
                    add(link.component, name, link)
                    if self.original_side and name.startswith("text_model."):  # transformers 5 drops it in memory
                        add(link.component, name[len("text_model.") :], link)
                originals[link.original] = link
            for original, link in originals.items() if self.original_side else ():  # the file's own names
                for name in self._original_names(link):
                    add(link.component, name, Link(link.component, original, name))
            for component, prefix in self.layout.prefixes if self.original_side else ():
                for key in self.base:  # names the file keeps as they are, under a prefix
                    if key.startswith(prefix) and key.endswith(".weight"):
                        path = key[len(prefix) : -len(".weight")]
                        same = Link(component, key[: -len(".weight")], path)
                        add(component, path, same)
                        if path.startswith("text_model."):  # transformers versions disagree on this prefix
                            add(component, path[len("text_model.") :], same)
                        elif component.startswith("text_encoder"):
                            add(component, f"text_model.{path}", same)
            self._index = index
        return self._index

    def _original_names(self, link: Link) -> list[str]:
        """An original module's name with and without the single file's prefix (adapters use either)."""
        names = [link.original]
        for _, prefix in self.layout.prefixes:
            if prefix and link.original.startswith(prefix):
                names.append(link.original[len(prefix) :])
        for prefix in (UNET_PREFIX, VAE_PREFIX) if len(names) == 1 else ():
            if link.original.startswith(prefix):
                names.append(link.original[len(prefix) :])
        return names

    def _links(self, module) -> list[Link] | None:
        """The links a module's name (in its component) matches; a name without a component must be unique."""
        by_component = self.index().get(module.name, {})
        component = _DENOISER.get(module.component, module.component)
        if component in by_component:
            return by_component[component]
        if component is not None and self.original_side:  # a single file holds several components: names must agree
            return None
        return next(iter(by_component.values())) if len(by_component) == 1 else None

    def locate(self, module) -> Located | None:
        """Where `module` lands in the base, or None when the layout does not name it."""
        if self.layout is None:
            return None
        links = self._links(module)
        if not links:
            return None
        if self.original_side:
            return self._onto_original(links)
        return self._onto_diffusers(links)

    def _shape(self, tensor: str) -> tuple[int, ...] | None:
        info = self.base.get(tensor)
        return tuple(info.shape) if info is not None else None

    def _onto_original(self, links: list[Link]) -> Located | None:
        """A diffusers-named module into a single file: its rows land in row blocks of fused weights."""
        shapes = [self._shape(link.original_weight) for link in links]
        if any(not s for s in shapes):
            return None
        blocks = [block_rows(link.block, s[0], _cols(s)) for link, s in zip(links, shapes, strict=True)]
        sizes = [(b[1] - b[0]) if b else s[0] for b, s in zip(blocks, shapes, strict=True)]
        total = sum(sizes)
        parts = []
        for link, rows, shape in zip(links, blocks, shapes, strict=True):
            source = block_rows(link.diffusers_block, total, _cols(shape))
            piece = None if rows is None and source is None and not link.reshaped else Piece(rows, source, total)
            parts.append((link.original_weight, link.original_bias, piece))
        return Located((total, *shapes[0][1 : 2 if links[0].reshaped else None]), tuple(parts))

    def _onto_diffusers(self, links: list[Link]) -> Located | None:
        """An original-named module (a fused qkv) into a diffusers folder: each split weight takes its rows."""
        shapes = {link.diffusers: self._shape(f"{link.diffusers}.weight") for link in links}
        if any(not s for s in shapes.values()):
            return None
        total = sum(s[0] for s in shapes.values())
        cols = _cols(next(iter(shapes.values())))
        parts = []
        for link in links:
            rows = shapes[link.diffusers][0]
            source = block_rows(link.block, total, cols)
            target = block_rows(link.diffusers_block, rows, cols)
            piece = None if source is None and target is None and not link.reshaped else Piece(target, source, total)
            parts.append((f"{link.diffusers}.weight", f"{link.diffusers}.bias", piece))
        kernel = (1, 1) if links[0].reshaped else ()  # the original's 1×1 conv of this Linear
        return Located((total, *next(iter(shapes.values()))[1:], *kernel), tuple(parts))


def _cols(shape: tuple[int, ...]) -> int:
    """In-features for the row rules (1 for norms' 1-D weights)."""
    return shape[1] if len(shape) > 1 else 1


def piece_delta(
    module, piece: Piece, get: Callable[[str], object], target_shape: tuple[int, ...], *, bias: bool, full_delta
):
    """The unscaled ΔW rows `piece` takes from `module`, shaped like the target's row block.

    For a plain LoRA only B's rows are multiplied (A shared); other variants build the module's
    whole ΔW (`full_delta(shape)`) and take its rows.
    """
    start, stop = piece.source_rows or (0, piece.source_total)
    if bias:
        return get(module.bias_key)[start:stop]
    rest = tuple(target_shape[1:])
    if module.variant == "lora" and module.kind != "embedding" and not module.fan_in_fan_out:
        up, down = get(module.b_key), get(module.a_key)
        left = up.reshape(up.shape[0], -1)[start:stop]
        return (left @ down.reshape(down.shape[0], -1)).reshape(stop - start, *rest)
    return full_delta((piece.source_total, *rest))[start:stop]
