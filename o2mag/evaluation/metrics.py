"""Detection metrics of the anomaly-generation papers, computed exactly.

``detection_metrics`` returns image-level AUROC / AP / F1-max (one score per image), pixel-level
AUROC / AP / F1-max (every test pixel of a category pooled) and AUPRO (per-region overlap
integrated up to a false-positive rate of 0.3 and divided by 0.3, so it lies in [0, 1]).

The ROC and precision-recall curves come from torchmetrics (exact: no threshold grid), fed with
the scores' dense ranks so that its automatic sigmoid on values outside [0, 1] can never merge
distinct scores into ties. F1-max is the maximum over every point of the full PR curve. AUPRO
labels defect regions with ``scipy.ndimage.label`` (8-connected, per image) and walks every
distinct score once. Only :func:`f1_max_on_grid` (the papers' 0.05-step grid, used by the leaky
protocol) approximates.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchmetrics.functional.classification import (binary_auroc, binary_average_precision,
                                                    binary_precision_recall_curve, binary_roc)

from ..checks import is_int, is_number

__all__ = ["detection_metrics", "METRIC_KEYS", "precision_recall", "roc", "auroc", "average_precision",
           "f1_max", "aupro", "pro_curve", "f1_max_on_grid", "image_scores_from_maps"]

METRIC_KEYS = ("auroc_i", "ap_i", "f1max_i", "auroc_p", "ap_p", "f1max_p", "aupro")
DEFAULT_PRO_FPR = 0.3


# ---------------------------------------------------------------------------------------- checks


def _array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu").numpy()
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise TypeError(f"{name} must be an array (numpy, torch or a sequence), got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array: {e}") from None
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got an array of objects")
    return arr


def _scores(value: Any, name: str, ndim: int | None = None) -> np.ndarray:
    arr = _array(value, name)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _labels(value: Any, name: str, ndim: int | None = None) -> np.ndarray:
    arr = _array(value, name)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must be bool or 0/1 numbers, got dtype {arr.dtype}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (or bool); found other values")
    return arr.astype(bool)


def _both_classes(labels: np.ndarray, name: str, what: str) -> None:
    if labels.all():
        raise ValueError(f"{name} has no negative {what}: the metric is undefined without both classes")
    if not labels.any():
        raise ValueError(f"{name} has no positive {what}: the metric is undefined without both classes")


def _pair(scores: Any, labels: Any, names: Tuple[str, str] = ("scores", "labels")) -> Tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, names[0])
    y = _labels(labels, names[1])
    if s.shape != y.shape:
        raise ValueError(f"{names[0]} has shape {s.shape} but {names[1]} has shape {y.shape}")
    s, y = s.ravel(), y.ravel()
    _both_classes(y, names[1], "sample")
    return s, y


# ---------------------------------------------------------------------------------------- curves


def _ranked(scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Dense ranks of the scores scaled to [0, 1] (ties kept, order kept) and the distinct values."""
    values, inverse = np.unique(scores, return_inverse=True)
    ranks = inverse.astype(np.float64)
    if len(values) > 1:
        ranks /= len(values) - 1
    return ranks, values


def _torch_pair(scores: np.ndarray, labels: np.ndarray):
    ranks, values = _ranked(scores)
    return torch.from_numpy(ranks), torch.from_numpy(labels.astype(np.int64)), values


def precision_recall(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full precision-recall curve: ``(precision, recall, thresholds)``, float64 arrays.

    As in scikit-learn: one point per distinct score (predict positive when score >= threshold),
    thresholds increasing, plus a final point (precision 1, recall 0) with no threshold.
    """
    s, y = _pair(scores, labels)
    preds, target, values = _torch_pair(s, y)
    p, r, t = binary_precision_recall_curve(preds, target, thresholds=None, validate_args=False)
    idx = np.rint(t.numpy().astype(np.float64) * max(len(values) - 1, 1)).astype(np.int64)
    return p.numpy().astype(np.float64), r.numpy().astype(np.float64), values[idx]


def roc(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    """The ROC curve ``(fpr, tpr)`` over every distinct score, starting at (0, 0)."""
    s, y = _pair(scores, labels)
    preds, target, _ = _torch_pair(s, y)
    fpr, tpr, _ = binary_roc(preds, target, thresholds=None, validate_args=False)
    return fpr.numpy().astype(np.float64), tpr.numpy().astype(np.float64)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (trapezoids over every distinct score; ties count half)."""
    s, y = _pair(scores, labels)
    preds, target, _ = _torch_pair(s, y)
    return float(binary_auroc(preds, target, thresholds=None, validate_args=False))


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision: sum over the PR curve of (recall step) x precision (no interpolation)."""
    s, y = _pair(scores, labels)
    preds, target, _ = _torch_pair(s, y)
    return float(binary_average_precision(preds, target, thresholds=None, validate_args=False))


def _f1_from_curve(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1


def f1_max(scores: Any, labels: Any, *, return_threshold: bool = False):
    """Best F1 over every threshold of the full precision-recall curve (no grid).

    With ``return_threshold``: ``(f1, threshold)``, the threshold being the smallest score
    predicted positive at the best point.
    """
    p, r, t = precision_recall(scores, labels)
    f1 = _f1_from_curve(p[:-1], r[:-1])
    k = int(np.argmax(f1))
    return (float(f1[k]), float(t[k])) if return_threshold else float(f1[k])


def f1_max_on_grid(scores: Any, labels: Any, step: float = 0.05) -> float:
    """LEAKY-PROTOCOL ONLY: the papers' pixel F1-max on thresholds 0, step, ..., 1 (pred > t).

    It reproduces AnomalyDiffusion-style evaluation code (a 1e-8 epsilon in each ratio); it can
    only be lower than or equal to the exact :func:`f1_max` and depends on scores being in [0, 1].
    """
    s, y = _pair(scores, labels)
    if not (isinstance(step, (int, float)) and 0 < step <= 1):
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    eps = 1e-8
    best = 0.0
    positives = y.sum()
    for t in np.arange(0.0, 1.0 + 1e-3, step):
        pred = s > t
        tp = np.logical_and(pred, y).sum()
        precision = tp / (pred.sum() + eps)
        recall = tp / (positives + eps)
        best = max(best, 2 * precision * recall / (precision + recall + eps))
    return float(best)


# ---------------------------------------------------------------------------------------- AUPRO


def _regions(masks: np.ndarray) -> Tuple[np.ndarray, int]:
    """Global region ids (0 = background) of 8-connected defect regions, labelled per image."""
    structure = np.ones((3, 3), dtype=bool)
    ids = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=structure)
        if n:
            ids[i] = np.where(lab > 0, lab + total, 0)
            total += n
    return ids, total


def pro_curve(pixel_scores: Any, pixel_masks: Any) -> Tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at every distinct score, from (0, 0) to (1, 1).

    PRO at a threshold is the mean, over every connected defect region of every image, of the
    fraction of that region's pixels scored >= the threshold; FPR is the fraction of defect-free
    pixels scored >= it.
    """
    scores = _scores(pixel_scores, "pixel_scores", ndim=3)
    masks = _labels(pixel_masks, "pixel_masks", ndim=3)
    if scores.shape != masks.shape:
        raise ValueError(f"pixel_scores has shape {scores.shape} but pixel_masks has shape {masks.shape}")
    _both_classes(masks.ravel(), "pixel_masks", "pixel")
    ids, n_regions = _regions(masks)
    ids = ids.ravel()
    sizes = np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    neg = ids == 0
    weight_pro = np.where(neg, 0.0, 1.0 / (n_regions * sizes[ids]))
    weight_fpr = neg / neg.sum()
    s = scores.ravel()
    order = np.argsort(-s, kind="stable")
    s = s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    fpr = np.r_[0.0, np.cumsum(weight_fpr[order])[last]]
    pro = np.r_[0.0, np.cumsum(weight_pro[order])[last]]
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def aupro(pixel_scores: Any, pixel_masks: Any, fpr_limit: float = DEFAULT_PRO_FPR) -> float:
    """Area under the PRO curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1]).

    Trapezoids between the exact curve points; the point at ``fpr_limit`` is linearly
    interpolated on the segment that crosses it.
    """
    if not is_number(fpr_limit) or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(pixel_scores, pixel_masks)
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:k] <= limit
    x, y = fpr[:k], pro[:k]
    if k < fpr.size and x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return min(max(area / fpr_limit, 0.0), 1.0)


# ---------------------------------------------------------------------------------------- contract


def image_scores_from_maps(maps: Any, pool: int = 21):
    """Image scores as the field computes them: max of the ``pool`` x ``pool`` average-pooled map.

    ``maps``: (N, H, W) torch tensor or array of per-pixel anomaly probabilities. Padding counts
    as zeros (as in DRAEM's evaluation code), so a defect at the border scores a little lower.
    """
    t = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    if t.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(t.shape)}")
    if not is_int(pool) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be an odd int >= 1, got {pool!r}")
    pooled = F.avg_pool2d(t[:, None].float(), pool, stride=1, padding=pool // 2)
    return pooled.flatten(1).amax(dim=1)


def detection_metrics(image_scores: Any, image_labels: Any, pixel_scores: Any, pixel_masks: Any, *,
                      pro_fpr_limit: float = DEFAULT_PRO_FPR, pixel_f1_grid: float | None = None) -> Dict[str, float]:
    """The seven detection metrics of one category as floats in [0, 1].

    ``image_scores`` (N,), ``image_labels`` (N,) bool or 0/1; ``pixel_scores`` (N, H, W),
    ``pixel_masks`` (N, H, W) bool or 0/1. Numpy arrays, torch tensors or sequences. Pixel
    metrics pool every pixel of the N images (defect-free images included). Keys:
    ``auroc_i, ap_i, f1max_i, auroc_p, ap_p, f1max_p, aupro``.

    ``pixel_f1_grid``: None (exact F1-max, the default) or a step such as 0.05 to reproduce the
    papers' grid (leaky protocol only). Raises ``ValueError``/``TypeError`` naming the argument for
    mismatched shapes, non-finite scores, labels that are not binary, or a missing class.
    """
    s_i = _scores(image_scores, "image_scores", ndim=1)
    y_i = _labels(image_labels, "image_labels", ndim=1)
    if s_i.shape != y_i.shape:
        raise ValueError(f"image_scores has {s_i.shape[0]} entries but image_labels has {y_i.shape[0]}")
    s_p = _scores(pixel_scores, "pixel_scores", ndim=3)
    y_p = _labels(pixel_masks, "pixel_masks", ndim=3)
    if s_p.shape != y_p.shape:
        raise ValueError(f"pixel_scores has shape {s_p.shape} but pixel_masks has shape {y_p.shape}")
    if s_p.shape[0] != s_i.shape[0]:
        raise ValueError(f"pixel_scores holds {s_p.shape[0]} images but image_scores has {s_i.shape[0]} entries")
    _both_classes(y_i, "image_labels", "image")
    _both_classes(y_p.ravel(), "pixel_masks", "pixel")
    if (y_p.reshape(len(y_p), -1).any(axis=1) & ~y_i).any():
        warnings.warn("some images labelled normal in image_labels have defect pixels in pixel_masks",
                      RuntimeWarning, stacklevel=2)
    out = {
        "auroc_i": auroc(s_i, y_i),
        "ap_i": average_precision(s_i, y_i),
        "f1max_i": f1_max(s_i, y_i),
        "auroc_p": auroc(s_p, y_p),
        "ap_p": average_precision(s_p, y_p),
        "f1max_p": f1_max(s_p, y_p) if pixel_f1_grid is None else f1_max_on_grid(s_p, y_p, pixel_f1_grid),
        "aupro": aupro(s_p, y_p, pro_fpr_limit),
    }
    return out
