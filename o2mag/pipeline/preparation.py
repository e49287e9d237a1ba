"""What a request computes once per reference/normal pair, and the encoders around the UNet: the
prompt and image encodings, the DDIM inversions and the AGO embedding, each cached by content key
(:mod:`.caches`), plus decoding latents. A mixin of :class:`o2mag.O2MAGPipeline`, which provides
the components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``; SDXL's
``text_encoder_2`` and ``tokenizer_2``), ``stats``,
``model_id``, ``cache_dir``, ``cache_lock`` and the two result caches."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import numpy as np
import PIL.Image
import torch

from ..method.ago import dilate_mask, optimize_conditioning
from ..method.inversion import Inversion, ddim_invert
from .caches import content_key, model_fingerprint, scheduler_settings

__all__ = ["PreparationMixin"]


class PreparationMixin:
    """Encoding, DDIM inversion and AGO for :class:`o2mag.O2MAGPipeline` (see the module docstring).

    The family seam: SD 1.x/2.x condition the UNet on one text encoder's last hidden states; SDXL
    (a UNet with "text_time" added conditioning and a ``text_encoder_2``) on both encoders'
    penultimate hidden states, concatenated (one (1, 77, D1 + D2) tensor, the "sequence
    embedding"), plus the second encoder's pooled embedding and the size/crop ids, passed as
    ``added_cond_kwargs`` to every UNet call (:meth:`_unet`, :meth:`_added_cond`). Everything else
    -- the batch layout, grafting, DAE, the caches -- sees only the sequence embedding."""

    @property
    def is_xl(self) -> bool:
        """SDXL conditioning: the UNet takes "text_time" added conditioning (pooled text + size ids)."""
        return self.unet is not None and getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def _family_key(self) -> str:
        """The model family as a cache-key part (caches never mix families' results)."""
        if getattr(self, "family", None) is not None:
            return self.family.name
        return "sdxl" if self.is_xl else "sd"

    def _identity(self) -> str:
        encoders = (self.text_encoder,) + ((self.text_encoder_2,) if self._second_encoder() is not None else ())
        return model_fingerprint(self.model_id or getattr(self.config, "_name_or_path", ""),
                                 (self.unet, self.vae) + encoders)

    def _second_encoder(self):
        return getattr(self, "text_encoder_2", None)

    def _size_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's six size/crop ids for a UNet call on ``latents`` (rows, C, h, w), (1, 6) float32:
        (original size, crop top-left (0, 0), target size), both sizes the working image size
        (h, w) x the VAE factor, as diffusers' SDXL pipeline sets them when not told otherwise."""
        h, w = (int(n) * self.vae_scale_factor for n in latents.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=latents.device)

    def _added_cond(self, pooled: Optional[torch.Tensor], latents: torch.Tensor,
                    time_ids: Optional[torch.Tensor] = None) -> Optional[dict]:
        """SDXL's ``added_cond_kwargs`` for a UNet call on ``latents`` (rows, C, h, w): the pooled
        embedding of each row (``pooled``: (rows, P)) and the same six ids for every row
        (``time_ids``, (1, 6); default :meth:`_size_ids`). None for SD 1.x/2.x (``pooled`` None)."""
        if pooled is None:
            return None
        ids = self._size_ids(latents) if time_ids is None else time_ids
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"add_time_ids must be one row of ids, shape (1, k), got {tuple(ids.shape)}")
        cfg = self.unet.config
        passed = cfg.addition_time_embed_dim * ids.shape[1] + pooled.shape[-1]
        expected = self.unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"the UNet's added embedding takes {expected} numbers but the pooled text "
                             f"embedding ({pooled.shape[-1]}) and {ids.shape[1]} size ids give {passed}: "
                             "unet.config.addition_time_embed_dim or text_encoder_2's projection_dim is wrong")
        dtype, dev = self.unet.dtype, latents.device
        if pooled.shape[0] != latents.shape[0]:
            raise RuntimeError(f"{pooled.shape[0]} pooled embeddings for {latents.shape[0]} latent rows")
        time_ids = ids.to(device=dev, dtype=dtype).expand(latents.shape[0], -1)
        return {"text_embeds": pooled.to(device=dev, dtype=dtype), "time_ids": time_ids}

    def _unet(self, latents: torch.Tensor, t, emb: torch.Tensor, generation: bool = False,
              pooled: Optional[torch.Tensor] = None, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows = latents.shape[0]
        self.stats.unet_calls += 1
        self.stats.unet_rows += rows
        if generation:
            self.stats.generation_unet_calls += 1
            self.stats.generation_unet_rows += rows
        out = self.unet(latents.to(self.unet.dtype), t, encoder_hidden_states=emb.to(self.unet.dtype),
                        added_cond_kwargs=self._added_cond(pooled, latents, time_ids)).sample
        return out.float()

    @torch.no_grad()
    def _encode(self, prompt: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(sequence embedding (1, 77, D), pooled embedding (1, P) or None), float32.

        SD 1.x/2.x: the text encoder's last hidden states, no pooled embedding. SDXL, as
        diffusers' ``StableDiffusionXLPipeline.encode_prompt`` defines it (no clip skip): each
        tokenizer pads ``prompt`` to its own length with its own pad token, each encoder's
        penultimate hidden states, concatenated on the feature axis, and the pooled embedding of
        the second encoder (``CLIPTextModelWithProjection``'s ``text_embeds``)."""
        dev = self._execution_device
        second = self._second_encoder()
        pairs = [(self.tokenizer, self.text_encoder)]
        if second is not None:
            pairs.append((self.tokenizer_2, second))
        states, pooled = [], None
        for tokenizer, encoder in pairs:
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(dev)
            if second is None:
                states.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # the projected pooled output: only the second encoder has one
                pooled = out[0]
            states.append(out.hidden_states[-2])
        if second is not None and pooled is None:
            raise ValueError("text_encoder_2 gives no pooled embedding: SDXL's second text encoder must be "
                             "a CLIPTextModelWithProjection")
        return torch.cat(states, dim=-1).float(), (None if pooled is None else pooled.float())

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The sequence embedding (1, 77, D), float32, on the execution device: the text encoder's
        hidden states (SDXL: both encoders' penultimate ones, concatenated; see :meth:`_encode`)."""
        return self._encode(prompt)[0]

    @torch.no_grad()
    def encode_pooled(self, prompt: str) -> Optional[torch.Tensor]:
        """SDXL's pooled embedding of ``prompt`` (1, P), float32; None for SD 1.x/2.x."""
        return self._encode(prompt)[1] if self.is_xl else None

    @contextlib.contextmanager
    def _vae_precision(self):
        """Within the block the VAE runs in float32 where diffusers' SDXL pipelines upcast it: an SDXL
        model whose float16 VAE sets ``force_upcast`` (SDXL's VAE overflows in float16); it goes
        back to float16 afterwards. An fp16-fixed VAE (``force_upcast`` false) stays in float16."""
        up = self.is_xl and self.vae.dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        if up:
            self.vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            if up:
                self.vae.to(dtype=torch.float16)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 VAE latent (1, 4, H/8, W/8), scaled by the VAE's scaling factor.

        Works with ``AutoencoderKL`` (SD) and ``AutoencoderTiny`` (TAESD, fast previews)."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with self._vae_precision():
            x = x.to(device=self._execution_device, dtype=self.vae.dtype)
            enc = self.vae.encode(x)
        # AutoencoderKL returns a distribution (its mode: deterministic); AutoencoderTiny the latents
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        return z.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [-1, 1], (N, 3, H, W), on the CPU."""
        with self._vae_precision():
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
        key = content_key("inversion", image, self._family_key(), self._identity(), num_steps, str(self.unet.dtype),
                          scheduler_settings(self.scheduler))

        def compute() -> Inversion:
            z0 = self.encode_image(image)
            empty, pooled = self._encode("")
            pooled = pooled if self.is_xl else None
            return ddim_invert(lambda z, t: self._unet(z, t, empty, pooled=pooled), self.scheduler, z0, num_steps,
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
        ``<cache_dir>/embeddings``. On SDXL the sequence embedding (both encoders' parts, one
        tensor) is optimised and the pooled embedding stays the prompt's (:meth:`optimize_conditioning`
        with ``pooled=True`` optimises it too)."""
        return self.optimize_conditioning(image, prompt, steps=steps, lr=lr, mask=mask, seed=seed)[0]

    def optimize_conditioning(self, image: np.ndarray, prompt: str, *, steps: int = 500, lr: float = 3e-3,
                              mask: Optional[np.ndarray] = None, seed: int = 0,
                              pooled: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(sequence embedding, pooled embedding or None)`` of AGO for (reference image, prompt),
        drawn with ``seed``; cached in memory and in ``<cache_dir>/embeddings``. With ``pooled``
        (SDXL only) the pooled embedding is optimised jointly (:func:`o2mag.method.ago.optimize_conditioning`)
        and returned; else it is None (the prompt's stays, see README, "Model families"), and so
        it is with ``steps=0`` (AGO off: the plain prompt embedding). The cache key holds
        ``pooled`` only when it is on, so entries made without it keep their keys; an entry under
        a pooled key that holds no pooled tensor is a damaged one (computed again, replaced)."""
        if pooled and not self.is_xl:
            raise ValueError("ago_pooled needs an SDXL model: SD 1.x/2.x have no pooled text embedding to optimise")
        if steps == 0:  # AGO off: the plain prompt embedding
            return self.encode_prompt(prompt), None
        device = self._execution_device
        parts = ["ago", image, prompt, self._family_key(), self._identity(), steps, lr, seed, str(self.unet.dtype),
                 mask if mask is not None else None, scheduler_settings(self.scheduler)]
        key = content_key(*parts, {"ago_pooled": True}) if pooled else content_key(*parts)

        def count(rows):
            self.stats.unet_calls += 1
            self.stats.unet_rows += rows

        def compute() -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            init, init_pooled = self._encode(prompt)
            z0 = self.encode_image(image)
            # SDXL: the pooled embedding stays the prompt's unless ``pooled`` (README, "Model families")
            added = self._added_cond(init_pooled, z0) if self.is_xl else None
            weight = None
            if mask is not None:
                weight = dilate_mask(torch.from_numpy(mask), z0.shape[-2:], radius=1)
            gen = torch.Generator().manual_seed(int(seed))
            return optimize_conditioning(self.unet, self.scheduler, z0, init,
                                         init_pooled=init_pooled if pooled else None, steps=steps, lr=lr,
                                         weight=weight, generator=gen, progress=self._phase_bar, on_forward=count,
                                         added_cond_kwargs=added)

        def pack(result) -> dict:
            record = {"embedding": result[0].cpu(), "prompt": prompt, "steps": steps, "lr": lr, "seed": seed}
            if pooled:
                record["pooled"] = result[1].cpu()
            return record

        def unpack(data: dict):
            return data["embedding"].to(device), (data["pooled"].to(device) if pooled else None)

        (emb, emb_pooled), computed = self._embeddings.fetch(key, self.cache_dir, compute, lock=self.cache_lock,
                                                             pack=pack, unpack=unpack)
        if computed:
            self.stats.ago_runs += 1
        else:
            self.stats.ago_cache_hits += 1
        return emb.to(device), (None if emb_pooled is None else emb_pooled.to(device))

    def clear_caches(self) -> None:
        """Forget in-memory inversions and embeddings (the disk bank stays)."""
        self._inversions.clear()
        self._embeddings.clear()
