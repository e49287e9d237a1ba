"""Downstream detection: does a synthetic tree help a detector find real defects?

Per category: train :class:`~o2mag.evaluation.segmentation.SegmentationUNet` on the category's
``train/good`` normals (empty masks) plus the generated (image, mask) pairs (and, if asked, the real
reference defects held back from the test set), then score the held-out test split with the
model after the LAST epoch and compute :func:`~o2mag.evaluation.metrics.detection_metrics`.

``leaky=True`` reproduces the published protocol so results can be set beside published tables:
test masks resized bilinearly and truncated (edges eroded), pixel F1-max on a 0.05 grid, and the
checkpoint chosen on the test set after every epoch (by AUROC-I + AUROC-P + AP-P + AUPRO). Its
numbers are optimistic by construction and every output says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .data import load_images, load_pairs, mvtec_split, synthetic_samples
from ..errors import InputError
from ..files import atomic_write
from .metrics import detection_metrics, image_scores_from_maps, precision_recall
from .segmentation import TrainConfig, predict_maps, train_segmentation

__all__ = ["DetectOptions", "evaluate_category", "LEAKY_SELECTION_KEYS"]

LEAKY_SELECTION_KEYS = ("auroc_i", "auroc_p", "ap_p", "aupro")


@dataclass
class DetectOptions:
    mvtec_root: Path
    synthetic_root: Path
    out: Path
    size: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    real_refs: bool = False
    max_per_defect: Optional[int] = 500
    leaky: bool = False
    device: torch.device = torch.device("cpu")
    eval_batch_size: int = 16
    progress: bool = True
    maps_per_category: int = 4


def _curve_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 400) -> Dict[str, list]:
    p, r, _ = precision_recall(scores, labels)
    if p.size > max_points:
        keep = np.unique(np.r_[np.linspace(0, p.size - 1, max_points).round().astype(int), p.size - 1])
        p, r = p[keep], r[keep]
    return {"precision": p.round(6).tolist(), "recall": r.round(6).tolist()}


def _pick_examples(labels: np.ndarray, n: int) -> List[int]:
    """Up to n defect images spread over the test set, plus one defect-free image."""
    bad = np.nonzero(labels)[0]
    good = np.nonzero(~labels)[0]
    picks = list(bad[np.linspace(0, len(bad) - 1, min(n, len(bad))).round().astype(int)]) if len(bad) else []
    if len(good):
        picks.append(int(good[0]))
    return [int(i) for i in dict.fromkeys(picks)]


def evaluate_category(category: str, opts: DetectOptions) -> dict:
    """Train, test and measure one category; returns the category's result record.

    The record holds the metrics, the split and sample counts, the training history, the
    checkpoint path, PR-curve points, and (under key ``_examples``, for the report only) a few
    test images with their ground truth and predicted maps.

    Long on purpose: one linear protocol (load, train, test, measure, record) whose steps share a
    dozen locals; split up, each piece would take and return them all.
    """
    t0 = time.perf_counter()
    synth = synthetic_samples(opts.synthetic_root, category, opts.max_per_defect)
    split = mvtec_split(opts.mvtec_root, category, synth.references)
    progress = opts.progress
    normals = load_images(split.train_good, opts.size, progress=progress, desc=f"{category}: normals")
    syn_pairs = [pair for pairs in synth.pairs.values() for pair in pairs]
    syn_images, syn_masks = load_pairs(syn_pairs, opts.size, progress=progress, desc=f"{category}: synthetic")
    pools = {"normal": (normals,), "synthetic": (syn_images, syn_masks)}
    real_items = [it for items in split.references.values() for it in items]
    if opts.real_refs:
        if not real_items:
            raise InputError(f"{category}: --real-refs asked for, but no reference defect is held back "
                             "(defect folders with fewer than 3 images hold none)")
        pools["real"] = load_pairs([(it.image, it.mask) for it in real_items], opts.size, progress=progress,
                                   desc=f"{category}: references")
    mask_mode = "bilinear-uint8" if opts.leaky else "nearest"
    test_images, test_masks = load_pairs([(it.image, it.mask) for it in split.test], opts.size,
                                         mask_mode=mask_mode, progress=progress, desc=f"{category}: test")
    labels = np.array([it.defect != "good" for it in split.test])
    if opts.leaky and not test_masks.any():
        raise InputError(f"{category}: with bilinear-truncated masks no test defect pixel is left")
    cfg = opts.train
    if opts.real_refs and cfg.real_fraction == 0:
        cfg = TrainConfig(**{**cfg.__dict__, "real_fraction": 0.1})
    grid = 0.05 if opts.leaky else None

    def measure(model) -> tuple:
        maps = predict_maps(model, test_images, opts.device, batch_size=opts.eval_batch_size, amp=cfg.amp,
                            progress=progress, desc=f"{category}: test")
        scores = image_scores_from_maps(maps).numpy()
        m = detection_metrics(scores, labels, maps.numpy(), test_masks.numpy(), pixel_f1_grid=grid)
        return m, maps, scores

    best = {"sum": -1.0, "epoch": None, "state": None, "per_epoch": []}

    def on_epoch(epoch: int, model) -> None:  # leaky protocol only: test-set model selection
        m, _, _ = measure(model)
        total = sum(m[k] for k in LEAKY_SELECTION_KEYS)
        best["per_epoch"].append({"epoch": epoch, **m})
        if total > best["sum"]:
            best.update(sum=total, epoch=epoch, state={k: v.detach().clone() for k, v in model.state_dict().items()})

    model, history = train_segmentation(pools, cfg, opts.device, progress=progress, desc=f"{category}: train",
                                        after_epoch=on_epoch if opts.leaky else None)
    cat_dir = opts.out / category
    cat_dir.mkdir(parents=True, exist_ok=True)
    if opts.leaky:
        model.load_state_dict(best["state"])
        ckpt = cat_dir / "model_best_on_test_LEAKY.pt"
    else:
        ckpt = cat_dir / "model_final.pt"
    state = {"state_dict": model.state_dict(), "config": cfg.as_dict(), "size": opts.size, "category": category,
             "leaky": opts.leaky}
    atomic_write(ckpt, lambda f: torch.save(state, f))
    metrics, maps, scores = measure(model)
    pixel_scores = maps.numpy().ravel()
    pixel_labels = test_masks.numpy().ravel()
    examples = _pick_examples(labels, opts.maps_per_category)
    record = {
        "metrics": metrics,
        "split": split.counts(),
        "synthetic": {d: len(v) for d, v in synth.pairs.items()},
        "synthetic_rejected": dict(synth.rejected),
        "synthetic_references": synth.references,
        "history": history,
        "checkpoint": str(ckpt),
        "checkpoint_rule": "best AUROC-I + AUROC-P + AP-P + AUPRO on the TEST set (leaky)" if opts.leaky
        else f"after the last epoch ({cfg.epochs})",
        "curves": {"image": _curve_points(scores, labels), "pixel": _curve_points(pixel_scores, pixel_labels)},
        "seconds": time.perf_counter() - t0,
        "_examples": [{"name": f"{split.test[i].defect}/{split.test[i].image.name}",
                       "image": test_images[i].permute(1, 2, 0).numpy(), "mask": test_masks[i].numpy(),
                       "map": maps[i].numpy(), "score": float(scores[i])} for i in examples],
    }
    if opts.leaky:
        record["selected_epoch"] = best["epoch"]
        record["per_epoch_test_metrics"] = best["per_epoch"]
    return record
