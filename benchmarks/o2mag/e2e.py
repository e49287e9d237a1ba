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

from o2mag import GraftConfig, O2MAGPipeline
from o2mag.masks.targets import affine_masks
from o2mag.sources.sample import embedded_sample


def sd15_shaped_pipeline(device, dtype=torch.float16, seed: int = 0) -> O2MAGPipeline:
    """Random-weight pipeline with SD v1.5's full UNet, VAE and CLIP-L text encoder shapes, built
    on ``device`` (on a GPU that is seconds; random initialisation on a CPU is the slow part)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from o2mag.sources.tiny import tiny_scheduler, tiny_tokenizer

    tokenizer, scheduler = tiny_tokenizer(), tiny_scheduler()  # the scheduler's tensors stay on the CPU
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id))
    pipe = O2MAGPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         scheduler=scheduler)
    pipe.model_id = "random-weight SD v1.5 shapes"
    return pipe.to(device=device, dtype=dtype)


def _setups(device: torch.device):
    """(label, N, generate kwargs). The K/V cache only helps from the second batch on, so it is
    compared with plain one-to-more at the SAME batch size. On a GPU the per-sample scheme runs at
    N = 8 only (its cost per sample does not depend on N) to keep the suite within minutes."""
    ns = (8, 32) if device.type == "cuda" else (1, 8, 32)
    for n in ns:
        if device.type != "cuda" or n == 8:
            yield "per_sample", n, dict(scheme="per_sample", batch_size=1)
        yield "one_to_more (batch min(N, 8))", n, dict(batch_size=min(n, 8))
        if n > 8:
            yield "one_to_more+kv_cache (batch 8)", n, dict(batch_size=8, kv_cache=True)
        if device.type == "cuda" and n == 32:
            yield "one_to_more, torch backend (batch 8)", n, dict(
                batch_size=8, graft_config=GraftConfig.paper(backend="torch"))
        if device.type != "cuda" and n > 4:
            yield "one_to_more (batch 4)", n, dict(batch_size=4)
            yield "one_to_more+kv_cache (batch 4)", n, dict(batch_size=4, kv_cache=True)


def txt2img_pipeline(pipe):
    """diffusers' own text-to-image pipeline on ``pipe``'s components: ``StableDiffusionPipeline``
    for SD 1.x/2.x, ``StableDiffusionXLPipeline`` for SDXL (no safety checker, no watermark)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if pipe.is_xl:
        sd = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                       text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
                                       tokenizer_2=pipe.tokenizer_2, unet=pipe.unet,
                                       scheduler=pipe.scheduler, add_watermarker=False)
    else:
        sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def _txt2img(pipe, n: int, steps: int, batch: int, device) -> float:
    """Seconds per image of diffusers' own text-to-image pipeline built from the same components,
    same steps, guidance 7.5 and batch size: the cost of an ordinary SD image on this machine."""
    sd = txt2img_pipeline(pipe)
    size = pipe.default_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        k = min(batch, n - start)
        sd(["a photo of a bottle"] * k, height=size, width=size, num_inference_steps=steps,
           guidance_scale=7.5, generator=gen, output_type="pil")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n


def grafted_call_inputs(pipe, device, n: int, backend: str = "auto"):
    """(layout, latents, text states, timestep, graft) of one UNet call with N = ``n`` targets at
    the pipeline's default size: seeded random latents and states, a central box as ``M_R`` and
    shifted copies of it as the targets, the paper's config restated for the UNet (the layers
    generation grafts: ``GraftConfig.for_unet``, exactly ``paper()`` on SD 1.x/2.x), DAE on token 5."""
    from o2mag import AttentionGraft, BranchLayout

    unet = pipe.unet
    lat_hw = pipe.default_size // pipe.vae_scale_factor
    layout = BranchLayout(n)
    g = torch.Generator().manual_seed(n)
    lat = torch.randn(layout.batch_size, 4, lat_hw, lat_hw, generator=g).to(device, unet.dtype)
    emb = torch.randn(layout.batch_size, 77, unet.config.cross_attention_dim, generator=g).to(
        device, unet.dtype)
    m = torch.zeros(pipe.default_size, pipe.default_size)
    c = pipe.default_size // 2
    m[c - c // 4:c + c // 4, c - c // 6:c + c // 6] = 1
    targets = torch.stack([torch.roll(m, shifts=(k * 7) % c, dims=1) for k in range(n)])
    graft = AttentionGraft(GraftConfig.for_unet(unet, backend=backend), layout)
    graft.set_masks(m, targets)
    graft.set_token_indices([5])
    return layout, lat, emb, torch.tensor(500, device=device), graft


def added_cond_inputs(pipe, rows: int, device, size: int = None):
    """SDXL's ``added_cond_kwargs`` for a UNet call on ``rows`` rows at ``size`` px (default the
    pipeline's): a seeded random pooled text embedding per row and the six size/crop ids
    (size, size, 0, 0, size, size) as diffusers' SDXL pipeline sets them; None for SD 1.x/2.x."""
    if not pipe.is_xl:
        return None
    size = size or pipe.default_size
    g = torch.Generator().manual_seed(rows)
    pooled = torch.randn(rows, pipe.text_encoder_2.config.projection_dim, generator=g)
    ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(rows, -1)
    dtype = pipe.unet.dtype
    return {"text_embeds": pooled.to(device, dtype), "time_ids": ids.to(device, dtype)}


def unet_call_rows(pipe, device, sizes, *, compiled: bool, repeats: int = 10, mode=None,
                   backend: str = "auto"):
    """One UNet call at a TriAG + DAE step (step 25 of 50, the paper's settings for this UNet)
    against the stock UNet on the same batch: rows = 2 x (2 + N). ``compiled``: through
    ``torch.compile(unet, mode=mode)`` (``mode="reduce-overhead"``: CUDA graphs); ``backend``: the
    op's backend while grafting.
    Returns rows of median ms per call."""
    from ..measure import median_seconds

    unet = pipe.unet
    lat_hw = pipe.default_size // pipe.vae_scale_factor
    out = []
    for n in sizes:
        layout, lat, emb, t, graft = grafted_call_inputs(pipe, device, n, backend)
        added = added_cond_inputs(pipe, layout.batch_size, device)  # SDXL's pooled text + size ids
        fn = torch.compile(unet, mode=mode) if compiled else unet
        call = lambda: fn(lat, t, encoder_hidden_states=emb, added_cond_kwargs=added)  # noqa: E731
        with torch.no_grad():
            stock = median_seconds(call, device, repeats=repeats, warmup=2)
            with graft.installed(unet):
                graft.prepare((lat_hw, lat_hw), device, dtype=unet.dtype)
                graft.set_step(25, 50)
                grafted = median_seconds(call, device, repeats=repeats, warmup=2)
        if compiled:
            torch._dynamo.reset()
        out.append({"num": n, "rows": layout.batch_size, "compiled": compiled, "mode": mode,
                    "backend": backend,
                    "stock_ms": stock * 1e3, "grafted_ms": grafted * 1e3,
                    "grafted_over_stock": grafted / stock})
    return out


def run_e2e_suite(device: torch.device, *, quick: bool, steps: int = None):
    """Seconds and UNet rows per generated sample for each scheme and N (one timed run each),
    diffusers' txt2img per image from the same components, and one UNet call grafted vs stock
    (eager; compiled too in a full GPU run)."""
    if device.type == "cuda":
        pipe = sd15_shaped_pipeline(device)
        model = pipe.model_id
        steps = steps or 20
    else:
        pipe = O2MAGPipeline.tiny().to(device)
        model = "tiny seeded model (o2mag.sources.tiny)"
        steps = steps or (10 if quick else 25)  # N = 1, 8, 32 in both: the tiny model is fast
    pipe.progress = False
    pipe.set_progress_bar_config(disable=True)
    # the one-UNet-call comparison first: it is the cheapest row and the one a cut-short run most
    # needs (every row is also printed as it lands)
    unet_rows = unet_call_rows(pipe, device, (8, 32) if device.type == "cuda" else (8,), compiled=False)
    if device.type == "cuda" and not quick:
        unet_rows += unet_call_rows(pipe, device, (8, 32), compiled=True)
    for r in unet_rows:
        print(f"e2e: UNet call N={r['num']}: grafted {r['grafted_ms']:.1f} ms, stock "
              f"{r['stock_ms']:.1f} ms ({r['grafted_over_stock']:.2f}x)", flush=True)
    sample = embedded_sample(size=pipe.default_size)
    max_n = 32
    targets = [t.mask for t in affine_masks(np.asarray(sample.ref_mask), max_n, seed=0)]
    rows = []
    per_sample_time = None
    for label, n, kwargs in _setups(device):
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
            per_sample_time = (seconds / n, stats["unet_rows"] / n)
        elif per_sample_time is not None:
            base_t, base_rows = per_sample_time
            row["speedup_vs_per_sample"] = base_t / row["seconds_per_sample"]
            row["fewer_rows_vs_per_sample"] = base_rows / row["unet_rows_per_sample"]
        rows.append(row)
        print(f"e2e: {label} N={n}: {row['seconds_per_sample']:.3f} s/sample", flush=True)
    txt2img = _txt2img(pipe, max_n, steps, 8, device)
    for row in rows:
        if row["num"] == max_n:
            row["over_txt2img"] = row["seconds_per_sample"] / txt2img
    return {"model": model, "steps": steps, "ago_steps": 0, "rows": rows,
            "txt2img_seconds_per_image": txt2img, "unet_calls": unet_rows}
