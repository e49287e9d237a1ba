"""AGO: optimise the prompt's text embedding on the reference anomaly image (frozen UNet).

Why: the generic prompt ("a photo of a crack") does not describe *this* defect; fitting the
embedding so that the frozen UNet predicts the noise of the noised reference latent well makes
the conditional branch describe the reference's appearance. Paper defaults: 500 Adam steps at
lr 3e-3, random timesteps, noise-prediction MSE.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inversion import to_epsilon

__all__ = ["optimize_embedding", "dilate_mask"]


def dilate_mask(mask: torch.Tensor, size, radius: int = 1) -> torch.Tensor:
    """Image-space mask (H, W) -> float mask at latent ``size`` (h, w), max-pooled then dilated.

    Max-pooling keeps small defects from vanishing at latent resolution.
    """
    m = mask.float()[None, None]
    m = F.adaptive_max_pool2d(m, tuple(size))
    if radius > 0:
        m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    return m[0, 0]


def optimize_embedding(
    unet,
    scheduler,
    latent0: torch.Tensor,
    init_embedding: torch.Tensor,
    *,
    steps: int = 500,
    lr: float = 3e-3,
    weight: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress=True,
    on_forward=None,
    added_cond_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """Return the optimised embedding (float32, shape of ``init_embedding``). ``latent0``: clean
    float32 VAE latent (1, C, h, w) of the reference image. ``weight``: optional (h, w) loss weight
    (e.g. the dilated reference mask); None = plain MSE over the latent. The UNet's parameters are
    never updated (their ``requires_grad`` flags are restored on exit). ``added_cond_kwargs``: the
    UNet's added conditioning for one row (SDXL: pooled text embedding, size ids), passed to every
    call, not optimised. ``on_forward(rows)`` is called after each UNet call (statistics).
    ``progress``: a tqdm bar (bool), or a callable ``progress(iterable, desc)`` wrapping the steps."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    emb = init_embedding.detach().float().clone().requires_grad_(True)
    if steps == 0:
        return emb.detach()
    device = latent0.device
    dtype = unet.dtype
    num_train = scheduler.config.num_train_timesteps
    ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    w = None
    if weight is not None:
        w = weight.to(device=device, dtype=torch.float32)[None, None]
        if float(w.sum()) <= 0:
            w = None
    flags = [p.requires_grad for p in unet.parameters()]
    was_training = unet.training
    unet.requires_grad_(False)
    unet.eval()
    opt = torch.optim.Adam([emb], lr=lr)
    skipped = 0
    try:
        with torch.enable_grad():
            desc = "AGO (embedding)"
            bar = progress(range(steps), desc) if callable(progress) else \
                tqdm(range(steps), desc=desc, disable=not progress, leave=False)
            for _ in bar:
                t = int(torch.randint(0, num_train, (1,), generator=generator).item())
                noise = torch.randn(latent0.shape, generator=generator, dtype=torch.float32).to(device)
                a = ac[t]
                noisy = a.sqrt() * latent0 + (1 - a).sqrt() * noise
                out = unet(noisy.to(dtype), t, emb.to(dtype), added_cond_kwargs=added_cond_kwargs).sample.float()
                if on_forward is not None:
                    on_forward(noisy.shape[0])
                eps = to_epsilon(scheduler, out, noisy, float(a))
                err = (eps - noise) ** 2
                if w is None:
                    loss = err.mean()
                else:
                    loss = (err * w).sum() / (w.sum() * err.shape[1])
                opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):  # a rare fp16 overflow: skip this draw, keep the embedding
                    skipped += 1
                    continue
                loss.backward()
                if emb.grad is not None and torch.isfinite(emb.grad).all():
                    opt.step()
                else:
                    skipped += 1
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        unet.train(was_training)
    out = emb.detach()
    if skipped == steps or not torch.isfinite(out).all():
        raise FloatingPointError("AGO: every step overflowed or the embedding is not finite; use --dtype "
                                 "fp32 or bf16, or a lower --ago-lr")
    return out
