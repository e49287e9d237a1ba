"""Small image-processing helpers on bool/grey numpy arrays: connected components, hole filling
and the box blur from ``scipy.ndimage``; Otsu's threshold and the image's border frame."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "label",
    "largest_component",
    "fill_holes",
    "box_blur",
    "otsu_threshold",
    "border_frame",
    "frame_width",
]

_CONNECTIVITY = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool image: (labels int32 with 0 = background, sizes[label]),
    numbered in raster order of each component's first pixel (``scipy.ndimage.label``).
    ``connectivity``: 8 (diagonal neighbours join) or 4."""
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY[8 if connectivity == 8 else 4])
    sizes = np.bincount(labels.ravel(), minlength=n + 1).astype(np.int64)
    sizes[0] = 0
    return labels.astype(np.int32, copy=False), sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component (the first in raster order on a tie); empty if none."""
    labels, sizes = label(mask, 8)
    if sizes.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (4-connected) that do not reach the image border
    (``scipy.ndimage.binary_fill_holes``)."""
    return ndimage.binary_fill_holes(mask, structure=_CONNECTIVITY[4])


def box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2 radius + 1)-pixel square, edges repeated (``scipy.ndimage.uniform_filter``,
    float64); radius 0 = identity."""
    if radius <= 0:
        return img
    return ndimage.uniform_filter(np.asarray(img, dtype=np.float64), size=2 * radius + 1, mode="nearest")


def otsu_threshold(grey: np.ndarray) -> float | None:
    """Otsu threshold on a uint8-range grey image; None when the image is (nearly) constant."""
    hist = np.bincount(np.clip(grey, 0, 255).astype(np.int64).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None
    mu0 = np.where(valid, m0 / np.maximum(w0, 1), 0)
    mu1 = np.where(valid, (m0[-1] - m0) / np.maximum(w1, 1), 0)
    between = np.where(valid, w0 * w1 * (mu0 - mu1) ** 2, -1)
    return float(np.argmax(between))


def border_frame(shape: tuple[int, int], width: int) -> np.ndarray:
    h, w = shape
    frame = np.zeros(shape, dtype=bool)
    width = max(1, min(width, (min(h, w) + 1) // 2))
    frame[:width] = frame[-width:] = True
    frame[:, :width] = frame[:, -width:] = True
    return frame


def frame_width(shape: tuple[int, int]) -> int:
    return max(1, int(round(0.02 * min(shape))))
