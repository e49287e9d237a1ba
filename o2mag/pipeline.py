"""``O2MAGPipeline``: one reference anomaly + one normal image -> many defects at new masks.

One-to-more (this project): the reference and the normal image are DDIM-inverted once, the prompt
embedding is optimised (AGO) once, and then N target masks are denoised in batches that share ONE
reference branch and ONE normal branch, which replay their inverted latents. With ``kv_cache=True``
the source branches' self-attention keys/values are recorded on the first batch and later batches
run target rows only. ``scheme="per_sample"`` emulates the authors' code (both inversions and
three branches per sample) and exists as the baseline for benchmarks.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from .ago import dilate_mask, optimize_embedding
from .errors import InputError
from .inversion import Inversion, ddim_invert, ddim_step
from .loading import check_model_path, loading_kwargs
from .masks import load_image, load_mask, resize_image, resize_mask, to_mask

__all__ = ["O2MAGPipeline", "PipelineStats", "token_indices"]

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]

SCHEMES = ("one_to_more", "per_sample")


@dataclass
class PipelineStats:
    """Work counters (reset with :meth:`reset`): UNet forward calls and rows, inversions, AGO runs.

    ``generation_unet_calls``/``generation_unet_rows`` count only the denoising loop, so the cost per
    generated sample can be compared between schemes.
    """

    unet_calls: int = 0
    unet_rows: int = 0
    generation_unet_calls: int = 0
    generation_unet_rows: int = 0
    inversion_runs: int = 0
    inversion_cache_hits: int = 0
    ago_runs: int = 0
    ago_cache_hits: int = 0
    samples: int = 0

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def token_indices(tokenizer, prompt: str, word: Optional[str]) -> List[int]:
    """Positions (in the padded 77-token sequence, BOS at 0) of ``word``'s tokens inside ``prompt``."""
    if not word:
        return []
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    w = tokenizer(word, add_special_tokens=False).input_ids
    if not w:
        raise InputError(f"anomaly word {word!r} has no tokens")
    found: List[int] = []
    for s in range(len(ids) - len(w) + 1):
        if ids[s : s + len(w)] == w:
            found.extend(range(s, s + len(w)))
    if not found:
        raise InputError(f"anomaly word {word!r} does not occur in the prompt {prompt!r}")
    return sorted(set(found))


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


def _named(what: str, fn, *args, **kwargs):
    """Call a masks.py reader; its InputError says which argument the file was given for."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        raise type(e)(f"{what}: {e}") from None


def _image_array(image: ImageLike, what: str) -> np.ndarray:
    """Any image input -> uint8 (H, W, 3). Files are read by :func:`o2mag.masks.load_image`."""
    if isinstance(image, (str, os.PathLike)):
        image = _named(what, load_image, image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a PIL image, a path, an array or a tensor, got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise InputError(f"{what}: expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        af = a.astype(np.float64)
        if not np.isfinite(af).all():
            raise InputError(f"{what}: image has non-finite values")
        a = np.clip(np.round(af * 255.0 if af.max() <= 1.0 else af), 0, 255).astype(np.uint8)
    return a


def _mask_array(mask: ImageLike, what: str) -> np.ndarray:
    """Any mask input -> bool (H, W), read exactly as the command line reads masks
    (:func:`o2mag.masks.load_mask` for files, :func:`o2mag.masks.to_mask` otherwise)."""
    if isinstance(mask, (str, os.PathLike)):
        return _named(what, load_mask, mask, allow_empty=True)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return to_mask(mask, what)


def _resize_image(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[:2] == (size, size):
        return a
    return np.asarray(resize_image(Image.fromarray(a), size), dtype=np.uint8)


class O2MAGPipeline(DiffusionPipeline):
    """Training-free one-to-more anomaly generation on a frozen Stable Diffusion (v1.5 by default).

    Components as in diffusers' Stable Diffusion: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler`` (any scheduler is converted to ``DDIMScheduler`` with the same config, because
    inversion and replay need deterministic DDIM; sample clipping and thresholding are switched
    off, because the inversion is the exact mirror of an *unclipped* DDIM step -- with clipping,
    replayed and denoised trajectories would disagree, and ``DDIMScheduler()`` clips by default).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        super().__init__()
        cfg = scheduler.config
        if not isinstance(scheduler, DDIMScheduler) or cfg.get("clip_sample", True) \
                or cfg.get("thresholding", False):
            scheduler = DDIMScheduler.from_config(cfg, clip_sample=False, thresholding=False)
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        vcfg = self.vae.config
        blocks = getattr(vcfg, "block_out_channels", None)
        blocks = blocks or getattr(vcfg, "decoder_block_out_channels", None)
        self.vae_scale_factor = 2 ** (len(blocks) - 1) if blocks else 8
        self.stats = PipelineStats()
        self.cache_dir: Optional[str] = None
        self.model_id: Optional[str] = None
        self.progress = True
        self._inversions: Dict[str, Inversion] = {}
        self._embeddings: Dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local diffusers folder (e.g. stable-diffusion-v1-5) or a hub id.

        ``dtype`` (or its older name ``torch_dtype``) is passed under the name the installed
        diffusers takes. A missing path, a folder that is not a diffusers pipeline, or a folder
        diffusers cannot read (broken JSON, missing or corrupt weights: diffusers' ``OSError`` and
        ``ValueError``) raises :class:`o2mag.errors.InputError`; anything else -- running out of
        memory, a bug -- propagates as itself.
        """
        name = check_model_path(pretrained_model_name_or_path)
        kwargs = loading_kwargs(kwargs)
        try:
            pipe = super().from_pretrained(name, **kwargs)
        except InputError:
            raise
        except (OSError, ValueError) as e:
            raise InputError(f"could not load a diffusers pipeline from {name!r}: {e}") from e
        pipe.model_id = os.path.abspath(name) if os.path.isdir(name) else name
        return pipe

    @classmethod
    def tiny(cls, seed: int = 0) -> "O2MAGPipeline":
        """The tiny seeded random model of :mod:`o2mag.tiny` (machinery demos and tests, not quality)."""
        from .tiny import tiny_components

        pipe = cls(**tiny_components(seed))
        pipe.model_id = f"o2mag-tiny-seed{seed}"
        return pipe

    # ------------------------------------------------------------------ helpers
    @property
    def default_size(self) -> int:
        """Image side the UNet was trained at (512 for SD v1.5, 128 for the tiny model)."""
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return int(s) * self.vae_scale_factor

    def _check_size(self, size: int) -> None:
        """Raise ``ValueError`` unless ``size`` can be the working image side: a multiple of the
        VAE factor and at least two latent pixels (a 1-pixel latent breaks the UNet's GroupNorm,
        one value per group). The CLI asks the same question, so the rule lives here once."""
        f = self.vae_scale_factor
        if size % f or size < 2 * f:
            raise ValueError(f"size must be a multiple of {f} and at least {2 * f}, got {size}")

    def _identity(self) -> str:
        """Model identity for cache keys: name plus a cheap weight fingerprint."""
        fp = []
        for module in (self.unet, self.vae, self.text_encoder):
            params = list(module.parameters())
            fp += [type(module).__name__, float(params[0].detach().float().sum()),
                   float(params[-1].detach().float().sum())]
        return _sha(self.model_id or getattr(self.config, "_name_or_path", "") or "unnamed", fp)

    @property
    def _show_progress(self) -> bool:
        """tqdm bars unless ``pipe.progress = False`` or ``set_progress_bar_config(disable=True)``."""
        return bool(self.progress) and not getattr(self, "_progress_bar_config", {}).get("disable", False)

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
        """Text-encoder hidden states (1, 77, D), float32."""
        tok = self.tokenizer(
            [prompt], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(tok.input_ids.to(self.text_encoder.device))[0]
        return out.float()

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 VAE latent (1, 4, H/8, W/8), scaled by the VAE's scaling factor.

        Works with ``AutoencoderKL`` (SD) and ``AutoencoderTiny`` (TAESD, fast previews)."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        x = x.to(device=self.vae.device, dtype=self.vae.dtype)
        enc = self.vae.encode(x)
        # AutoencoderKL returns a distribution (its mode: deterministic); AutoencoderTiny the latents
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        return z.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> List[Image.Image]:
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in x]

    def _disk(self, kind: str, key: str) -> Optional[str]:
        if not self.cache_dir:
            return None
        return os.path.join(self.cache_dir, kind, f"{key}.pt")

    def _scheduler_settings(self) -> Dict[str, Any]:
        """The scheduler config as a cache-key part: diffusers' private ``_...`` entries dropped
        (``_use_default_values`` comes from a set, so its order changes between processes and
        would make every on-disk cache key new in each run)."""
        return {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}

    def invert(self, image: np.ndarray, num_steps: int, *, use_cache: bool = True,
               cache_to_disk: bool = False,
               desc: str = "DDIM inversion") -> Inversion:
        """DDIM-invert a uint8 (H, W, 3) image with the empty prompt; cached by content + settings."""
        key = _sha("inversion", image, self._identity(), num_steps, str(self.unet.dtype),
                   self._scheduler_settings())
        if use_cache and key in self._inversions:
            self.stats.inversion_cache_hits += 1
            return self._inversions[key].to(self.device)
        path = self._disk("inversions", key) if cache_to_disk else None
        if use_cache and path and os.path.isfile(path):
            data = torch.load(path, map_location="cpu")
            inv = Inversion(list(data["latents"]), data["timesteps"]).to(self.device)
            self.stats.inversion_cache_hits += 1
        else:
            z0 = self.encode_image(image)
            empty = self.encode_prompt("")
            inv = ddim_invert(lambda z, t: self._unet(z, t, empty), self.scheduler, z0, num_steps,
                              progress=self._show_progress, desc=desc)
            self.stats.inversion_runs += 1
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + ".tmp"
                torch.save({"latents": [z.cpu() for z in inv.latents], "timesteps": inv.timesteps.cpu()}, tmp)
                os.replace(tmp, path)
        if use_cache:
            self._inversions[key] = inv
        return inv

    def optimize_embedding(self, image: np.ndarray, prompt: str, *, steps: int = 500, lr: float = 3e-3,
                           mask: Optional[np.ndarray] = None, seed: int = 0) -> torch.Tensor:
        """AGO embedding for (reference image, prompt); memory + disk bank (``<cache_dir>/embeddings``)."""
        if steps == 0:  # AGO off: the plain prompt embedding
            return self.encode_prompt(prompt)
        key = _sha("ago", image, prompt, self._identity(), steps, lr, seed, str(self.unet.dtype),
                   mask if mask is not None else None, self._scheduler_settings())
        if key in self._embeddings:
            self.stats.ago_cache_hits += 1
            return self._embeddings[key].to(self.device)
        path = self._disk("embeddings", key)
        if path and os.path.isfile(path):
            emb = torch.load(path, map_location="cpu")["embedding"].to(self.device)
            self.stats.ago_cache_hits += 1
        else:
            init = self.encode_prompt(prompt)
            z0 = self.encode_image(image)
            weight = None
            if mask is not None:
                weight = dilate_mask(torch.from_numpy(mask), z0.shape[-2:], radius=1)
            gen = torch.Generator().manual_seed(int(seed))

            def count(rows):
                self.stats.unet_calls += 1
                self.stats.unet_rows += rows

            emb = optimize_embedding(self.unet, self.scheduler, z0, init, steps=steps, lr=lr, weight=weight,
                                     generator=gen, progress=self._show_progress, on_forward=count)
            self.stats.ago_runs += 1
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + ".tmp"
                record = {"embedding": emb.cpu(), "prompt": prompt, "steps": steps, "lr": lr, "seed": seed}
                torch.save(record, tmp)
                os.replace(tmp, path)
        self._embeddings[key] = emb
        return emb

    def clear_caches(self) -> None:
        """Forget in-memory inversions and embeddings (the disk bank stays)."""
        self._inversions.clear()
        self._embeddings.clear()

    # ------------------------------------------------------------------ generation
    def _prepare(self, reference, ref_mask, normal, size):
        ref = _image_array(reference, "reference")
        m_r = _mask_array(ref_mask, "ref_mask")
        if m_r.shape != ref.shape[:2]:
            raise InputError(f"ref_mask is {m_r.shape[0]}x{m_r.shape[1]} (HxW) but the reference image is "
                             f"{ref.shape[0]}x{ref.shape[1]}")
        if not m_r.any():
            raise InputError("ref_mask (M_R) is empty: the reference defect mask has no pixels")
        nor = _image_array(normal, "normal")
        ref, nor, m_r = _resize_image(ref, size), _resize_image(nor, size), resize_mask(m_r, (size, size))
        if not m_r.any():
            raise InputError("ref_mask (M_R) vanished when resized to the working size")
        return ref, m_r, nor

    def _targets(self, target_masks, size) -> List[np.ndarray]:
        if isinstance(target_masks, (np.ndarray, torch.Tensor)):
            arr = target_masks
            if isinstance(arr, torch.Tensor):
                arr = arr.detach().cpu().numpy()
            if arr.ndim == 2:
                arr = arr[None]
            items = list(arr)
        else:
            items = list(target_masks)
        out = []
        for k, m in enumerate(items):
            m = getattr(m, "mask", m)  # o2mag.masks.TargetMask
            out.append(resize_mask(_mask_array(m, f"target_masks[{k}]"), (size, size)))
        if not out:
            raise ValueError("target_masks is empty: give at least one target mask")
        return out

    def generate(self, reference: ImageLike, ref_mask: ImageLike, normal: ImageLike, target_masks,
                 prompt: str = "a photo of a defect", anomaly_word: Optional[str] = None,
                 **kwargs) -> List[Tuple[Image.Image, Image.Image]]:
        """Generate one image per target mask; returns ``[(image, mask), ...]`` in target order.

        See :meth:`generate_iter` for the options; this collects its output.
        """
        out: List[Optional[Tuple[Image.Image, Image.Image]]] = []
        for k, image, mask in self.generate_iter(reference, ref_mask, normal, target_masks, prompt,
                                                 anomaly_word, **kwargs):
            out.append((image, mask))
        return out  # type: ignore[return-value]

    __call__ = generate

    def generate_iter(
        self,
        reference: ImageLike,
        ref_mask: ImageLike,
        normal: ImageLike,
        target_masks,
        prompt: str = "a photo of a defect",
        anomaly_word: Optional[str] = None,
        *,
        num_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 4,
        seed: int = 0,
        kv_cache: bool = False,
        kv_cache_device=None,
        blend_background: bool = True,
        ago_steps: int = 500,
        ago_lr: float = 3e-3,
        ago_mask_weight: bool = False,
        size: Optional[int] = None,
        graft_config=None,
        scheme: str = "one_to_more",
        cache_inversions_to_disk: bool = False,
    ):
        """Yield ``(k, image, mask)`` for every target mask ``k`` as soon as its batch is decoded.

        Arguments are checked (and inputs read) when this is called, not at the first ``next()``.

        reference, normal: PIL images, paths, uint8 (H, W, 3) arrays or [0, 1] float arrays.
        ref_mask: ``M_R`` at the reference's size (path, PIL, array); target_masks: a sequence of
        masks (arrays, PIL, paths or :class:`o2mag.masks.TargetMask`) or an (N, H, W) array; all
        are resized (nearest) to ``size`` (default: the model's native size, 512 for SD v1.5).
        prompt/anomaly_word: the conditional prompt and the word whose cross-attention DAE
        amplifies (default: the prompt's last word). ``kv_cache``: record the source branches'
        K/V on the first batch and run only target rows afterwards (SD v1.5 at 512 px, 50 steps:
        a few GB; ``kv_cache_device="cpu"`` keeps it in host memory). ``blend_background``: replace
        the target latent outside ``M_T`` by the normal branch's latent after every step.
        ``graft_config``: an :class:`o2mag.GraftConfig` (default ``GraftConfig.paper()``).
        ``scheme="per_sample"`` is the authors' scheme (two inversions and three branches per
        sample), kept as the benchmark baseline.
        """
        for name, value, low in (("num_steps", num_steps, 1), ("batch_size", batch_size, 1),
                                 ("ago_steps", ago_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if not (np.isfinite(ago_lr) and ago_lr > 0):
            raise ValueError(f"ago_lr must be > 0, got {ago_lr}")
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme == "per_sample" and kv_cache:
            raise ValueError("kv_cache=True needs scheme='one_to_more' "
                             "(the per-sample baseline re-runs everything)")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if kv_cache_device is not None:
            try:
                torch.device(kv_cache_device)
            except (RuntimeError, TypeError):
                raise ValueError(f"kv_cache_device must be None or a torch device such as 'cpu', "
                                 f"got {kv_cache_device!r}") from None
        size = int(size or self.default_size)
        self._check_size(size)
        if anomaly_word is None and prompt.strip():
            anomaly_word = prompt.strip().split()[-1]
        tokens = token_indices(self.tokenizer, prompt, anomaly_word)
        ref, m_r, nor = self._prepare(reference, ref_mask, normal, size)
        masks = self._targets(target_masks, size)
        from .config import GraftConfig

        config = graft_config if graft_config is not None else GraftConfig.paper()
        if not isinstance(config, GraftConfig):
            raise TypeError(f"graft_config must be an o2mag.GraftConfig or None, got {type(config).__name__}")
        # everything above checks the arguments now; the work starts when the caller iterates
        return self._generate_batches(
            ref, m_r, nor, masks, prompt, tokens, config, num_steps=num_steps, guidance_scale=guidance_scale,
            batch_size=batch_size, seed=seed, kv_cache=kv_cache, kv_cache_device=kv_cache_device,
            blend_background=blend_background, ago_steps=ago_steps, ago_lr=ago_lr,
            ago_mask_weight=ago_mask_weight, scheme=scheme, cache_inversions_to_disk=cache_inversions_to_disk)

    def _generate_batches(self, ref, m_r, nor, masks, prompt, tokens, config, *, num_steps, guidance_scale,
                          batch_size, seed, kv_cache, kv_cache_device, blend_background, ago_steps, ago_lr,
                          ago_mask_weight, scheme, cache_inversions_to_disk):
        """The work of :meth:`generate_iter` (a generator), on checked and prepared inputs."""
        emb_u = self.encode_prompt("")
        emb_c = self.optimize_embedding(ref, prompt, steps=ago_steps, lr=ago_lr,
                                        mask=m_r if ago_mask_weight else None, seed=seed)
        if scheme == "one_to_more":
            disk = cache_inversions_to_disk
            inv_r = self.invert(ref, num_steps, cache_to_disk=disk, desc="DDIM inversion (reference)")
            inv_n = self.invert(nor, num_steps, cache_to_disk=disk, desc="DDIM inversion (normal)")
            n = len(masks)
            batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        else:
            batches = [[k] for k in range(len(masks))]
        cache = None
        bar = tqdm(total=len(masks), desc="generating", unit="img", disable=not self._show_progress)
        try:
            for b, idx in enumerate(batches):
                if scheme == "per_sample":
                    inv_r = self.invert(ref, num_steps, use_cache=False, desc="DDIM inversion (reference)")
                    inv_n = self.invert(nor, num_steps, use_cache=False, desc="DDIM inversion (normal)")
                with_sources = not (kv_cache and b > 0)
                if kv_cache and b == 0:
                    cache = self._new_source_cache(kv_cache_device)
                latents = self._denoise(inv_r, inv_n, m_r, [masks[k] for k in idx], emb_u, emb_c, tokens,
                                        config=config, guidance_scale=guidance_scale, blend=blend_background,
                                        with_sources=with_sources, cache=cache,
                                        desc=f"denoising batch {b + 1}/{len(batches)}")
                images = self.decode_latents(latents)
                for j, k in enumerate(idx):
                    self.stats.samples += 1
                    mask_img = Image.fromarray(masks[k].astype(np.uint8) * 255)
                    bar.update(1)
                    yield k, images[j], mask_img
        finally:
            bar.close()

    # ------------------------------------------------------------------ the denoising loop
    def _new_source_cache(self, device=None):
        from .graft import SourceCache

        return SourceCache(device=device)

    def _denoise(self, inv_r: Inversion, inv_n: Inversion, m_r: np.ndarray, masks: List[np.ndarray],
                 emb_u: torch.Tensor, emb_c: torch.Tensor, tokens: List[int], *, config,
                 guidance_scale: float,
                 blend: bool, with_sources: bool = True, cache=None, desc: str = "denoising") -> torch.Tensor:
        """Denoise one batch of targets; returns their final latents (b, C, h, w), float32.

        The reference and normal rows (when ``with_sources``) feed the inverted latents of the
        current step (replay); their outputs are not used. Without sources, ``cache`` supplies
        their K/V (recorded by the first batch).
        """
        from .graft import AttentionGraft
        from .layout import BranchLayout

        b = len(masks)
        cfg = guidance_scale != 1.0
        layout = BranchLayout(b, cfg=cfg, include_sources=with_sources)
        graft = AttentionGraft(config, layout, source_cache=cache)
        graft.set_masks(torch.from_numpy(m_r), torch.from_numpy(np.stack(masks)))
        graft.set_token_indices(tokens)
        dev = self.device
        halves = [emb_u, emb_c] if cfg else [emb_c]
        emb = torch.cat([e.to(dev).expand(layout.rows_per_half, -1, -1) for e in halves])
        x = inv_n.noise.to(dev).expand(b, -1, -1, -1).clone()
        h, w = x.shape[-2:]
        m_t = graft.stitch_masks((h, w), dev)
        num_steps = inv_n.num_steps
        self.scheduler.set_timesteps(num_steps, device=dev)
        timesteps = self.scheduler.timesteps
        if not torch.equal(timesteps.cpu(), inv_n.timesteps.cpu()):
            raise RuntimeError("scheduler timesteps differ from the inversion's")
        with graft.installed(self.unet), torch.no_grad():
            steps = tqdm(timesteps, desc=desc, unit="step", leave=False, disable=not self._show_progress)
            for i, t in enumerate(steps):
                graft.set_step(i, num_steps)
                if with_sources:
                    inp = layout.assemble(reference=inv_r.before_step(i).to(dev),
                                          normal=inv_n.before_step(i).to(dev), targets=x)
                else:
                    inp = layout.assemble(targets=x)
                out = self._unet(inp, t, emb, generation=True)
                if cfg:
                    eps_u = out[layout.target_slice("uncond")]
                    eps_c = out[layout.target_slice("cond")]
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                else:
                    eps = out[layout.target_slice("cond")]
                x = ddim_step(self.scheduler, eps, t, x)
                if blend:
                    x = m_t * x + (1 - m_t) * inv_n.after_step(i).to(dev)
        self.last_run = {"target_latents": x.detach(), "normal_latent": inv_n.latents[0].detach(),
                         "layout": layout}
        return x
