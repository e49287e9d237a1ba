"""The denoising of a request: its batches of targets, each sharing one reference and one normal
branch (:meth:`DenoisingMixin._batches`), and the loop that denoises one batch with the grafting
processors installed (:meth:`DenoisingMixin._denoise`). A mixin of :class:`o2mag.O2MAGPipeline`;
see ``docs/architecture.md`` (sections 3 and 6) for the batch layout and the phases."""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..graft import AttentionGraft, SourceCache
from ..method.config import GraftConfig
from ..method.inversion import Inversion, ddim_step
from ..method.layout import BranchLayout
from .request import Request

__all__ = ["Conditioning", "DenoisingMixin"]


@dataclasses.dataclass
class Conditioning:
    """What conditions the UNet rows of one batch, under diffusers' step-end callback names: the
    empty prompt's and the (AGO) prompt's sequence embeddings, one row each, and on SDXL their
    pooled embeddings and the (1, 6) size ids every row gets (None on SD 1.x/2.x)."""

    negative_prompt_embeds: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: Optional[torch.Tensor] = None
    add_text_embeds: Optional[torch.Tensor] = None
    add_time_ids: Optional[torch.Tensor] = None

    def named(self) -> Dict[str, Optional[torch.Tensor]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self, cfg: bool, per_half: int, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(text states, pooled embeddings or None) per UNet row: ``per_half`` rows of the
        unconditional half (with guidance), then of the conditional half."""
        def stack(uncond, cond):
            halves = [uncond, cond] if cfg else [cond]
            return torch.cat([e.to(device).expand(per_half, *e.shape[1:]) for e in halves])

        pooled = None
        if self.add_text_embeds is not None:
            pooled = stack(self.negative_pooled_prompt_embeds, self.add_text_embeds)
        return stack(self.negative_prompt_embeds, self.prompt_embeds), pooled

    def replace(self, returned: Dict[str, torch.Tensor]) -> bool:
        """Take the tensors a callback returned under these names (an SDXL name is ignored on
        SD 1.x/2.x, which never offer it); True when one was taken."""
        taken = False
        for name, value in self.named().items():
            if name in returned and value is not None:
                setattr(self, name, returned.pop(name))
                taken = True
        return taken


class DenoisingMixin:
    """The batches and the denoising loop of :class:`o2mag.O2MAGPipeline` (see the module docstring)."""

    def _batches(self, job: Request,
                 stop_on_interrupt: bool = False) -> Iterator[Tuple[List[int], torch.Tensor]]:
        """The work shared by ``__call__`` and ``generate_iter``: AGO, the inversions, and the
        denoising of each batch; yields ``(target indices, their final latents)``.

        After a callback sets ``pipe._interrupt``, no denoising step runs: the batches left are
        yielded undenoised (``pipe(...)`` returns every target, as diffusers' pipelines do), or,
        with ``stop_on_interrupt`` (streaming), not at all: neither is the batch being denoised when
        the interrupt came (its latents are half-denoised, no finished samples)."""
        s = job.settings
        self._interrupt = False
        emb_u = self.encode_prompt("")
        # SDXL's pooled embeddings (None otherwise): the empty prompt's, and the prompt's unless
        # ago_pooled optimised it (conditional rows only; the unconditional keep the empty prompt's)
        pooled = (self.encode_pooled(""), self.encode_pooled(job.prompt)) if self.is_xl else None
        ago = dict(steps=s.ago_steps, lr=s.ago_lr, mask=job.m_r if s.ago_mask_weight else None, seed=s.seed)
        if s.ago_pooled:
            emb_c, pooled_c = self.optimize_conditioning(job.ref, job.prompt, pooled=True, **ago)
            if pooled_c is not None:  # None when AGO is off (ago_steps 0): the prompt's stays
                pooled = (pooled[0], pooled_c)
        else:
            emb_c = self.optimize_embedding(job.ref, job.prompt, **ago)
        n = len(job.masks)
        steps = s.num_inference_steps
        if s.scheme == "one_to_more":
            disk = s.cache_inversions_to_disk
            inv_r = self.invert(job.ref, steps, cache_to_disk=disk, desc="DDIM inversion (reference)")
            inv_n = self.invert(job.nor, steps, cache_to_disk=disk, desc="DDIM inversion (normal)")
            batches = [list(range(k, min(k + s.batch_size, n))) for k in range(0, n, s.batch_size)]
        else:
            batches = [[k] for k in range(n)]
        cache = None
        # the paper's layers restated for this UNet (exactly GraftConfig.paper() on SD 1.x/2.x)
        config = s.graft_config if s.graft_config is not None else GraftConfig.for_unet(self.unet)
        for b, idx in enumerate(batches):
            if self.interrupt and stop_on_interrupt:
                return
            # per_sample re-inverts for its cost only (same values); once interrupted, nothing runs
            if s.scheme == "per_sample" and not (self.interrupt and b > 0):
                inv_r = self.invert(job.ref, steps, use_cache=False, desc="DDIM inversion (reference)")
                inv_n = self.invert(job.nor, steps, use_cache=False, desc="DDIM inversion (normal)")
            with_sources = not (s.kv_cache and b > 0)
            if s.kv_cache and b == 0:
                cache = SourceCache(device=s.kv_cache_device)
            latents = self._denoise(inv_r, inv_n, job.m_r, [job.masks[k] for k in idx], emb_u, emb_c,
                                    job.tokens, config=config, pooled=pooled, guidance_scale=s.guidance_scale,
                                    blend=s.blend_background, with_sources=with_sources, cache=cache,
                                    eta=s.eta, generator=job.generator_for(idx), callback=job.callback,
                                    callback_inputs=job.callback_inputs,
                                    desc=f"denoising batch {b + 1}/{len(batches)}")
            if self.interrupt and stop_on_interrupt:
                return  # interrupted while denoising it: these latents are no finished samples
            self.stats.samples += len(idx)
            yield idx, latents

    def _denoise(self, inv_r: Inversion, inv_n: Inversion, m_r: np.ndarray, masks: List[np.ndarray],
                 emb_u: torch.Tensor, emb_c: torch.Tensor, tokens: List[int], *, config, pooled=None,
                 guidance_scale: float, blend: bool, with_sources: bool = True, cache=None, eta: float = 0.0,
                 generator=None, callback=None, callback_inputs: Sequence[str] = (),
                 desc: str = "denoising") -> torch.Tensor:
        """Denoise one batch of targets; returns their final latents (b, C, h, w), float32.

        The reference and normal rows (when ``with_sources``) feed the inverted latents of the
        current step (replay); their outputs are not used. Without sources, ``cache`` supplies
        their K/V (recorded by the first batch). ``pooled``: SDXL's (unconditional, conditional)
        pooled embeddings, laid out per row exactly as the sequence embeddings (None: SD 1.x/2.x).

        diffusers' callback state: ``pipe.guidance_scale`` starts at ``guidance_scale`` and is read
        at every step (a callback may change it); the unconditional half runs when guidance is on
        at the start (``do_classifier_free_guidance``); a step is skipped once ``pipe.interrupt``.
        """
        b = len(masks)
        self._guidance_scale = guidance_scale
        cfg = self.do_classifier_free_guidance
        layout = BranchLayout(b, cfg=cfg, include_sources=with_sources)
        graft = AttentionGraft(config, layout, source_cache=cache)
        graft.set_masks(torch.from_numpy(m_r), torch.from_numpy(np.stack(masks)))
        graft.set_token_indices(tokens)
        dev = self._execution_device
        x = inv_n.noise.to(dev).expand(b, -1, -1, -1).clone()
        cond = Conditioning(emb_u, emb_c, *(pooled if pooled is not None else (None, None)),
                            add_time_ids=self._size_ids(x) if pooled is not None else None)
        emb, pooled_rows = cond.rows(cfg, layout.rows_per_half, dev)
        h, w = x.shape[-2:]
        m_t = graft.stitch_masks((h, w), dev)
        num_steps = inv_n.num_steps
        self.scheduler.set_timesteps(num_steps, device=dev)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        if not torch.equal(timesteps.cpu(), inv_n.timesteps.cpu()):
            raise RuntimeError("scheduler timesteps differ from the inversion's")
        with graft.installed(self.unet), torch.no_grad():
            # every mask, routing table and DAE bias now, once: nothing is built (or read back to
            # the host) inside the UNet calls, which a torch.compile-d UNet needs
            graft.prepare((h, w), dev, dtype=self.unet.dtype, text_len=emb.shape[1])
            for i, t in enumerate(self.progress_bar(timesteps, desc=desc, leave=False)):
                if self.interrupt:
                    continue
                graft.set_step(i, num_steps)
                if with_sources:
                    inp = layout.assemble(reference=inv_r.before_step(i).to(dev),
                                          normal=inv_n.before_step(i).to(dev), targets=x)
                else:
                    inp = layout.assemble(targets=x)
                out = self._unet(inp, t, emb, generation=True, pooled=pooled_rows, time_ids=cond.add_time_ids)
                eps = out[layout.target_slice("cond")]
                if self.do_classifier_free_guidance:
                    if not cfg:
                        raise RuntimeError(
                            f"a step-end callback set guidance_scale to {self.guidance_scale} (> 1) in a "
                            f"batch that started without guidance (guidance_scale {guidance_scale} <= 1): "
                            "the unconditional half was never run; start with guidance_scale > 1")
                    eps_u = out[layout.target_slice("uncond")]
                    eps = eps_u + self.guidance_scale * (eps - eps_u)
                x = ddim_step(self.scheduler, eps, t, x, eta=eta, generator=generator)
                if blend:
                    x = m_t * x + (1 - m_t) * inv_n.after_step(i).to(dev)
                if callback is not None:
                    named = {"latents": x, **cond.named()}
                    returned = callback(self, i, t, {k: named[k] for k in callback_inputs}) or {}
                    x = returned.pop("latents", x)
                    if cond.replace(returned):
                        emb, pooled_rows = cond.rows(cfg, layout.rows_per_half, dev)
        self.last_run = {"target_latents": x.detach(), "normal_latent": inv_n.latents[0].detach(),
                         "layout": layout}
        return x
