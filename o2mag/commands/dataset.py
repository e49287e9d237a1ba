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
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import InputError, MissingInputError

__all__ = ["GroupSpec", "reference_count", "mvtec_groups", "job_groups", "summary_table", "run_dataset",
           "DATASET_FILE"]

DATASET_FILE = "dataset.json"
DEFAULT_NUM = 200
_GROUP_KEYS = {"category", "defect", "num", "references", "normals", "prompt", "anomaly_word", "mvtec_root"}
_TOP_KEYS = {"num", "mvtec_root", "groups", "prompt"}


def reference_count(n: int) -> int:
    """References taken from a defect folder of ``n`` images: its first third, ``n // 3``."""
    return n // 3


@dataclass
class GroupSpec:
    """One category x defect type to generate: reference (image, mask) paths, normal image paths."""

    category: str
    defect: str
    num: int
    references: List[tuple] = field(default_factory=list)  # [(image path, mask path)]
    normals: List[Path] = field(default_factory=list)
    prompt: Optional[str] = None
    anomaly_word: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.category}/{self.defect}"


def _pick(names: List[str], wanted: Optional[Sequence[str]], what: str, where: str) -> List[str]:
    if not wanted:
        return names
    missing = [w for w in wanted if w not in names]
    if missing:
        raise MissingInputError(f"{what} {', '.join(repr(m) for m in missing)} not found in {where}; there: "
                                f"{', '.join(names) if names else 'nothing'}")
    return [n for n in names if n in wanted]


def _mvtec_group(root: Path, category: str, defect: str, num: int, num_normals: int) -> GroupSpec:
    from ..sources.mvtec import mvtec_inputs

    from ..sources.mvtec import mvtec_test_images

    ref0, mask0, normals = mvtec_inputs(root, category, defect, ref_index=0)  # checks the layout
    test_dir = root / category / "test" / defect
    n = len(mvtec_test_images(root, category, defect))
    count = reference_count(n)
    if count == 0:
        raise InputError(f"{test_dir} holds {n} image(s): its first third (n // 3) is empty, so it has no "
                         "reference to generate from (a defect type needs at least 3 images)")
    refs = [(ref0, mask0)] + [mvtec_inputs(root, category, defect, ref_index=j)[:2] for j in range(1, count)]
    return GroupSpec(category, defect, num, refs, list(normals[:num_normals]))


def mvtec_groups(root: str | os.PathLike, num: int, num_normals: int = 1,
                 categories: Optional[Sequence[str]] = None,
                 defects: Optional[Sequence[str]] = None) -> List[GroupSpec]:
    """Every category x defect type of an MVTec-AD root (optionally only the named ones)."""
    from ..sources.mvtec import mvtec_categories, mvtec_defects

    r = Path(root)
    cats = _pick(mvtec_categories(r), categories, "category", str(r))
    out = []
    seen_defects = set()
    for c in cats:
        names = mvtec_defects(r, c)
        chosen = [d for d in names if not defects or d in defects]
        seen_defects.update(chosen)
        out += [_mvtec_group(r, c, d, num, num_normals) for d in chosen]
    if defects:
        unknown = [d for d in defects if d not in seen_defects]
        if unknown:
            raise MissingInputError(f"defect type {', '.join(repr(u) for u in unknown)} not found in any "
                                    f"chosen category of {r}")
    if not out:
        raise InputError(f"no category x defect type to generate under {r}")
    return out


def _expand_images(paths: List[Path], what: str) -> List[Path]:
    from ..masks.images import MASK_EXTENSIONS

    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() in MASK_EXTENSIONS)
            if not found:
                raise InputError(f"{what}: folder {p} holds no images")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise MissingInputError(f"{what}: not found: {p}")
    return out


def job_groups(path: str | os.PathLike, num: Optional[int] = None, num_normals: int = 1,
               categories: Optional[Sequence[str]] = None,
               defects: Optional[Sequence[str]] = None) -> List[GroupSpec]:
    """Groups of a JSON job file (see ``o2mag dataset --help``); paths are relative to the file.

    How many samples a group gets: its own ``"num"``, else ``num`` (the command line's ``--num``,
    when given), else the file's ``"num"``, else 200."""
    from ..errors import existing_path

    p = existing_path(path, "job file")
    try:
        job = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"job file {p} is not valid JSON: {e}") from None
    if not isinstance(job, dict) or not isinstance(job.get("groups"), list) or not job["groups"]:
        raise InputError(f"job file {p} must be a JSON object with a non-empty \"groups\" list")
    unknown = set(job) - _TOP_KEYS
    if unknown:
        raise InputError(f"job file {p}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    base = p.parent

    def resolve(x, what):
        if not isinstance(x, str) or not x:
            raise InputError(f"job file {p}: {what} must be a path string, got {x!r}")
        q = Path(os.path.expanduser(x))
        return q if q.is_absolute() else base / q

    default_num = num if num is not None else job.get("num", DEFAULT_NUM)
    out = []
    for k, g in enumerate(job["groups"]):
        where = f"job file {p}, group {k}"
        if not isinstance(g, dict):
            raise InputError(f"{where}: must be an object")
        bad = set(g) - _GROUP_KEYS
        if bad:
            raise InputError(f"{where}: unknown key(s) {sorted(bad)} (allowed: {sorted(_GROUP_KEYS)})")
        for key in ("category", "defect"):
            if not isinstance(g.get(key), str) or not g[key]:
                raise InputError(f"{where}: needs \"{key}\" (a name)")
        n = g.get("num", default_num)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"{where}: \"num\" must be an integer >= 1, got {n!r}")
        root = g.get("mvtec_root", job.get("mvtec_root"))
        if "references" in g:
            refs = g["references"]
            if not isinstance(refs, list) or not refs:
                raise InputError(f"{where}: \"references\" must be a non-empty list of "
                                 "{\"image\", \"mask\"}")
            pairs = []
            for r in refs:
                if not isinstance(r, dict) or set(r) != {"image", "mask"}:
                    raise InputError(f"{where}: each reference is {{\"image\": path, \"mask\": path}}, "
                                     f"got {r!r}")
                pairs.append((existing_path(resolve(r["image"], "reference image"), "reference image"),
                              existing_path(resolve(r["mask"], "reference mask"), "reference mask")))
            if "normals" in g:
                if not isinstance(g["normals"], list) or not g["normals"]:
                    raise InputError(f"{where}: \"normals\" must be a non-empty list of files or folders")
                normals = _expand_images([resolve(x, "normal") for x in g["normals"]], where)
            elif root is not None:
                from ..sources.mvtec import mvtec_inputs

                normals = mvtec_inputs(resolve(root, "mvtec_root"), g["category"], g["defect"])[2]
            else:
                raise InputError(f"{where}: gives references but no \"normals\" (nor an mvtec_root to take "
                                 "train/good from)")
            spec = GroupSpec(g["category"], g["defect"], n, pairs, list(normals[:num_normals]))
        else:
            if root is None:
                raise InputError(f"{where}: needs \"references\" (and \"normals\") or an \"mvtec_root\"")
            spec = _mvtec_group(resolve(root, "mvtec_root"), g["category"], g["defect"], n, num_normals)
            if "normals" in g:
                found = _expand_images([resolve(x, "normal") for x in g["normals"]], where)
                spec.normals = found[:num_normals]
        spec.prompt = g.get("prompt", job.get("prompt"))
        spec.anomaly_word = g.get("anomaly_word")
        out.append(spec)
    keys = [s.key for s in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise InputError(f"job file {p}: the same category/defect twice: {', '.join(dup)}")
    if categories:
        _pick(sorted({s.category for s in out}), categories, "category", str(p))
        out = [s for s in out if s.category in categories]
    if defects:
        _pick(sorted({s.defect for s in out}), defects, "defect type", str(p))
        out = [s for s in out if s.defect in defects]
    return out


def summary_table(report) -> str:
    """A fixed-width table: one row per group, then the totals."""
    rows = [("category", "defect", "refs", "wanted", "present", "made", "s/sample")]
    for g in report.groups:
        per = f"{g.seconds / g.made:.2f}" if g.made else "-"
        rows.append((g.category, g.defect, str(g.references), str(g.wanted),
                     str(g.complete if g.complete is not None else "?"), str(g.made), per))
    made = sum(g.made for g in report.groups)
    secs = sum(g.seconds for g in report.groups)
    rows.append(("total", f"{len(report.groups)} groups", str(sum(g.references for g in report.groups)),
                 str(sum(g.wanted for g in report.groups)),
                 str(sum(g.complete or 0 for g in report.groups)), str(made),
                 f"{secs / made:.2f}" if made else "-"))
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
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{DATASET_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _image_shape(path) -> tuple:
    """(H, W) of an image file from its header (the pixels are read later, when needed)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot read image {path}: {e}") from None


def run_dataset(args) -> int:
    """The ``o2mag dataset`` command (called by :func:`o2mag.cli.main`)."""
    from .. import cli
    from ..masks.images import load_image, load_mask, resize_image
    from ..runs.parallel import Group, Reference, run_groups

    if not args.mvtec_root and not args.job:
        raise cli.UsageError("o2mag dataset needs --mvtec-root ROOT or --job FILE.json")
    mode = cli._check_mask_options(args)
    if args.mvtec_root:
        specs = mvtec_groups(args.mvtec_root, args.num or DEFAULT_NUM, args.num_normals, args.category,
                             args.defect)
    else:
        specs = job_groups(args.job, args.num, args.num_normals, args.category, args.defect)
    embedded = args.model is None
    state = cli._process_state(args)
    device, dtype, dtype_name = cli._device_dtype(args, state)
    steps = args.steps or (cli.EMBEDDED_STEPS if embedded else cli.PAPER_STEPS)
    ago_steps = args.ago_steps
    if ago_steps is None:
        ago_steps = cli.EMBEDDED_AGO_STEPS if embedded else cli.PAPER_AGO_STEPS
    t0 = time.perf_counter()
    pipe = cli._load_pipeline(args, device, dtype, state, embedded)
    pipe.progress = False  # the dataset shows its own bars (overall, category, what is running)
    size = cli._working_size(args, pipe)
    pipe.cache_dir = args.cache_dir or os.path.join(args.out, ".o2mag-cache")

    groups: List[Group] = []
    kept_specs: List[GroupSpec] = []
    for spec in specs:
        try:
            template = spec.prompt or args.prompt
            prompt = template.format(defect=spec.defect.replace("_", " "),
                                     category=spec.category.replace("_", " "))
        except (KeyError, IndexError, ValueError) as e:
            raise cli.UsageError(f"--prompt {template!r}: only {{defect}} and {{category}} can be filled in "
                                 f"({e})") from None
        remedy = (f"put {{defect}} in the prompt, or give group {spec.key} an \"anomaly_word\" in the job "
                  "file" if args.job else "put {defect} in --prompt")
        prompt, word = cli._prompt_and_word(pipe, prompt, spec.anomaly_word, spec.category, spec.defect,
                                            remedy=f"{spec.key}: {remedy}")
        refs = []
        for img_path, mask_path in spec.references:  # masks that vanish at the working size are skipped
            m = load_mask(mask_path, _image_shape(img_path), resize=False)
            try:
                cli.load_mask_array(m, size)
            except InputError:
                if state.is_main:
                    print(f"o2mag: {spec.key}: reference {img_path} skipped: its mask is empty at {size} px",
                          file=sys.stderr)
                continue
            refs.append((img_path, mask_path))
        if not refs:
            raise InputError(f"{spec.key}: every reference mask is empty at the working size {size} px")
        normals = [str(p) for p in spec.normals]
        settings = dict(
            model=pipe.model_id, source="dataset", references=[str(i) for i, _ in refs],
            ref_masks=[str(m) for _, m in refs], normals=normals, prompt=prompt, anomaly_word=word,
            steps=steps, guidance=args.guidance, ago_steps=ago_steps, ago_lr=args.ago_lr,
            ago_mask_weight=args.ago_mask_weight, size=size, dtype=dtype_name, blend_background=args.blend,
            mask_mode=mode, foreground=args.foreground, masks=None, seed=args.seed, graft="paper",
        )

        def load(refs=refs, normal_paths=list(spec.normals)):
            out_refs = []
            for img_path, mask_path in refs:
                im = load_image(img_path)
                m = load_mask(mask_path, (im.height, im.width), resize=False)
                out_refs.append(Reference(str(img_path), resize_image(im, size),
                                          cli.load_mask_array(m, size)))
            return out_refs, [resize_image(load_image(p), size) for p in normal_paths]

        groups.append(Group(category=spec.category, defect=spec.defect, num=spec.num,
                            ref_names=[str(i) for i, _ in refs], normal_names=normals, prompt=prompt,
                            word=word, settings=settings, load=load, record_reference=True))
        kept_specs.append(spec)

    def announce(results, stores):
        _write_dataset_file(Path(args.out), kept_specs, groups)
        wanted = sum(r.wanted for r in results)
        todo = sum(r.todo for r in results)
        cats = len({r.category for r in results})
        print(f"o2mag: dataset in {args.out}: {len(results)} groups ({cats} categories), {wanted - todo} of "
              f"{wanted} samples present, generating {todo} on {state.count} process(es)", file=sys.stderr)

    report = run_groups(pipe, args.out, groups, cli._options(args, mode, steps, ago_steps, size), state,
                        progress=not args.quiet, per_category=True, announce=announce)
    if state.is_main:
        from ..runs.contact_sheet import write_contact_sheet

        for g in report.groups:
            if g.made:
                write_contact_sheet(g.dir)  # what a person looks at first, one per defect folder
        print(summary_table(report), file=sys.stderr)
        complete = sum(g.complete or 0 for g in report.groups)
        wanted = sum(g.wanted for g in report.groups)
        print(f"o2mag: dataset: {complete} of {wanted} samples present in {args.out}; made {report.made} in "
              f"{time.perf_counter() - t0:.1f} s on {report.processes} process(es) "
              f"({cli._stats_line(report.stats)})",
              file=sys.stderr)
        if complete < wanted:
            print(f"o2mag: {wanted - complete} sample(s) still missing (held by another run, or claimed by a "
                  "process that died: rerun the same command to finish)", file=sys.stderr)
    return 0
