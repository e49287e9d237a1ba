"""``o2mag generate``: many anomalies from one reference defect, its mask and normal image(s).

Inputs come from files (``--ref``, ``--ref-mask``, ``--normal``), an MVTec-AD tree
(``--mvtec-root``, ``--category``, ``--defect``) or, with none of them, the built-in sample; the
samples go to one output folder ``<out>/<category>/<defect>/`` through the same runner as
``o2mag dataset`` (so it also splits the work over the processes of a launcher).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import List

from ..errors import InputError, MissingInputError, UsageError
from ..masks import image_files, load_image, load_mask, read_mask, resize_image
from ..runs.contact_sheet import write_contact_sheet
from ..runs.runner import Group, Reference, run_groups
from ..sources.mvtec import mvtec_inputs
from ..sources.sample import Sample, embedded_sample
from . import options as o

__all__ = ["add_parser", "run", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def add_parser(sub) -> None:
    """Add ``generate`` to the ``o2mag`` sub-parser set ``sub``."""
    g = sub.add_parser(
        "generate",
        help="generate N anomaly images (and masks) from one reference defect and normal image(s)",
        description="Generate --num anomaly images at new target masks from ONE reference anomaly image "
                    "(--ref, --ref-mask) and normal image(s) (--normal). Inversion and AGO run once; the "
                    "targets are denoised in batches that share one reference and one normal branch. "
                    "With no --model and no inputs it runs the embedded demo (tiny random model).",
        formatter_class=o.HelpFormatter,
    )
    src = g.add_argument_group("inputs (give --ref/--ref-mask/--normal, or --mvtec-root/--category/--defect, "
                               "or nothing for the embedded sample)")
    src.add_argument("--ref", metavar="IMG", help="reference anomaly image (the defect to copy)")
    src.add_argument("--ref-mask", metavar="MASK",
                     help="binary mask of the defect in --ref (same size as --ref)")
    src.add_argument("--normal", metavar="IMG|DIR",
                     help="normal (defect-free) image, or a folder of them (see --num-normals)")
    src.add_argument("--num-normals", type=o.int_at_least("--num-normals", 1), default=1,
                     help="how many normal images of a folder (or of MVTec train/good) to use, first ones in "
                          "name order; sample i uses normal i mod count. Each normal image costs one "
                          "inversion, "
                          "and targets sharing a normal share its branch")
    src.add_argument("--mvtec-root", metavar="ROOT",
                     help="MVTec-AD root: reference and mask from <category>/test/<defect> and "
                          "<category>/ground_truth/<defect>, normals from <category>/train/good")
    src.add_argument("--category", help="MVTec category (with --mvtec-root); also names the output folder")
    src.add_argument("--defect", help="MVTec defect type (with --mvtec-root); also names the output folder")
    src.add_argument("--ref-index", type=o.int_at_least("--ref-index", 0), default=0,
                     help="which anomaly image of the MVTec defect folder (sorted) is the reference")
    o.add_output_args(g, num_default=8,
                      num_help="total number of samples wanted in the output folder (a rerun makes only the "
                               "missing ones)")
    o.add_model_args(g)
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
    masks.add_argument("--seed", type=o.integer("--seed"), default=0,
                       help="base seed: mask i uses seed (seed, i); AGO uses seed")
    o.add_generation_args(g)
    g.set_defaults(handler=run)


def _images_in(folder: Path) -> List[Path]:
    files = image_files(folder, IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--normal folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _inputs(args):
    """Read and check the inputs at their own resolution (before any model is loaded).

    -> dict(reference PIL, ref_mask bool array, normals [(name, PIL)], category, defect, prompt,
    word, source); the embedded sample is made later, at the model's size.
    """
    given = [n for n in ("ref", "ref_mask", "normal") if getattr(args, n)]
    if args.mvtec_root:
        if given:
            raise UsageError("--mvtec-root picks the reference, mask and normal images; do not also give "
                             + ", ".join("--" + n.replace("_", "-") for n in given))
        if not args.category or not args.defect:
            raise UsageError("--mvtec-root needs --category and --defect")
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
    read_mask(ref_mask, "--ref-mask", allow_full=False)  # the pipeline's rule, before the model loads
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
        try:
            s = embedded_sample(size)
        except ValueError as e:
            raise UsageError(f"--size {size}: the embedded sample cannot be drawn at that size ({e})") from None
        inputs.update(reference=s.reference, ref_mask=s.ref_mask, normals=[("embedded:normal", s.normal)],
                      prompt=s.prompt, word=s.anomaly_word)
    inputs["reference"] = resize_image(inputs["reference"], size)
    inputs["ref_mask"] = o.load_mask_array(inputs["ref_mask"], size)
    inputs["normals"] = [(n, resize_image(im, size)) for n, im in inputs["normals"]]
    return inputs


def run(args) -> int:
    """The ``o2mag generate`` command (called by :func:`o2mag.cli.main`)."""
    embedded = o.embedded_model(args)
    mode = o.check_mask_options(args)
    state = o.process_state_for(args)
    device, dtype, dtype_name = o.device_dtype(args, state)
    inputs = _inputs(args)
    o.check_output_folders(args)
    steps, ago_steps = o.default_steps(args, embedded)
    # the settings' rules, before the model loads
    o.generation_settings(args, steps, ago_steps, None, o.known_xl(args))

    t0 = time.perf_counter()
    sample = " and a built-in brushed-metal sample" if inputs["source"] == "embedded" else ""
    pipe = o.load_pipeline(args, device, dtype, state, embedded, sample)
    size = o.working_size(args, pipe)
    inputs = _fit(inputs, size)
    prompt, word = o.prompt_and_word(pipe, args.prompt or inputs["prompt"],
                                     args.anomaly_word or inputs["word"], inputs["category"], inputs["defect"])
    pipe.cache_dir = args.cache_dir or os.path.join(args.out, ".o2mag-cache")

    gen = o.generation_settings(args, steps, ago_steps, size, o.known_xl(args, pipe))
    settings = dict(
        model=pipe.model_id, source=inputs["source"], reference=inputs.get("ref_path", "embedded"),
        ref_mask=inputs.get("mask_path", "embedded"), normals=[n for n, _ in inputs["normals"]],
        prompt=prompt, anomaly_word=word, dtype=dtype_name, mask_mode=mode, foreground=args.foreground,
        masks=str(args.masks) if mode == "folder" else None, **o.manifest_settings(gen),
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

    report = run_groups(pipe, args.out, [group], o.run_options(args, mode, gen), state,
                        progress=state.distributed and not args.quiet, announce=announce)
    res = report.groups[0]
    if state.is_main and res.todo:
        dt = time.perf_counter() - t0
        per = f"; {res.seconds / res.made:.2f} s per sample per process" if res.made else ""
        split = (f" by {state.count} processes (" + " + ".join(map(str, report.per_process)) + ")"
                 if state.distributed else "")
        print(f"o2mag: wrote {res.made} samples to {res.dir}{split} in {dt:.1f} s "
              f"({o.stats_line(report.stats)}{per})", file=sys.stderr)
    if not state.is_main:
        return o.EXIT_OK
    sheet = write_contact_sheet(res.dir)  # follows the folder's content, whatever this run made
    if sheet is not None and res.todo:
        print(f"o2mag: contact sheet {sheet}", file=sys.stderr)
    return o.report_missing(report.groups)
