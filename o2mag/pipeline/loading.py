"""Loading a diffusers model folder or hub id: what counts as a bad path, which model family it
holds (:func:`detect_family`), which dtype argument the installed diffusers takes, and keeping the
libraries quiet while they load."""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from diffusers.utils import logging as dlog
from transformers.utils import logging as tlog

from ..errors import InputError, MissingInputError

__all__ = ["check_model_path", "detect_family", "ModelFamily", "FAMILY_SIZES", "SUPPORTED_FAMILIES",
           "dtype_keyword", "loading_kwargs", "quiet_loading", "load_error_message"]


def check_model_path(name_or_path: Any) -> str:
    """The name to hand to diffusers: an existing pipeline folder (``~`` expanded) or a hub id.

    Raises :class:`~o2mag.errors.InputError` for a folder without ``model_index.json`` or a file,
    and :class:`~o2mag.errors.MissingInputError` for a path that does not exist (anything that
    starts with ``.``, ``/`` or ``~`` or has more than one ``/`` cannot be a hub id)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a str or os.PathLike, "
                        f"got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise InputError(
                f"{name} is not a diffusers pipeline folder (no model_index.json); point --model at a "
                "folder such as stable-diffusion-v1-5 that holds model_index.json, unet/, vae/, "
                "text_encoder/, tokenizer/ and scheduler/")
        return expanded
    if os.path.exists(expanded):
        raise InputError(f"{name} is a file, not a diffusers pipeline folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep == "\\" and "\\" in name):
        raise MissingInputError(f"model folder not found: {name}")
    return name


FAMILY_SIZES: Dict[str, int] = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
"""The published checkpoints' working sizes (SD 1.x; SD 2.x base, epsilon; SD 2.x v-prediction;
SDXL): the default when a UNet config gives no ``sample_size``."""

SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")
"""The families O2MAGPipeline runs; :func:`detect_family` refuses the others with one line."""

_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class ModelFamily:
    """What a model folder holds, read from its configs alone (no weights loaded).

    ``name`` is "sd1", "sd2" or "sdxl"; ``prediction_type`` the scheduler's ("epsilon",
    "v_prediction" or "sample"); ``default_size`` the working image side: the UNet's
    ``sample_size`` times the VAE's downsampling factor, as diffusers' own pipelines default their
    height and width (512 for SD 1.5 and SD 2 base, 768 for SD 2.x v-prediction, 1024 for SDXL),
    or :data:`FAMILY_SIZES` when the UNet config has none."""

    name: str
    prediction_type: str
    default_size: int

    @property
    def label(self) -> str:
        return _LABELS[self.name]


def _config(name: str, subfolder: Optional[str] = None) -> Dict[str, Any]:
    """A config as diffusers reads it (a folder's file, or a hub id's, fetched without weights)."""
    # the class only names the file: config.json for models, scheduler_config.json, model_index.json
    reader = {None: DiffusionPipeline, "scheduler": DDIMScheduler}.get(subfolder, UNet2DConditionModel)
    kw = {"subfolder": subfolder} if subfolder else {}
    try:
        with warnings.catch_warnings():  # diffusers passes the hub an argument it deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return dict(reader.load_config(name, **kw))
    except (OSError, ValueError) as e:  # a missing or broken JSON file, as diffusers reports it
        where = f"{subfolder}/" if subfolder else "model_index.json"
        raise InputError(f"could not load a diffusers pipeline from {name!r} ({where}): "
                         f"{load_error_message(e)}") from e


def _present(index: Dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def detect_family(name: str) -> ModelFamily:
    """The family of the diffusers pipeline at ``name`` (a folder or hub id checked by
    :func:`check_model_path`), from ``model_index.json`` and the UNet, VAE and scheduler configs.

    Raises :class:`~o2mag.errors.InputError` with one line for what o2mag cannot run: a
    transformer-based pipeline (SD3, Flux, PixArt: no UNet to graft), a pipeline without a UNet
    or text encoder (unconditional models, an SDXL refiner alone), a UNet that is not a
    ``UNet2DConditionModel`` or takes other than 4 latent channels (inpainting: 9), and an SDXL
    UNet without its second text encoder."""
    index = _config(name)
    cls = index.get("_class_name", "?")
    if not _present(index, "unet"):
        if _present(index, "transformer"):
            raise InputError(f"{name} holds a {cls}, a transformer-based pipeline (SD3, Flux, ...): o2mag "
                             "grafts a UNet's attention and runs SD 1.x, SD 2.x and SDXL UNet pipelines only")
        raise InputError(f"{name} holds a {cls} without a unet component: o2mag runs SD 1.x, SD 2.x and "
                         "SDXL text-to-image pipelines only")
    unet = _config(name, "unet")
    if unet.get("_class_name") != "UNet2DConditionModel":
        raise InputError(f"{name}: its unet is a {unet.get('_class_name', '?')}, not a text-conditioned "
                         "UNet2DConditionModel (an unconditional model?); o2mag needs a text-to-image UNet")
    channels = unet.get("in_channels", 4)
    if channels != 4:
        kind = "an inpainting UNet" if channels == 9 else "not a text-to-image UNet"
        raise InputError(f"{name}: its unet takes {channels} input channels ({kind}); o2mag needs a "
                         "text-to-image UNet with 4 latent channels")
    xl = _present(index, "text_encoder_2") or unet.get("addition_embed_type") == "text_time"
    if not _present(index, "text_encoder") or not _present(index, "tokenizer"):
        what = "an SDXL refiner alone (no first text encoder)" if xl else "no text_encoder/tokenizer"
        raise InputError(f"{name} holds a {cls} with {what}; o2mag needs a text-to-image base model")
    if xl and (not _present(index, "text_encoder_2") or not _present(index, "tokenizer_2")
               or unet.get("addition_embed_type") != "text_time"):
        raise InputError(f"{name} holds a {cls} with an SDXL part but not SDXL's base layout (a UNet with "
                         "'text_time' added conditioning and text_encoder_2/tokenizer_2); o2mag needs an SDXL "
                         "base model")
    scheduler = _config(name, "scheduler") if _present(index, "scheduler") else {}
    prediction = scheduler.get("prediction_type", "epsilon")
    if xl:
        family = "sdxl"
    elif unet.get("use_linear_projection") or unet.get("cross_attention_dim") == 1024:
        family = "sd2"  # SD 2.x's OpenCLIP-H UNets: linear projections, 1024-wide text states
    else:
        family = "sd1"
    vae = _config(name, "vae") if _present(index, "vae") else {}
    blocks = vae.get("block_out_channels") or [0] * 4
    sample = unet.get("sample_size")
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    if sample:
        size = int(sample) * 2 ** (len(blocks) - 1)
    else:
        size = FAMILY_SIZES["sd2-v" if family == "sd2" and prediction == "v_prediction" else family]
    return ModelFamily(family, prediction, size)


def dtype_keyword() -> str:
    """``"dtype"`` where the installed diffusers' ``from_pretrained`` takes it, else ``"torch_dtype"``.

    Recent diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works but warns);
    older ones know only ``torch_dtype`` and would ignore ``dtype``. The method's documented
    parameters tell which one this installation has."""
    doc = DiffusionPipeline.from_pretrained.__doc__ or ""
    return "dtype" if re.search(r"^\s*dtype \(", doc, re.MULTILINE) else "torch_dtype"


def loading_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``from_pretrained`` keyword arguments in the names the installed diffusers takes.

    ``dtype``/``torch_dtype`` (either name) is passed under :func:`dtype_keyword`; giving both is an
    error. Without accelerate, ``low_cpu_mem_usage`` defaults to False: diffusers would switch it
    off anyway, after a warning that says only that."""
    out = dict(kwargs)
    given = [k for k in ("dtype", "torch_dtype") if out.get(k) is not None]
    if len(given) == 2:
        raise ValueError("give dtype or torch_dtype, not both (torch_dtype is the older name)")
    for k in ("dtype", "torch_dtype"):
        out.pop(k, None)
    if given:
        out[dtype_keyword()] = kwargs[given[0]]
    if not is_accelerate_available():
        out.setdefault("low_cpu_mem_usage", False)
    return out


def load_error_message(error: BaseException) -> str:
    """diffusers' loading error as one self-contained line. Where diffusers points to "the root
    cause in the stacktrace above", or its error hides a hub error (a hub id that is neither
    cached nor reachable, e.g. with ``HF_HUB_OFFLINE=1``), the innermost cause it chained is
    named instead: the ``o2mag`` command prints no stack trace."""
    text = " ".join(str(error).split())
    root, seen = error, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    from_hub = root is not error and type(root).__module__.startswith("huggingface_hub")
    if "stacktrace above" in text or from_hub:  # e.g. "offline mode is enabled ... HF_HUB_OFFLINE"
        text = text.replace("Please check out the root cause in the stacktrace above.", "").strip()
        if root is not error:
            text += f" Cause: {' '.join(str(root).split())}"
    return text


@contextlib.contextmanager
def quiet_loading(quiet: bool = True):
    """Within the block, diffusers and transformers print nothing -- no progress bars, no advice,
    no error lines: a failure to load raises, and the ``o2mag`` command reports it in its own one
    line (``--quiet``); their previous settings come back afterwards."""
    if not quiet:
        yield
        return

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    try:
        for lib, _, _ in saved:
            lib.set_verbosity(lib.CRITICAL)  # not even logger.error (diffusers logs one, then raises)
            lib.disable_progress_bar()
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
