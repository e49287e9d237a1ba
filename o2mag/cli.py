"""The ``o2mag`` command: generate many anomalies from one reference defect.

Input problems (missing file, unreadable image, bad mask, impossible option, model folder that is
not a diffusers pipeline) end with a one-line message and exit code 2, never a traceback; a run
that fails for a reason the user can act on (AGO overflow, GPU out of memory) ends with a one-line
message and exit code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import __version__
from .commands.options import float_at_least, int_at_least
from .errors import InputError, MissingInputError

EMBEDDED_STEPS = 10
EMBEDDED_AGO_STEPS = 20
PAPER_STEPS = 50
PAPER_AGO_STEPS = 500
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

EMBEDDED_NOTE = (
    "o2mag: no --model given, so this run uses the EMBEDDED DEFAULT: a tiny randomly initialised "
    "model{sample}.\n"
    "       It demonstrates the machinery (inversion, AGO, tri-branch grafting, one-to-more batching, "
    "output tree), NOT image quality.\n"
    "       For real defects point it at Stable Diffusion v1.5 weights: "
    "--model /path/to/stable-diffusion-v1-5 (a local diffusers folder) or a hub id such as "
    "stable-diffusion-v1-5/stable-diffusion-v1-5."
)


class UsageError(InputError):
    """An impossible combination or value of options."""




class _Parser(argparse.ArgumentParser):
    """argparse that exits with code 2 and one line (its default), kept for sub-commands too."""


class _Help(argparse.HelpFormatter):
    """Shows an option's default unless its help already names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not argparse.SUPPRESS and action.nargs != 0
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="o2mag", description="Training-free one-to-more anomaly generation (O2MAG) on a frozen "
                                          "Stable Diffusion: one reference defect -> many new defects.")
    p.add_argument("--version", action="version", version=f"o2mag {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    g = sub.add_parser(
        "generate",
        help="generate N anomaly images (and masks) from one reference defect and normal image(s)",
        description="Generate --num anomaly images at new target masks from ONE reference anomaly image "
                    "(--ref, --ref-mask) and normal image(s) (--normal). Inversion and AGO run once; the "
                    "targets are denoised in batches that share one reference and one normal branch. "
                    "With no --model and no inputs it runs the embedded demo (tiny random model).",
        formatter_class=_Help,
    )
    src = g.add_argument_group("inputs (give --ref/--ref-mask/--normal, or --mvtec-root/--category/--defect, "
                               "or nothing for the embedded sample)")
    src.add_argument("--ref", metavar="IMG", help="reference anomaly image (the defect to copy)")
    src.add_argument("--ref-mask", metavar="MASK",
                     help="binary mask of the defect in --ref (same size as --ref)")
    src.add_argument("--normal", metavar="IMG|DIR",
                     help="normal (defect-free) image, or a folder of them (see --num-normals)")
    src.add_argument("--num-normals", type=int_at_least("--num-normals", 1), default=1,
                     help="how many normal images of a folder (or of MVTec train/good) to use, first ones in "
                          "name order; sample i uses normal i mod count. Each normal image costs one "
                          "inversion, "
                          "and targets sharing a normal share its branch")
    src.add_argument("--mvtec-root", metavar="ROOT",
                     help="MVTec-AD root: reference and mask from <category>/test/<defect> and "
                          "<category>/ground_truth/<defect>, normals from <category>/train/good")
    src.add_argument("--category", help="MVTec category (with --mvtec-root); also names the output folder")
    src.add_argument("--defect", help="MVTec defect type (with --mvtec-root); also names the output folder")
    src.add_argument("--ref-index", type=int_at_least("--ref-index", 0), default=0,
                     help="which anomaly image of the MVTec defect folder (sorted) is the reference")
    _add_output_args(g, num_default=8,
                     num_help="total number of samples wanted in the output folder (a rerun makes only the "
                              "missing ones)")
    _add_model_args(g)
    text = g.add_argument_group("prompt")
    text.add_argument("--prompt",
                      help="prompt describing the defect (default: 'a photo of a <defect> on a <category>')")
    text.add_argument("--anomaly-word", help="word of the prompt whose cross-attention DAE amplifies "
                                             "(default: the last word of the defect name when the prompt "
                                             "contains it; otherwise this option is required)")
    masks = g.add_argument_group("target masks")
    masks.add_argument("--mask-mode", choices=("affine", "perlin", "folder"), default=None,
                       help="affine: random rotated/scaled/flipped copies of the reference mask on the "
                            "object; perlin: Perlin-noise blobs; folder: masks from --masks (default affine, "
                            "or folder "
                            "when --masks is given)")
    masks.add_argument("--masks", metavar="DIR", help="folder of target masks, resized to the working size "
                                                      "(sample i uses file i mod count, in name order)")
    masks.add_argument("--foreground", metavar="MASK|otsu|all", default="otsu",
                       help="where target masks may go: a mask file, 'otsu' (estimated from the normal "
                            "image, "
                            "falls back to the whole image) or 'all'")
    masks.add_argument("--seed", type=int_at_least("--seed", 0), default=0,
                       help="base seed: mask i uses seed (seed, i); AGO uses seed")
    _add_generation_args(g)
    _add_dataset_parser(sub)
    from .commands.evaluate import register as register_evaluate

    register_evaluate(sub)
    return p


def _add_output_args(g, num_default, num_help: str) -> None:
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


def _add_model_args(g) -> None:
    model = g.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_ID",
                       help="diffusers Stable Diffusion folder or hub id (default: the embedded tiny demo "
                            "model)")
    model.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (auto = cuda when available; under accelerate launch "
                            "or torchrun, auto and cuda mean this process's GPU)")
    model.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="model precision (auto = fp16 on CUDA, fp32 on CPU; fp16 needs CUDA)")
    model.add_argument("--size", type=int_at_least("--size", 8), default=None,
                       help="working image side in pixels, multiple of 8 (default: the model's native size)")


def _add_generation_args(g) -> None:
    gen = g.add_argument_group("generation")
    gen.add_argument("--steps", type=int_at_least("--steps", 2), default=None,
                     help=f"DDIM steps (default {PAPER_STEPS}; {EMBEDDED_STEPS} in the embedded demo)")
    gen.add_argument("--guidance", type=float_at_least("--guidance", 0.0), default=7.5,
                     help="classifier-free guidance scale")
    gen.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=4,
                     help="targets per UNet batch (each batch adds one reference and one normal branch)")
    gen.add_argument("--ago-steps", type=int_at_least("--ago-steps", 0), default=None,
                     help=f"AGO Adam steps, 0 = off (default {PAPER_AGO_STEPS}; {EMBEDDED_AGO_STEPS} in the "
                          "demo)")
    gen.add_argument("--ago-lr", type=float_at_least("--ago-lr", 0.0, strict=True), default=3e-3,
                     help="AGO learning rate")
    gen.add_argument("--ago-mask-weight", action="store_true",
                     help="weight the AGO loss by the dilated reference mask (focus on the defect)")
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


def _add_dataset_parser(sub) -> None:
    d = sub.add_parser(
        "dataset",
        help="generate a whole synthetic dataset: every MVTec category x defect type (or a job file)",
        description="Generate --num anomalies for every category x defect type of an MVTec-AD root (or the "
                    "groups of a JSON job file) into <out>/<category>/<defect>/. References are the first "
                    "third (n // 3, name order) of each test/<defect> folder, which the usual evaluation "
                    "keeps out of its test set; sample i uses reference i mod R and normal (i // R) mod "
                    "--num-normals. Under accelerate launch or torchrun every process takes part; a rerun "
                    "resumes.",
        formatter_class=_Help,
    )
    src = d.add_argument_group("inputs (--mvtec-root or --job)")
    which = src.add_mutually_exclusive_group()
    which.add_argument("--mvtec-root", metavar="ROOT", help="MVTec-AD root (<category>/test/<defect>, "
                                                            "ground_truth/<defect>, train/good)")
    which.add_argument("--job", metavar="FILE.json",
                       help="JSON job file: {\"num\": N, \"mvtec_root\": ..., \"groups\": [{\"category\", "
                            "\"defect\", optional \"num\", \"references\": [{\"image\", \"mask\"}], "
                            "\"normals\": [files or folders], \"prompt\", \"anomaly_word\"}]} (paths "
                            "relative to the file; a group without references takes them from mvtec_root)")
    src.add_argument("--category", action="append", metavar="NAME",
                     help="only this category (repeat for several; default: all)")
    src.add_argument("--defect", action="append", metavar="NAME",
                     help="only this defect type (repeat for several; default: all of each category)")
    src.add_argument("--num-normals", type=int_at_least("--num-normals", 1), default=1,
                     help="normal images per category (first of train/good in name order); each costs one "
                          "inversion")
    _add_output_args(d, num_default=None,
                     num_help="samples per category x defect type, default 200 (a job file's own counts come "
                              "first; a rerun makes only the missing ones)")
    _add_model_args(d)
    text = d.add_argument_group("prompt")
    text.add_argument("--prompt", default="a photo of a {defect} on a {category}",
                      help="prompt template; {defect} and {category} are replaced (underscores become "
                           "spaces)")
    masks = d.add_argument_group("target masks")
    masks.add_argument("--mask-mode", choices=("affine", "perlin"), default="affine",
                       help="affine: rotated/scaled/flipped copies of the reference mask on the object; "
                            "perlin: Perlin-noise blobs")
    masks.add_argument("--foreground", choices=("otsu", "all"), default="otsu",
                       help="where target masks may go: 'otsu' (estimated per normal image, falls back to "
                            "the whole image for textures) or 'all'")
    masks.add_argument("--seed", type=int_at_least("--seed", 0), default=0,
                       help="base seed: mask i uses seed (seed, i); AGO uses seed")
    _add_generation_args(d)
    d.set_defaults(handler=_dataset)


# ---------------------------------------------------------------------------------------------- helpers


def _images_in(folder: Path) -> List[Path]:
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--normal folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _process_state(args):
    """This process's place under accelerate launch / torchrun (one process when run plainly)."""
    import torch

    from .runs.parallel import process_state

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    return process_state(cpu=cpu)


def _device_dtype(args, state=None):
    import torch

    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if state is not None and state.distributed and dev == "cuda":
        dev = f"cuda:{state.local_index}"  # one GPU per process
    try:
        device = torch.device(dev)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device (use auto, cpu, cuda or cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r}: only cpu and cuda are supported")
    name = args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs CUDA; on the CPU use --dtype fp32 (default) or bf16")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return device, dtype, name


def _inputs(args):
    """Read and check the inputs at their own resolution (before any model is loaded).

    -> dict(reference PIL, ref_mask bool array, normals [(name, PIL)], category, defect, prompt,
    word, source); the embedded sample is made later, at the model's size.
    """
    from .masks import load_image, load_mask

    given = [n for n in ("ref", "ref_mask", "normal") if getattr(args, n)]
    if args.mvtec_root:
        if given:
            raise UsageError("--mvtec-root picks the reference, mask and normal images; do not also give "
                             + ", ".join("--" + n.replace("_", "-") for n in given))
        if not args.category or not args.defect:
            raise UsageError("--mvtec-root needs --category and --defect")
        from .sources.mvtec import mvtec_inputs

        ref_path, mask_path, normal_paths = mvtec_inputs(args.mvtec_root, args.category, args.defect,
                                                         ref_index=args.ref_index)
        category, defect, source = args.category, args.defect, "mvtec"
    elif given:
        if len(given) < 3:
            missing = [n for n in ("ref", "ref_mask", "normal") if n not in given]
            raise UsageError("--ref, --ref-mask and --normal go together; missing: "
                             + ", ".join("--" + n.replace("_", "-") for n in missing))
        ref_path, mask_path = Path(args.ref), Path(args.ref_mask)
        normal = Path(args.normal)
        if not normal.exists():
            raise MissingInputError(f"--normal not found: {normal}")
        normal_paths = _images_in(normal) if normal.is_dir() else [normal]
        category = args.category or "custom"
        defect = args.defect or "defect"
        source = "files"
    else:
        from .sources.sample import Sample

        return dict(source="embedded", category=args.category or Sample.category,
                    defect=args.defect or Sample.defect)
    try:
        reference = load_image(ref_path)
    except InputError as e:
        raise type(e)(f"--ref: {e}") from None
    try:
        ref_mask = load_mask(mask_path, (reference.height, reference.width), resize=False)
    except InputError as e:
        raise type(e)(f"--ref-mask: {e}") from None
    normals = []
    for p in list(normal_paths)[: args.num_normals]:
        try:
            normals.append((str(p), load_image(p)))
        except InputError as e:
            raise type(e)(f"--normal: {e}") from None
    return dict(reference=reference, ref_mask=ref_mask, normals=normals, category=category, defect=defect,
                prompt=None, word=None, source=source, ref_path=str(ref_path), mask_path=str(mask_path))


def _fit(inputs, size: int):
    """Bring the inputs to the working size (and make the embedded sample at that size)."""
    if inputs["source"] == "embedded":
        from .sources.sample import embedded_sample

        try:
            s = embedded_sample(size)
        except ValueError as e:
            raise UsageError(f"--size {size}: the embedded sample cannot be drawn at that size ({e})") from None
        inputs.update(reference=s.reference, ref_mask=s.ref_mask, normals=[("embedded:normal", s.normal)],
                      prompt=s.prompt, word=s.anomaly_word)
    from .masks import resize_image

    inputs["reference"] = resize_image(inputs["reference"], size)
    inputs["ref_mask"] = load_mask_array(inputs["ref_mask"], size)
    inputs["normals"] = [(n, resize_image(im, size)) for n, im in inputs["normals"]]
    return inputs


def load_mask_array(mask, size: int):
    """Bool mask resized (nearest) to the working size; an empty result is an input error."""
    from .masks import resize_mask

    m = resize_mask(mask, (size, size))
    if not m.any():
        raise InputError("--ref-mask is empty (no defect pixel) at the working size")
    return m


def _target_masks(args, mode: str, ref_mask, normal_image, indices: Sequence[int], size: int):
    from .masks import resolve_foreground, target_masks

    if mode == "folder":
        return target_masks("folder", list(indices), shape=(size, size), folder=args.masks)
    fg = resolve_foreground(args.foreground, normal_image, (size, size))
    return target_masks(mode, list(indices), ref_mask=ref_mask, shape=(size, size), foreground=fg,
                        seed=args.seed)


def _check_mask_options(args) -> str:
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
    if args.foreground not in ("otsu", "all") and not Path(args.foreground).is_file():
        raise MissingInputError(f"--foreground mask not found: {args.foreground}")
    return mode


def _load_pipeline(args, device, dtype, state, embedded: bool, note: str = ""):
    """The model on this process's device; the embedded note printed once (process 0)."""
    import torch

    from .pipeline.pipeline_o2mag import O2MAGPipeline

    if embedded:
        if state.is_main:
            print(EMBEDDED_NOTE.format(sample=note), file=sys.stderr)
        if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
            # the tiny model's ops are far too small to gain from threads; extra threads only spin
            torch.set_num_threads(1)
        pipe = O2MAGPipeline.tiny(0)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        from .pipeline.loading import quiet_loading

        with quiet_loading(args.quiet or not state.is_main):
            pipe = O2MAGPipeline.from_pretrained(args.model, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=args.quiet or not state.is_main)
    return pipe


def _working_size(args, pipe) -> int:
    size = args.size or pipe.default_size
    try:
        pipe._check_size(size)  # one rule, shared with the pipeline
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    return size


def _prompt_and_word(pipe, prompt, word, category: str, defect: str, remedy: Optional[str] = None):
    """The prompt (default 'a photo of a <defect> on a <category>') and the word DAE amplifies
    (default: the defect name's last word when the prompt holds it; never some other word of the
    prompt, which is usually the object: amplifying the object is worse than stopping).
    ``remedy``: what the error tells the user to do when no word can be chosen."""
    from .pipeline.pipeline_o2mag import token_indices

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


def _options(args, mode: str, steps: int, ago_steps: int, size: int):
    from .runs.parallel import Options

    def make_masks(ref_mask, normal_image, indices):
        import numpy as np

        return _target_masks(args, mode, ref_mask, np.asarray(normal_image), indices, size)

    return Options(steps=steps, guidance=args.guidance, batch_size=args.batch_size, seed=args.seed,
                   ago_steps=ago_steps, ago_lr=args.ago_lr, ago_mask_weight=args.ago_mask_weight, size=size,
                   make_masks=make_masks, kv_cache=args.kv_cache,
                   kv_cache_device="cpu" if args.kv_cache_device == "cpu" else None, blend=args.blend,
                   overwrite=args.overwrite, lease=args.claim_lease)


def _stats_line(stats) -> str:
    return (f"UNet calls {stats.get('unet_calls', 0)}, rows {stats.get('unet_rows', 0)}; inversions "
            f"{stats.get('inversion_runs', 0)}, AGO runs {stats.get('ago_runs', 0)}")


def _generate(args) -> int:
    from .runs.parallel import Group, Reference, run_groups

    embedded = args.model is None
    mode = _check_mask_options(args)
    state = _process_state(args)
    device, dtype, dtype_name = _device_dtype(args, state)
    inputs = _inputs(args)
    steps = args.steps or (EMBEDDED_STEPS if embedded else PAPER_STEPS)
    ago_steps = args.ago_steps
    if ago_steps is None:
        ago_steps = EMBEDDED_AGO_STEPS if embedded else PAPER_AGO_STEPS

    t0 = time.perf_counter()
    sample = " and a built-in brushed-metal sample" if inputs["source"] == "embedded" else ""
    pipe = _load_pipeline(args, device, dtype, state, embedded, sample)
    size = _working_size(args, pipe)
    inputs = _fit(inputs, size)
    prompt, word = _prompt_and_word(pipe, args.prompt or inputs["prompt"],
                                    args.anomaly_word or inputs["word"], inputs["category"], inputs["defect"])
    pipe.cache_dir = args.cache_dir or os.path.join(args.out, ".o2mag-cache")

    settings = dict(
        model=pipe.model_id, source=inputs["source"], reference=inputs.get("ref_path", "embedded"),
        ref_mask=inputs.get("mask_path", "embedded"), normals=[n for n, _ in inputs["normals"]],
        prompt=prompt, anomaly_word=word, steps=steps, guidance=args.guidance, ago_steps=ago_steps,
        ago_lr=args.ago_lr, ago_mask_weight=args.ago_mask_weight, size=size, dtype=dtype_name,
        blend_background=args.blend, mask_mode=mode, foreground=args.foreground,
        masks=str(args.masks) if mode == "folder" else None, seed=args.seed, graft="paper",
    )
    ref = Reference(settings["reference"], inputs["reference"], inputs["ref_mask"])
    normals = [im for _, im in inputs["normals"]]
    group = Group(category=inputs["category"], defect=inputs["defect"], num=args.num,
                  ref_names=[settings["reference"]], normal_names=settings["normals"], prompt=prompt,
                  word=word, settings=settings, load=lambda: ([ref], normals))

    def announce(results, stores):
        r = results[0]
        print(f"o2mag: {stores[0].dir}: {r.wanted - r.todo} of {r.wanted} samples present, generating "
              f"{r.todo}" + (f" on {state.count} processes" if state.distributed and r.todo else ""),
              file=sys.stderr)

    report = run_groups(pipe, args.out, [group], _options(args, mode, steps, ago_steps, size), state,
                        progress=state.distributed and not args.quiet, announce=announce)
    res = report.groups[0]
    if state.is_main and res.todo:
        dt = time.perf_counter() - t0
        per = f"; {res.seconds / res.made:.2f} s per sample per process" if res.made else ""
        split = (f" by {state.count} processes (" + " + ".join(map(str, report.per_process)) + ")"
                 if state.distributed else "")
        print(f"o2mag: wrote {res.made} samples to {res.dir}{split} in {dt:.1f} s "
              f"({_stats_line(report.stats)}{per})", file=sys.stderr)
        if res.complete is not None and res.complete < res.wanted:
            print(f"o2mag: {res.wanted - res.complete} sample(s) still missing (held by another run, or "
                  "claimed by a process that died: rerun the same command to finish)", file=sys.stderr)
    if state.is_main and res.made:
        from .runs.contact_sheet import write_contact_sheet

        print(f"o2mag: contact sheet {write_contact_sheet(res.dir)}", file=sys.stderr)
    return 0


def _dataset(args) -> int:
    from .commands.dataset import run_dataset

    return run_dataset(args)


def _who() -> str:
    """'o2mag', or 'o2mag[rank 3/8]' in a launch of several processes (each may report)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return "o2mag"
    return f"o2mag[rank {rank}/{world}]" if world > 1 else "o2mag"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it; code 2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    import torch

    threads = torch.get_num_threads()
    who = _who()
    try:
        return getattr(args, "handler", _generate)(args)
    except InputError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # AGO diverged (fp16 overflow): its message says what to change
        print(f"{who}: error: {e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print(f"{who}: error: out of GPU memory; lower --batch-size, use --dtype fp16, or drop --kv-cache "
              "(complete samples are kept, rerun the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{who}: interrupted; complete samples are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # main() may run in-process (tests, notebooks)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
