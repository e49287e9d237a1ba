"""Target masks for one-to-more generation, and loading of user images and masks.

O2MAG paints the reference defect (mask ``M_R``) at many new places ``M_T``. This module makes
those target masks without diffusers: random affine copies of ``M_R`` placed on the object,
Perlin-noise blobs, or masks from a folder. Every generated mask is seeded per sample index
(``numpy.random.default_rng([seed, index])``), so mask ``i`` is the same whether a run makes 10 or
1000 masks, and a resumed run makes exactly the masks a full run would have made.

All masks are ``numpy`` bool arrays of shape ``(H, W)`` in image space. Only numpy and Pillow are
used (connected components, hole filling, Otsu and Perlin noise are small numpy routines here).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError, MissingInputError, existing_path

__all__ = [
    "TargetMask",
    "MASK_EXTENSIONS",
    "foreground_mask",
    "resolve_foreground",
    "affine_masks",
    "perlin_masks",
    "perlin_noise",
    "folder_masks",
    "target_masks",
    "MASK_KINDS",
    "load_mask",
    "load_image",
    "to_mask",
    "resize_mask",
    "resize_image",
]

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_KINDS = ("affine", "perlin", "folder")


@dataclass
class TargetMask:
    """One target mask ``M_T`` and how it was made (``params`` is JSON-serialisable, for the manifest)."""

    mask: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 positive: bool = False) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers (min, max), got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise ValueError(f"{name} must be a finite pair with min <= max, got {value!r}")
    if positive and a <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if (low is not None and a < low) or (high is not None and b > high):
        raise ValueError(f"{name} must lie within [{low}, {high}], got {value!r}")
    return a, b


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_shape(name: str, shape: Any) -> tuple[int, int]:
    try:
        h, w = shape
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (height, width), got {shape!r}") from None
    h = _check_int(f"{name}[0]", h, minimum=1)
    w = _check_int(f"{name}[1]", w, minimum=1)
    return h, w


def to_mask(value: Any, name: str = "mask") -> np.ndarray:
    """Turn a bool/0-1/0-255 array or a PIL image into a bool ``(H, W)`` array (>127 for uint8).

    The one mask reader of o2mag (files go through :func:`load_mask`, which ends here too): PIL
    images are read as mask files are (16-bit modes, alpha drawn on black); arrays may be (H, W),
    (1, H, W) or (H, W, 1) (a 3-channel array is refused: it is more likely an image than a mask).
    """
    if isinstance(value, Image.Image):
        return _image_to_mask(value)
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.copy()
    if arr.dtype == np.uint8:
        return arr > 127
    if np.issubdtype(arr.dtype, np.number):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} holds NaN or Inf")
        return arr > 0.5
    raise TypeError(f"{name} must be a bool or numeric array, got dtype {arr.dtype}")


def _seed_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _indices(n: int | Sequence[int]) -> list[int]:
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool):
        return list(range(_check_int("n", n, minimum=0)))
    try:
        idx = [_check_int("n[i] (sample index)", i, minimum=0) for i in n]
    except TypeError as exc:
        if "not iterable" in str(exc):
            raise TypeError(f"n must be an int or a sequence of sample indices, "
                            f"got {type(n).__name__}") from None
        raise
    if len(set(idx)) != len(idx):
        raise ValueError("n: sample indices must be distinct")
    return idx


# ----------------------------------------------------------------------------------------------
# small image-processing helpers (numpy only)


def _label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = _label(mask, 8)
    if sizes.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (4-connected) that do not reach the image border."""
    labels, _ = _label(~mask, 4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
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


def _otsu_threshold(grey: np.ndarray) -> float | None:
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


def _border_frame(shape: tuple[int, int], width: int) -> np.ndarray:
    h, w = shape
    frame = np.zeros(shape, dtype=bool)
    width = max(1, min(width, (min(h, w) + 1) // 2))
    frame[:width] = frame[-width:] = True
    frame[:, :width] = frame[:, -width:] = True
    return frame


def _frame_width(shape: tuple[int, int]) -> int:
    return max(1, int(round(0.02 * min(shape))))


# ----------------------------------------------------------------------------------------------
# foreground


def _as_rgb_array(image: Any, name: str = "normal_image") -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be a PIL image or an HxWx3 uint8 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"{name} array must be uint8, got {arr.dtype}")
    return arr[..., :3]


def foreground_mask(normal_image: Any, method: str = "otsu", *, min_fraction: float = 0.02,
                    max_border_fraction: float = 0.3, return_reason: bool = False):
    """Estimate where the object is in a normal image, so target masks land on the object.

    ``method="all"`` returns all-ones (texture categories: carpet, grid, leather, tile, wood, and
    any image you want fully usable). ``method="otsu"`` is a heuristic for an object on a plain
    background: grey image, light 5x5 box blur, Otsu threshold; the class that covers less of the
    image border is the object; keep the largest 8-connected component and fill its holes.

    It falls back to all-ones when the estimate is degenerate, which also covers textures: the
    image is (nearly) constant; the object class covers more than ``max_border_fraction`` of the
    border frame (no clear background around it); or the object covers less than
    ``min_fraction`` of the image. With ``return_reason=True`` it returns ``(mask, reason)``.
    """
    if method not in ("otsu", "all"):
        raise ValueError(f"method must be 'otsu' or 'all', got {method!r}")
    min_fraction = _check_fraction("min_fraction", min_fraction)
    max_border_fraction = _check_fraction("max_border_fraction", max_border_fraction)
    rgb = _as_rgb_array(normal_image)
    shape = rgb.shape[:2]

    def done(mask: np.ndarray, reason: str):
        return (mask, reason) if return_reason else mask

    ones = np.ones(shape, dtype=bool)
    if method == "all":
        return done(ones, "all: whole image")
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = _box_blur(grey, 2)
    t = _otsu_threshold(np.rint(grey))
    if t is None or grey.max() - grey.min() < 8:
        return done(ones, "fallback to all: image is nearly constant")
    bright = grey > t
    frame = _border_frame(shape, _frame_width(shape))
    fg = bright if bright[frame].mean() <= 0.5 else ~bright
    border_share = float(fg[frame].mean())
    if border_share > max_border_fraction:
        return done(ones, f"fallback to all: object class covers {border_share:.0%} of the border")
    fg = _fill_holes(_largest_component(fg))
    frac = float(fg.mean())
    if frac < min_fraction:
        return done(ones, f"fallback to all: object covers only {frac:.1%} of the image")
    return done(fg, f"otsu: object covers {frac:.1%} of the image")


def resolve_foreground(spec: Any, normal_image: Any = None,
                       shape: tuple[int, int] | None = None) -> np.ndarray:
    """Foreground from a user setting: ``None``/``"all"`` (all-ones), ``"otsu"`` (estimated from
    ``normal_image``), a mask file path, or a mask array. ``shape`` (H, W), default the normal
    image's size: file and ``"otsu"`` masks are resized to it (nearest), arrays must match it."""
    if shape is None and normal_image is not None:
        shape = _as_rgb_array(normal_image).shape[:2]
    if spec is None or (isinstance(spec, str) and spec == "all"):
        if shape is None:
            raise ValueError("shape or normal_image is needed for an all-ones foreground")
        return np.ones(_check_shape("shape", shape), dtype=bool)
    if isinstance(spec, str) and spec == "otsu":
        if normal_image is None:
            raise ValueError("normal_image is needed for foreground='otsu'")
        return resize_mask(foreground_mask(normal_image, "otsu"), shape)
    if isinstance(spec, (str, os.PathLike)):
        return load_mask(spec, shape)
    mask = to_mask(spec, "foreground")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"foreground has shape {mask.shape}, expected {tuple(shape)}")
    if not mask.any():
        raise InputError("foreground mask is empty")
    return mask


def _check_foreground(foreground: Any, shape: tuple[int, int]) -> np.ndarray:
    if foreground is None:
        return np.ones(shape, dtype=bool)
    fg = to_mask(foreground, "foreground")
    if fg.shape != shape:
        raise ValueError(f"foreground has shape {fg.shape} but the masks have shape {shape}")
    if not fg.any():
        raise InputError("foreground mask is empty: no place for a target mask")
    return fg


def _reject_message(what: str, tries: int, reasons: dict[str, int]) -> str:
    parts = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"no valid {what} found after {tries} tries ({parts}); " \
           "loosen the limits, use a larger foreground, or a smaller mask"


def _rejection_sample(kind: str, what: str, idx: list[int], seed: int, max_tries: int,
                      draw) -> list[TargetMask]:
    """Seeded rejection sampling shared by the mask makers: for sample ``i`` the rng is
    ``default_rng([seed, i])`` and ``draw(i, rng, tries)`` returns a :class:`TargetMask` or the
    reason (str) it rejected this try; after ``max_tries`` rejections an ``InputError`` counts them."""
    out: list[TargetMask] = []
    for i in idx:
        rng = _seed_rng(seed, i)
        reasons: dict[str, int] = {}
        for tries in range(1, max_tries + 1):
            got = draw(i, rng, tries)
            if isinstance(got, str):
                reasons[got] = reasons.get(got, 0) + 1
                continue
            out.append(got)
            break
        else:
            raise InputError(f"{kind} mask {i}: " + _reject_message(what, max_tries, reasons))
    return out


# ----------------------------------------------------------------------------------------------
# affine copies of M_R


def _affine_render(ys: np.ndarray, xs: np.ndarray, ref: np.ndarray, c_src: np.ndarray, c_dst: np.ndarray,
                   angle: float, scale: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Place ``ref`` (pixels ys, xs) rotated/scaled/flipped about its centroid at ``c_dst``.

    Returns (mask, forward-mapped pixel centres). The mask is the union of inverse nearest
    sampling (no holes when enlarging) and forward splatting (thin lines survive shrinking).
    """
    h, w = ref.shape
    th = math.radians(angle)
    cos, sin = math.cos(th), math.sin(th)
    fx = -1.0 if flip else 1.0
    # forward: p' = c_dst + s * R @ F @ (p - c_src), p = (y, x)
    dy, dx = ys - c_src[0], (xs - c_src[1]) * fx
    fy_ = c_dst[0] + scale * (cos * dy - sin * dx)
    fx_ = c_dst[1] + scale * (sin * dy + cos * dx)
    out = np.zeros((h, w), dtype=bool)
    iy, ix = np.rint(fy_).astype(np.int64), np.rint(fx_).astype(np.int64)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    out[iy[ok], ix[ok]] = True
    # inverse nearest over the bounding box of the forward points
    if ok.any():
        y0, y1 = max(0, int(fy_.min()) - 2), min(h, int(math.ceil(fy_.max())) + 3)
        x0, x1 = max(0, int(fx_.min()) - 2), min(w, int(math.ceil(fx_.max())) + 3)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        ry, rx = (gy - c_dst[0]) / scale, (gx - c_dst[1]) / scale
        sy = cos * ry + sin * rx
        sx = -sin * ry + cos * rx
        sy, sx = np.rint(sy + c_src[0]).astype(np.int64), np.rint(sx * fx + c_src[1]).astype(np.int64)
        inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        hit = np.zeros_like(inside)
        hit[inside] = ref[sy[inside], sx[inside]]
        out[y0:y1, x0:x1] |= hit
    return out, np.stack([fy_, fx_])


def affine_masks(ref_mask: Any, n: int | Sequence[int], *, foreground: Any = None, seed: int = 0,
                 rotation: tuple[float, float] = (-180.0, 180.0), scale: tuple[float, float] = (0.7, 1.3),
                 flip: bool = True, min_inside: float = 0.9, max_border_touch: float = 0.1,
                 max_tries: int = 200) -> list[TargetMask]:
    """Random affine copies of ``M_R`` on the object: rotation, scale, horizontal flip, translation.

    ``n`` is a count (sample indices ``0..n-1``) or an explicit list of sample indices (resume).
    Mask ``i`` uses ``default_rng([seed, i])``. Each copy is rotated and scaled about the
    centroid of ``M_R`` and moved so that the centroid lands on a uniformly drawn foreground
    pixel. A draw is rejected and redrawn when: the copy is empty; less than ``min_inside`` of
    it lies on the foreground; or more than ``max_border_touch`` of it falls outside the image
    or within the 2% border frame. Accepted copies are cut to the foreground, so every returned
    mask lies inside it. Raises ``InputError`` if ``M_R`` is empty or no valid placement is found
    in ``max_tries`` draws (the message counts the reasons).
    """
    ref = to_mask(ref_mask, "ref_mask")
    shape = ref.shape
    if not ref.any():
        raise InputError("ref_mask (M_R) is empty: the reference defect mask has no pixels")
    idx = _indices(n)
    fg = _check_foreground(foreground, shape)
    seed = _check_int("seed", seed, minimum=0)
    rotation = _check_range("rotation", rotation)
    scale = _check_range("scale", scale, positive=True)
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"flip must be a bool, got {type(flip).__name__}")
    min_inside = _check_fraction("min_inside", min_inside)
    max_border_touch = _check_fraction("max_border_touch", max_border_touch)
    max_tries = _check_int("max_tries", max_tries, minimum=1)

    ys, xs = np.nonzero(ref)
    ys, xs = ys.astype(np.float64), xs.astype(np.float64)
    c_src = np.array([ys.mean(), xs.mean()])
    fgy, fgx = np.nonzero(fg)
    frame = _border_frame(shape, _frame_width(shape))
    h, w = shape

    def draw(i: int, rng: np.random.Generator, tries: int) -> TargetMask | str:
        angle = float(rng.uniform(*rotation))
        s = float(rng.uniform(*scale))
        flipped = bool(flip and rng.random() < 0.5)
        k = int(rng.integers(len(fgy)))
        c_dst = np.array([fgy[k], fgx[k]], dtype=np.float64)
        m, pts = _affine_render(ys, xs, ref, c_src, c_dst, angle, s, flipped)
        area = int(m.sum())
        if area == 0:
            return "empty"
        iy, ix = np.rint(pts[0]).astype(np.int64), np.rint(pts[1]).astype(np.int64)
        off = (iy < 0) | (iy >= h) | (ix < 0) | (ix >= w)
        near = np.zeros_like(off)
        near[~off] = frame[iy[~off], ix[~off]]
        # share of M_R's pixels mapped off the image or into the frame, and share of the
        # drawn mask in the frame (they differ when enlarging adds pixels): the larger counts
        touch = max(float((off | near).mean()), float((m & frame).sum()) / area)
        if touch > max_border_touch:
            return "touching the image border"
        inside = float((m & fg).sum()) / area
        if inside < min_inside:
            return f"less than {min_inside:.0%} on the foreground"
        final = m & fg
        return TargetMask(final, {
            "kind": "affine", "index": i, "seed": seed, "tries": tries,
            "angle": round(angle, 4), "scale": round(s, 4), "flip": flipped,
            "shift": [round(float(c_dst[0] - c_src[0]), 3), round(float(c_dst[1] - c_src[1]), 3)],
            "center": [int(c_dst[0]), int(c_dst[1])], "area": int(final.sum()),
            "inside_foreground": round(inside, 4), "border_touch": round(touch, 4),
        })

    return _rejection_sample("affine", "placement", idx, seed, max_tries, draw)


# ----------------------------------------------------------------------------------------------
# Perlin-noise masks


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator,
                 octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``cells`` (rows, cols) lattice cells.

    Random unit gradients on the lattice, quintic fade, bilinear blend of the four corner dot
    products; extra octaves double the cells and scale the amplitude by ``persistence``.
    Values lie in about [-1, 1] (exactly 0 on lattice points).
    """
    h, w = _check_shape("shape", shape)
    cy, cx = _check_shape("cells", cells)
    octaves = _check_int("octaves", octaves, minimum=1)
    total = np.zeros((h, w))
    amp = 1.0
    for _ in range(octaves):
        ang = rng.uniform(0, 2 * np.pi, size=(cy + 1, cx + 1))
        gy, gx = np.sin(ang), np.cos(ang)
        y = (np.arange(h) + 0.5) * cy / h
        x = (np.arange(w) + 0.5) * cx / w
        y0 = np.minimum(np.floor(y).astype(np.int64), cy - 1)
        x0 = np.minimum(np.floor(x).astype(np.int64), cx - 1)
        ty, tx = (y - y0)[:, None], (x - x0)[None, :]

        def dot(oy: int, ox: int) -> np.ndarray:
            # gather lattice rows first (H x cells), then columns: far cheaper than 2-D indexing
            ry, rx = gy[y0 + oy], gx[y0 + oy]
            return np.take(ry, x0 + ox, axis=1) * (ty - oy) + np.take(rx, x0 + ox, axis=1) * (tx - ox)

        uy, ux = _fade(ty), _fade(tx)
        top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
        bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
        total += amp * ((1 - uy) * top + uy * bottom) * math.sqrt(2)
        amp *= persistence
        cy, cx = cy * 2, cx * 2
    return total


def perlin_masks(shape: tuple[int, int], n: int | Sequence[int], *, foreground: Any = None, seed: int = 0,
                 cells: tuple[int, int] = (2, 6), octaves: int = 2, area: tuple[float, float] = (0.005, 0.10),
                 max_border_touch: float = 0.1, max_tries: int = 100) -> list[TargetMask]:
    """Perlin-noise blobs inside the foreground (irregular stains, dents, contamination).

    For sample ``i`` (rng ``default_rng([seed, i])``): draw a lattice of ``cells`` rows/cols each
    in the range, make fractal noise, draw a target area in ``area`` (fractions of the image),
    threshold the noise on the foreground at the matching quantile and keep the largest blob. A
    draw is rejected when the blob's area is outside ``area`` or more than ``max_border_touch``
    of it lies in the 2% border frame. Masks always lie inside the foreground. Raises
    ``InputError`` when the foreground is smaller than the minimum area or no draw passes.
    """
    shape = _check_shape("shape", shape)
    idx = _indices(n)
    fg = _check_foreground(foreground, shape)
    seed = _check_int("seed", seed, minimum=0)
    c_lo, c_hi = _check_range("cells", cells, positive=True)
    if c_lo != int(c_lo) or c_hi != int(c_hi):
        raise ValueError(f"cells must be whole numbers, got {cells!r}")
    octaves = _check_int("octaves", octaves, minimum=1)
    a_lo, a_hi = _check_range("area", area, low=0.0, high=1.0)
    if a_hi <= 0:
        raise ValueError(f"area must allow a non-empty mask, got {area!r}")
    max_border_touch = _check_fraction("max_border_touch", max_border_touch)
    max_tries = _check_int("max_tries", max_tries, minimum=1)

    total = shape[0] * shape[1]
    min_px, max_px = max(1, int(math.ceil(a_lo * total))), int(math.floor(a_hi * total))
    fg_px = int(fg.sum())
    if fg_px < min_px:
        raise InputError(f"foreground has {fg_px} pixels, fewer than the minimum Perlin mask area "
                         f"{min_px} ({a_lo:.1%} of the image); lower area[0] or use a larger foreground")
    frame = _border_frame(shape, _frame_width(shape))

    def draw(i: int, rng: np.random.Generator, tries: int) -> TargetMask | str:
        cell = (int(rng.integers(c_lo, c_hi + 1)), int(rng.integers(c_lo, c_hi + 1)))
        noise = perlin_noise(shape, cell, rng, octaves=octaves)
        target = float(rng.uniform(a_lo, a_hi))
        k = min(fg_px, max(1, int(round(target * total))))
        vals = noise[fg]
        thr = np.partition(vals, fg_px - k)[fg_px - k]
        blob = _largest_component(fg & (noise >= thr))
        a = int(blob.sum())
        if not (min_px <= a <= max_px):
            return "blob area out of range"
        touch = float((blob & frame).sum()) / a
        if touch > max_border_touch:
            return "touching the image border"
        return TargetMask(blob, {
            "kind": "perlin", "index": i, "seed": seed, "tries": tries, "cells": list(cell),
            "octaves": octaves, "target_area": round(target, 5), "threshold": round(float(thr), 5),
            "area": a, "border_touch": round(touch, 4),
        })

    return _rejection_sample("perlin", "mask", idx, seed, max_tries, draw)


# ----------------------------------------------------------------------------------------------
# files


def _open_image(p: Path, what: str) -> Image.Image:
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {what} {p}: {exc}") from None


def _size_arg(size: Any) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        s = _check_int("size", size, minimum=1)
        return s, s
    try:
        w, h = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or (width, height), got {size!r}") from None
    return _check_int("size[0] (width)", w, minimum=1), _check_int("size[1] (height)", h, minimum=1)


def resize_image(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """``image`` as RGB at ``size`` (int or (width, height)), bicubic; the one image resizer."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    wh = _size_arg(size)
    img = image.convert("RGB")
    return img if img.size == wh else img.resize(wh, Image.BICUBIC)


def resize_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """A mask (anything :func:`to_mask` takes) as bool ``shape`` (H, W), nearest neighbour (no
    blending across the edge); the one mask resizer."""
    m = to_mask(mask, "mask")
    h, w = _check_shape("shape", shape)
    if m.shape == (h, w):
        return m
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image file as RGB; ``size`` (int or (width, height)) resizes it with bicubic."""
    p = existing_path(path, "image")
    img = _open_image(p, "image").convert("RGB")
    return img if size is None else resize_image(img, size)


def _image_to_mask(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return arr > (127 if arr.max() <= 255 else 32767)
    if img.mode in ("RGBA", "LA", "PA") and np.asarray(img.getchannel("A")).min() < 255 \
            and np.asarray(img.convert("L")).max() <= 127:
        return np.asarray(img.getchannel("A")) > 127  # mask drawn as alpha on black
    return np.asarray(img.convert("L")) > 127


def load_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None, *, resize: bool = True,
              allow_empty: bool = False) -> np.ndarray:
    """Read a binary mask file (pixel > 127 is True) as a bool ``(H, W)`` array.

    ``shape`` (H, W): resize with nearest when ``resize`` is True, else raise ``InputError`` when
    the file has another size (e.g. a mask that does not belong to the image). An empty mask
    raises ``InputError`` unless ``allow_empty``.
    """
    p = existing_path(path, "mask")
    img = _open_image(p, "mask")
    if shape is not None:
        h, w = _check_shape("shape", shape)
        if img.size != (w, h):
            if not resize:
                raise InputError(f"mask {p} is {img.size[1]}x{img.size[0]} (HxW) but the image is {h}x{w}")
            img = img.convert("L") if img.mode not in ("L", "1") else img
            img = img.resize((w, h), Image.NEAREST)
    mask = _image_to_mask(img)
    if not allow_empty and not mask.any():
        raise InputError(f"mask {p} is empty (no pixel above 127)")
    return mask


def folder_masks(path: str | os.PathLike, shape: tuple[int, int]) -> list[TargetMask]:
    """All masks in a folder (png/jpg/bmp/tif, sorted by file name), binarised and resized (nearest)
    to ``shape`` (H, W). Other files are ignored. Errors name the folder or file at fault."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    folder = Path(path)
    shape = _check_shape("shape", shape)
    if not folder.exists():
        raise MissingInputError(f"mask folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"mask folder is not a folder: {folder}")
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in MASK_EXTENSIONS)
    if not files:
        others = sorted(f.name for f in folder.iterdir())[:10]
        raise InputError(f"mask folder {folder} holds no mask images ({', '.join(MASK_EXTENSIONS)})"
                         + (f"; found: {', '.join(others)}" if others else "; it is empty"))
    return [TargetMask(load_mask(f, shape), {"kind": "file", "index": k, "file": str(f)})
            for k, f in enumerate(files)]


def target_masks(kind: str, n: int | Sequence[int], *, ref_mask: Any = None,
                 shape: tuple[int, int] | None = None, foreground: Any = None, seed: int = 0, folder: str | os.PathLike | None = None,
                 **options: Any) -> list[TargetMask]:
    """One entry point for the three kinds of target masks (what the command line calls).

    ``kind="affine"`` needs ``ref_mask``; ``"perlin"`` needs ``shape`` (or ``ref_mask`` for its
    shape); ``"folder"`` needs ``folder`` and ``shape`` (or ``ref_mask``), and sample ``i`` gets
    the folder's mask ``i % count`` (masks are reused in turn when ``n`` exceeds the folder).
    ``options`` go to :func:`affine_masks` / :func:`perlin_masks`.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MASK_KINDS)}, got {kind!r}")
    if shape is None and ref_mask is not None:
        shape = to_mask(ref_mask, "ref_mask").shape
    if kind == "affine":
        if ref_mask is None:
            raise ValueError("ref_mask is needed for affine target masks")
        return affine_masks(ref_mask, n, foreground=foreground, seed=seed, **options)
    if shape is None:
        raise ValueError(f"shape (or ref_mask) is needed for {kind} target masks")
    if kind == "perlin":
        return perlin_masks(shape, n, foreground=foreground, seed=seed, **options)
    if options:
        raise TypeError(f"folder masks take no options, got {sorted(options)}")
    if folder is None:
        raise ValueError("folder is needed for folder target masks")
    idx = _indices(n)
    found = folder_masks(folder, shape)
    out = []
    for i in idx:
        src = found[i % len(found)]
        out.append(TargetMask(src.mask.copy(), {**src.params, "index": i, "file_index": src.params["index"]}))
    return out
