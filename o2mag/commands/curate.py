"""``o2mag curate OUT``: score, list, accept and reject the samples of an output tree, headless.

Decisions go into each sample's manifest line as ``review`` (``"accepted"``, ``"rejected"``, or
absent = unreviewed) through :mod:`o2mag.curation.decisions`, safe beside a running ``o2mag
generate`` on the same folder. Order of work: ``--rescore``, then ``--reject-below`` and
``--keep-top``, then ``--accept``/``--reject``/``--clear`` by index, then
``--regenerate-rejected``, then ``--list``. ``--keep-top`` never overturns a decision: samples
already accepted or rejected (``--reject-below`` of the same command included) keep it.

Every decision is made on the samples as curate read them, and recorded only on those very samples
(:attr:`o2mag.curation.decisions.Sample.id`): a sample that ``generate --overwrite`` replaced in
between is skipped, and curate names it.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..curation.decisions import Sample, decide, defect_folders, keep_top, reject_below, samples
from ..sample_quality import QUALITY_VERSION
from ..curation.rescore import line_cwd, rescore
from ..errors import InputError, MissingInputError, UsageError
from ..runs.contact_sheet import write_contact_sheet
from ..runs.store import OutputStore
from ..sources.mvtec import mvtec_test_images
from . import generate
from . import options as o

__all__ = ["add_parser", "run", "parse_indices", "table", "generate_argv"]


def add_parser(sub) -> None:
    """Add ``curate`` to the ``o2mag`` sub-parser set ``sub``."""
    c = sub.add_parser(
        "curate", help="score, list, accept and reject generated samples (decisions go into the manifests)",
        description="Curate the samples of an output folder (what o2mag generate --out / o2mag dataset --out "
                    "wrote): give old folders quality records (--rescore), reject by score, keep the best K "
                    "per defect type, accept or reject by index, and list them. Decisions are stored in "
                    "each sample's manifest line as \"review\"; o2mag evaluate leaves rejected samples out.",
        formatter_class=o.HelpFormatter)
    c.add_argument("out", metavar="OUT", help="output folder (<OUT>/<category>/<defect>/manifest.jsonl)")
    c.add_argument("--category", help="only this category")
    c.add_argument("--defect", help="only this defect type")
    c.add_argument("--list", action="store_true", help="print a table of the samples with their scores and reviews")
    c.add_argument("--rescore", action="store_true",
                   help="compute the quality record of samples that have none (or an older version), against "
                        "the normal image the manifest names (no model is loaded)")
    c.add_argument("--reject-below", type=o.fraction("--reject-below"), metavar="SCORE",
                   help="reject every scored sample whose score is below SCORE (0..1)")
    c.add_argument("--keep-top", type=o.int_at_least("--keep-top", 0), metavar="K",
                   help="per defect type, accept the best scored samples until K are accepted and reject the "
                        "other scored ones; samples already accepted or rejected (--reject-below included) "
                        "keep their decision, and accepted ones count toward K")
    for name, what in (("accept", "accept"), ("reject", "reject"), ("clear", "forget the decision on")):
        c.add_argument(f"--{name}", metavar="INDICES", action="append", default=[],
                       help=f"{what} these samples of the one selected defect folder: e.g. 3,5,10-12 "
                            "(repeatable)")
    regen = c.add_argument_group("replacements")
    regen.add_argument("--regenerate-rejected", action="store_true",
                       help="generate new samples (new indices, so new mask seeds) with the folder's own settings "
                            "until --num accepted-or-unreviewed samples exist; with --reject-below the new ones "
                            "are judged too (up to 5 rounds). Folders of o2mag generate only")
    regen.add_argument("--num", type=o.int_at_least("--num", 1), help="how many accepted-or-unreviewed samples "
                                                                      "--regenerate-rejected makes sure exist")
    regen.add_argument("--device", default="auto", help="device for --regenerate-rejected (as o2mag generate)")
    regen.add_argument("--batch-size", type=o.int_at_least("--batch-size", 1), default=4,
                       help="targets per UNet batch for --regenerate-rejected")
    c.set_defaults(handler=run)


ROUNDS = 5  # --regenerate-rejected: at most this many generate runs


def _input_paths(settings: dict) -> List[str]:
    """The paths among a folder's settings that o2mag generate opened (relative to its directory)."""
    paths = []
    if settings.get("source") in ("files", "mvtec"):
        paths += [settings.get("reference"), settings.get("ref_mask"), *(settings.get("normals") or [])]
    if settings.get("foreground") not in (None, "otsu", "all"):
        paths.append(settings["foreground"])
    if settings.get("masks"):
        paths.append(settings["masks"])
    return [p for p in paths if isinstance(p, str)]


def generate_argv(settings: dict, out: str, category: str, defect: str, num: int) -> List[str]:
    """The ``o2mag generate`` arguments that reproduce a folder's manifest ``settings`` (the store
    refuses to resume if any of them differs, so a wrong guess cannot mix two setups). The paths
    are the settings' own, as typed: run it from the directory the folder was made in."""
    def need(key):
        if settings.get(key) is None:
            raise InputError(f"--regenerate-rejected: the manifest's settings lack {key!r}")
        return settings[key]

    argv = ["generate", "--out", str(out), "--category", category, "--defect", defect, "--num", str(num)]
    model = need("model")
    tiny = {"o2mag-tiny-seed0" + ("" if f == "sd1" else f"-{f}"): f for f in ("sd1", "sd2", "sdxl")}
    if model in tiny:  # an embedded tiny model: loaded without --model, by its --family
        argv += ["--family", tiny[model]]
    else:
        argv += ["--model", model]
    source, normals = need("source"), need("normals")
    if source == "files":
        if len(normals) != 1:
            raise UsageError("--regenerate-rejected: this folder was made from a folder of normal images; rerun "
                             "o2mag generate with --num to add samples")
        argv += ["--ref", need("reference"), "--ref-mask", need("ref_mask"), "--normal", normals[0]]
    elif source == "mvtec":
        ref = Path(need("reference"))  # <root>/<category>/test/<defect>/<name>
        root, tests = ref.parents[3], mvtec_test_images(ref.parents[3], ref.parents[2].name, ref.parent.name)
        names = [p.name for p in tests]  # counted as o2mag generate counts --ref-index
        if ref.name not in names:
            raise InputError(f"--regenerate-rejected: the reference {ref} is no longer among the images of "
                             f"{ref.parent}")
        argv += ["--mvtec-root", str(root), "--ref-index", str(names.index(ref.name)),
                 "--num-normals", str(len(normals))]
    elif source != "embedded":
        raise UsageError(f"--regenerate-rejected: folders made by o2mag {source} are not supported; rerun that "
                         "command with a larger --num")
    argv += ["--prompt", need("prompt"), "--anomaly-word", need("anomaly_word"), "--dtype", need("dtype"),
             "--size", str(need("size")), "--steps", str(need("steps")), "--guidance", repr(need("guidance")),
             "--ago-steps", str(need("ago_steps")), "--ago-lr", repr(need("ago_lr")), "--seed", str(need("seed")),
             "--mask-mode", need("mask_mode"), "--foreground", need("foreground"), "--quiet"]
    if settings.get("masks"):
        argv += ["--masks", settings["masks"]]
    if settings.get("ago_mask_weight"):
        argv.append("--ago-mask-weight")
    if settings.get("ago_pooled"):
        argv.append("--ago-pooled")
    if settings.get("blend_background") is False:
        argv.append("--no-blend")
    return argv


def _workdir(record: dict, key: str) -> Path:
    """The directory o2mag generate ran in for this line, where its relative input paths point;
    the current one only when every input path is absolute."""
    cwd = line_cwd(record)
    relative = [p for p in _input_paths(record.get("settings") or {}) if not Path(p).is_absolute()]
    if cwd is None:
        if relative:
            raise InputError(f"--regenerate-rejected: {key}: the manifest names the relative path {relative[0]!r} "
                             "but not the directory it is relative to (written by an older o2mag); rerun o2mag "
                             "generate from the directory it first ran in, with the same inputs and a larger --num")
        return Path.cwd()
    if not cwd.is_dir():
        raise MissingInputError(f"--regenerate-rejected: {key}: the directory o2mag generate ran in, {cwd}, "
                                "is gone (the manifest's input paths are relative to it)")
    return cwd


def _regenerate(args, changed: set) -> int:
    """Top up each selected folder; the exit code (the worst of the generate runs', or
    EXIT_INCOMPLETE when a folder still has too few kept samples)."""
    folders = sorted({(s.category, s.defect) for s in samples(args.out, args.category, args.defect)})
    parser = o.Parser(prog="o2mag")
    generate.add_parser(parser.add_subparsers(dest="command", parser_class=o.Parser))
    out = Path(args.out).resolve()  # generate runs in the folder's own working directory
    code = o.EXIT_OK
    for cat, dfc in folders:
        for _ in range(ROUNDS):
            items = samples(args.out, cat, dfc)
            kept = [s for s in items if s.review != "rejected"]
            if len(kept) >= args.num:
                break
            slots = max(s.index for s in items) + 1
            record = items[-1].record
            with contextlib.chdir(_workdir(record, f"{cat}/{dfc}")):  # the settings' paths as typed
                argv = generate_argv(record.get("settings") or {}, str(out), cat, dfc, slots + args.num - len(kept))
                gen_args = parser.parse_args(argv + ["--device", args.device, "--batch-size",
                                                     str(args.batch_size)])
                print(f"o2mag: curate: {cat}/{dfc}: {len(kept)} of {args.num} samples kept, generating "
                      f"{args.num - len(kept)} more", file=sys.stderr)
                rc = generate.run(gen_args)
            changed.add((cat, dfc))
            if args.reject_below is not None:
                new = [s for s in samples(args.out, cat, dfc) if s.index >= slots]
                _apply(args.out, reject_below(new, args.reject_below), f"new samples below {args.reject_below:g}",
                       changed, new)
            if rc != o.EXIT_OK:
                code = rc if code == o.EXIT_OK else code
                break
        kept = sum(1 for s in samples(args.out, cat, dfc) if s.review != "rejected")
        if kept < args.num:
            print(f"o2mag: curate: {cat}/{dfc}: only {kept} of {args.num} samples kept"
                  + (f" after {ROUNDS} rounds" if code == o.EXIT_OK else "")
                  + f" (exit code {code or o.EXIT_INCOMPLETE})", file=sys.stderr)
            code = code or o.EXIT_INCOMPLETE
    return code


def parse_indices(text: str, option: str) -> List[int]:
    """``"3,5,10-12"`` -> [3, 5, 10, 11, 12]; a malformed list is an input error naming ``option``."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(f"{option}: {text!r} is not a list of sample indices like 3,5,10-12") from None
        if a < 0 or b < a:
            raise UsageError(f"{option}: {part!r} is not an index or a rising range of indices >= 0")
        out.extend(range(a, b + 1))
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def table(items: List[Sample]) -> str:
    """The ``--list`` table: one row per sample."""
    rows = [("folder", "index", "score", "presence", "leakage", "likeness", "review")]
    for s in items:
        q = s.record.get("quality") if isinstance(s.record.get("quality"), dict) else {}
        rows.append((s.key, f"{s.index:03d}", _fmt(q.get("score")), _fmt(q.get("presence")),
                     _fmt(q.get("leakage")), _fmt(q.get("likeness")), s.review or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _ids(items: List[Sample]) -> Dict[Tuple[str, str], Dict[int, Optional[str]]]:
    """The identity of every sample as read, so a decision never lands on a replacement."""
    ids: Dict[Tuple[str, str], Dict[int, Optional[str]]] = {}
    for s in items:
        ids.setdefault((s.category, s.defect), {})[s.index] = s.id
    return ids


def _skipped(cat: str, dfc: str, wanted, got) -> int:
    gone = sorted(set(wanted) - set(got))
    if gone:
        print(f"o2mag: curate: {cat}/{dfc}: skipped sample(s) {', '.join(map(str, gone))}: replaced or being "
              "replaced since curate read them (run curate again to judge the new ones)", file=sys.stderr)
    return len(gone)


def _apply(out: str, plan: Dict[Tuple[str, str], Dict[int, Optional[str]]], what: str, changed: set,
           items: List[Sample]) -> int:
    """Record ``plan``, each decision only on the very sample of ``items`` it was made on."""
    ids = _ids(items)
    n = 0
    for (cat, dfc), reviews in plan.items():
        if reviews:
            known = ids.get((cat, dfc), {})
            lines = decide(out, cat, dfc, reviews, {i: known.get(i) for i in reviews})
            _skipped(cat, dfc, reviews, lines)
            n += len(lines)
            changed.add((cat, dfc))
    print(f"o2mag: curate: {what}: {n} sample(s) marked", file=sys.stderr)
    return n


def _by_index(args, items: List[Sample]) -> Dict[Tuple[str, str], Dict[int, Optional[str]]]:
    wanted: Dict[int, Optional[str]] = {}
    for name, value in (("accept", "accepted"), ("reject", "rejected"), ("clear", None)):
        for text in getattr(args, name):
            for i in parse_indices(text, f"--{name}"):
                wanted[i] = value
    if not wanted:
        return {}
    folders = sorted({(s.category, s.defect) for s in items})
    if len(folders) != 1:
        raise UsageError("--accept/--reject/--clear need exactly one defect folder; give --category and "
                         f"--defect (found {', '.join(f'{c}/{d}' for c, d in folders) or 'none'})")
    present = {s.index for s in items}
    missing = sorted(set(wanted) - present)
    if missing:
        raise InputError(f"{folders[0][0]}/{folders[0][1]} has no complete sample at index(es) "
                         f"{', '.join(map(str, missing))}")
    return {folders[0]: wanted}


def run(args) -> int:
    """The ``o2mag curate`` command (called by :func:`o2mag.cli.main`)."""
    if not defect_folders(args.out):
        raise InputError(f"{args.out} holds no generated samples (no <category>/<defect>/manifest.jsonl)")
    items = samples(args.out, args.category, args.defect)
    if not items:
        raise InputError(f"no complete samples in {args.out} for the selected category/defect")
    by_index = _by_index(args, items)  # checked before anything is written
    if args.regenerate_rejected != (args.num is not None):
        raise UsageError("--regenerate-rejected and --num go together")
    if args.rescore:
        stale = [s for s in items if not isinstance(s.record.get("quality"), dict)
                 or s.record["quality"].get("version") != QUALITY_VERSION]
        scores, problems = rescore(stale)
        for p in problems:
            print(f"o2mag: curate: not scored: {p}", file=sys.stderr)
        n = 0
        for (cat, dfc), records in scores.items():
            store = OutputStore(args.out, cat, dfc, annotator=True)
            ids = _ids(stale).get((cat, dfc), {})
            try:
                lines = store.annotate({i: {"quality": q} for i, q in records.items()},
                                       {i: ids.get(i) for i in records})
            finally:
                store.close()
            _skipped(cat, dfc, records, lines)
            n += len(lines)
        print(f"o2mag: curate: rescored {n} sample(s) ({len(items) - len(stale)} already had a record)",
              file=sys.stderr)
        items = samples(args.out, args.category, args.defect)
    changed: set = set()
    unscored = sum(1 for s in items if s.score is None)
    if (args.reject_below is not None or args.keep_top is not None) and unscored:
        print(f"o2mag: curate: {unscored} sample(s) have no quality record and are left as they are "
              "(run with --rescore to score them)", file=sys.stderr)
    below: Dict[Tuple[str, str], Dict[int, Optional[str]]] = {}
    if args.reject_below is not None:
        below = reject_below(items, args.reject_below)
        _apply(args.out, below, f"score below {args.reject_below:g}", changed, items)
    if args.keep_top is not None:  # never overturns a decision, this command's rejections included
        _apply(args.out, keep_top(items, args.keep_top, below), f"keep top {args.keep_top}", changed, items)
    if by_index:
        _apply(args.out, by_index, "by index", changed, items)
    code = o.EXIT_OK
    if args.regenerate_rejected:
        code = _regenerate(args, changed)
    if changed:
        for cat, dfc in sorted(changed):  # the sheets show the decisions (rejected ones crossed out)
            write_contact_sheet(Path(args.out) / cat / dfc)
    if args.list:
        print(table(samples(args.out, args.category, args.defect)))
    return code
