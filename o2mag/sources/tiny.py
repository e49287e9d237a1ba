"""Tiny, seeded, randomly initialised Stable-Diffusion-shaped components for tests and demos.

No weights can be downloaded on the development machines, so everything in this project is tested
on these models. They keep SD v1.5's *structure* where it matters to the method -- in particular
the UNet has SD's 16 transformer blocks in the same execution order (down 0-5, mid 6, up 7-15), so
layer indices in :class:`o2mag.GraftConfig` mean the same thing on the tiny and the real model --
while being small enough to build in milliseconds and to run on a CPU.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_IMAGE_SIZE = 128
"""Image side in pixels; the VAE downsamples by 8 like SD, so latents are 16x16 (tokens 256/64/16/4)."""

TINY_LATENT_SIZE = TINY_IMAGE_SIZE // 8
TINY_TEXT_HIDDEN = 32
# package data of o2mag (pyproject: o2mag = ["data/*", "data/**/*"]), one folder up from here
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizer")

# SD v1.5's scheduler config (the values its scheduler_config.json carries).
SD15_SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# SD 2.1's scheduler config (768 px, v-prediction); SD 2 base (512 px) is the same with "epsilon".
SD2_SCHEDULER_CONFIG: Dict[str, Any] = dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")

# The SD 2.x UNet's attention at a tiny width: head dim 64 at every level (SD 2.x's
# attention_head_dim (5, 10, 20, 20) over 320/640/1280 channels), linear projections in and out of
# each transformer (SD 1.x uses 1x1 convolutions). The block layout stays SD's 16 blocks.
SD2_UNET_OVERRIDES: Dict[str, Any] = dict(block_out_channels=(64, 64, 64, 64), attention_head_dim=(1, 1, 1, 1),
                                          use_linear_projection=True)


def _finish(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no grad; configs build float32 already (casting again only triggers a warning)."""
    return module.eval().requires_grad_(False)


def tiny_unet_config(**overrides: Any) -> Dict[str, Any]:
    """Config of the tiny UNet: SD v1.5's block layout (16 transformer blocks) at a tiny width.

    ``overrides`` replace entries, e.g. ``block_out_channels=(64, 128, 128, 128),
    attention_head_dim=(1, 2, 2, 2)`` for an SD 2.x-like variant with head dim 64.
    """
    cfg: Dict[str, Any] = dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=1,
        attention_head_dim=2,  # diffusers' name for the number of heads in SD 1.x configs
        cross_attention_dim=TINY_TEXT_HIDDEN,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg


def tiny_sdxl_unet_config(**overrides: Any) -> Dict[str, Any]:
    """Config of a UNet with SDXL's block layout at a tiny width: 70 transformer blocks (down 2x2 at
    1/2 of the latent side and 2x10 at 1/4, mid 10, up 3x10 at 1/4 and 3x2 at 1/2), head dim 64,
    linear projections, and SDXL's "text_time" added conditioning (pooled text embedding plus six
    size/crop numbers, each embedded in ``addition_time_embed_dim`` channels)."""
    cfg: Dict[str, Any] = dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(1, 1, 1),  # heads per level, as SDXL's config counts them: head dim 64
        use_linear_projection=True,
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,  # the two text encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TINY_TEXT_HIDDEN + 6 * 8,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    return cfg


def tiny_unet(seed: int = 0, **overrides: Any):
    """A seeded tiny ``UNet2DConditionModel`` (eval, float32, no grad) with SD v1.5's block layout."""
    torch.manual_seed(seed)
    return _finish(UNet2DConditionModel(**tiny_unet_config(**overrides)))


def tiny_vae(seed: int = 0):
    """A seeded tiny ``AutoencoderKL``: 4 blocks, so it downsamples by 8 like SD's VAE."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=0.18215,
    )
    return _finish(vae)


def tiny_tokenizer():
    """A ``CLIPTokenizer`` over the shipped tiny byte-level BPE vocabulary (model_max_length 77)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)


def _tokenizer_ids() -> Dict[str, int]:
    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    return {"vocab_size": len(vocab), "bos": vocab["<|startoftext|>"], "eos": vocab["<|endoftext|>"]}


def tiny_text_encoder(seed: int = 0, projection: bool = False):
    """A seeded tiny ``CLIPTextModel`` whose vocabulary matches :func:`tiny_tokenizer`; with
    ``projection``, a ``CLIPTextModelWithProjection`` (SDXL's second encoder: its ``text_embeds``
    are the pooled embedding, ``projection_dim`` = :data:`TINY_TEXT_HIDDEN` wide)."""
    ids = _tokenizer_ids()
    config = CLIPTextConfig(
        vocab_size=ids["vocab_size"],
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["eos"],
        projection_dim=TINY_TEXT_HIDDEN,
    )
    torch.manual_seed(seed)
    return _finish((CLIPTextModelWithProjection if projection else CLIPTextModel)(config))


def tiny_scheduler():
    """A ``DDIMScheduler`` with SD v1.5's configuration."""
    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def tiny_sd2_components(seed: int = 0, prediction_type: str = "v_prediction") -> Dict[str, Any]:
    """An SD 2.x-shaped model: the SD 1.5 layout with SD 2.x's attention (head dim 64, linear
    projections, :data:`SD2_UNET_OVERRIDES`) and SD 2.1's scheduler with ``prediction_type``
    ("v_prediction", as SD 2.1 at 768 px, or "epsilon", as SD 2 base)."""
    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {prediction_type!r}")
    return dict(
        unet=tiny_unet(seed, **SD2_UNET_OVERRIDES),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        scheduler=DDIMScheduler(**dict(SD2_SCHEDULER_CONFIG, prediction_type=prediction_type)),
    )


def tiny_sdxl_components(seed: int = 0) -> Dict[str, Any]:
    """An SDXL-shaped model: the UNet of :func:`tiny_sdxl_unet_config` (70 transformer blocks,
    "text_time" added conditioning), two tiny CLIP text encoders -- a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection``, as SDXL's CLIP-L and OpenCLIP-bigG, seeded differently -- with
    the shipped tokenizer used for both (SDXL's two tokenizers share CLIP's BPE vocabulary), the
    tiny VAE and SD's DDIM scheduler (SDXL's scheduler config has the same betas and offset)."""
    torch.manual_seed(seed)
    return dict(
        unet=_finish(UNet2DConditionModel(**tiny_sdxl_unet_config())),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=tiny_text_encoder(seed + 1, projection=True),
        tokenizer_2=tiny_tokenizer(),
        scheduler=tiny_scheduler(),
    )


def tiny_components(seed: int = 0) -> Dict[str, Any]:
    """All five components, as ``DiffusionPipeline`` constructors take them."""
    return dict(
        unet=tiny_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler(),
    )
