"""What a request computes once per reference/normal pair, and the encoders around the UNet: the
prompt and image encodings, the DDIM inversions and the AGO embedding, each cached by content key
(:mod:`.caches`), plus decoding latents. A mixin of :class:`o2mag.O2MAGPipeline`, which provides
the components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``), ``stats``,
``model_id``, ``cache_dir``, ``cache_lock`` and the two result caches."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import PIL.Image
import torch

from ..method.ago import dilate_mask, optimize_embedding
from ..method.inversion import Inversion, ddim_invert
from .caches import content_key, model_fingerprint, scheduler_settings

__all__ = ["PreparationMixin"]


class PreparationMixin:
    """Encoding, DDIM inversion and AGO for :class:`o2mag.O2MAGPipeline` (see the module docstring)."""

    def _identity(self) -> str:
        return model_fingerprint(self.model_id or getattr(self.config, "_name_or_path", ""),
                                 (self.unet, self.vae, self.text_encoder))

    def _unet(self, latents: torch.Tensor, t, emb: torch.Tensor, generation: bool = False) -> torch.Tensor:
        rows = latents.shape[0]
        self.stats.unet_calls += 1
        self.stats.unet_rows += rows
        if generation:
            self.stats.generation_unet_calls += 1
            self.stats.generation_unet_rows += rows
        out = self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=emb.to(self.unet.dtype)).sample
        return out.float()

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states (1, 77, D), float32, on the execution device."""
        tok = self.tokenizer(
            [prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tok.input_ids.to(self._execution_device))[0]
        return out.float()

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 VAE latent (1, 4, H/8, W/8), scaled by the VAE's scaling factor.

        Works with ``AutoencoderKL`` (SD) and ``AutoencoderTiny`` (TAESD, fast previews)."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        x = x.to(device=self._execution_device, dtype=self.vae.dtype)
        enc = self.vae.encode(x)
        # AutoencoderKL returns a distribution (its mode: deterministic); AutoencoderTiny the latents
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        return z.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [-1, 1], (N, 3, H, W), on the CPU."""
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return x.float().cpu()

    def decode_latents(self, latents: torch.Tensor) -> List[PIL.Image.Image]:
        """Latents -> RGB PIL images (as ``output_type="pil"`` gives them)."""
        return self.image_processor.postprocess(self._decode(latents), output_type="pil")

    def invert(self, image: np.ndarray, num_steps: int, *, use_cache: bool = True,
               cache_to_disk: bool = False, desc: str = "DDIM inversion") -> Inversion:
        """DDIM-invert a uint8 (H, W, 3) image with the empty prompt; cached by content + settings
        (in memory; also in ``<cache_dir>/inversions`` with ``cache_to_disk``)."""
        device = self._execution_device
        key = content_key("inversion", image, self._identity(), num_steps, str(self.unet.dtype),
                          scheduler_settings(self.scheduler))

        def compute() -> Inversion:
            z0 = self.encode_image(image)
            empty = self.encode_prompt("")
            return ddim_invert(lambda z, t: self._unet(z, t, empty), self.scheduler, z0, num_steps,
                               progress=self._phase_bar, desc=desc)

        inv, computed = self._inversions.fetch(
            key, self.cache_dir if cache_to_disk else None, compute, lock=self.cache_lock, reuse=use_cache,
            pack=lambda inv: {"latents": [z.cpu() for z in inv.latents], "timesteps": inv.timesteps.cpu()},
            unpack=lambda data: Inversion(list(data["latents"]), data["timesteps"]).to(device))
        if computed:
            self.stats.inversion_runs += 1
        else:
            self.stats.inversion_cache_hits += 1
        return inv.to(device)

    def optimize_embedding(self, image: np.ndarray, prompt: str, *, steps: int = 500, lr: float = 3e-3,
                           mask: Optional[np.ndarray] = None, seed: int = 0) -> torch.Tensor:
        """AGO embedding for (reference image, prompt), drawn with ``seed``; cached in memory and in
        ``<cache_dir>/embeddings``."""
        if steps == 0:  # AGO off: the plain prompt embedding
            return self.encode_prompt(prompt)
        device = self._execution_device
        key = content_key("ago", image, prompt, self._identity(), steps, lr, seed, str(self.unet.dtype),
                          mask if mask is not None else None, scheduler_settings(self.scheduler))

        def count(rows):
            self.stats.unet_calls += 1
            self.stats.unet_rows += rows

        def compute() -> torch.Tensor:
            init = self.encode_prompt(prompt)
            z0 = self.encode_image(image)
            weight = None
            if mask is not None:
                weight = dilate_mask(torch.from_numpy(mask), z0.shape[-2:], radius=1)
            gen = torch.Generator().manual_seed(int(seed))
            return optimize_embedding(self.unet, self.scheduler, z0, init, steps=steps, lr=lr, weight=weight,
                                      generator=gen, progress=self._phase_bar, on_forward=count)

        emb, computed = self._embeddings.fetch(
            key, self.cache_dir, compute, lock=self.cache_lock,
            pack=lambda emb: {"embedding": emb.cpu(), "prompt": prompt, "steps": steps, "lr": lr, "seed": seed},
            unpack=lambda data: data["embedding"].to(device))
        if computed:
            self.stats.ago_runs += 1
        else:
            self.stats.ago_cache_hits += 1
        return emb.to(device)

    def clear_caches(self) -> None:
        """Forget in-memory inversions and embeddings (the disk bank stays)."""
        self._inversions.clear()
        self._embeddings.clear()
