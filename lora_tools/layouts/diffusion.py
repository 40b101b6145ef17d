"""Diffusion checkpoints: diffusers module names ↔ the original single-file layouts.

Single files as the community holds them (A1111 / ComfyUI / Civitai): Stable Diffusion 1.x/2.x/SDXL
(`model.diffusion_model.input_blocks.…`, `cond_stage_model.…`, `conditioner.embedders.N.…`) and Flux
in Black Forest Labs' layout (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`). The maps
are the inverse of the one-way conversions diffusers' `loaders/single_file_utils.py` runs for
`from_single_file`; tests prove each against that code. Everything here is names and row blocks:
no tensors, no dependency on diffusers.

A `Link` says that a diffusers module is (a row block of) a module of the original layout. Fused
projections are several links to one original module: Flux `img_attn.qkv` is to_q / to_k / to_v as
thirds of its rows; `single_blocks.N.linear1` is to_q, to_k, to_v (hidden rows each) then proj_mlp;
OpenCLIP's `attn.in_proj` is q/k/v_proj as thirds. Flux's final adaLN is stored (shift, scale) where
diffusers keeps (scale, shift): two links with swapped halves.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

__all__ = ["Link", "Layout", "detect_layout", "describe_layout", "block_rows", "vae_links", "RULES"]

#: how a fused module's rows divide into blocks, from its (rows, columns).
RULES: dict[str, Callable[[int, int], list[int]]] = {
    "halves": lambda rows, cols: [rows // 2] * 2,
    "thirds": lambda rows, cols: [rows // 3] * 3,
    "qkv_mlp": lambda rows, cols: [cols] * 3 + [rows - 3 * cols],  # Flux single blocks: hidden = in_features
}


@dataclass(frozen=True)
class Link:
    """diffusers module `diffusers` of `component` is the `block` rows of the original module `original`.

    `block` is (index, rule) into RULES, None for the whole module; `diffusers_block` likewise for
    the diffusers side (only Flux's swapped halves need it). `original` includes the file's prefix.
    `reshaped`: the original weight is the diffusers one with trailing 1×1 kernel axes.
    """

    component: str
    original: str
    diffusers: str
    block: tuple[int, str] | None = None
    diffusers_block: tuple[int, str] | None = None
    reshaped: bool = False  # the original keeps this Linear as a 1×1 conv, [out, in, 1, 1] (LDM VAE attention)

    @property
    def original_weight(self) -> str:
        return _tensor(self.original, "weight")

    @property
    def original_bias(self) -> str:
        return _tensor(self.original, "bias")


def _tensor(module: str, leaf: str) -> str:
    """A module's weight/bias tensor name; OpenCLIP's fused attention spells them `in_proj_weight`."""
    if module.endswith(".in_proj"):
        return f"{module}_{leaf}"
    if leaf == "weight" and module.endswith(("query_norm", "key_norm")):  # Flux's RMSNorm weights are `scale`
        return f"{module}.scale"
    return f"{module}.{leaf}"


def block_rows(block: tuple[int, str] | None, rows: int, cols: int) -> tuple[int, int] | None:
    """The (start, stop) rows of `block` in a module of `rows` × `cols`, None for the whole module."""
    if block is None:
        return None
    index, rule = block
    sizes = RULES[rule](rows, cols)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class Layout:
    """What a checkpoint is: its family, which naming its keys use, and every link of its modules.

    `side` is "original" for single files (links map diffusers names onto the file) and
    "diffusers" for diffusers folders (links map original names onto the folder). `prefixes`
    maps pipeline components to the single file's key prefix, for names passed through as is.
    """

    family: str
    side: str
    links: tuple[Link, ...]
    prefixes: tuple[tuple[str, str], ...] = ()


# --- Stable Diffusion UNet -------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
_UNET_FIXED = (
    ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"),
    ("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2"),
)  # fmt: skip
_RESNET = (
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
)  # fmt: skip
#: the modules inside a transformer block keep their names in both layouts.
_ATTENTION_INNER = (
    "norm", "proj_in", "proj_out",
    "transformer_blocks.{t}.norm1", "transformer_blocks.{t}.norm2", "transformer_blocks.{t}.norm3",
    "transformer_blocks.{t}.attn1.to_q", "transformer_blocks.{t}.attn1.to_k", "transformer_blocks.{t}.attn1.to_v",
    "transformer_blocks.{t}.attn1.to_out.0", "transformer_blocks.{t}.attn2.to_q", "transformer_blocks.{t}.attn2.to_k",
    "transformer_blocks.{t}.attn2.to_v", "transformer_blocks.{t}.attn2.to_out.0",
    "transformer_blocks.{t}.ff.net.0.proj", "transformer_blocks.{t}.ff.net.2",
)  # fmt: skip


@dataclass(frozen=True)
class UnetShape:
    """What the UNet maps need to know: blocks, resnets per down block, where attention is."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    transformer_depth: int


def _count(names: Collection[str], pattern: str) -> int:
    """How many consecutive indices i make `pattern.format(i)` a prefix of some name."""
    count = 0
    while any(n.startswith(pattern.format(count)) for n in names):
        count += 1
    return count


def _unet_shape_from_diffusers(names: Collection[str]) -> UnetShape:
    blocks = _count(names, "down_blocks.{}.")
    return UnetShape(
        layers_per_block=_count(names, "down_blocks.0.resnets.{}."),
        down_attention=tuple(any(n.startswith(f"down_blocks.{i}.attentions.") for n in names) for i in range(blocks)),
        up_attention=tuple(any(n.startswith(f"up_blocks.{i}.attentions.") for n in names) for i in range(blocks)),
        transformer_depth=_max_depth(names),
    )


def _unet_shape_from_original(names: Collection[str]) -> UnetShape:
    inputs = _count(names, "input_blocks.{}.")
    first_down = next((i for i in range(1, inputs) if f"input_blocks.{i}.0.op.weight" in names), inputs)
    per = first_down  # layers_per_block + 1
    blocks = inputs // per
    return UnetShape(
        layers_per_block=per - 1,
        down_attention=tuple(any(n.startswith(f"input_blocks.{per * i + 1}.1.") for n in names) for i in range(blocks)),
        up_attention=tuple(
            any(n.startswith(f"output_blocks.{per * i}.1.") and ".1.conv." not in n for n in names)
            for i in range(blocks)
        ),
        transformer_depth=_max_depth(names),
    )


def _max_depth(names: Collection[str]) -> int:
    depths = [int(n.split("transformer_blocks.")[1].split(".")[0]) for n in names if "transformer_blocks." in n]
    return max(depths, default=-1) + 1


def _unet_pairs(shape: UnetShape) -> list[tuple[str, str, str]]:
    """(original prefix, diffusers prefix, "resnet" | "attention" | "module") for every UNet part."""
    per = shape.layers_per_block + 1
    blocks = len(shape.down_attention)
    pairs = [(original, diffusers, "module") for original, diffusers in _UNET_FIXED]
    for i in range(blocks):
        for j in range(shape.layers_per_block):
            pairs.append((f"input_blocks.{per * i + j + 1}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if shape.down_attention[i]:
                pairs.append((f"input_blocks.{per * i + j + 1}.1", f"down_blocks.{i}.attentions.{j}", "attention"))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{per * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "module"))
        for j in range(per):
            pairs.append((f"output_blocks.{per * i + j}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if shape.up_attention[i]:
                pairs.append((f"output_blocks.{per * i + j}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
        if i < blocks - 1:
            slot = 2 if shape.up_attention[i] else 1
            pairs.append(
                (f"output_blocks.{per * i + per - 1}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", "module")
            )
    pairs += [("middle_block.0", "mid_block.resnets.0", "resnet"), ("middle_block.2", "mid_block.resnets.1", "resnet")]
    pairs.append(("middle_block.1", "mid_block.attentions.0", "attention"))
    return pairs


def unet_links(shape: UnetShape, prefix: str = UNET_PREFIX, component: str = "unet") -> list[Link]:
    """Every UNet module of this shape: original (with `prefix`) ↔ diffusers."""
    links = []
    for original, diffusers, kind in _unet_pairs(shape):
        if kind == "module":
            inner = [("", "")]
        elif kind == "resnet":
            inner = [(f".{a}", f".{b}") for a, b in _RESNET]
        else:
            inner = [
                (f".{name}".format(t=t),) * 2
                for t in range(max(shape.transformer_depth, 1))
                for name in _ATTENTION_INNER
                if t == 0 or "{t}" in name
            ]
        links += [Link(component, f"{prefix}{original}{a}", f"{diffusers}{b}") for a, b in inner]
    return links


# --- VAE (AutoencoderKL) ------------------------------------------------------------------------

VAE_PREFIX = "first_stage_model."
_VAE_TOP = (
    ("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_out", "encoder.conv_out"),
    ("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.conv_in", "decoder.conv_in"),
    ("decoder.conv_out", "decoder.conv_out"), ("decoder.norm_out", "decoder.conv_norm_out"),
    ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"),
)  # fmt: skip
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("nin_shortcut", "conv_shortcut"))  # fmt: skip
_VAE_ATTENTION = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))


@dataclass(frozen=True)
class VaeShape:
    """Resolution levels, and resnets per encoder / decoder level."""

    blocks: int
    encoder_layers: int
    decoder_layers: int


def _vae_shape(names: Collection[str], original: bool) -> VaeShape:
    if original:
        return VaeShape(_count(names, "encoder.down.{}."), _count(names, "encoder.down.0.block.{}."), _count(names, "decoder.up.0.block.{}."))  # fmt: skip
    return VaeShape(_count(names, "encoder.down_blocks.{}."), _count(names, "encoder.down_blocks.0.resnets.{}."),
                    _count(names, "decoder.up_blocks.0.resnets.{}."))  # fmt: skip


def _vae_pairs(shape: VaeShape) -> list[tuple[str, str]]:
    """(original, diffusers) resnet prefixes; the decoder's levels run the other way round."""
    pairs = []
    for i in range(shape.blocks):
        pairs += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}") for j in range(shape.encoder_layers)]  # fmt: skip
        up = shape.blocks - 1 - i
        pairs += [(f"decoder.up.{up}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}") for j in range(shape.decoder_layers)]  # fmt: skip
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_{k + 1}", f"{part}.mid_block.resnets.{k}") for k in range(2)]
    return pairs


def vae_links(shape: VaeShape, prefix: str = VAE_PREFIX, component: str = "vae") -> list[Link]:
    """LDM's AutoencoderKL (`encoder.down.N.block.M`, 1×1-conv mid attention) ↔ diffusers' AutoencoderKL."""
    links = [Link(component, prefix + a, b) for a, b in _VAE_TOP]
    for original, diffusers in _vae_pairs(shape):
        links += [Link(component, f"{prefix}{original}.{a}", f"{diffusers}.{b}") for a, b in _VAE_RESNET]
    for i in range(shape.blocks):
        links.append(Link(component, f"{prefix}encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))  # fmt: skip
        up = shape.blocks - 1 - i
        links.append(Link(component, f"{prefix}decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))  # fmt: skip
    for part in ("encoder", "decoder"):
        original, diffusers = f"{prefix}{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."
        links.append(Link(component, f"{original}norm", f"{diffusers}group_norm"))
        links += [Link(component, original + a, diffusers + b, reshaped=True) for a, b in _VAE_ATTENTION]
    return links


# --- text encoders -------------------------------------------------------------------------

_OPEN_CLIP_LAYER = (
    ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
)  # fmt: skip


def open_clip_links(prefix: str, layers: int, component: str) -> list[Link]:
    """OpenCLIP ViT-H / bigG (`transformer.resblocks.N`) ↔ transformers' CLIPTextModel(WithProjection)."""
    links = []
    for n in range(layers):
        original, diffusers = f"{prefix}transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
        for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            links.append(Link(component, f"{original}attn.in_proj", f"{diffusers}self_attn.{proj}", (index, "thirds")))
        links += [Link(component, f"{original}{a}", f"{diffusers}{b}") for a, b in _OPEN_CLIP_LAYER]
    links.append(Link(component, f"{prefix}ln_final", "text_model.final_layer_norm"))
    links.append(Link(component, f"{prefix}token_embedding", "text_model.embeddings.token_embedding"))
    return links  # positional_embedding and the transposed text_projection are no LoRA targets


def _swapped(component: str, original: str, diffusers: str) -> list[Link]:
    """(shift, scale) on disk, (scale, shift) in diffusers: two links with swapped halves."""
    return [
        Link(component, original, diffusers, (1, "halves"), (0, "halves")),
        Link(component, original, diffusers, (0, "halves"), (1, "halves")),
    ]


def _qkv(component: str, original: str, diffusers: tuple[str, ...]) -> list[Link]:
    return [Link(component, original, part, (k, "thirds")) for k, part in enumerate(diffusers)]


# --- Flux ------------------------------------------------------------------------------------

_FLUX_TOP = (
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out"),
)  # fmt: skip
_FLUX_DOUBLE = (
    ("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
    ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k"),
)  # fmt: skip
_FLUX_FUSED_DOUBLE = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
_FLUX_SINGLE = (
    ("modulation.lin", "norm.linear"), ("linear2", "proj_out"),
    ("norm.query_norm", "attn.norm_q"), ("norm.key_norm", "attn.norm_k"),
)  # fmt: skip
_FLUX_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def flux_links(double: int, single: int, prefix: str = "", component: str = "transformer") -> list[Link]:
    """Black Forest Labs' Flux layout ↔ diffusers' FluxTransformer2DModel."""
    links = [Link(component, f"{prefix}{a}", b) for a, b in _FLUX_TOP]
    links += _swapped(component, f"{prefix}final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in range(double):
        original, diffusers = f"{prefix}double_blocks.{i}.", f"transformer_blocks.{i}."
        links += [Link(component, original + a, diffusers + b) for a, b in _FLUX_DOUBLE]
        for fused, parts in _FLUX_FUSED_DOUBLE:
            links += _qkv(component, original + fused, tuple(diffusers + p for p in parts))
    for i in range(single):
        original, diffusers = f"{prefix}single_blocks.{i}.", f"single_transformer_blocks.{i}."
        links += [Link(component, original + a, diffusers + b) for a, b in _FLUX_SINGLE]
        links += [
            Link(component, f"{original}linear1", diffusers + p, (k, "qkv_mlp")) for k, p in enumerate(_FLUX_LINEAR1)
        ]
    return links


# --- SD3 / SD3.5 ---------------------------------------------------------------------------------

_SD3_TOP = (
    ("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"), ("final_layer.linear", "proj_out"),
)  # fmt: skip
_SD3_X = (
    ("attn.ln_q", "attn.norm_q"), ("attn.ln_k", "attn.norm_k"), ("attn.proj", "attn.to_out.0"),
    ("adaLN_modulation.1", "norm1.linear"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
)  # fmt: skip
_SD3_CONTEXT = (("attn.ln_q", "attn.norm_added_q"), ("attn.ln_k", "attn.norm_added_k"))
_SD3_CONTEXT_NOT_LAST = (
    ("attn.proj", "attn.to_add_out"), ("adaLN_modulation.1", "norm1_context.linear"),
    ("mlp.fc1", "ff_context.net.0.proj"), ("mlp.fc2", "ff_context.net.2"),
)  # fmt: skip
_SD3_DUAL = (("attn2.ln_q", "attn2.norm_q"), ("attn2.ln_k", "attn2.norm_k"), ("attn2.proj", "attn2.to_out.0"))


def sd3_links(layers: int, dual: Collection[int], prefix: str = "", component: str = "transformer") -> list[Link]:
    """Stability's SD3 / SD3.5 MMDiT layout (`joint_blocks.N.x_block…`) ↔ diffusers' SD3Transformer2DModel."""
    links = [Link(component, f"{prefix}{a}", b) for a, b in _SD3_TOP]
    links += _swapped(component, f"{prefix}final_layer.adaLN_modulation.1", "norm_out.linear")
    for i in range(layers):
        x, context, block = f"{prefix}joint_blocks.{i}.x_block.", f"{prefix}joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."  # fmt: skip
        links += _qkv(component, f"{x}attn.qkv", tuple(f"{block}attn.to_{p}" for p in "qkv"))
        links += _qkv(component, f"{context}attn.qkv", tuple(f"{block}attn.add_{p}_proj" for p in "qkv"))
        links += [Link(component, x + a, block + b) for a, b in _SD3_X]
        links += [Link(component, context + a, block + b) for a, b in _SD3_CONTEXT]
        if i < layers - 1:
            links += [Link(component, context + a, block + b) for a, b in _SD3_CONTEXT_NOT_LAST]
        else:  # the last context block only modulates, with (shift, scale) halves swapped
            links += _swapped(component, f"{context}adaLN_modulation.1", f"{block}norm1_context.linear")
        if i in dual:
            links += _qkv(component, f"{x}attn2.qkv", tuple(f"{block}attn2.to_{p}" for p in "qkv"))
            links += [Link(component, x + a, block + b) for a, b in _SD3_DUAL]
    return links


# --- detection -------------------------------------------------------------------------------

#: single-file text encoders: key prefix → (component, kind), per family.
_SD_ENCODERS = {
    "SD 1.x": (("cond_stage_model.transformer.", "text_encoder", "clip"),),
    "SD 2.x": (("cond_stage_model.model.", "text_encoder", "open_clip"),),
    "SDXL": (
        ("conditioner.embedders.0.transformer.", "text_encoder", "clip"),
        ("conditioner.embedders.1.model.", "text_encoder_2", "open_clip"),
    ),
}


def _stripped(names: Iterable[str], prefix: str) -> set[str]:
    return {n[len(prefix) :] for n in names if n.startswith(prefix)}


def _sd_family(names: Collection[str]) -> str:
    if any(n.startswith("conditioner.embedders.") for n in names) or f"{UNET_PREFIX}label_emb.0.0.weight" in names:
        return "SDXL"
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "SD 2.x"
    return "SD 1.x"


def _sd_single_file(names: Collection[str]) -> Layout:
    family = _sd_family(names)
    links = unet_links(_unet_shape_from_original(_stripped(names, UNET_PREFIX)))
    prefixes = [("unet", UNET_PREFIX)]
    for prefix, component, kind in _SD_ENCODERS[family]:
        if kind == "clip":
            prefixes.append((component, prefix))
        else:
            layers = _count(names, prefix + "transformer.resblocks.{}.")
            links += open_clip_links(prefix, layers, component) if layers else []
    vae = _stripped(names, VAE_PREFIX)
    if vae:
        links += vae_links(_vae_shape(vae, original=True))
        prefixes.append(("vae", VAE_PREFIX))
    return Layout(family, "original", tuple(links), tuple(prefixes))


#: encoders ComfyUI-style all-in-one Flux / SD3 files embed (transformers' names under the prefix). sd-scripts
#: names Flux's T5 `lora_te3_` though diffusers calls it text_encoder_2, so Flux lists it under both.
_EMBEDDED_ENCODERS = {
    "Flux": (("text_encoder", "text_encoders.clip_l.transformer."), ("text_encoder_2", "text_encoders.t5xxl.transformer."),
             ("text_encoder_3", "text_encoders.t5xxl.transformer.")),
    "SD3": (("text_encoder", "text_encoders.clip_l.transformer."), ("text_encoder_2", "text_encoders.clip_g.transformer."),
            ("text_encoder_3", "text_encoders.t5xxl.transformer.")),
}  # fmt: skip


def _embedded(names: Collection[str], family: str) -> tuple[tuple[str, str], ...]:
    return tuple((c, p) for c, p in _EMBEDDED_ENCODERS[family] if any(n.startswith(p) for n in names))


def _flux_prefix(names: Collection[str]) -> str | None:
    for prefix in ("", UNET_PREFIX):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in names:
            return prefix
    return None


def detect_layout(names: Collection[str]) -> Layout | None:
    """The diffusion layout of a checkpoint from its tensor names, or None when it is none of them."""
    names = set(names)
    if f"{UNET_PREFIX}input_blocks.0.0.weight" in names:
        return _sd_single_file(names)
    prefix = _flux_prefix(names)
    if prefix is not None:
        blocks = _stripped(names, prefix)
        links = flux_links(_count(blocks, "double_blocks.{}."), _count(blocks, "single_blocks.{}."), prefix)
        return Layout("Flux", "original", tuple(links), (("transformer", prefix), *_embedded(names, "Flux")))
    for prefix in ("", UNET_PREFIX):
        if f"{prefix}joint_blocks.0.x_block.attn.qkv.weight" in names:
            blocks = _stripped(names, prefix)
            dual = {i for i in range(_count(blocks, "joint_blocks.{}.")) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in blocks}  # fmt: skip
            links = sd3_links(_count(blocks, "joint_blocks.{}."), dual, prefix)
            return Layout("SD3", "original", tuple(links), (("transformer", prefix), *_embedded(names, "SD3")))
    if "transformer_blocks.0.attn.add_q_proj.weight" in names and "pos_embed.proj.weight" in names:
        layers = _count(names, "transformer_blocks.{}.")
        dual = {i for i in range(layers) if f"transformer_blocks.{i}.attn2.to_q.weight" in names}
        return Layout("SD3 (diffusers)", "diffusers", tuple(sd3_links(layers, dual)))
    if "single_transformer_blocks.0.proj_mlp.weight" in names:
        links = flux_links(_count(names, "transformer_blocks.{}."), _count(names, "single_transformer_blocks.{}."))
        return Layout("Flux (diffusers)", "diffusers", tuple(links))
    if "down_blocks.0.resnets.0.conv1.weight" in names and "conv_in.weight" in names:
        return Layout("SD UNet (diffusers)", "diffusers", tuple(unet_links(_unet_shape_from_diffusers(names))))
    if "encoder.down.0.block.0.conv1.weight" in names and "decoder.up.0.block.0.conv1.weight" in names:
        return Layout("VAE", "original", tuple(vae_links(_vae_shape(names, original=True), prefix="")), (("vae", ""),))
    if (
        "encoder.down_blocks.0.resnets.0.conv1.weight" in names
        and "decoder.up_blocks.0.resnets.0.conv1.weight" in names
    ):
        return Layout("VAE (diffusers)", "diffusers", tuple(vae_links(_vae_shape(names, original=False))))
    if "text_model.encoder.layers.0.self_attn.q_proj.weight" in names:
        layers = _count(names, "text_model.encoder.layers.{}.")
        return Layout("CLIP text encoder (diffusers)", "diffusers", tuple(open_clip_links("", layers, "text_encoder")))
    return None


def describe_layout(names: Collection[str]) -> str | None:
    """What `inspect` says a diffusion checkpoint is: "SDXL single file", "Flux (diffusers)", …"""
    layout = detect_layout(names)
    if layout is None:
        return None
    return f"{layout.family} single file" if layout.side == "original" else layout.family
