"""End-to-end generation cost: the authors' per-sample scheme against one-to-more batching.

Per generated sample the authors' code runs two DDIM inversions and three branches (×2 for CFG);
this project inverts once and shares one reference and one normal branch across a batch of targets,
and with the K/V cache runs only target rows after the first batch. AGO is cached per reference in
both schemes (the paper's own practice), so it is left out (``ago_steps=0``) to compare the rest.

On a CPU the tiny model is used; on a GPU a full-width, randomly initialised SD v1.5-shaped
UNet/VAE/text encoder (weights do not change speed).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from o2mag import O2MAGPipeline
from o2mag.targets import affine_masks
from o2mag.sample import embedded_sample


def sd15_shaped_pipeline(device, dtype=torch.float16, seed: int = 0) -> O2MAGPipeline:
    """Random-weight pipeline with SD v1.5's full UNet, VAE and CLIP-L text encoder shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from o2mag.tiny import tiny_scheduler, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id))
    pipe = O2MAGPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler=tiny_scheduler())
    pipe.model_id = "random-weight SD v1.5 shapes"
    return pipe.to(device=device, dtype=dtype)


def _setups():
    """(label, N, generate kwargs). The K/V cache only helps from the second batch on, so it is
    compared with plain one-to-more at the SAME batch size (4, and 8 where N > 8)."""
    for n in (1, 8, 32):
        yield "per_sample", n, dict(scheme="per_sample", batch_size=1)
        yield "one_to_more (batch min(N, 8))", n, dict(batch_size=min(n, 8))
        if n > 4:
            yield "one_to_more (batch 4)", n, dict(batch_size=4)
            yield "one_to_more+kv_cache (batch 4)", n, dict(batch_size=4, kv_cache=True)
        if n > 8:
            yield "one_to_more+kv_cache (batch 8)", n, dict(batch_size=8, kv_cache=True)


def run_e2e_suite(device: torch.device, *, quick: bool, steps: int = None):
    """Seconds and UNet rows per generated sample for each scheme and N (one timed run each)."""
    if device.type == "cuda":
        pipe = sd15_shaped_pipeline(device)
        model = pipe.model_id
        steps = steps or 50
    else:
        pipe = O2MAGPipeline.tiny().to(device)
        model = "tiny seeded model (o2mag.tiny)"
        steps = steps or (10 if quick else 25)  # N = 1, 8, 32 in both: the tiny model is fast
    pipe.progress = False
    pipe.set_progress_bar_config(disable=True)
    sample = embedded_sample(size=pipe.default_size)
    max_n = 32
    targets = [t.mask for t in affine_masks(np.asarray(sample.ref_mask), max_n, seed=0)]
    rows = []
    per_sample_time = {}
    for label, n, kwargs in _setups():
        pipe.clear_caches()
        pipe.stats.reset()
        t0 = time.perf_counter()
        pipe.generate(sample.reference, sample.ref_mask, sample.normal, targets[:n], sample.prompt,
                      sample.anomaly_word, num_steps=steps, ago_steps=0, seed=0, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        stats = pipe.stats.as_dict()
        row = {"scheme": label, "num": n, "batch_size": kwargs["batch_size"], "steps": steps,
               "seconds": seconds, "seconds_per_sample": seconds / n,
               "unet_rows_per_sample": stats["unet_rows"] / n, "unet_calls": stats["unet_calls"],
               "stats": stats}
        if label == "per_sample":
            per_sample_time[n] = (seconds / n, stats["unet_rows"] / n)
        else:
            base_t, base_rows = per_sample_time[n]
            row["speedup_vs_per_sample"] = base_t / row["seconds_per_sample"]
            row["fewer_rows_vs_per_sample"] = base_rows / row["unet_rows_per_sample"]
        rows.append(row)
    return {"model": model, "steps": steps, "ago_steps": 0, "rows": rows}
