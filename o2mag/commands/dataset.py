"""``o2mag dataset``: a whole synthetic dataset, every category x defect type, in one command.

Groups come from an MVTec-AD root (every category with a ``test`` folder, every defect type but
``good``) or from a JSON job file. Each group is one output folder
``<out>/<category>/<defect>/`` (the tree ``o2mag generate`` writes, so ``o2mag evaluate`` reads
it the same way) with ``--num`` samples. References are the first third of the sorted
``test/<defect>`` images (``n // 3``, the images the usual MVTec protocol trains on and does not
test on); their masks come from ``ground_truth/<defect>/<stem>_mask.*``; normals are the first
``--num-normals`` images of ``train/good``. Sample ``i`` of a group uses reference ``i mod R``
and normal ``(i // R) mod M``.

``<out>/dataset.json`` lists every group with its references and normals, so an evaluation can
hold the same references out of its test set.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from PIL import Image, UnidentifiedImageError

from ..curation.decisions import review_counts
from ..errors import InputError, UsageError
from ..files import atomic_write
from ..masks import load_image, load_mask, read_mask, resize_image
from ..runs.contact_sheet import write_contact_sheet
from ..runs.runner import Group, Reference, run_groups
from ..sources.groups import DEFAULT_NUM, GroupSpec, job_groups, mvtec_groups
from . import options as o

__all__ = ["add_parser", "run", "summary_table", "DATASET_FILE"]

DATASET_FILE = "dataset.json"


def add_parser(sub) -> None:
    """Add ``dataset`` to the ``o2mag`` sub-parser set ``sub``."""
    d = sub.add_parser(
        "dataset",
        help="generate a whole synthetic dataset: every MVTec category x defect type (or a job file)",
        description="Generate --num anomalies for every category x defect type of an MVTec-AD root (or the "
                    "groups of a JSON job file) into <out>/<category>/<defect>/. References are the first "
                    "third (n // 3, name order) of each test/<defect> folder, which the usual evaluation "
                    "keeps out of its test set; sample i uses reference i mod R and normal (i // R) mod "
                    "--num-normals. Under accelerate launch or torchrun every process takes part; a rerun "
                    "resumes.",
        formatter_class=o.HelpFormatter,
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
    src.add_argument("--num-normals", type=o.int_at_least("--num-normals", 1), default=1,
                     help="normal images per category (first of train/good in name order); each costs one "
                          "inversion")
    o.add_output_args(d, num_default=None,
                      num_help="samples per category x defect type, default 200 (a job file's own counts come "
                               "first; a rerun makes only the missing ones)")
    o.add_model_args(d)
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
    masks.add_argument("--seed", type=o.integer("--seed"), default=0,
                       help="base seed: mask i uses seed (seed, i); AGO uses seed")
    o.add_generation_args(d)
    d.set_defaults(handler=run)


def summary_table(report, reviews: Optional[Dict[str, Dict[str, int]]] = None) -> str:
    """A fixed-width table: one row per group, then the totals. ``reviews`` (group key -> counts of
    :func:`o2mag.curation.decisions.review_counts`) adds accepted/rejected/unreviewed columns."""
    kinds = ("accepted", "rejected", "unreviewed") if reviews is not None else ()
    rows = [("category", "defect", "refs", "wanted", "present", "made", "s/sample") + kinds]
    for g in report.groups:
        per = f"{g.seconds / g.made:.2f}" if g.made else "-"
        rows.append((g.category, g.defect, str(g.references), str(g.wanted),
                     str(g.complete if g.complete is not None else "?"), str(g.made), per)
                    + tuple(str(reviews.get(g.key, {}).get(k, 0)) for k in kinds))
    made = sum(g.made for g in report.groups)
    secs = sum(g.seconds for g in report.groups)
    rows.append(("total", f"{len(report.groups)} groups", str(sum(g.references for g in report.groups)),
                 str(sum(g.wanted for g in report.groups)),
                 str(sum(g.complete or 0 for g in report.groups)), str(made),
                 f"{secs / made:.2f}" if made else "-")
                + tuple(str(sum(r.get(k, 0) for r in reviews.values())) for k in kinds))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[c].ljust(widths[c]) if c < 2 else r[c].rjust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if k == 0 or k == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_dataset_file(out: Path, specs: List[GroupSpec], groups) -> None:
    """``<out>/dataset.json``: what each group is made from (written by process 0, atomically)."""
    data = {"groups": [{"category": s.category, "defect": s.defect, "num": s.num,
                        "references": [{"image": str(i), "mask": str(m)} for i, m in s.references],
                        "references_used": g.ref_names, "normals": g.normal_names,
                        "prompt": g.prompt, "anomaly_word": g.word}
                       for s, g in zip(specs, groups)]}
    path = out / DATASET_FILE
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    atomic_write(path, text.encode("utf-8"), make_parents=True)


def _image_shape(path) -> tuple:
    """(H, W) of an image file from its header (the pixels are read later, when needed)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def _prompt_and_word(args, spec: GroupSpec, pipe) -> tuple:
    """The group's prompt (its own, else the ``--prompt`` template filled in) and anomaly word."""
    try:
        template = spec.prompt or args.prompt
        prompt = template.format(defect=spec.defect.replace("_", " "), category=spec.category.replace("_", " "))
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--prompt {template!r}: only {{defect}} and {{category}} can be filled in "
                         f"({e})") from None
    remedy = (f"put {{defect}} in the prompt, or give group {spec.key} an \"anomaly_word\" in the job "
              "file" if args.job else "put {defect} in --prompt")
    return o.prompt_and_word(pipe, prompt, spec.anomaly_word, spec.category, spec.defect,
                             remedy=f"{spec.key}: {remedy}")


def _usable_references(spec: GroupSpec, size: int, say: bool) -> List[tuple]:
    """The group's (image, mask) references whose mask does not vanish at the working size (the
    others are skipped, with a warning when ``say``)."""
    refs = []
    for img_path, mask_path in spec.references:
        m = load_mask(mask_path, _image_shape(img_path), resize=False)
        read_mask(m, f"{spec.key}: reference mask {mask_path}", allow_full=False)  # refused, not skipped
        try:
            read_mask(m, "reference mask", shape=(size, size))
        except InputError:
            if say:
                print(f"o2mag: {spec.key}: reference {img_path} skipped: its mask is empty at {size} px",
                      file=sys.stderr)
            continue
        refs.append((img_path, mask_path))
    if not refs:
        raise InputError(f"{spec.key}: every reference mask is empty at the working size {size} px")
    return refs


def _group(args, spec: GroupSpec, pipe, state, mode: str, dtype_name: str, gen) -> Group:
    """The runner's group for ``spec``: names, prompt, manifest settings, and how to load its
    references and normals at the working size."""
    size = gen.size
    prompt, word = _prompt_and_word(args, spec, pipe)
    refs = _usable_references(spec, size, state.is_main)
    normals = [str(p) for p in spec.normals]
    settings = dict(
        model=pipe.model_id, source="dataset", references=[str(i) for i, _ in refs],
        ref_masks=[str(m) for _, m in refs], normals=normals, prompt=prompt, anomaly_word=word,
        dtype=dtype_name, mask_mode=mode, foreground=args.foreground, masks=None, **o.manifest_settings(gen),
    )

    def load(refs=refs, normal_paths=list(spec.normals)):
        out_refs = []
        for img_path, mask_path in refs:
            im = load_image(img_path)
            m = load_mask(mask_path, (im.height, im.width), resize=False)
            out_refs.append(Reference(str(img_path), resize_image(im, size),
                                      o.load_mask_array(m, size, f"reference mask {mask_path}")))
        return out_refs, [resize_image(load_image(p), size) for p in normal_paths]

    return Group(category=spec.category, defect=spec.defect, num=spec.num, ref_names=[str(i) for i, _ in refs],
                 normal_names=normals, prompt=prompt, word=word, settings=settings, load=load,
                 record_reference=True)


def run(args) -> int:
    """The ``o2mag dataset`` command (called by :func:`o2mag.cli.main`)."""
    if not args.mvtec_root and not args.job:
        raise UsageError("o2mag dataset needs --mvtec-root ROOT or --job FILE.json")
    mode = o.check_mask_options(args)
    if args.mvtec_root:
        specs = mvtec_groups(args.mvtec_root, args.num or DEFAULT_NUM, args.num_normals, args.category,
                             args.defect)
    else:
        specs = job_groups(args.job, args.num, args.num_normals, args.category, args.defect)
    embedded = o.embedded_model(args)
    o.check_output_folders(args)
    state = o.process_state_for(args)
    device, dtype, dtype_name = o.device_dtype(args, state)
    steps, ago_steps = o.default_steps(args, embedded)
    # the settings' rules, before the model loads
    o.generation_settings(args, steps, ago_steps, None, o.known_xl(args))
    t0 = time.perf_counter()
    pipe = o.load_pipeline(args, device, dtype, state, embedded)
    pipe.progress = False  # the dataset shows its own bars (overall, category, what is running)
    size = o.working_size(args, pipe)
    gen = o.generation_settings(args, steps, ago_steps, size, o.known_xl(args, pipe))
    pipe.cache_dir = args.cache_dir or os.path.join(args.out, ".o2mag-cache")
    groups = [_group(args, spec, pipe, state, mode, dtype_name, gen) for spec in specs]

    def announce(results, stores):
        _write_dataset_file(Path(args.out), specs, groups)
        wanted = sum(r.wanted for r in results)
        todo = sum(r.todo for r in results)
        cats = len({r.category for r in results})
        print(f"o2mag: dataset in {args.out}: {len(results)} groups ({cats} categories), {wanted - todo} of "
              f"{wanted} samples present, generating {todo} on {state.count} process(es)", file=sys.stderr)

    report = run_groups(pipe, args.out, groups, o.run_options(args, mode, gen), state,
                        progress=not args.quiet, per_category=True, announce=announce)
    if state.is_main:
        for g in report.groups:
            write_contact_sheet(g.dir)  # what a person looks at first: it follows each folder's content
        reviews = {g.key: review_counts(g.dir) for g in report.groups}  # what o2mag curate/review decided
        print(summary_table(report, reviews), file=sys.stderr)
        complete = sum(g.complete or 0 for g in report.groups)
        wanted = sum(g.wanted for g in report.groups)
        print(f"o2mag: dataset: {complete} of {wanted} samples present in {args.out}; made {report.made} in "
              f"{time.perf_counter() - t0:.1f} s on {report.processes} process(es) "
              f"({o.stats_line(report.stats)})",
              file=sys.stderr)
        return o.report_missing(report.groups)
    return o.EXIT_OK
