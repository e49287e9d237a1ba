"""``o2mag evaluate {detect,classify,quality}``: the papers' downstream metrics on your data.

:func:`add_parser` adds the sub-commands to the ``o2mag`` parser; each sets ``args.handler``. The
work is done by :mod:`o2mag.evaluation`, a library without argparse; its modules that load torch
are imported by the handler that needs them (``# deferred``), so building the parser stays cheap.
Errors follow the ``o2mag`` command's rules: a problem with what the user gave raises
``InputError`` (one line, exit 2); results are never written over an earlier run's without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import InputError, existing_path
from ..files import check_writable
from ..evaluation.demo import make_demo_data
from ..masks import image_files
from ..curation.decisions import is_rejected
from ..runs.store import MANIFEST_NAME, complete_samples, package_versions
from ..sources.mvtec import mvtec_categories
from .options import HelpFormatter, Parser, fraction, int_at_least, positive_float, resolve_device

__all__ = ["add_parser"]

EMBEDDED_NOTE = (
    "o2mag: no --mvtec-root/--synthetic given, so this run uses the EMBEDDED DEMO: a tiny MVTec-like "
    "dataset and synthetic tree drawn in code\n"
    "       (written to {data}), a small U-Net and a short schedule. It demonstrates the evaluation "
    "machinery; its numbers say nothing about any generator.\n"
    "       For real numbers: o2mag evaluate detect --mvtec-root /data/mvtec --synthetic o2mag-out "
    "--category all"
)

# the embedded demo's schedule (the papers' defaults are the options' defaults)
DEMO = dict(size=64, epochs=12, samples_per_epoch=96, batch_size=8, lr=1e-3, base_width=8)


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    if data:
        p.add_argument("--mvtec-root", metavar="ROOT", help="MVTec-AD root (<category>/{train/good,test,ground_truth})")
        p.add_argument("--synthetic", metavar="DIR",
                       help="synthetic tree in o2mag's layout: <DIR>/<category>/<defect>/{image,mask}/NNN.png "
                            "+ manifest.jsonl (what o2mag generate --out DIR writes)")
        p.add_argument("--category", default=None, help="category name, or 'all' (every category in both trees)")
        p.add_argument("--max-per-defect", type=int_at_least("--max-per-defect", 1), default=500,
                       help="use at most this many generated samples per defect type (lowest indices)")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0, help="seed for initialisation and sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_parser(sub) -> None:
    """Add ``evaluate`` and its sub-commands to the ``o2mag`` sub-parser set ``sub``."""
    ev = sub.add_parser("evaluate", help="measure generated data: downstream detection, classification, quality",
                        description="The metrics of the anomaly-generation papers, computed on your data. "
                                    "See 'o2mag evaluate detect --help'.", formatter_class=HelpFormatter)
    ev.set_defaults(handler=lambda args: (ev.print_help(), 2)[1])
    evsub = ev.add_subparsers(dest="evaluate_command", metavar="WHAT", parser_class=Parser)

    d = evsub.add_parser(
        "detect", formatter_class=HelpFormatter,
        help="train a segmentation U-Net on normals + a synthetic tree, test on real MVTec defects",
        description="Train a DRAEM-style segmentation U-Net per category on train/good normals (empty masks) "
                    "and a synthetic tree, test it on test/good plus each defect folder without its first third "
                    "(the references), with the FINAL checkpoint, and report AUROC/AP/F1-max (image and pixel) "
                    "and AUPRO. With no --mvtec-root/--synthetic it runs the embedded demo.")
    _common(d)
    d.add_argument("--size", type=int_at_least("--size", 32), default=None, help="working side in px, multiple of 32 "
                   "(default 256; demo 64)")
    d.add_argument("--epochs", type=int_at_least("--epochs", 1), default=None, help="training epochs (default 200; demo 12)")
    d.add_argument("--samples-per-epoch", type=int_at_least("--samples-per-epoch", 1), default=None,
                   help="samples drawn per epoch (default 500; demo 96)")
    d.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=None, help="batch size (default 8)")
    d.add_argument("--lr", type=positive_float("--lr"), default=None, help="Adam learning rate (default 1e-4; "
                   "demo 1e-3), x0.2 at 80%% and 90%% of the epochs")
    d.add_argument("--base-width", type=int_at_least("--base-width", 1), default=None,
                   help="U-Net width of the first level (default 64; demo 8)")
    d.add_argument("--normal-fraction", type=fraction("--normal-fraction"), default=0.5,
                   help="share of training samples from train/good")
    d.add_argument("--real-refs", action="store_true",
                   help="also train on the real reference defects (the held-back third), 10%% of samples")
    d.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="float16 autocast on CUDA (auto = on for CUDA, off on the CPU)")
    d.add_argument("--leaky-paper-protocol", action="store_true",
                   help="reproduce the published protocol to compare with published tables: checkpoint chosen on "
                        "the TEST set every epoch, bilinear-truncated masks, 0.05-grid pixel F1 (LEAKY: the "
                        "report says so)")
    d.set_defaults(handler=_keeps_no_empty_out(_detect))

    c = evsub.add_parser(
        "classify", formatter_class=HelpFormatter,
        help="train a defect-type classifier on generated images, test on real defects",
        description="Per category, classify defect types: train on at most --max-per-defect generated images per "
                    "type, test on the real defect images without the reference third; accuracy and confusion "
                    "matrix. The papers use an ImageNet ResNet-34 (weights from the torch hub cache or "
                    "--weights; nothing is downloaded).")
    _common(c)
    c.add_argument("--backbone", choices=("resnet34", "tiny"), default="resnet34",
                   help="resnet34 (ImageNet weights, needs o2mag[eval]) or tiny (small random CNN, demonstration)")
    c.add_argument("--weights", metavar="FILE", help="ResNet-34 ImageNet state dict (default: torch hub cache)")
    c.add_argument("--size", type=int_at_least("--size", 16), default=256, help="image side in px")
    c.add_argument("--epochs", type=int_at_least("--epochs", 1), default=30, help="training epochs")
    c.add_argument("--batch-size", type=int_at_least("--batch-size", 2), default=16, help="batch size")
    c.add_argument("--lr", type=positive_float("--lr"), default=1e-4, help="Adam learning rate")
    c.set_defaults(handler=_keeps_no_empty_out(_classify))

    q = evsub.add_parser(
        "quality", formatter_class=HelpFormatter, help="KID and IC-LPIPS of generated images against real ones",
        description="KID (unbiased MMD, cubic kernel, on Inception features) between --generated and --reference "
                    "images, and IC-LPIPS (each generated image joins its nearest reference by LPIPS; mean "
                    "pairwise LPIPS inside clusters). Pretrained weights come from the torch hub cache or the "
                    "--*-weights options; nothing is downloaded.")
    _common(q, data=False)
    q.add_argument("--generated", metavar="DIR", required=True,
                   help="generated images: a folder of images, or an o2mag defect folder (uses its image/)")
    q.add_argument("--reference", metavar="DIR", required=True, help="real images (e.g. MVTec test/<defect>)")
    q.add_argument("--size", type=int_at_least("--size", 16), default=256, help="images are resized to this side")
    q.add_argument("--kid-features", choices=("inception", "tiny"), default="inception",
                   help="inception (torch-fidelity FID Inception, needs o2mag[eval]) or tiny (demonstration)")
    q.add_argument("--inception-weights", metavar="FILE", help="FID Inception weights (default: torch hub cache)")
    q.add_argument("--kid-subset-size", type=int_at_least("--kid-subset-size", 2), default=1000,
                   help="KID subset size, capped at the smaller image set")
    q.add_argument("--kid-subsets", type=int_at_least("--kid-subsets", 1), default=100, help="KID subsets")
    q.add_argument("--lpips-net", choices=("alex", "vgg", "tiny"), default="alex",
                   help="LPIPS backbone for IC-LPIPS (alex as in DFMGAN; vgg as later papers; tiny = demonstration)")
    q.add_argument("--lpips-weights", metavar="FILE", help="AlexNet/VGG-16 ImageNet weights (default: hub cache)")
    q.add_argument("--batch-size", type=int_at_least("--batch-size", 1), default=32, help="batch size for the networks")
    q.set_defaults(handler=_keeps_no_empty_out(_quality))


# --------------------------------------------------------------------------------------------- helpers


def _device(name: str):
    return resolve_device(name)


_CREATED: list = []  # the folders this command's _out_dir made (deepest first), for _keeps_no_empty_out


def _out_dir(out: Path, overwrite: bool, marker: str) -> Path:
    """Check ``--out`` and create it: called once every other option and input was checked."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out is not a folder: {out}")
    if (out / marker).exists() and not overwrite:
        raise InputError(f"{out / marker} already exists (an earlier run); use --overwrite to replace its "
                         "results or choose another --out")
    check_writable(out, "--out")
    _CREATED[:] = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    return out


def _keeps_no_empty_out(handler):
    """``handler``, but when it fails, the ``--out`` folders it created and left empty are removed:
    an input error found late (a category's data) leaves no empty folder behind."""
    @functools.wraps(handler)
    def run(args):
        _CREATED.clear()
        try:
            return handler(args)
        except BaseException:
            for folder in _CREATED:
                try:
                    folder.rmdir()  # only when empty; a parent is tried only if its child went
                except OSError:
                    break
            raise
        finally:
            _CREATED.clear()

    return run


def _categories(args) -> list:
    from ..evaluation.data import synthetic_categories  # deferred: loads torch

    if not args.category:
        raise InputError("--category is required with --mvtec-root (a name, or 'all')")
    mv = mvtec_categories(args.mvtec_root)
    syn = synthetic_categories(args.synthetic)
    if args.category == "all":
        both = [c for c in mv if c in syn]
        if not both:
            raise InputError(f"no category is in both trees: MVTec root has {', '.join(mv) or 'none'}; synthetic "
                             f"tree has {', '.join(syn) or 'none'}")
        return both
    if args.category not in mv:
        raise InputError(f"category {args.category!r} not found under {args.mvtec_root}; categories there: "
                         f"{', '.join(mv) or 'none'}")
    if args.category not in syn:
        raise InputError(f"category {args.category!r} not found in synthetic tree {args.synthetic}; categories "
                         f"there: {', '.join(syn) or 'none'}")
    return [args.category]


def _versions() -> dict:
    return package_versions()


def _say(text: str) -> None:
    print(text, file=sys.stderr)


# --------------------------------------------------------------------------------------------- detect


def _detect(args) -> int:
    import torch  # deferred: loads torch

    from ..evaluation.detect import DetectOptions, evaluate_category  # deferred: loads torch
    from ..evaluation.metrics import METRIC_KEYS  # deferred: loads torch
    from ..evaluation.report import write_detect_report, write_json  # deferred: loads torch
    from ..evaluation.segmentation import TrainConfig  # deferred: loads torch

    demo = args.mvtec_root is None and args.synthetic is None
    if (args.mvtec_root is None) != (args.synthetic is None):
        raise InputError("--mvtec-root and --synthetic go together (give both, or neither for the embedded demo)")
    out = Path(args.out or ("o2mag-eval-demo" if demo else "o2mag-eval"))
    device = _device(args.device)
    pick = (lambda name, paper: getattr(args, name) if getattr(args, name) is not None
            else (DEMO[name] if demo else paper))
    size = pick("size", 256)
    if size % 32:
        raise InputError(f"--size must be a multiple of 32 (the U-Net halves it 5 times), got {size}")
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    if amp and device.type != "cuda":
        raise InputError("--amp on needs CUDA")
    cfg = TrainConfig(epochs=pick("epochs", 200), samples_per_epoch=pick("samples_per_epoch", 500),
                      batch_size=pick("batch_size", 8), lr=pick("lr", 1e-4), base_width=pick("base_width", 64),
                      normal_fraction=args.normal_fraction, real_fraction=0.1 if args.real_refs else 0.0,
                      seed=args.seed, amp=amp)
    cats = None if demo else _categories(args)
    _out_dir(out, args.overwrite, "results.json")  # every option and input checked first: no empty --out
    if demo:
        args.mvtec_root, args.synthetic = (str(p) for p in make_demo_data(out / "demo-data"))
        args.category = args.category or "all"
        _say(EMBEDDED_NOTE.format(data=out / "demo-data"))
        if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
            # the demo's convolutions are far too small to gain from threads; extra threads only spin
            torch.set_num_threads(1)
        cats = _categories(args)
    opts = DetectOptions(mvtec_root=Path(args.mvtec_root), synthetic_root=Path(args.synthetic), out=out, size=size,
                         train=cfg, real_refs=args.real_refs, max_per_defect=args.max_per_defect,
                         leaky=args.leaky_paper_protocol, device=device, progress=not args.quiet)
    if opts.leaky:
        _say("o2mag: --leaky-paper-protocol: the checkpoint is chosen on the TEST set; results are marked LEAKY")
    t0 = time.perf_counter()
    records = {}
    for cat in cats:
        records[cat] = evaluate_category(cat, opts)
        left_out = sum(records[cat]["synthetic_rejected"].values())
        _say(f"o2mag: {cat}: trained without {left_out} rejected synthetic sample(s)"
             + (" (" + ", ".join(f"{d} {n}" for d, n in records[cat]["synthetic_rejected"].items()) + ")"
                if left_out else ""))
        m = records[cat]["metrics"]
        _say(f"o2mag: {cat}: " + ", ".join(f"{k} {100 * m[k]:.1f}" for k in METRIC_KEYS)
             + f" ({records[cat]['seconds']:.0f} s)")
    mean = {k: float(np.mean([r["metrics"][k] for r in records.values()])) for k in METRIC_KEYS}
    results = {
        "command": "o2mag evaluate detect", "protocol": "leaky-paper" if opts.leaky else "final-checkpoint",
        "leaky": opts.leaky, "demo": demo, "mean": mean, "categories": records,
        "settings": {"mvtec_root": str(opts.mvtec_root), "synthetic_root": str(opts.synthetic_root), "size": size,
                     "train": cfg.as_dict(), "real_refs": args.real_refs, "max_per_defect": args.max_per_defect,
                     "mask_resize": "bilinear-truncated" if opts.leaky else "nearest",
                     "pixel_f1": "0.05 grid" if opts.leaky else "exact", "image_score": "max of 21x21 mean-pooled map",
                     "aupro_fpr_limit": 0.3, "device": str(device)},
        "versions": _versions(), "seconds": time.perf_counter() - t0,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "results.json", results)
    report = write_detect_report(out, results)
    label = " (LEAKY protocol)" if opts.leaky else ""
    label += " — demonstration data" if demo else ""
    _say(f"o2mag: mean over {len(cats)} categor{'y' if len(cats) == 1 else 'ies'}{label}: "
         + ", ".join(f"{k} {100 * mean[k]:.1f}" for k in METRIC_KEYS))
    _say(f"o2mag: wrote {out / 'results.json'} and {report} in {results['seconds']:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------- classify


def _classify(args) -> int:
    from ..evaluation.backbones import resnet34_classifier, tiny_classifier, weights_file  # deferred: loads torch
    from ..evaluation.classify import ClassifyOptions, classify_category  # deferred: loads torch
    from ..evaluation.report import write_classify_report, write_json  # deferred: loads torch

    if args.mvtec_root is None or args.synthetic is None:
        raise InputError("o2mag evaluate classify needs --mvtec-root and --synthetic")
    if args.backbone == "tiny" and args.weights:
        raise InputError("--weights is for --backbone resnet34")
    out = Path(args.out or "o2mag-eval-classify")
    cats = _categories(args)
    if args.backbone == "resnet34":
        weights_file("resnet34", args.weights)  # fail before any work when the weights are missing
        factory = (lambda k: resnet34_classifier(k, args.weights))
    else:
        factory = (lambda k: tiny_classifier(k, seed=args.seed))
    device = _device(args.device)
    _out_dir(out, args.overwrite, "results.json")
    opts = ClassifyOptions(mvtec_root=Path(args.mvtec_root), synthetic_root=Path(args.synthetic), out=out,
                           model_factory=factory, size=args.size, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, max_per_defect=args.max_per_defect, seed=args.seed, device=device,
                           amp=device.type == "cuda", progress=not args.quiet)
    t0 = time.perf_counter()
    records = {}
    for cat in cats:
        records[cat] = classify_category(cat, opts)
        _say(f"o2mag: {cat}: accuracy {100 * records[cat]['accuracy']:.1f}% on {records[cat]['n_test']} "
                   f"real defects ({len(records[cat]['classes'])} types)")
    results = {"command": "o2mag evaluate classify", "backbone": args.backbone, "demo_backbone": args.backbone == "tiny",
               "categories": records, "mean_accuracy": float(np.mean([r["accuracy"] for r in records.values()])),
               "settings": {"mvtec_root": args.mvtec_root, "synthetic_root": args.synthetic, "size": args.size,
                            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                            "max_per_defect": args.max_per_defect, "seed": args.seed, "device": str(device)},
               "versions": _versions(), "seconds": time.perf_counter() - t0,
               "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(out / "results.json", results)
    report = write_classify_report(out, results)
    _say(f"o2mag: mean accuracy {100 * results['mean_accuracy']:.1f}%; wrote {out / 'results.json'} and {report}")
    return 0


# --------------------------------------------------------------------------------------------- quality


def _image_folder(path: str, what: str) -> list:
    """The images of ``path``: a folder of images, or a generated defect folder, where only the
    manifest's complete samples a reviewer did not reject count (as for detect and classify)."""
    p = existing_path(path, what, folder=True)
    if (p / MANIFEST_NAME).is_file():
        done = complete_samples(p)
        files = [img for _, img, _, rec in done if not is_rejected(rec)]
        on_disk = len(image_files(p / "image")) if (p / "image").is_dir() else 0
        rejected = len(done) - len(files)
        others = max(on_disk - len(done), 0)
        if rejected or others:
            print(f"o2mag: evaluate: {what} {p}: {len(files)} sample(s) used; left out: {rejected} rejected by a "
                  f"reviewer, {others} other file(s) in image/ that the manifest does not list as complete",
                  file=sys.stderr)
        if not files:
            raise InputError(f"{what} folder {p} holds no complete, non-rejected samples")
        return files
    if (p / "image").is_dir():
        p = p / "image"
    files = image_files(p)
    if not files:
        raise InputError(f"{what} folder {p} holds no images")
    return files


def _quality(args) -> int:
    from ..evaluation.backbones import (inception_extractor, lpips_distance,  # deferred: loads torch
                                        tiny_distance, tiny_feature_extractor, weights_file)
    from ..evaluation.data import load_images, to_float  # deferred: loads torch
    from ..evaluation.quality import extract_features, ic_lpips, kid  # deferred: loads torch
    from ..evaluation.report import write_json  # deferred: loads torch

    if args.kid_features == "tiny" and args.inception_weights:
        raise InputError("--inception-weights is for --kid-features inception")
    if args.lpips_net == "tiny" and args.lpips_weights:
        raise InputError("--lpips-weights is for --lpips-net alex or vgg")
    gen_files = _image_folder(args.generated, "--generated")
    ref_files = _image_folder(args.reference, "--reference")
    if len(gen_files) < 2 or len(ref_files) < 2:
        raise InputError(f"KID needs at least 2 images on each side (generated {len(gen_files)}, "
                         f"reference {len(ref_files)})")
    if args.kid_features == "inception":
        weights_file("inception", args.inception_weights)
    if args.lpips_net != "tiny":
        weights_file(args.lpips_net, args.lpips_weights)
    out = Path(args.out) if args.out else None
    device = _device(args.device)
    if out is not None:
        _out_dir(out, args.overwrite, "quality.json")
    progress = not args.quiet
    gen = load_images(gen_files, args.size, progress=progress, desc="generated")
    ref = load_images(ref_files, args.size, progress=progress, desc="reference")
    if args.kid_features == "inception":
        fe, as_uint8 = inception_extractor(args.inception_weights).to(device), True
    else:
        fe, as_uint8 = tiny_feature_extractor(args.seed).to(device), False
    f_ref = extract_features(to_float(ref), fe, batch_size=args.batch_size, device=device, uint8=as_uint8,
                             progress=progress, desc="KID features (reference)")
    f_gen = extract_features(to_float(gen), fe, batch_size=args.batch_size, device=device, uint8=as_uint8,
                             progress=progress, desc="KID features (generated)")
    k = kid(f_ref, f_gen, subset_size=args.kid_subset_size, subsets=args.kid_subsets, seed=args.seed)
    dist = (tiny_distance(args.seed) if args.lpips_net == "tiny"
            else lpips_distance(args.lpips_net, args.lpips_weights)).to(device).eval()
    ic = ic_lpips(to_float(gen), to_float(ref), dist, batch_size=args.batch_size, device=device, seed=args.seed,
                  progress=progress)
    results = {"command": "o2mag evaluate quality", "kid": k, "ic_lpips": ic,
               "demo_networks": args.kid_features == "tiny" or args.lpips_net == "tiny",
               "settings": {"generated": args.generated, "reference": args.reference, "size": args.size,
                            "kid_features": args.kid_features, "lpips_net": args.lpips_net, "seed": args.seed},
               "versions": _versions(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if results["demo_networks"]:
        _say("o2mag: tiny random networks were used: these numbers demonstrate the machinery only")
    _say(f"o2mag: KID {k['kid_mean']:.4f} ± {k['kid_std']:.4f} (subset size {k['subset_size']}), "
               f"IC-LPIPS ({args.lpips_net}) {ic['ic_lpips']:.4f} over {ic['used_clusters']} clusters")
    if out is not None:
        write_json(out / "quality.json", results)
    print(json.dumps({"kid_mean": k["kid_mean"], "kid_std": k["kid_std"], "ic_lpips": ic["ic_lpips"]}))
    return 0
