"""What the ``o2mag`` sub-commands share: argparse value types and formatting, the option groups of
``generate`` and ``dataset``, and the steps both take before generating (process state, device
and dtype, the model, the working size, the prompt and its anomaly word, target masks).

Each value type names its option in the one-line error argparse prints (exit 2), so every
command rejects bad numbers alike. Building the parser stays cheap (``o2mag --help`` loads
neither torch nor diffusers): the functions that need torch or the pipeline import them when
they are called, each such import marked ``# deferred``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError, MissingInputError, UsageError
from ..files import check_writable
from ..masks import folder_masks, read_mask, resolve_foreground, target_masks
from ..runs.processes import process_state
from ..runs.runner import RunOptions

__all__ = [
    "int_at_least", "float_at_least", "positive_float", "fraction", "Parser", "HelpFormatter",
    "EMBEDDED_STEPS", "EMBEDDED_AGO_STEPS", "PAPER_STEPS", "PAPER_AGO_STEPS", "EMBEDDED_NOTE",
    "add_output_args", "add_model_args", "add_generation_args", "process_state_for", "resolve_device",
    "device_dtype", "default_steps", "embedded_model", "TINY_FAMILIES", "load_pipeline", "working_size", "prompt_and_word",
    "check_mask_options", "target_masks_for", "load_mask_array", "known_xl", "generation_settings",
    "manifest_settings",
    "integer", "number", "SETTING_OPTIONS",
    "run_options", "stats_line", "check_output_folders", "report_missing", "EXIT_OK", "EXIT_FAILED",
    "EXIT_INPUT", "EXIT_INCOMPLETE", "EXIT_INTERRUPTED",
]

# The command's exit codes (documented in o2mag.cli and the README).
EXIT_OK = 0  # every sample asked for is there
EXIT_FAILED = 1  # the run failed for a reason the user can act on (AGO overflow, out of GPU memory)
EXIT_INPUT = 2  # what the user gave is wrong, or an OS error about one of the user's paths
EXIT_INCOMPLETE = 3  # the run ended with samples missing: rerun the same command to finish them
EXIT_INTERRUPTED = 130  # Ctrl-C

EMBEDDED_STEPS = 10
EMBEDDED_AGO_STEPS = 20
PAPER_STEPS = 50
PAPER_AGO_STEPS = 500

EMBEDDED_NOTE = (
    "o2mag: no --model given, so this run uses the EMBEDDED DEFAULT: a tiny randomly initialised "
    "{shape}model{sample}.\n"
    "       It demonstrates the machinery (inversion, AGO, tri-branch grafting, one-to-more batching, "
    "output tree), NOT image quality.\n"
    "       For real defects point it at Stable Diffusion v1.5 weights: "
    "--model /path/to/stable-diffusion-v1-5 (a local diffusers folder) or a hub id such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5."
)


# ------------------------------------------------------------------------------------ value types
def _number(name: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None


def integer(name: str):
    """An int, any value: for options whose bounds are a setting's rule (checked by
    :func:`generation_settings`, so the command line and ``pipe(...)`` share one rule)."""
    return lambda text: _number(name, text, int)


def number(name: str):
    """A float, any value (see :func:`integer`)."""
    return lambda text: _number(name, text, float)


def int_at_least(name: str, minimum: int):
    """An int >= ``minimum``."""
    def parse(text: str) -> int:
        value = _number(name, text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def float_at_least(name: str, minimum: float, strict: bool = False):
    """A finite float >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        value = _number(name, text, float)
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


def positive_float(name: str):
    """A finite float > 0."""
    return float_at_least(name, 0.0, strict=True)


def fraction(name: str):
    """A float in [0, 1]."""
    def parse(text: str) -> float:
        value = _number(name, text, float)
        if not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1], got {text}")
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line (its default), kept for sub-commands too."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default unless its help already names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


# ---------------------------------------------------------------------------------- option groups
def add_output_args(g, num_default, num_help: str) -> None:
    out = g.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="o2mag-out",
                     help="output root; samples go to <out>/<category>/<defect>/{image,mask}/NNN.png "
                          "+ manifest.jsonl. Several processes or runs may write one folder at once (they "
                          "claim samples); on several machines it must be a shared filesystem")
    out.add_argument("--num", type=int_at_least("--num", 1), default=num_default, help=num_help)
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="overwrite", action="store_false",
                      help="keep complete samples and generate only missing ones (default)")
    mode.add_argument("--overwrite", dest="overwrite", action="store_true",
                      help="regenerate and replace samples 0..num-1 even if they exist")
    g.set_defaults(overwrite=False)
    out.add_argument("--cache-dir", metavar="DIR",
                     help="where AGO embeddings and DDIM inversions are cached for reruns (default "
                          "<out>/.o2mag-cache)")
    out.add_argument("--claim-lease", metavar="SECONDS", type=float_at_least("--claim-lease", 0.0, strict=True),
                     default=120.0,
                     help="a sample claimed by a process that stopped renewing its claim for this long "
                          "(killed on another machine) is taken over; on the same machine a dead process's "
                          "claims are taken over at once")


TINY_FAMILIES = ("sd1", "sd2", "sdxl")
"""The embedded tiny models ``--family`` picks (:meth:`O2MAGPipeline.tiny`'s families)."""


def add_model_args(g) -> None:
    model = g.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_ID",
                       help="diffusers Stable Diffusion folder or hub id (default: the embedded tiny demo "
                            "model)")
    model.add_argument("--family", choices=TINY_FAMILIES, default=None,
                       help="without --model: which embedded tiny model runs, SD 1.5-shaped (sd1, the "
                            "default), SD 2.x-shaped with v-prediction (sd2) or SDXL-shaped (sdxl); with "
                            "--model it is an error (the family is detected from the folder)")
    model.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (auto = cuda when available; under accelerate launch "
                            "or torchrun, auto and cuda mean this process's GPU)")
    model.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="model precision (auto = fp16 on CUDA, fp32 on CPU; fp16 needs CUDA)")
    model.add_argument("--size", type=int_at_least("--size", 8), default=None,
                       help="working image side in pixels, multiple of 8 (default: the model's native size)")


def add_generation_args(g) -> None:
    gen = g.add_argument_group("generation")
    gen.add_argument("--steps", type=integer("--steps"), default=None,
                     help=f"DDIM steps (default {PAPER_STEPS}; {EMBEDDED_STEPS} in the embedded demo)")
    gen.add_argument("--guidance", type=number("--guidance"), default=7.5,
                     help="classifier-free guidance scale")
    gen.add_argument("--batch-size", type=integer("--batch-size"), default=4,
                     help="targets per UNet batch (each batch adds one reference and one normal branch)")
    gen.add_argument("--ago-steps", type=integer("--ago-steps"), default=None,
                     help=f"AGO Adam steps, 0 = off (default {PAPER_AGO_STEPS}; {EMBEDDED_AGO_STEPS} in the "
                          "demo)")
    gen.add_argument("--ago-lr", type=number("--ago-lr"), default=3e-3,
                     help="AGO learning rate")
    gen.add_argument("--ago-mask-weight", action="store_true",
                     help="weight the AGO loss by the dilated reference mask (focus on the defect)")
    gen.add_argument("--ago-pooled", action="store_true",
                     help="SDXL only: AGO optimises the pooled text embedding too, jointly with the sequence "
                          "embedding (default: the prompt's pooled embedding stays; see README, Model families)")
    gen.add_argument("--kv-cache", action="store_true",
                     help="record the reference/normal branches' keys/values on the first batch and run only "
                          "target rows afterwards (same images, fewer UNet rows, more memory)")
    gen.add_argument("--kv-cache-device", choices=("model", "cpu"), default=None,
                     help="where --kv-cache keeps the recorded keys/values: on the model's device (default) "
                          "or in host memory (cpu: for SD v1.5 at 512 px about 6 GB in fp16 over 50 steps, "
                          "copied back layer by layer)")
    gen.add_argument("--no-blend", dest="blend", action="store_false",
                     help="do not reset the background (outside the target mask) to the normal image each "
                          "step")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------- before generating
def process_state_for(args):
    """This process's place under accelerate launch / torchrun (one process when run plainly)."""
    import torch  # deferred: o2mag --help must not load torch

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    return process_state(cpu=cpu)


def resolve_device(spec: str, state=None):
    """The torch device ``--device spec`` names (``auto``: CUDA when available); under a launcher
    ``auto``/``cuda`` mean this process's GPU. A device that cannot be used is a ``UsageError``."""
    import torch  # deferred: o2mag --help must not load torch

    dev = spec
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if state is not None and state.distributed and dev == "cuda":
        dev = f"cuda:{state.local_index}"  # one GPU per process
    try:
        device = torch.device(dev)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported")
    return device


def device_dtype(args, state=None):
    """``(device, torch dtype, dtype name)`` from ``--device`` and ``--dtype``."""
    import torch  # deferred: o2mag --help must not load torch

    device = resolve_device(args.device, state)
    name = args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs CUDA; on the CPU use --dtype fp32 (default) or bf16")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return device, dtype, name


def default_steps(args, embedded: bool) -> tuple:
    """``(steps, ago_steps)``: the options, else the embedded demo's or the paper's defaults."""
    steps = args.steps if args.steps is not None else (EMBEDDED_STEPS if embedded else PAPER_STEPS)
    ago_steps = args.ago_steps
    if ago_steps is None:
        ago_steps = EMBEDDED_AGO_STEPS if embedded else PAPER_AGO_STEPS
    return steps, ago_steps


def embedded_model(args) -> bool:
    """True when no ``--model`` is given (the embedded tiny model of ``--family`` runs). ``--family``
    with ``--model`` is a ``UsageError``: a folder's family is detected from its configs."""
    if args.model is not None and args.family is not None:
        raise UsageError(f"--family {args.family} picks an embedded tiny model and cannot be used with "
                         "--model (the family of --model is detected from the folder); give one of them")
    return args.model is None


def load_pipeline(args, device, dtype, state, embedded: bool, note: str = ""):
    """The model on this process's device; the embedded note printed once (process 0)."""
    import torch  # deferred: o2mag --help must not load torch

    from ..pipeline.loading import quiet_loading  # deferred: the pipeline loads diffusers
    from ..pipeline.pipeline_o2mag import O2MAGPipeline  # deferred: the pipeline loads diffusers

    if embedded:
        if state.is_main:
            shape = {"sd2": "SD 2.x-shaped (v-prediction) ", "sdxl": "SDXL-shaped "}.get(args.family, "")
            print(EMBEDDED_NOTE.format(shape=shape, sample=note), file=sys.stderr)
        if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
            # the tiny model's ops are far too small to gain from threads; extra threads only spin
            torch.set_num_threads(1)
        pipe = O2MAGPipeline.tiny(0, family=args.family or "sd1")
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        with quiet_loading(args.quiet or not state.is_main):
            pipe = O2MAGPipeline.from_pretrained(args.model, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet or not state.is_main)
    return pipe


def working_size(args, pipe) -> int:
    """``--size``, else the model's native size; checked by the pipeline's own rule."""
    from ..pipeline.settings import check_size  # deferred: loads torch

    size = args.size or pipe.default_size
    try:
        check_size(size, pipe.vae_scale_factor)  # one rule, shared with the pipeline
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    return size


def prompt_and_word(pipe, prompt, word, category: str, defect: str, remedy: Optional[str] = None):
    """The prompt (default 'a photo of a <defect> on a <category>') and the word DAE amplifies
    (default: the defect name's last word when the prompt holds it; never some other word of the
    prompt, which is usually the object: amplifying the object is worse than stopping).
    ``remedy``: what the error tells the user to do when no word can be chosen."""
    from ..pipeline.inputs import token_indices  # deferred: loads torch

    if not prompt:
        prompt = f"a photo of a {defect.replace('_', ' ')} on a {category.replace('_', ' ')}"
    if not word:
        cand = defect.replace("_", " ").split()[-1]
        if cand not in prompt.split():
            what = f"the defect name {defect!r} does not occur in the prompt {prompt!r}"
            if remedy is None:
                raise UsageError(f"--anomaly-word is needed: {what}; give the prompt's word for the defect, "
                                 "e.g. --anomaly-word crack")
            raise UsageError(f"{what}; {remedy}")
        word = cand
    token_indices(pipe.tokenizer, prompt, word)  # fail early if the word is not in the prompt
    return prompt, word


def check_mask_options(args) -> str:
    """The target-mask mode the options ask for (``affine``, ``perlin`` or ``folder``), checked."""
    if args.kv_cache_device and not args.kv_cache:
        raise UsageError("--kv-cache-device only applies with --kv-cache")
    masks = getattr(args, "masks", None)
    if masks and args.mask_mode not in (None, "folder"):
        raise UsageError(f"--masks gives the target masks; it cannot be used with --mask-mode "
                         f"{args.mask_mode}")
    mode = args.mask_mode or ("folder" if masks else "affine")
    if mode == "folder":
        if not masks:
            raise UsageError("--mask-mode folder needs --masks DIR")
        if not Path(masks).is_dir():
            raise MissingInputError(f"--masks folder not found: {masks}")
        try:
            folder_masks(masks)  # every file readable and not empty, before the model loads
        except InputError as e:
            raise type(e)(f"--masks: {e}") from None
    if args.foreground not in ("otsu", "all"):
        if not Path(args.foreground).is_file():
            raise MissingInputError(f"--foreground mask not found: {args.foreground}")
        read_mask(args.foreground, "--foreground")
    return mode


def target_masks_for(args, mode: str, ref_mask, normal_image, indices: Sequence[int], size: int):
    """The target masks of sample ``indices`` (mask ``i`` is drawn from ``(--seed, i)``)."""
    if mode == "folder":
        return target_masks("folder", list(indices), shape=(size, size), folder=args.masks)
    fg = resolve_foreground(args.foreground, normal_image, (size, size))
    return target_masks(mode, list(indices), ref_mask=ref_mask, shape=(size, size), foreground=fg,
                        seed=args.seed)


def load_mask_array(mask, size: int, name: str = "--ref-mask"):
    """A reference mask as bool at the working size (nearest), read by the pipeline's rule
    (:func:`o2mag.masks.read_mask`): empty, or covering the whole image, is an input error."""
    return read_mask(mask, name, shape=(size, size), allow_full=False)


SETTING_OPTIONS = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "batch_size": "--batch-size",
                   "seed": "--seed", "ago_steps": "--ago-steps", "ago_lr": "--ago-lr", "size": "--size",
                   "ago_pooled": "--ago-pooled"}
"""The generation settings the options set: their bounds are the settings' own rules."""


def known_xl(args, pipe=None) -> Optional[bool]:
    """Whether the model is SDXL, as far as known: the loaded ``pipe``'s family; before loading,
    the embedded model's (``--family``), or, when ``--ago-pooled`` asks, the ``--model`` folder's
    from its configs (no weights load); else None for a ``--model`` not loaded yet."""
    if pipe is not None:
        return pipe.is_xl
    if args.model is None:
        return args.family == "sdxl"
    if not args.ago_pooled:
        return None
    from ..pipeline.loading import check_model_path, detect_family  # deferred: loads diffusers

    return detect_family(check_model_path(args.model)).name == "sdxl"


def generation_settings(args, steps: int, ago_steps: int, size: Optional[int], xl: Optional[bool] = None):
    """The :class:`~o2mag.pipeline.settings.GenerationSettings` these options ask for, checked by
    the settings' own rules (the ones ``pipe(...)`` applies), an error naming the option
    (``UsageError``). Called once with ``size=None`` before the model loads, to check the options
    early. ``xl`` (:func:`known_xl`): whether the model is SDXL, which ``--ago-pooled`` needs
    (None: not known yet, not checked). Inversions go to the disk cache too, so that the processes
    of a launch and later runs share them."""
    from ..pipeline.settings import GenerationSettings  # deferred: loads torch

    values = dict(num_inference_steps=steps, guidance_scale=args.guidance, batch_size=args.batch_size,
                  seed=args.seed, size=size, kv_cache=args.kv_cache,
                  kv_cache_device="cpu" if args.kv_cache_device == "cpu" else None, blend_background=args.blend,
                  ago_steps=ago_steps, ago_lr=args.ago_lr, ago_mask_weight=args.ago_mask_weight,
                  ago_pooled=args.ago_pooled, cache_inversions_to_disk=True)
    try:
        settings = GenerationSettings(**values)
        GenerationSettings.check_choices(vars(settings), xl=xl)
        return settings
    except (TypeError, ValueError) as e:
        text = str(e)
        for name, option in SETTING_OPTIONS.items():
            if text.startswith(name + " "):
                text = option + text[len(name):]
        raise UsageError(text) from None


def manifest_settings(settings) -> dict:
    """The generation settings every manifest line records (under the command line's names).
    ``ago_pooled`` only when on: folders made before it existed (or without it) keep their
    settings, and a resume with the other ``--ago-pooled`` is a run with other settings."""
    return dict(steps=settings.num_inference_steps, guidance=settings.guidance_scale, ago_steps=settings.ago_steps,
                ago_lr=settings.ago_lr, ago_mask_weight=settings.ago_mask_weight, size=settings.size,
                blend_background=settings.blend_background, seed=settings.seed,
                graft="paper",  # the command line always grafts with GraftConfig.paper()
                **({"ago_pooled": True} if settings.ago_pooled else {}))


def run_options(args, mode: str, settings):
    """The runner's options for these command-line options and generation ``settings``."""
    def make_masks(ref_mask, normal_image, indices):
        return target_masks_for(args, mode, ref_mask, np.asarray(normal_image), indices, settings.size)

    return RunOptions(settings=settings, make_masks=make_masks, overwrite=args.overwrite, lease=args.claim_lease)


def check_output_folders(args) -> None:
    """``--out`` and the cache folder (``--cache-dir``, default ``<out>/.o2mag-cache``) can be written:
    checked before the model is loaded, so a read-only or impossible folder is one line (exit 2)."""
    check_writable(args.out, "--out")
    check_writable(args.cache_dir or os.path.join(args.out, ".o2mag-cache"), "--cache-dir")


def report_missing(results) -> int:
    """Say which groups of a finished run still miss samples, who holds them and how to finish them;
    ``EXIT_INCOMPLETE`` when any does, else ``EXIT_OK``."""
    code = EXIT_OK
    for r in results:
        if r.complete is None or r.complete >= r.wanted:
            continue
        code = EXIT_INCOMPLETE
        held = (f"; {len(r.held)} claimed by another live o2mag run ({'; '.join(sorted(set(r.held.values())))}): "
                "rerun the same command when it has finished, or let it finish them" if r.held else "")
        print(f"o2mag: {r.wanted - r.complete} of {r.wanted} sample(s) still missing in {r.dir}{held}; rerun the "
              "same command to finish them (exit code 3)", file=sys.stderr)
    return code


def stats_line(stats) -> str:
    return (f"UNet calls {stats.get('unet_calls', 0)}, rows {stats.get('unet_rows', 0)}; inversions "
            f"{stats.get('inversion_runs', 0)}, AGO runs {stats.get('ago_runs', 0)}")
