"""Small image-processing helpers on bool/grey numpy arrays (no SciPy or OpenCV needed):
connected components, hole filling, box blur, Otsu's threshold and the image's border frame."""

from __future__ import annotations

import numpy as np

__all__ = [
    "label",
    "largest_component",
    "fill_holes",
    "box_blur",
    "otsu_threshold",
    "border_frame",
    "frame_width",
]


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool image: (labels int32 with 0 = background, sizes[label]).

    Works on runs of True pixels per row and a union-find over runs, so the Python loop is over
    runs, not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    sr, sc = np.nonzero(d == 1)
    er, ec = np.nonzero(d == -1)  # ends are exclusive
    n = len(sr)
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, np.zeros(1, dtype=np.int64)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    slack = 1 if connectivity == 8 else 0
    row_start = np.searchsorted(sr, np.arange(h + 1))
    cs, ce = sc.tolist(), ec.tolist()
    for r in range(1, h):
        i, i_end = int(row_start[r - 1]), int(row_start[r])
        j, j_end = i_end, int(row_start[r + 1])
        while i < i_end and j < j_end:
            if cs[i] < ce[j] + slack and cs[j] < ce[i] + slack:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ce[i] < ce[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(k) for k in range(n)])
    _, comp = np.unique(roots, return_inverse=True)
    comp = comp.astype(np.int32) + 1
    lengths = ec - sc
    flat_start = sr * w + sc
    offsets = np.repeat(flat_start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    flat = np.arange(int(lengths.sum())) + offsets
    labels.reshape(-1)[flat] = np.repeat(comp, lengths)
    sizes = np.bincount(comp, weights=lengths, minlength=int(comp.max()) + 1).astype(np.int64)
    sizes[0] = 0
    return labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = label(mask, 8)
    if sizes.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (4-connected) that do not reach the image border."""
    labels, _ = label(~mask, 4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding (radius 0 = identity)."""
    if radius <= 0:
        return img
    k = 2 * radius + 1
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        p = np.pad(out, pad, mode="edge")
        c = np.cumsum(p, axis=axis)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        out = (hi - lo) / k
    return out


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
