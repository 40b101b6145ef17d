"""Tiny diffusers models for the single-file tests, built from real diffusers / transformers classes.

Shapes are the smallest that keep each architecture's structure: an SD-1.x-shaped UNet (attention in
the first blocks, a 1×1 conv shortcut where channels change), an SDXL-shaped UNet (no attention in
the first block, linear projections, add_embedding), a Flux transformer (double and single blocks).
"""

from __future__ import annotations

import torch


def sd1_unet(seed: int = 0, **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, **({"attention_head_dim": 8} | extra),
    ).eval()  # fmt: skip


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(4, 8), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()  # fmt: skip


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=32, projection_dim=32)  # fmt: skip
    return CLIPTextModel(config).eval()


def open_clip_g():
    """The CLIPTextModelWithProjection diffusers uses for SDXL's OpenCLIP bigG encoder, tiny."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(5)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=32, projection_dim=32)  # fmt: skip
    return CLIPTextModelWithProjection(config).eval()


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(3)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def diffusers_to_original(state: dict, links) -> dict:
    """A diffusers state dict laid out as the single file `links` describe (fused rows assembled).

    Fails on any diffusers tensor no link names, so a gap in the tables shows here. Which file this
    makes is proven separately: diffusers' own single-file conversion must turn it back into `state`.
    """
    from lora_tools.layouts.diffusion import block_rows

    by_original: dict[str, list] = {}
    for link in links:
        by_original.setdefault(link.original, []).append(link)
    out, used = {}, set()
    for group in by_original.values():
        for leaf, name in (("weight", group[0].original_weight), ("bias", group[0].original_bias)):
            parts = [(link, state.get(f"{link.diffusers}.{leaf}")) for link in group]
            if any(value is None for _, value in parts):
                continue
            used.update(f"{link.diffusers}.{leaf}" for link in group)
            if len(parts) == 1 and group[0].block is None:
                kernel = (1, 1) if group[0].reshaped and leaf == "weight" else ()
                out[name] = parts[0][1].clone().reshape(*parts[0][1].shape, *kernel)
                continue
            totals = {link.diffusers: value.shape[0] for link, value in parts}
            rows = sum(totals.values())
            cols = parts[0][1].shape[1] if parts[0][1].dim() > 1 else state[f"{group[0].diffusers}.weight"].shape[1]
            fused = torch.empty((rows, *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
            for link, value in parts:
                start, stop = block_rows(link.block, rows, cols) or (0, rows)
                source = block_rows(link.diffusers_block, value.shape[0], cols) or (0, value.shape[0])
                fused[start:stop] = value[source[0] : source[1]]
            out[name] = fused
    missing = sorted(set(state) - used)
    assert not missing, f"no link for {missing[:5]}"
    return out


def vae():
    """An AutoencoderKL of SD's shape: two levels, a channel change (conv_shortcut), mid attention."""
    from diffusers import AutoencoderKL

    torch.manual_seed(6)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16,
    ).eval()  # fmt: skip


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(4)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()  # fmt: skip


def sd2_unet():
    """SD 2.x's shape: linear proj_in / proj_out in the transformer blocks, attention heads per block."""
    return sd1_unet(7, attention_head_dim=(4, 8), use_linear_projection=True)


def open_clip_h():
    """The CLIPTextModel diffusers uses for SD 2.x's OpenCLIP ViT-H encoder, tiny."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(8)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=32, hidden_act="gelu")  # fmt: skip
    return CLIPTextModel(config).eval()


def t5_encoder():
    """Flux's / SD3's T5-XXL encoder (T5EncoderModel), tiny."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(9)
    config = T5Config(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1, vocab_size=50,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    return T5EncoderModel(config).eval()
