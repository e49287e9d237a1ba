"""DDIM inversion with every intermediate latent kept, so source branches can replay it.

The schedule is the one of the pipeline's diffusers ``DDIMScheduler`` (its ``timesteps`` and
``alphas_cumprod``); no scheduler class is re-implemented here. Inversion step ``k`` is the exact
algebraic mirror of the denoising step that ``DDIMScheduler.step`` (eta=0) takes at the same
timestep, so "invert, then denoise with the same noise predictions" returns the start latent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

__all__ = ["Inversion", "ddim_invert", "ddim_step", "alpha_pair", "to_epsilon"]


@dataclass
class Inversion:
    """Latents of one DDIM inversion.

    ``latents[k]`` is the latent after ``k`` inversion steps (``latents[0]`` the clean VAE latent,
    ``latents[-1]`` the inverted noise z_T); all float32, shape (1, C, h, w), on the pipeline device.
    ``timesteps`` are the *denoising* timesteps (descending), as ``scheduler.timesteps``.
    """

    latents: list
    timesteps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def noise(self) -> torch.Tensor:
        """z_T: the start latent of the denoising loop."""
        return self.latents[-1]

    def before_step(self, i: int) -> torch.Tensor:
        """The latent a replaying branch feeds to the UNet at denoising step ``i``."""
        return self.latents[self.num_steps - i]

    def after_step(self, i: int) -> torch.Tensor:
        """The latent a replaying branch holds once denoising step ``i`` is done."""
        return self.latents[self.num_steps - i - 1]

    def to(self, device=None) -> "Inversion":
        return Inversion([z.to(device) for z in self.latents], self.timesteps.to(device))


def alpha_pair(scheduler, t: int, num_steps: int):
    """(alpha_bar at t, alpha_bar one DDIM step earlier) exactly as ``DDIMScheduler.step`` uses them."""
    ac = scheduler.alphas_cumprod
    prev = int(t) - scheduler.config.num_train_timesteps // num_steps
    a_t = ac[int(t)]
    a_prev = ac[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return float(a_t), float(a_prev)


def to_epsilon(scheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """Noise prediction from any of diffusers' prediction types (SD v1.5 is ``epsilon``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    if kind == "v_prediction":
        return alpha_t ** 0.5 * model_output + (1 - alpha_t) ** 0.5 * sample
    if kind == "sample":
        return (sample - alpha_t ** 0.5 * model_output) / (1 - alpha_t) ** 0.5
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported")


def ddim_step(scheduler, model_output: torch.Tensor, t, sample: torch.Tensor, *, eta: float = 0.0,
              generator=None) -> torch.Tensor:
    """One denoising step with the diffusers scheduler: deterministic with ``eta=0`` (the exact
    mirror of an inversion step); ``eta > 0`` adds DDIM's noise, drawn from ``generator`` (one
    generator, or a list with one per batch row)."""
    if eta == 0.0:
        return scheduler.step(model_output, t, sample, eta=0.0).prev_sample
    return scheduler.step(model_output, t, sample, eta=eta, generator=generator).prev_sample


@torch.no_grad()
def ddim_invert(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latent0: torch.Tensor,
    num_steps: int,
    *,
    progress=True,
    desc: str = "DDIM inversion",
) -> Inversion:
    """Invert ``latent0`` ((1, C, h, w)) over ``num_steps`` DDIM steps, in float32 (float64 when
    ``latent0`` is float64: the near-exact run tests compare against).

    ``predict(latent, t)`` returns the model output (float32) for the inversion prompt (the empty
    prompt, as in the authors' code). The scheduler's timesteps are set to ``num_steps``.
    ``progress``: show a tqdm bar (bool), or a callable ``progress(iterable, desc)`` that wraps
    the steps in the caller's own bar (the pipeline passes its ``progress_bar``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps, device=latent0.device)
    timesteps = scheduler.timesteps.clone()
    dtype = torch.float64 if latent0.dtype == torch.float64 else torch.float32
    z = latent0.to(dtype)
    latents = [z]
    steps = list(reversed(timesteps.tolist()))
    bar = progress(steps, desc) if callable(progress) else tqdm(steps, desc=desc, disable=not progress,
                                                                 leave=False)
    for t in bar:
        a_t, a_prev = alpha_pair(scheduler, t, num_steps)
        eps = to_epsilon(scheduler, predict(z, t).to(dtype), z, a_t)
        # mirror of the DDIM update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps, solved for x_t
        x0 = (z - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
        z = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
        latents.append(z)
    return Inversion(latents, timesteps)
