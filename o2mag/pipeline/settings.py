"""The keywords of a generation request, declared once.

:class:`GenerationSettings` is everything that decides what a request makes and how its targets
are batched -- steps, guidance, eta, batch size, seed, size, the K/V cache, background blending,
AGO (on SDXL also whether it optimises the pooled embedding), the grafting config, the scheme,
disk caching -- with the defaults of ``pipe(...)``. It is checked when built, with the errors
``pipe(...)`` raises (``TypeError``/``ValueError`` naming the argument). The pipeline builds one per call and takes the AGO and inversion cache keys from it;
the command line builds one from its options, and the runner (:mod:`o2mag.runs.runner`) plans
its batches with it and hands it to ``generate_iter`` (:meth:`GenerationSettings.keywords`).

:data:`CALL_OPTIONS` holds the per-call keywords that are not settings (generator, output type,
callbacks). The public signatures of ``pipe(...)``, ``generate_iter`` and ``check_inputs``
(:data:`CALL`, :data:`STREAM`, :data:`CHECK`) are built from these two declarations, so every
keyword is written once and every method takes it with the same default and the same check;
:func:`bind` matches a call's arguments to one of them.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from ..checks import check_int, is_number
from ..method.config import GraftConfig

__all__ = ["GenerationSettings", "MIN_STEPS", "CALL_OPTIONS", "CALLBACK_TENSOR_INPUTS", "XL_CALLBACK_TENSOR_INPUTS",
           "OUTPUT_TYPES", "SCHEMES", "CALL",
           "STREAM", "CHECK", "bind", "check_prompt", "check_call_options", "check_size"]

SCHEMES = ("one_to_more", "per_sample")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
XL_CALLBACK_TENSOR_INPUTS = CALLBACK_TENSOR_INPUTS + ("add_text_embeds", "negative_pooled_prompt_embeds",
                                                      "add_time_ids")
"""SDXL's step-end callback tensors: SD's, plus the pooled embeddings (the prompt's as diffusers'
SDXL pipeline names it, ``add_text_embeds``; the empty prompt's as its ``encode_prompt`` names it)
and the six size/crop ids every UNet row gets (``add_time_ids``, (1, 6))."""
MIN_STEPS = 2
"""The fewest DDIM steps a request may take (``pipe(...)``, ``generate_iter``, ``o2mag --steps``).
With one step, Stable Diffusion's schedule ("leading" spacing, offset 1) has the single timestep 1:
the inversion adds almost no noise, so the target comes out as the normal image, and the paper's
DAE window (40%-80% of the steps) holds no step. Two steps are the first schedule with both."""


@dataclass(frozen=True)
class GenerationSettings:
    """What one request makes and how it is batched (see the module docstring), with the defaults
    of ``pipe(...)``. ``size=None`` is the model's native size (the pipeline resolves it and checks
    it with :func:`check_size`); ``graft_config=None`` is :meth:`GraftConfig.for_unet` of the
    pipeline's UNet.
    Numbers are stored as ``int``/``float`` and flags as ``bool``."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    batch_size: int = 4
    seed: int = 0
    size: Optional[int] = None
    kv_cache: bool = False
    kv_cache_device: Any = None
    blend_background: bool = True
    ago_steps: int = 500
    ago_lr: float = 3e-3
    ago_mask_weight: bool = False
    ago_pooled: bool = False
    graft_config: Optional[GraftConfig] = None
    scheme: str = "one_to_more"
    cache_inversions_to_disk: bool = False

    def __post_init__(self):
        values = vars(self)
        self.check_numbers(values)
        self.check_choices(values)
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        for name in ("num_inference_steps", "batch_size", "seed", "ago_steps"):
            put(name, int(getattr(self, name)))
        for name in ("guidance_scale", "eta", "ago_lr"):
            put(name, float(getattr(self, name)))
        for name in ("kv_cache", "blend_background", "ago_mask_weight", "ago_pooled", "cache_inversions_to_disk"):
            put(name, bool(getattr(self, name)))
        if self.size is not None:
            put("size", int(self.size))

    # The checks come in two groups because pipe(...) has always checked the call options
    # (generator, output type, callbacks) between them: the first bad argument is the one named.
    @staticmethod
    def check_numbers(v: Dict[str, Any]) -> None:
        """The counts and numbers: steps, batch size, AGO steps, seed, guidance, eta, AGO lr."""
        for name, low in (("num_inference_steps", MIN_STEPS), ("batch_size", 1), ("ago_steps", 0), ("seed", 0)):
            check_int(name, v[name], minimum=low)
        g = v["guidance_scale"]
        if not is_number(g) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g}")
        eta = v["eta"]
        if not is_number(eta) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        lr = v["ago_lr"]
        if not is_number(lr) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"ago_lr must be > 0, got {lr}")

    @staticmethod
    def check_choices(v: Dict[str, Any], vae_scale_factor: Optional[int] = None, xl: Optional[bool] = None) -> None:
        """The scheme, the K/V cache, the size (with a ``vae_scale_factor``, also the model's rule,
        :func:`check_size`), ``ago_pooled`` (with ``xl`` known, False: a model without SDXL's pooled
        text embedding refuses it) and the grafting config."""
        if v["scheme"] not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {v['scheme']!r}")
        if v["scheme"] == "per_sample" and v["kv_cache"]:
            raise ValueError("kv_cache=True needs scheme='one_to_more' "
                             "(the per-sample baseline re-runs everything)")
        if v["kv_cache_device"] is not None:
            try:
                torch.device(v["kv_cache_device"])
            except (RuntimeError, TypeError):
                raise ValueError(f"kv_cache_device must be None or a torch device such as 'cpu', "
                                 f"got {v['kv_cache_device']!r}") from None
        if v["size"] is not None:
            check_int("size", v["size"], minimum=1)
            if vae_scale_factor is not None:
                check_size(int(v["size"]), vae_scale_factor)
        if v["ago_pooled"] and xl is False:
            raise ValueError("ago_pooled needs an SDXL model: SD 1.x/2.x have no pooled text embedding to "
                             "optimise")
        gc = v["graft_config"]
        if gc is not None and not isinstance(gc, GraftConfig):
            raise TypeError(f"graft_config must be an o2mag.GraftConfig or None, got {type(gc).__name__}")

    @classmethod
    def names(cls) -> tuple:
        """The settings' keyword names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def graft(self) -> GraftConfig:
        """``graft_config``, else the paper's (the pipeline uses :meth:`GraftConfig.for_unet` of its
        UNet instead, which is the paper's on SD 1.x/2.x)."""
        return self.graft_config if self.graft_config is not None else GraftConfig.paper()

    def keywords(self) -> Dict[str, Any]:
        """The settings as keyword arguments of ``pipe(...)`` or ``generate_iter``."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)


def check_size(size: int, vae_scale_factor: int) -> None:
    """Raise ``ValueError`` unless ``size`` can be the working image side: a multiple of the VAE
    factor and at least two latent pixels (a 1-pixel latent breaks the UNet's GroupNorm, one
    value per group). The command line asks the same question, so the rule lives here once."""
    f = vae_scale_factor
    if size % f or size < 2 * f:
        raise ValueError(f"size must be a multiple of {f} and at least {2 * f}, got {size}")


def check_prompt(prompt: Any, anomaly_word: Any) -> None:
    """``prompt`` and ``anomaly_word`` must be given, as strings (``""`` amplifies no word)."""
    if prompt is None:
        raise ValueError("prompt is required: the text that describes the defect, e.g. "
                         "'a photo of a crack on a bottle'")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if anomaly_word is None:
        raise ValueError(
            "anomaly_word is required: the word (or words) of the prompt whose cross-attention DAE "
            "amplifies, e.g. anomaly_word='crack' for 'a photo of a crack on a bottle'; "
            "anomaly_word='' amplifies no word")
    if not isinstance(anomaly_word, str):
        raise TypeError(f"anomaly_word must be a str, got {type(anomaly_word).__name__}")


def check_call_options(generator: Any, output_type: Any, callback: Any, callback_inputs: Any,
                       allowed: Sequence[str] = CALLBACK_TENSOR_INPUTS) -> None:
    """The per-call options: a generator (or one per target), the output type, the step-end
    callback and the tensors it asks for (any of ``allowed``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of them (one per target "
                            f"mask), got {type(generator).__name__}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if isinstance(callback_inputs, str) or not hasattr(callback_inputs, "__iter__"):
        raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names, got {callback_inputs!r}")
    bad = [k for k in callback_inputs if k not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not among {list(allowed)}")


# ------------------------------------------------------------------------------------ signatures
_P = inspect.Parameter
_INPUTS = [
    ("reference", _P.empty, "ImageLike"),
    ("ref_mask", _P.empty, "ImageLike"),
    ("normal", _P.empty, "ImageLike"),
    ("target_masks", _P.empty, _P.empty),
    ("prompt", None, "Optional[str]"),
    ("anomaly_word", None, "Optional[str]"),
]
CALL_OPTIONS: Dict[str, tuple] = {  # name -> (default, annotation): per call, not settings
    "generator": (None, "Optional[Union[torch.Generator, List[torch.Generator]]]"),
    "output_type": ("pil", "str"),
    "return_dict": (True, "bool"),
    "callback_on_step_end": (None, "Optional[Callable]"),
    "callback_on_step_end_tensor_inputs": (("latents",), "Sequence[str]"),
}
# diffusers' pipelines take these positionally after the inputs; the other settings are keyword-only
_DIFFUSERS_ORDER = ("num_inference_steps", "guidance_scale", "eta", "generator", "output_type", "return_dict",
                    "callback_on_step_end", "callback_on_step_end_tensor_inputs")
_FIELDS = {f.name: f for f in dataclasses.fields(GenerationSettings)}


def _param(name: str, kind, *, required: bool = False) -> inspect.Parameter:
    """A setting's or a call option's parameter, with its declared default (none if ``required``)."""
    default, annotation = ((_FIELDS[name].default, _FIELDS[name].type) if name in _FIELDS
                           else CALL_OPTIONS[name])
    return _P(name, kind, default=_P.empty if required else default, annotation=annotation)


def _signature(head, middle, *, return_annotation=_P.empty) -> inspect.Signature:
    """``self``, ``head`` and ``middle`` parameters, then every remaining setting, keyword-only."""
    params = [_P("self", _P.POSITIONAL_OR_KEYWORD)] + head + middle
    named = {p.name for p in params}
    params += [_param(n, _P.KEYWORD_ONLY) for n in _FIELDS if n not in named]
    return inspect.Signature(params, return_annotation=return_annotation)


_INPUT_PARAMS = [_P(n, _P.POSITIONAL_OR_KEYWORD, default=d, annotation=a) for n, d, a in _INPUTS]

CALL = _signature(_INPUT_PARAMS, [_param(n, _P.POSITIONAL_OR_KEYWORD) for n in _DIFFUSERS_ORDER])
"""``pipe(...)``: the inputs, diffusers' positional keywords, then the other settings."""

STREAM = _signature(_INPUT_PARAMS, [
    _P("num_inference_steps", _P.KEYWORD_ONLY, default=None, annotation="Optional[int]"),
    _P("num_steps", _P.KEYWORD_ONLY, default=None, annotation="Optional[int]"),  # its older name
] + [_param(n, _P.KEYWORD_ONLY) for n in _DIFFUSERS_ORDER if n not in ("num_inference_steps", "output_type",
                                                                        "return_dict")],
    return_annotation="Iterator[Tuple[int, PIL.Image.Image, PIL.Image.Image]]")
"""``generate_iter(...)``: the inputs, then keyword-only arguments (no output options; the step
count may also be given as ``num_steps``, defaulting to 50)."""

CHECK = _signature([], [_P(n, _P.POSITIONAL_OR_KEYWORD) for n in ("prompt", "anomaly_word")]
                   + [_param(n, _P.POSITIONAL_OR_KEYWORD, required=True) for n in _DIFFUSERS_ORDER
                      if n != "return_dict"], return_annotation="None")
"""``check_inputs(...)``: diffusers' order, required, then the other settings as keywords."""


def bind(signature: inspect.Signature, qualname: str, args: tuple, kwargs: dict) -> Dict[str, Any]:
    """Every parameter of ``signature`` by name for this call (defaults filled in); a call that
    does not fit raises ``TypeError`` as Python's own would, naming ``qualname``."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{qualname}() {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)
