"""Where the object is in a normal image, so target masks land on the object and not on the
background (``--foreground``: ``otsu`` estimate, ``all``, or a mask file)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from ..checks import check_fraction, check_shape
from .images import read_mask, resize_mask, to_mask
from .morphology import border_frame, box_blur, fill_holes, frame_width, largest_component, otsu_threshold

__all__ = [
    "foreground_mask",
    "resolve_foreground",
    "check_foreground",
]


def as_rgb_array(image: Any, name: str = "normal_image") -> np.ndarray:
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
    min_fraction = check_fraction("min_fraction", min_fraction)
    max_border_fraction = check_fraction("max_border_fraction", max_border_fraction)
    rgb = as_rgb_array(normal_image)
    shape = rgb.shape[:2]

    def done(mask: np.ndarray, reason: str):
        return (mask, reason) if return_reason else mask

    ones = np.ones(shape, dtype=bool)
    if method == "all":
        return done(ones, "all: whole image")
    grey = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = box_blur(grey, 2)
    t = otsu_threshold(np.rint(grey))
    if t is None or grey.max() - grey.min() < 8:
        return done(ones, "fallback to all: image is nearly constant")
    bright = grey > t
    frame = border_frame(shape, frame_width(shape))
    fg = bright if bright[frame].mean() <= 0.5 else ~bright
    border_share = float(fg[frame].mean())
    if border_share > max_border_fraction:
        return done(ones, f"fallback to all: object class covers {border_share:.0%} of the border")
    fg = fill_holes(largest_component(fg))
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
        shape = as_rgb_array(normal_image).shape[:2]
    if spec is None or (isinstance(spec, str) and spec == "all"):
        if shape is None:
            raise ValueError("shape or normal_image is needed for an all-ones foreground")
        return np.ones(check_shape("shape", shape), dtype=bool)
    if isinstance(spec, str) and spec == "otsu":
        if normal_image is None:
            raise ValueError("normal_image is needed for foreground='otsu'")
        return resize_mask(foreground_mask(normal_image, "otsu"), shape)
    if isinstance(spec, (str, os.PathLike)):
        return read_mask(spec, "foreground", shape=shape)
    mask = to_mask(spec, "foreground")
    if shape is not None and mask.shape != tuple(shape):
        raise ValueError(f"foreground has shape {mask.shape}, expected {tuple(shape)}")
    return read_mask(spec, "foreground")


def check_foreground(foreground: Any, shape: tuple[int, int]) -> np.ndarray:
    """The foreground a mask maker was given (None: the whole image), read by
    :func:`~.images.read_mask`: it must have ``shape`` and must not be empty."""
    if foreground is None:
        return np.ones(shape, dtype=bool)
    fg = to_mask(foreground, "foreground")
    if fg.shape != shape:
        raise ValueError(f"foreground has shape {fg.shape} but the masks have shape {shape}")
    return read_mask(fg, "foreground")
