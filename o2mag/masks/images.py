"""Image and mask files and arrays: reading, converting to bool masks, resizing.

One reader for every path a mask can take (a file, a PIL image, an array), so the command line, the
pipeline and the mask makers agree on what a mask pixel is: > 127 for 8-bit data, > 0.5 for
floats, 16-bit masks and masks drawn as alpha on black included. Images are RGB, resized bicubic;
masks are resized nearest (no blending across the edge)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..checks import check_int, check_shape, is_int
from ..errors import InputError, existing_path

__all__ = [
    "MASK_EXTENSIONS",
    "image_files",
    "to_mask",
    "load_image",
    "load_mask",
    "resize_image",
    "resize_mask",
]

MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File name endings read as images or masks (lower case)."""


def image_files(folder: Path, extensions: tuple[str, ...] = MASK_EXTENSIONS) -> list[Path]:
    """The image files of ``folder`` in name order: files whose ending (any case) is one of
    ``extensions``, hidden files (``.name``) skipped; the one way o2mag lists a folder of images."""
    return sorted(f for f in Path(folder).iterdir()
                  if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions)


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


def _image_to_mask(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        return arr > (127 if arr.max() <= 255 else 32767)
    if img.mode in ("RGBA", "LA", "PA") and np.asarray(img.getchannel("A")).min() < 255 \
            and np.asarray(img.convert("L")).max() <= 127:
        return np.asarray(img.getchannel("A")) > 127  # mask drawn as alpha on black
    return np.asarray(img.convert("L")) > 127


def _open_image(p: Path, what: str) -> Image.Image:
    try:
        with Image.open(p) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read {what} {p}: {exc}") from None


def _size_arg(size: Any) -> tuple[int, int]:
    if is_int(size):
        s = check_int("size", size, minimum=1)
        return s, s
    try:
        w, h = size
    except (TypeError, ValueError):
        raise TypeError(f"size must be an int or (width, height), got {size!r}") from None
    return check_int("size[0] (width)", w, minimum=1), check_int("size[1] (height)", h, minimum=1)


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
    h, w = check_shape("shape", shape)
    if m.shape == (h, w):
        return m
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open an image file as RGB; ``size`` (int or (width, height)) resizes it with bicubic."""
    p = existing_path(path, "image")
    img = _open_image(p, "image").convert("RGB")
    return img if size is None else resize_image(img, size)


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
        h, w = check_shape("shape", shape)
        if img.size != (w, h):
            if not resize:
                raise InputError(f"mask {p} is {img.size[1]}x{img.size[0]} (HxW) but the image is {h}x{w}")
            img = img.convert("L") if img.mode not in ("L", "1") else img
            img = img.resize((w, h), Image.NEAREST)
    mask = _image_to_mask(img)
    if not allow_empty and not mask.any():
        raise InputError(f"mask {p} is empty (no pixel above 127)")
    return mask
