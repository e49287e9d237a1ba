"""AGO: optimise the prompt's text embedding on the reference anomaly image (frozen UNet).

Why: the generic prompt ("a photo of a crack") does not describe *this* defect; fitting the
embedding so that the frozen UNet predicts the noise of the noised reference latent well makes
the conditional branch describe the reference's appearance. Paper defaults: 500 Adam steps at
lr 3e-3, random timesteps, noise-prediction MSE.

SDXL conditions the UNet on a second text tensor, the pooled embedding (``added_cond_kwargs``'s
``text_embeds``). :func:`optimize_conditioning` optimises it jointly with the sequence embedding
when given ``init_pooled`` (one loop, one Adam over both, the same loss and lr);
:func:`optimize_embedding` is the sequence embedding alone. :func:`ago_loss` evaluates the loss
on given draws (:func:`ago_draws`), e.g. held-out ones.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .inversion import to_epsilon

__all__ = ["optimize_embedding", "optimize_conditioning", "ago_loss", "ago_draws", "dilate_mask"]


def dilate_mask(mask: torch.Tensor, size, radius: int = 1) -> torch.Tensor:
    """Image-space mask (H, W) -> float mask at latent ``size`` (h, w), max-pooled then dilated.

    Max-pooling keeps small defects from vanishing at latent resolution.
    """
    m = mask.float()[None, None]
    m = F.adaptive_max_pool2d(m, tuple(size))
    if radius > 0:
        m = F.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    return m[0, 0]


def _draw(scheduler, latent0: torch.Tensor, generator) -> Tuple[int, torch.Tensor]:
    """One AGO draw: a timestep in [0, num_train_timesteps) and float32 noise like ``latent0``."""
    t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator).item())
    noise = torch.randn(latent0.shape, generator=generator, dtype=torch.float32).to(latent0.device)
    return t, noise


def ago_draws(scheduler, latent0: torch.Tensor, count: int,
              generator: Optional[torch.Generator] = None) -> List[Tuple[int, torch.Tensor]]:
    """``count`` (timestep, noise) draws as AGO's loop makes them, from ``generator``: a fixed set
    to evaluate :func:`ago_loss` on (a generator of its own keeps them apart from the training draws)."""
    return [_draw(scheduler, latent0, generator) for _ in range(int(count))]


def _loss_weight(weight: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """The (1, 1, h, w) float32 loss weight, or None (no weight, or one that sums to <= 0)."""
    if weight is None:
        return None
    w = weight.to(device=device, dtype=torch.float32)[None, None]
    return None if float(w.sum()) <= 0 else w


def _loss(unet, scheduler, latent0, t: int, noise, emb, added_cond_kwargs, w, on_forward=None):
    """AGO's loss on one draw: the (weighted) MSE of the UNet's noise prediction on the noised
    ``latent0`` at timestep ``t``, conditioned on ``emb`` and ``added_cond_kwargs``."""
    a = scheduler.alphas_cumprod.to(device=latent0.device, dtype=torch.float32)[t]
    noisy = a.sqrt() * latent0 + (1 - a).sqrt() * noise
    dtype = unet.dtype
    out = unet(noisy.to(dtype), t, emb.to(dtype), added_cond_kwargs=added_cond_kwargs).sample.float()
    if on_forward is not None:
        on_forward(noisy.shape[0])
    eps = to_epsilon(scheduler, out, noisy, float(a))
    err = (eps - noise) ** 2
    if w is None:
        return err.mean()
    return (err * w).sum() / (w.sum() * err.shape[1])


def _with_pooled(added_cond_kwargs: Optional[dict], pooled: Optional[torch.Tensor], dtype) -> Optional[dict]:
    """``added_cond_kwargs`` with ``text_embeds`` replaced by ``pooled`` (in the UNet's dtype)."""
    if pooled is None:
        return added_cond_kwargs
    return {**added_cond_kwargs, "text_embeds": pooled.to(dtype)}


def _check_pooled(init_pooled, added_cond_kwargs) -> None:
    if init_pooled is None:
        return
    given = (added_cond_kwargs or {}).get("text_embeds")
    if given is None:
        raise ValueError("init_pooled needs added_cond_kwargs with the UNet's text_embeds and time_ids "
                         "(an SDXL UNet's added conditioning)")
    if tuple(init_pooled.shape) != tuple(given.shape):
        raise ValueError(f"init_pooled has shape {tuple(init_pooled.shape)} but added_cond_kwargs['text_embeds'] "
                         f"has {tuple(given.shape)}")


@torch.no_grad()
def ago_loss(unet, scheduler, latent0: torch.Tensor, embedding: torch.Tensor,
             draws: List[Tuple[int, torch.Tensor]], *, weight: Optional[torch.Tensor] = None,
             added_cond_kwargs: Optional[dict] = None, pooled: Optional[torch.Tensor] = None) -> float:
    """The mean of AGO's loss over ``draws`` (:func:`ago_draws`) for ``embedding`` (and, on SDXL,
    ``pooled`` in place of ``added_cond_kwargs['text_embeds']``): the quantity the loop descends,
    evaluated without gradients."""
    if not draws:
        raise ValueError("draws is empty: give at least one (timestep, noise) draw")
    _check_pooled(pooled, added_cond_kwargs)
    w = _loss_weight(weight, latent0.device)
    added = _with_pooled(added_cond_kwargs, pooled, unet.dtype)
    total = sum(float(_loss(unet, scheduler, latent0, t, n, embedding, added, w)) for t, n in draws)
    return total / len(draws)


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
    call, not optimised (:func:`optimize_conditioning` optimises the pooled one too).
    ``on_forward(rows)`` is called after each UNet call (statistics). ``progress``: a tqdm bar
    (bool), or a callable ``progress(iterable, desc)`` wrapping the steps."""
    return optimize_conditioning(unet, scheduler, latent0, init_embedding, steps=steps, lr=lr, weight=weight,
                                 generator=generator, progress=progress, on_forward=on_forward,
                                 added_cond_kwargs=added_cond_kwargs)[0]


def optimize_conditioning(
    unet,
    scheduler,
    latent0: torch.Tensor,
    init_embedding: torch.Tensor,
    *,
    init_pooled: Optional[torch.Tensor] = None,
    steps: int = 500,
    lr: float = 3e-3,
    weight: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress=True,
    on_forward=None,
    added_cond_kwargs: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(sequence embedding, pooled embedding)``, both float32: AGO of :func:`optimize_embedding`,
    and with ``init_pooled`` (SDXL's pooled text embedding, the shape of ``added_cond_kwargs``'s
    ``text_embeds``, which it replaces in every call) the pooled embedding optimised jointly: one
    Adam over both tensors, the same loss, lr and draws. Without ``init_pooled`` the pooled result
    is None and the run is exactly :func:`optimize_embedding`'s. A draw whose loss or any gradient
    is not finite is skipped (no step for either tensor)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    _check_pooled(init_pooled, added_cond_kwargs)
    emb = init_embedding.detach().float().clone().requires_grad_(True)
    pooled = None if init_pooled is None else init_pooled.detach().float().clone().requires_grad_(True)
    params = [emb] + ([pooled] if pooled is not None else [])
    if steps == 0:
        return emb.detach(), (None if pooled is None else pooled.detach())
    w = _loss_weight(weight, latent0.device)
    flags = [p.requires_grad for p in unet.parameters()]
    was_training = unet.training
    unet.requires_grad_(False)
    unet.eval()
    opt = torch.optim.Adam(params, lr=lr)
    skipped = 0
    try:
        with torch.enable_grad():
            desc = "AGO (embedding)" if pooled is None else "AGO (embedding + pooled)"
            bar = progress(range(steps), desc) if callable(progress) else \
                tqdm(range(steps), desc=desc, disable=not progress, leave=False)
            for _ in bar:
                t, noise = _draw(scheduler, latent0, generator)
                added = _with_pooled(added_cond_kwargs, pooled, unet.dtype)
                loss = _loss(unet, scheduler, latent0, t, noise, emb, added, w, on_forward)
                opt.zero_grad(set_to_none=True)
                if not torch.isfinite(loss):  # a rare fp16 overflow: skip this draw, keep the embedding
                    skipped += 1
                    continue
                loss.backward()
                if all(p.grad is not None and torch.isfinite(p.grad).all() for p in params):
                    opt.step()
                else:
                    skipped += 1
    finally:
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        unet.train(was_training)
    if skipped == steps or not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError("AGO: every step overflowed or the embedding is not finite; use --dtype "
                                 "fp32 or bf16, or a lower --ago-lr")
    return emb.detach(), (None if pooled is None else pooled.detach())
