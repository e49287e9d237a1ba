"""Image and mask files and arrays: reading, converting to bool masks, resizing.

One rule for what a mask pixel is, for every form a mask can take (a file, a PIL image of any mode,
a numpy array or torch tensor of any bool, integer or float dtype): see :func:`to_mask`. The
command line, the pipeline and the mask makers all read masks here (:func:`read_mask` is the
checked reader: it names the argument and refuses empty masks). Images are RGB, resized bicubic;
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
    "MASK_SCALES",
    "to_mask",
    "read_mask",
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


MASK_SCALES = (1, 255, 65535)
"""The value ranges a mask may use: 0/1 (or [0, 1] floats), 0-255 (8-bit) and 0-65535 (16-bit)."""


def to_mask(value: Any, name: str = "mask") -> np.ndarray:
    """Turn any in-memory mask into a bool ``(H, W)`` array, by o2mag's one mask rule.

    The rule, the same for every type (bool, integers of any width, floats; numpy arrays, torch
    tensors, PIL images of any mode): bool is itself; otherwise the values' range is the smallest
    of 0-1, 0-255 and 0-65535 that holds the largest value, and a pixel is set when it is above
    half of it. So 0/1 and 0/255 masks both work, in ``uint8``, ``int64`` or ``float32`` alike;
    a value below 0, NaN, Inf or above 65535 is an error. PIL images: mode ``1`` is bool, ``P`` is
    read by its colours, an image with transparency whose colours are all dark (<= 127) by its
    alpha channel (a mask drawn as alpha on black), any other by its grey level (``L``) or its
    16-bit / float values (``I``, ``I;16``, ``F``). Arrays may be (H, W), (1, H, W), (1, 1, H, W)
    or (H, W, 1); a 3-channel array is refused (it is more likely an image than a mask).

    An empty result is allowed here; :func:`read_mask` is the checked reader (empty masks refused).
    """
    return _mask_and_scale(value, name)[0]


def _mask_and_scale(value: Any, name: str) -> tuple[np.ndarray, str]:
    """``(bool mask, how its values were read)``: :func:`to_mask` with words for error messages."""
    if isinstance(value, Image.Image):
        arr = _image_values(value)
    else:
        if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor (masks/ needs no torch)
            value = value.detach().cpu()
            try:
                value = value.numpy()
            except TypeError:  # bfloat16 and the like have no numpy dtype
                value = value.float().numpy()
        arr = np.asarray(value)
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {np.shape(value)}")
    return _binarise(arr, name)


def _binarise(arr: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    """The one rule (see :func:`to_mask`) on a 2-D array of values."""
    if arr.dtype == bool:
        return arr.copy(), "a bool mask: a pixel is set where True"
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a bool or numeric mask, got dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError(f"{name} has no pixels (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or Inf")
    low, high = arr.min().item(), arr.max().item()
    if low < 0:
        raise InputError(f"{name} has negative values (down to {low:g}); a mask holds values in 0-1, 0-255 or "
                         "0-65535")
    scale = next((s for s in MASK_SCALES if high <= s), None)
    if scale is None:
        raise InputError(f"{name} has values up to {high:g}; a mask holds values in 0-1, 0-255 or 0-65535")
    return arr > scale / 2, f"values in 0-{scale}, largest {high:g}; a pixel is set above {scale / 2:g}"


def _image_values(img: Image.Image) -> np.ndarray:
    """A PIL image's mask values as a 2-D array (what :func:`to_mask` says each mode means)."""
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        return np.asarray(img)
    if "A" in img.getbands():
        alpha, grey = np.asarray(img.getchannel("A")), np.asarray(img.convert("L"))
        if alpha.min() < 255 and grey.max() <= 127:
            return alpha  # a mask drawn as alpha on black
        return grey
    return np.asarray(img.convert("L"))


def read_mask(value: Any, name: str, *, shape: tuple[int, int] | None = None, allow_empty: bool = False,
              allow_full: bool = True) -> np.ndarray:
    """Any mask input -- a path (read by :func:`load_mask`), a PIL image, an array or a tensor --
    as a bool ``(H, W)`` array by :func:`to_mask`'s rule; the checked reader every caller uses.

    ``shape`` (H, W) resizes it (nearest). Errors name ``name`` (the argument or option the mask
    was given for): an empty mask is an :class:`~o2mag.errors.InputError` unless ``allow_empty``
    (also one that vanishes when resized), and so is a mask that sets every pixel when not
    ``allow_full`` (a defect mask covering the whole image is almost always inverted)."""
    if isinstance(value, (str, os.PathLike)):
        try:
            mask, how = _read_file(value)
        except InputError as e:
            raise type(e)(f"{name}: {e}") from None
        what = f"{name}: mask {value}"
    else:
        mask, how = _mask_and_scale(value, name)
        what = name
    if not allow_empty and not mask.any():
        raise InputError(f"{what} is empty ({how})")
    if not allow_full and mask.all():
        raise InputError(f"{name} covers the whole image (every pixel is set): a defect mask marks only the "
                         "defect, set (white, or 1) on an unset (black, 0) background; is it inverted?")
    if shape is not None:
        mask = resize_mask(mask, shape)
        if not allow_empty and not mask.any():
            raise InputError(f"{name} vanished when resized to {shape[0]}x{shape[1]} (no pixel left)")
        if not allow_full and mask.all():
            raise InputError(f"{name} covers the whole image when resized to {shape[0]}x{shape[1]}")
    return mask


def _read_file(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """A mask file's bool mask at its own size, and how its values were read."""
    p = existing_path(path, "mask")
    return _binarise(_image_values(_open_image(p, "mask")), f"mask {p}")


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
    """Read a mask file as a bool ``(H, W)`` array, by :func:`to_mask`'s rule (so a 0/255 and a
    0/1 file both work; 16-bit files, palette images and masks drawn as alpha on black too).

    ``shape`` (H, W): resize with nearest when ``resize`` is True, else raise ``InputError`` when
    the file has another size (e.g. a mask that does not belong to the image). An empty mask
    raises ``InputError`` unless ``allow_empty``.
    """
    p = existing_path(path, "mask")
    if shape is not None:
        h, w = check_shape("shape", shape)
    mask, how = _read_file(p)
    if shape is not None and mask.shape != (h, w) and not resize:
        raise InputError(f"mask {p} is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is {h}x{w}")
    if shape is not None:
        mask = resize_mask(mask, shape)
    if not allow_empty and not mask.any():
        raise InputError(f"mask {p} is empty ({how})")
    return mask
