"""Target masks ``M_T`` for one-to-more generation: where the new defects go.

Random affine copies of ``M_R`` placed on the object, Perlin-noise blobs, or masks from a folder.
Every generated mask is seeded per sample index (``numpy.random.default_rng([seed, index])``), so
mask ``i`` is the same whether a run makes 10 or 1000 masks, and a resumed run makes exactly the
masks a full run would have made. Masks are ``numpy`` bool arrays ``(H, W)`` in image space."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..checks import check_fraction, check_int, check_range, check_shape, sample_indices
from ..errors import InputError, MissingInputError
from .foreground import check_foreground
from .images import MASK_EXTENSIONS, image_files, load_mask, read_mask, to_mask
from .morphology import border_frame, frame_width, largest_component

__all__ = [
    "TargetMask",
    "MASK_KINDS",
    "affine_masks",
    "perlin_masks",
    "perlin_noise",
    "folder_masks",
    "target_masks",
]

MASK_KINDS = ("affine", "perlin", "folder")


@dataclass
class TargetMask:
    """One target mask ``M_T`` and how it was made (``params`` is JSON-serialisable, for the manifest)."""

    mask: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)


def _seed_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


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
    ref = read_mask(ref_mask, "ref_mask", allow_full=False)
    shape = ref.shape
    idx = sample_indices(n)
    fg = check_foreground(foreground, shape)
    seed = check_int("seed", seed, minimum=0)
    rotation = check_range("rotation", rotation)
    scale = check_range("scale", scale, positive=True)
    if not isinstance(flip, (bool, np.bool_)):
        raise TypeError(f"flip must be a bool, got {type(flip).__name__}")
    min_inside = check_fraction("min_inside", min_inside)
    max_border_touch = check_fraction("max_border_touch", max_border_touch)
    max_tries = check_int("max_tries", max_tries, minimum=1)

    ys, xs = np.nonzero(ref)
    ys, xs = ys.astype(np.float64), xs.astype(np.float64)
    c_src = np.array([ys.mean(), xs.mean()])
    fgy, fgx = np.nonzero(fg)
    frame = border_frame(shape, frame_width(shape))
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


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator,
                 octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``cells`` (rows, cols) lattice cells.

    Random unit gradients on the lattice, quintic fade, bilinear blend of the four corner dot
    products; extra octaves double the cells and scale the amplitude by ``persistence``.
    Values lie in about [-1, 1] (exactly 0 on lattice points).
    """
    h, w = check_shape("shape", shape)
    cy, cx = check_shape("cells", cells)
    octaves = check_int("octaves", octaves, minimum=1)
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
    shape = check_shape("shape", shape)
    idx = sample_indices(n)
    fg = check_foreground(foreground, shape)
    seed = check_int("seed", seed, minimum=0)
    c_lo, c_hi = check_range("cells", cells, positive=True)
    if c_lo != int(c_lo) or c_hi != int(c_hi):
        raise ValueError(f"cells must be whole numbers, got {cells!r}")
    octaves = check_int("octaves", octaves, minimum=1)
    a_lo, a_hi = check_range("area", area, low=0.0, high=1.0)
    if a_hi <= 0:
        raise ValueError(f"area must allow a non-empty mask, got {area!r}")
    max_border_touch = check_fraction("max_border_touch", max_border_touch)
    max_tries = check_int("max_tries", max_tries, minimum=1)

    total = shape[0] * shape[1]
    min_px, max_px = max(1, int(math.ceil(a_lo * total))), int(math.floor(a_hi * total))
    fg_px = int(fg.sum())
    if fg_px < min_px:
        raise InputError(f"foreground has {fg_px} pixels, fewer than the minimum Perlin mask area "
                         f"{min_px} ({a_lo:.1%} of the image); lower area[0] or use a larger foreground")
    frame = border_frame(shape, frame_width(shape))

    def draw(i: int, rng: np.random.Generator, tries: int) -> TargetMask | str:
        cell = (int(rng.integers(c_lo, c_hi + 1)), int(rng.integers(c_lo, c_hi + 1)))
        noise = perlin_noise(shape, cell, rng, octaves=octaves)
        target = float(rng.uniform(a_lo, a_hi))
        k = min(fg_px, max(1, int(round(target * total))))
        vals = noise[fg]
        thr = np.partition(vals, fg_px - k)[fg_px - k]
        blob = largest_component(fg & (noise >= thr))
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


def folder_masks(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> list[TargetMask]:
    """All masks in a folder (png/jpg/bmp/tif, sorted by file name), binarised and resized (nearest)
    to ``shape`` (H, W; None: each at its own size). Other files are ignored. Errors name the
    folder or file at fault; an empty mask is one."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    folder = Path(path)
    shape = None if shape is None else check_shape("shape", shape)
    if not folder.exists():
        raise MissingInputError(f"mask folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"mask folder is not a folder: {folder}")
    files = image_files(folder)
    if not files:
        others = sorted(f.name for f in folder.iterdir())[:10]
        raise InputError(f"mask folder {folder} holds no mask images ({', '.join(MASK_EXTENSIONS)})"
                         + (f"; found: {', '.join(others)}" if others else "; it is empty"))
    return [TargetMask(load_mask(f, shape), {"kind": "file", "index": k, "file": str(f)})
            for k, f in enumerate(files)]


def target_masks(kind: str, n: int | Sequence[int], *, ref_mask: Any = None,
                 shape: tuple[int, int] | None = None, foreground: Any = None, seed: int = 0,
                 folder: str | os.PathLike | None = None,
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
    idx = sample_indices(n)
    found = folder_masks(folder, shape)
    out = []
    for i in idx:
        src = found[i % len(found)]
        out.append(TargetMask(src.mask.copy(), {**src.params, "index": i, "file_index": src.params["index"]}))
    return out
