"""``O2MAGPipeline``: one reference anomaly + one normal image -> many defects at new masks.

One-to-more (this project): the reference and the normal image are DDIM-inverted once, the prompt
embedding is optimised (AGO) once, and then N target masks are denoised in batches that share ONE
reference branch and ONE normal branch, which replay their inverted latents. With ``kv_cache=True``
the source branches' self-attention keys/values are recorded on the first batch and later batches
run target rows only. ``scheme="per_sample"`` emulates the authors' code (both inversions and
three branches per sample) and exists as the baseline for benchmarks.

``pipe(...)`` follows diffusers' pipeline conventions (output types, ``return_dict``, step-end
callbacks, progress bars, model offloading); ``pipe.generate_iter(...)`` streams the samples as
each batch finishes (what the command line uses). Input preparation lives in
:mod:`o2mag.pipeline.inputs`, the inversion/AGO caches in :mod:`o2mag.pipeline.caches`, model loading helpers in
:mod:`o2mag.pipeline.loading`; see ``docs/architecture.md`` for how the pieces fit.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..checks import check_int
from ..errors import InputError
from ..graft import AttentionGraft, SourceCache
from ..method.ago import dilate_mask, optimize_embedding
from ..method.inversion import Inversion, ddim_invert, ddim_step
from ..method.layout import BranchLayout
from ..sources.tiny import tiny_components
from .caches import CacheLock, ResultCache, content_key, model_fingerprint, scheduler_settings
from .inputs import ImageLike, prepare_sources, prepare_targets
from .loading import check_model_path, loading_kwargs
from .settings import (CALL, CALLBACK_TENSOR_INPUTS, CHECK, OUTPUT_TYPES, STREAM, GenerationSettings, bind,
                       check_call_options, check_prompt, check_size)

__all__ = ["O2MAGPipeline", "O2MAGPipelineOutput", "PipelineStats", "token_indices", "OUTPUT_TYPES"]



@dataclass
class O2MAGPipelineOutput(BaseOutput):
    """What ``pipe(...)`` returns: one image and one mask per target mask, in target order.

    ``output_type="pil"``: lists of PIL images (RGB; masks mode "L", 0 or 255).
    ``"np"``: float32 arrays in [0, 1], images (N, H, W, 3), masks (N, H, W, 1).
    ``"pt"``: float32 tensors in [0, 1], images (N, 3, H, W), masks (N, 1, H, W).
    ``"latent"``: images are the final latents (N, C, H/8, W/8), not decoded; masks as for "pt".
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    masks: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]


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
    """Positions (in the padded 77-token sequence, BOS at 0) of ``word``'s tokens inside ``prompt``.

    ``word`` may be several words ("broken large"): the phrase's tokens must occur in a row. An
    empty word (or None) gives no position (DAE then amplifies nothing)."""
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


def _with_signature(signature):
    """Give a method taking ``(self, *args, **kwargs)`` its public signature (for ``help()``,
    ``inspect`` and IDEs); the method matches its arguments to it with :func:`~.settings.bind`."""
    def decorate(method):
        method.__signature__ = signature
        return method

    return decorate


@dataclass
class _Request:
    """One checked and prepared generation request (what ``__call__`` and ``generate_iter`` share):
    the inputs at the working size, the settings and the per-call options."""

    ref: np.ndarray
    m_r: np.ndarray
    nor: np.ndarray
    masks: List[np.ndarray]
    prompt: str
    tokens: List[int]
    settings: GenerationSettings
    generator: Any
    callback: Optional[Callable]
    callback_inputs: Tuple[str, ...]

    def generator_for(self, idx: Sequence[int]):
        """The generator(s) for the targets ``idx`` of one batch: the shared one, or theirs."""
        if isinstance(self.generator, (list, tuple)):
            return [self.generator[k] for k in idx]
        return self.generator


class O2MAGPipeline(DiffusionPipeline):
    """Training-free one-to-more anomaly generation on a frozen Stable Diffusion (v1.5 by default).

    Components as in diffusers' Stable Diffusion: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler`` (any scheduler is converted to ``DDIMScheduler`` with the same config, because
    inversion and replay need deterministic DDIM; sample clipping and thresholding are switched
    off, because the inversion is the exact mirror of an *unclipped* DDIM step -- with clipping,
    replayed and denoised trajectories would disagree, and ``DDIMScheduler()`` clips by default).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

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
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        self.stats = PipelineStats()
        self.cache_dir: Optional[str] = None
        self.cache_lock: Optional[CacheLock] = None  # held while a missing result is computed (caches.py)
        self.model_id: Optional[str] = None
        self._inversions = ResultCache("inversions")
        self._embeddings = ResultCache("embeddings")

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
        """The tiny seeded random model of :mod:`o2mag.sources.tiny` (machinery demos and tests, not quality)."""
        pipe = cls(**tiny_components(seed))
        pipe.model_id = f"o2mag-tiny-seed{seed}"
        return pipe

    # ------------------------------------------------------------------ progress bars
    def progress_bar(self, iterable=None, total=None, desc: Optional[str] = None, leave: bool = True):
        """diffusers' bar (it honours :meth:`set_progress_bar_config`), with a per-phase label."""
        user = dict(getattr(self, "_progress_bar_config", None) or {})
        self._progress_bar_config = {**({"desc": desc} if desc else {}), "leave": leave, **user}
        try:
            return super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = user

    @property
    def progress(self) -> bool:
        """False when bars are off; ``pipe.progress = False`` is ``set_progress_bar_config(disable=True)``."""
        return not (getattr(self, "_progress_bar_config", None) or {}).get("disable", False)

    @progress.setter
    def progress(self, on: bool) -> None:
        self._progress_bar_config = {**(getattr(self, "_progress_bar_config", None) or {}), "disable": not on}

    def _phase_bar(self, iterable, desc: str):
        return self.progress_bar(iterable, desc=desc, leave=False)

    # ------------------------------------------------------------------ helpers
    @property
    def default_size(self) -> int:
        """Image side the UNet was trained at (512 for SD v1.5, 128 for the tiny model)."""
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return int(s) * self.vae_scale_factor

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

    # ------------------------------------------------------------------ checking
    @_with_signature(CHECK)
    def check_inputs(self, *args, **kwargs) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad argument; touches no model."""
        a = bind(CHECK, "O2MAGPipeline.check_inputs", (self,) + args, kwargs)
        self._settings(a, a["output_type"], a["callback_on_step_end_tensor_inputs"])

    def _settings(self, a: Dict[str, Any], output_type: str, callback_inputs) -> GenerationSettings:
        """The checked settings of a call's arguments ``a``; the per-call options are checked
        between the settings' two groups of checks, as they always have been."""
        check_prompt(a["prompt"], a["anomaly_word"])
        values = {name: a[name] for name in GenerationSettings.names()}
        GenerationSettings.check_numbers(values)
        check_call_options(a["generator"], output_type, a["callback_on_step_end"], callback_inputs,
                           self._callback_tensor_inputs)
        GenerationSettings.check_choices(values, self.vae_scale_factor)
        return GenerationSettings(**values)

    def _request(self, a: Dict[str, Any], output_type: str = "pil") -> _Request:
        """Check every argument of a call (``a``: all of them by name) and read every input now,
        before any model work."""
        callback, callback_inputs = a["callback_on_step_end"], a["callback_on_step_end_tensor_inputs"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            callback_inputs = callback.tensor_inputs
        settings = self._settings(a, output_type, callback_inputs)
        size = settings.size or self.default_size
        check_size(size, self.vae_scale_factor)
        tokens = token_indices(self.tokenizer, a["prompt"], a["anomaly_word"])
        ref, m_r, nor = prepare_sources(a["reference"], a["ref_mask"], a["normal"], size)
        masks = prepare_targets(a["target_masks"], size)
        generator = a["generator"]
        if isinstance(generator, (list, tuple)) and len(generator) != len(masks):
            raise ValueError(f"generator holds {len(generator)} generators but there are {len(masks)} target "
                             "masks: give one generator, or one per target mask")
        return _Request(ref=ref, m_r=m_r, nor=nor, masks=masks, prompt=a["prompt"], tokens=tokens,
                        settings=settings, generator=generator, callback=callback,
                        callback_inputs=tuple(callback_inputs))

    # ------------------------------------------------------------------ generation
    @_with_signature(CALL)
    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """Generate one anomaly image per target mask.

        Args:
            reference, normal: the reference anomaly image and a normal image (PIL, path, uint8
                (H, W, 3) array, [0, 1] float array or tensor).
            ref_mask: ``M_R``, the defect's mask at the reference's size (path, PIL, array, tensor).
            target_masks: where the new defects go: a sequence of masks (arrays, PIL images, paths,
                :class:`o2mag.masks.targets.TargetMask`) or an (N, H, W) array; resized (nearest) to ``size``.
            prompt: the conditional prompt, e.g. "a photo of a crack on a bottle". Required.
            anomaly_word: the word(s) of ``prompt`` whose cross-attention DAE amplifies inside
                ``M_T``, e.g. "crack". Required: it is never guessed, since the wrong guess (the
                object) would amplify the object; ``""`` amplifies no word.
            num_inference_steps: DDIM steps (also the inversion's). guidance_scale: CFG scale
                (1 drops the unconditional half).
            eta: DDIM's noise on the target branch: 0 (the paper) is deterministic; > 0 draws
                noise from ``generator``.
            generator: a ``torch.Generator``, or a list with one per target mask (each target's
                noise then depends on its own generator only, whatever the batching). Used when
                ``eta > 0``; AGO, which runs once per reference, is seeded by ``seed``.
            output_type: "pil", "np", "pt" or "latent" (see :class:`O2MAGPipelineOutput`).
            return_dict: return an :class:`O2MAGPipelineOutput`, else the tuple ``(images, masks)``.
            callback_on_step_end: ``callback(pipe, step, timestep, callback_kwargs) -> dict``,
                called once per denoising step of every batch of targets, with the tensors named in
                ``callback_on_step_end_tensor_inputs`` (any of ``pipe._callback_tensor_inputs``:
                "latents" = the batch's target latents, "prompt_embeds" = the AGO embedding,
                "negative_prompt_embeds" = the empty prompt's). Tensors it returns replace them.
            batch_size: targets per UNet batch, each batch sharing one reference and one normal
                branch. seed: AGO's random timesteps and noise. size: working image side (default:
                the model's native size, 512 for SD v1.5).
            kv_cache: record the source branches' K/V on the first batch and run only target rows
                afterwards (SD v1.5 at 512 px, 50 steps: a few GB; ``kv_cache_device="cpu"`` keeps
                it in host memory). blend_background: after every step, replace the target latent
                outside ``M_T`` by the normal branch's.
            ago_steps, ago_lr, ago_mask_weight: AGO settings (0 steps: the plain prompt embedding).
            graft_config: an :class:`o2mag.GraftConfig` (default ``GraftConfig.paper()``).
            scheme: "one_to_more", or "per_sample" (the authors' cost, the benchmark baseline).
            cache_inversions_to_disk: also keep inversions in ``pipe.cache_dir``.

        Every argument is checked, and every input read, before any model work.
        """
        a = bind(CALL, "O2MAGPipeline.__call__", (self,) + args, kwargs)
        output_type = a["output_type"]
        job = self._request(a, output_type)
        n = len(job.masks)
        outputs: List[Optional[torch.Tensor]] = [None] * n
        for idx, latents in self._batches(job):
            done = latents if output_type == "latent" else self._decode(latents)
            for j, k in enumerate(idx):
                outputs[k] = done[j:j + 1].cpu()
        stacked = torch.cat(outputs)  # type: ignore[arg-type]
        mask_t = torch.from_numpy(np.stack(job.masks)).float()[:, None]
        if output_type == "latent":
            images, masks = stacked, mask_t
        else:
            images = self.image_processor.postprocess(stacked, output_type=output_type)
            masks = self.mask_processor.postprocess(mask_t, output_type=output_type)
        self.maybe_free_model_hooks()
        if not a["return_dict"]:
            return images, masks
        return O2MAGPipelineOutput(images=images, masks=masks)

    @_with_signature(STREAM)
    def generate_iter(self, *args, **kwargs) -> Iterator[Tuple[int, PIL.Image.Image, PIL.Image.Image]]:
        """Yield ``(k, image, mask)`` (PIL RGB, PIL "L" 0/255) for every target mask ``k`` as soon as
        its batch is decoded: streaming, for long runs that write samples as they come.

        Takes the arguments of :meth:`__call__` except the output options; ``num_steps`` is the
        older name of ``num_inference_steps`` (default 50). Arguments are checked, and inputs read,
        when this is called, not at the first ``next()``.
        """
        a = bind(STREAM, "O2MAGPipeline.generate_iter", (self,) + args, kwargs)
        steps, old_name = a.pop("num_inference_steps"), a.pop("num_steps")
        if old_name is not None and steps is not None:
            raise ValueError("give num_inference_steps or num_steps (its older name), not both")
        if old_name is not None:
            check_int("num_steps", old_name, minimum=1)  # the error names the argument the caller used
            steps = old_name
        # no step count given: the settings' default (the dataclass field's value, as for pipe(...))
        a["num_inference_steps"] = GenerationSettings.num_inference_steps if steps is None else steps
        job = self._request(a)
        # everything above checks the arguments now; the work starts when the caller iterates
        return self._stream(job)

    def _stream(self, job: _Request):
        bar = self.progress_bar(total=len(job.masks), desc="generating")
        try:
            for idx, latents in self._batches(job):
                images = self.decode_latents(latents)
                for j, k in enumerate(idx):
                    mask = self.mask_processor.postprocess(
                        torch.from_numpy(job.masks[k]).float()[None, None], output_type="pil")[0]
                    bar.update(1)
                    yield k, images[j], mask
        finally:
            bar.close()
            self.maybe_free_model_hooks()

    def generate(self, reference: ImageLike, ref_mask: ImageLike, normal: ImageLike, target_masks,
                 prompt: Optional[str] = None, anomaly_word: Optional[str] = None,
                 **kwargs) -> List[Tuple[PIL.Image.Image, PIL.Image.Image]]:
        """``[(image, mask), ...]`` in target order: :meth:`generate_iter` collected (same arguments).

        Kept for code written before ``pipe(...)`` followed diffusers; new code calls the pipeline."""
        return [(image, mask) for _, image, mask in
                self.generate_iter(reference, ref_mask, normal, target_masks, prompt, anomaly_word, **kwargs)]

    def _batches(self, job: _Request) -> Iterator[Tuple[List[int], torch.Tensor]]:
        """The work shared by ``__call__`` and ``generate_iter``: AGO, the inversions, and the
        denoising of each batch; yields ``(target indices, their final latents)``."""
        s = job.settings
        emb_u = self.encode_prompt("")
        emb_c = self.optimize_embedding(job.ref, job.prompt, steps=s.ago_steps, lr=s.ago_lr,
                                        mask=job.m_r if s.ago_mask_weight else None, seed=s.seed)
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
        for b, idx in enumerate(batches):
            if s.scheme == "per_sample":
                inv_r = self.invert(job.ref, steps, use_cache=False, desc="DDIM inversion (reference)")
                inv_n = self.invert(job.nor, steps, use_cache=False, desc="DDIM inversion (normal)")
            with_sources = not (s.kv_cache and b > 0)
            if s.kv_cache and b == 0:
                cache = self._new_source_cache(s.kv_cache_device)
            latents = self._denoise(inv_r, inv_n, job.m_r, [job.masks[k] for k in idx], emb_u, emb_c,
                                    job.tokens, config=s.graft, guidance_scale=s.guidance_scale,
                                    blend=s.blend_background, with_sources=with_sources, cache=cache,
                                    eta=s.eta, generator=job.generator_for(idx), callback=job.callback,
                                    callback_inputs=job.callback_inputs,
                                    desc=f"denoising batch {b + 1}/{len(batches)}")
            self.stats.samples += len(idx)
            yield idx, latents

    # ------------------------------------------------------------------ the denoising loop
    def _new_source_cache(self, device=None):
        return SourceCache(device=device)

    def _denoise(self, inv_r: Inversion, inv_n: Inversion, m_r: np.ndarray, masks: List[np.ndarray],
                 emb_u: torch.Tensor, emb_c: torch.Tensor, tokens: List[int], *, config,
                 guidance_scale: float, blend: bool, with_sources: bool = True, cache=None, eta: float = 0.0,
                 generator=None, callback=None, callback_inputs: Sequence[str] = (),
                 desc: str = "denoising") -> torch.Tensor:
        """Denoise one batch of targets; returns their final latents (b, C, h, w), float32.

        The reference and normal rows (when ``with_sources``) feed the inverted latents of the
        current step (replay); their outputs are not used. Without sources, ``cache`` supplies
        their K/V (recorded by the first batch).
        """
        b = len(masks)
        cfg = guidance_scale != 1.0
        layout = BranchLayout(b, cfg=cfg, include_sources=with_sources)
        graft = AttentionGraft(config, layout, source_cache=cache)
        graft.set_masks(torch.from_numpy(m_r), torch.from_numpy(np.stack(masks)))
        graft.set_token_indices(tokens)
        dev = self._execution_device

        def stack(emb_u, emb_c):
            halves = [emb_u, emb_c] if cfg else [emb_c]
            return torch.cat([e.to(dev).expand(layout.rows_per_half, -1, -1) for e in halves])

        emb = stack(emb_u, emb_c)
        x = inv_n.noise.to(dev).expand(b, -1, -1, -1).clone()
        h, w = x.shape[-2:]
        m_t = graft.stitch_masks((h, w), dev)
        num_steps = inv_n.num_steps
        self.scheduler.set_timesteps(num_steps, device=dev)
        timesteps = self.scheduler.timesteps
        if not torch.equal(timesteps.cpu(), inv_n.timesteps.cpu()):
            raise RuntimeError("scheduler timesteps differ from the inversion's")
        with graft.installed(self.unet), torch.no_grad():
            # every mask, routing table and DAE bias now, once: nothing is built (or read back to
            # the host) inside the UNet calls, which a torch.compile-d UNet needs
            graft.prepare((h, w), dev, dtype=self.unet.dtype, text_len=emb.shape[1])
            for i, t in enumerate(self.progress_bar(timesteps, desc=desc, leave=False)):
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
                x = ddim_step(self.scheduler, eps, t, x, eta=eta, generator=generator)
                if blend:
                    x = m_t * x + (1 - m_t) * inv_n.after_step(i).to(dev)
                if callback is not None:
                    named = {"latents": x, "prompt_embeds": emb_c, "negative_prompt_embeds": emb_u}
                    returned = callback(self, i, t, {k: named[k] for k in callback_inputs}) or {}
                    x = returned.pop("latents", x)
                    if "prompt_embeds" in returned or "negative_prompt_embeds" in returned:
                        emb_c = returned.pop("prompt_embeds", emb_c)
                        emb_u = returned.pop("negative_prompt_embeds", emb_u)
                        emb = stack(emb_u, emb_c)
        self.last_run = {"target_latents": x.detach(), "normal_latent": inv_n.latents[0].detach(),
                         "layout": layout}
        return x
