"""``O2MAGPipeline``: one reference anomaly + one normal image -> many defects at new masks.

One-to-more (this project): the reference and the normal image are DDIM-inverted once, the prompt
embedding is optimised (AGO) once, and then N target masks are denoised in batches that share ONE
reference branch and ONE normal branch, which replay their inverted latents. With ``kv_cache=True``
the source branches' self-attention keys/values are recorded on the first batch and later batches
run target rows only. ``scheme="per_sample"`` emulates the authors' code (both inversions and
three branches per sample) and exists as the baseline for benchmarks.

``pipe(...)`` follows diffusers' pipeline conventions (output types, ``return_dict``, step-end
callbacks, progress bars, model offloading); ``pipe.generate_iter(...)`` streams the samples as
each batch finishes (what the command line uses). This module holds the class and its entry
points; the pieces live beside it: the keywords (:mod:`.settings`), checking and reading a
request (:mod:`.request`, :mod:`.inputs`), encoding, inversion and AGO with their caches
(:mod:`.preparation`, :mod:`.caches`), the batches and the denoising loop (:mod:`.denoise`),
the outputs (:mod:`.outputs`) and model loading (:mod:`.loading`). ``docs/architecture.md``
shows how they fit.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..checks import check_int
from ..errors import InputError
from ..sources.tiny import tiny_components, tiny_sd2_components, tiny_sdxl_components
from .caches import CacheLock, ResultCache
from .denoise import DenoisingMixin
from .inputs import ImageLike
from .loading import check_model_path, detect_family, load_error_message, loading_kwargs
from .outputs import O2MAGPipelineOutput, PipelineStats, mask_image, postprocess
from .preparation import PreparationMixin
from .request import Request, check_arguments, prepare_request
from .settings import (CALL, CALLBACK_TENSOR_INPUTS, CHECK, MIN_STEPS, STREAM, XL_CALLBACK_TENSOR_INPUTS,
                       GenerationSettings, bind)

__all__ = ["O2MAGPipeline"]


def _with_signature(signature):
    """Give a method taking ``(self, *args, **kwargs)`` its public signature (for ``help()``,
    ``inspect`` and IDEs); the method matches its arguments to it with :func:`~.settings.bind`."""
    def decorate(method):
        method.__signature__ = signature
        return method

    return decorate


class O2MAGPipeline(PreparationMixin, DenoisingMixin, DiffusionPipeline):
    """Training-free one-to-more anomaly generation on a frozen Stable Diffusion (v1.5 by default).

    Components as in diffusers' Stable Diffusion: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``, and for SDXL also ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) and
    ``tokenizer_2``, as in diffusers' ``StableDiffusionXLPipeline`` (one class for every family: the
    conditioning differs behind :class:`~.preparation.PreparationMixin`'s seam) (any scheduler is converted to ``DDIMScheduler`` with the same config, because
    inversion and replay need deterministic DDIM; sample clipping and thresholding are switched
    off, because the inversion is the exact mirror of an *unclipped* DDIM step -- with clipping,
    replayed and denoised trajectories would disagree, and ``DDIMScheduler()`` clips by default).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["text_encoder_2", "tokenizer_2"]

    # The annotations are diffusers' contract, not decoration: ``from_pipe`` hands a model
    # component over only when its class is among them (else it asks for it).
    def __init__(self, unet: UNet2DConditionModel, vae: Union[AutoencoderKL, AutoencoderTiny],
                 text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler: KarrasDiffusionSchedulers,
                 text_encoder_2: Optional[CLIPTextModelWithProjection] = None,
                 tokenizer_2: Optional[CLIPTokenizer] = None):
        super().__init__()
        if scheduler is not None:
            cfg = scheduler.config
            if not isinstance(scheduler, DDIMScheduler) or cfg.get("clip_sample", True) \
                    or cfg.get("thresholding", False):
                scheduler = DDIMScheduler.from_config(cfg, clip_sample=False, thresholding=False)
        xl = unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"
        if xl and (text_encoder_2 is None or tokenizer_2 is None):
            raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and tokenizer_2")
        self.register_modules(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        # a pipeline may hold only some components (e.g. the text ones, to encode prompts): the
        # VAE factor then takes SD's value, as diffusers' pipelines do
        vcfg = self.vae.config if self.vae is not None else None
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
        self.family = None  # from_pretrained sets the ModelFamily it detected (loading.detect_family)
        self._inversions = ResultCache("inversions")
        self._embeddings = ResultCache("embeddings")
        # what diffusers' step-end callbacks read and write (see the properties below)
        self._guidance_scale = GenerationSettings.guidance_scale
        self._num_timesteps = 0
        self._interrupt = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local diffusers folder (e.g. stable-diffusion-v1-5) or a hub id.

        ``dtype`` (or its older name ``torch_dtype``) is passed under the name the installed
        diffusers takes. A missing path, a folder that is not a diffusers pipeline, or a folder
        diffusers cannot read (broken JSON, missing or corrupt weights: diffusers' ``OSError`` and
        ``ValueError``) raises :class:`o2mag.errors.InputError`, and so does a folder of a family
        o2mag does not run (:func:`o2mag.pipeline.loading.detect_family`: SD 1.x, SD 2.x and SDXL run;
        ``pipe.family`` tells which); anything else -- running out of
        memory, a bug -- propagates as itself.
        """
        name = check_model_path(pretrained_model_name_or_path)
        family = detect_family(name)  # one line for SD3/Flux, inpainting, refiners
        kwargs = loading_kwargs(kwargs)
        try:
            pipe = super().from_pretrained(name, **kwargs)
        except InputError:
            raise
        except (OSError, ValueError) as e:
            raise InputError(f"could not load a diffusers pipeline from {name!r}: {load_error_message(e)}") from e
        pipe.model_id = os.path.abspath(name) if os.path.isdir(name) else name
        pipe.family = family
        return pipe

    @classmethod
    def tiny(cls, seed: int = 0, family: str = "sd1") -> "O2MAGPipeline":
        """The tiny seeded random model of :mod:`o2mag.sources.tiny` (machinery demos and tests, not
        quality): SD 1.5-shaped (``family="sd1"``), SD 2.x-shaped with v-prediction (``"sd2"``) or
        SDXL-shaped (``"sdxl"``)."""
        makers = {"sd1": tiny_components, "sd2": tiny_sd2_components, "sdxl": tiny_sdxl_components}
        if family not in makers:
            raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
        pipe = cls(**makers[family](seed))
        pipe.model_id = f"o2mag-tiny-seed{seed}" + ("" if family == "sd1" else f"-{family}")
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

    @property
    def default_size(self) -> int:
        """Image side the UNet was trained at (512 for SD v1.5, 128 for the tiny model)."""
        s = self.unet.config.sample_size
        s = s[0] if isinstance(s, (tuple, list)) else s
        return int(s) * self.vae_scale_factor

    # ------------------------------------------------------------------ diffusers' callback state
    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the batch being denoised. A step-end callback may change it
        (``pipe._guidance_scale = ...``, as diffusers' callbacks do); each batch of targets starts
        again from the call's value, so a target's image does not depend on the batching."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' rule: guidance is on when ``guidance_scale > 1``; at 1 or below only the
        conditional half runs. Read at every step, so a callback that sets ``_guidance_scale``
        to 0 (diffusers' ``SDCFGCutoffCallback``) uses the conditional prediction alone from then on."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of one batch of targets (the callback is called this many times per batch)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (in a callback) to stop denoising: no later step runs;
        ``pipe(...)`` still returns every target, denoised as far as it got (targets of later
        batches not at all), and ``generate_iter`` stops: it yields no target of the batch it was
        denoising (half-denoised, no finished sample) nor of any later one."""
        return self._interrupt

    @property
    def _callback_tensor_inputs(self) -> List[str]:
        """The tensors a step-end callback may ask for (diffusers' attribute, per family): SD's
        ``latents``, ``prompt_embeds``, ``negative_prompt_embeds``; on SDXL also ``add_text_embeds``,
        ``negative_pooled_prompt_embeds`` and ``add_time_ids``, so diffusers' SDXL callbacks
        (``SDXLCFGCutoffCallback``) run unchanged."""
        return list(XL_CALLBACK_TENSOR_INPUTS if self.is_xl else CALLBACK_TENSOR_INPUTS)

    # ------------------------------------------------------------------ checking
    @_with_signature(CHECK)
    def check_inputs(self, *args, **kwargs) -> None:
        """Raise ``TypeError``/``ValueError`` naming the first bad argument; touches no model."""
        a = bind(CHECK, "O2MAGPipeline.check_inputs", (self,) + args, kwargs)
        check_arguments(a, a["output_type"], a["callback_on_step_end_tensor_inputs"],
                        allowed_callback_inputs=self._callback_tensor_inputs, vae_scale_factor=self.vae_scale_factor,
                        xl=self.is_xl)

    def _request(self, a: Dict[str, Any], output_type: str = "pil") -> Request:
        """Check every argument of a call and read every input now, before any model work."""
        return prepare_request(a, output_type, tokenizer=self.tokenizer, default_size=self.default_size,
                               tokenizer_2=self.tokenizer_2 if self.is_xl else None,
                               vae_scale_factor=self.vae_scale_factor,
                               allowed_callback_inputs=self._callback_tensor_inputs)

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
            num_inference_steps: DDIM steps (also the inversion's), at least 2
                (:data:`~.settings.MIN_STEPS` says why). guidance_scale: CFG scale (1 drops the
                unconditional half).
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
                "negative_prompt_embeds" = the empty prompt's; SDXL also "add_text_embeds" = the
                prompt's pooled embedding (AGO's with ``ago_pooled``), "negative_pooled_prompt_embeds"
                = the empty prompt's,
                "add_time_ids" = the (1, 6) size/crop ids of every row). Embeddings have one row
                each, so diffusers' cutoff callbacks (which keep ``[-1:]``) leave them as they are.
                Tensors it returns replace them from the next step on.
            batch_size: targets per UNet batch, each batch sharing one reference and one normal
                branch. seed: AGO's random timesteps and noise. size: working image side (default:
                the model's native size, 512 for SD v1.5).
            kv_cache: record the source branches' K/V on the first batch and run only target rows
                afterwards (SD v1.5 at 512 px, 50 steps: a few GB; ``kv_cache_device="cpu"`` keeps
                it in host memory). blend_background: after every step, replace the target latent
                outside ``M_T`` by the normal branch's.
            ago_steps, ago_lr, ago_mask_weight: AGO settings (0 steps: the plain prompt embedding).
            ago_pooled: SDXL only (an error on SD 1.x/2.x): AGO optimises the pooled text embedding
                jointly with the sequence embedding, and the optimised one conditions the
                conditional rows (``add_text_embeds``); off, the prompt's pooled embedding stays.
            graft_config: an :class:`o2mag.GraftConfig` (default ``GraftConfig.for_unet(pipe.unet)``:
                the paper's layers restated for this UNet, ``GraftConfig.paper()`` on SD 1.x/2.x).
            scheme: "one_to_more", or "per_sample" (the authors' cost, the benchmark baseline).
            cache_inversions_to_disk: also keep inversions in ``pipe.cache_dir``.

        Every argument is checked, and every input read, before any model work.
        """
        a = bind(CALL, "O2MAGPipeline.__call__", (self,) + args, kwargs)
        output_type = a["output_type"]
        job = self._request(a, output_type)
        outputs: List[Optional[torch.Tensor]] = [None] * len(job.masks)
        for idx, latents in self._batches(job):
            done = latents if output_type == "latent" else self._decode(latents)
            for j, k in enumerate(idx):
                outputs[k] = done[j:j + 1].cpu()
        images, masks = postprocess(torch.cat(outputs), job.masks, output_type,  # type: ignore[arg-type]
                                    self.image_processor, self.mask_processor)
        self.maybe_free_model_hooks()
        if not a["return_dict"]:
            return images, masks
        return O2MAGPipelineOutput(images=images, masks=masks)

    @_with_signature(STREAM)
    def generate_iter(self, *args, **kwargs) -> Iterator[Tuple[int, PIL.Image.Image, PIL.Image.Image]]:
        """Yield ``(k, image, mask)`` (PIL RGB, PIL "L" 0/255) for every target mask ``k`` as soon as
        its batch is decoded: streaming, for long runs that write samples as they come.

        When a step-end callback sets ``pipe._interrupt``, the stream ends without the batch being
        denoised then: every target yielded is fully denoised.

        Takes the arguments of :meth:`__call__` except the output options; ``num_steps`` is the
        older name of ``num_inference_steps`` (default 50). Arguments are checked, and inputs read,
        when this is called, not at the first ``next()``.
        """
        a = bind(STREAM, "O2MAGPipeline.generate_iter", (self,) + args, kwargs)
        steps, old_name = a.pop("num_inference_steps"), a.pop("num_steps")
        if old_name is not None and steps is not None:
            raise ValueError("give num_inference_steps or num_steps (its older name), not both")
        if old_name is not None:
            check_int("num_steps", old_name, minimum=MIN_STEPS)  # the error names the argument the caller used
            steps = old_name
        # no step count given: the settings' default (the dataclass field's value, as for pipe(...))
        a["num_inference_steps"] = GenerationSettings.num_inference_steps if steps is None else steps
        job = self._request(a)
        # everything above checks the arguments now; the work starts when the caller iterates
        return self._stream(job)

    def _stream(self, job: Request):
        bar = self.progress_bar(total=len(job.masks), desc="generating")
        try:
            for idx, latents in self._batches(job, stop_on_interrupt=True):
                images = self.decode_latents(latents)
                for j, k in enumerate(idx):
                    mask = mask_image(job.masks[k], self.mask_processor)
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
