"""What a caller hands :class:`o2mag.O2MAGPipeline`, checked and brought to the working size, and
where the anomaly word sits in the prompt.

Images may be PIL images, paths, uint8 ``(H, W, 3)`` arrays, ``[0, 1]`` float arrays or tensors;
masks may be paths, PIL images, arrays or tensors, read by :func:`o2mag.masks.images.read_mask`
(one rule for every mask type, exactly as the command line reads mask files). Errors name the
argument the bad value was given for; an empty mask (reference or target) is an error, and so is
a reference mask that covers the whole image.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..masks.images import load_image, read_mask, resize_image

__all__ = ["ImageLike", "image_array", "mask_array", "prepare_sources", "prepare_targets", "token_indices"]

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]


def _named(what: str, fn, *args, **kwargs):
    """Call a file reader; its InputError then says which argument the file was given for."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        raise type(e)(f"{what}: {e}") from None


def image_array(image: ImageLike, what: str) -> np.ndarray:
    """Any image input -> uint8 (H, W, 3). Files are read by :func:`o2mag.masks.images.load_image`."""
    if isinstance(image, (str, os.PathLike)):
        image = _named(what, load_image, image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a PIL image, a path, an array or a tensor, "
                        f"got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise InputError(f"{what}: expected an (H, W, 3) image, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        af = a.astype(np.float64)
        if not np.isfinite(af).all():
            raise InputError(f"{what}: image has non-finite values")
        a = np.clip(np.round(af * 255.0 if af.max() <= 1.0 else af), 0, 255).astype(np.uint8)
    return a


def mask_array(mask: Any, what: str, **checks: Any) -> np.ndarray:
    """Any mask input -> bool (H, W), read as the command line reads masks: by
    :func:`o2mag.masks.images.read_mask`, which names ``what`` in its errors and refuses an empty
    mask (``checks``: its ``shape``, ``allow_empty`` and ``allow_full``)."""
    return read_mask(mask, what, **checks)


def _resized(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[:2] == (size, size):
        return a
    return np.asarray(resize_image(Image.fromarray(a), size), dtype=np.uint8)


def prepare_sources(reference: ImageLike, ref_mask: Any, normal: ImageLike,
                    size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(reference uint8, M_R bool, normal uint8)`` at ``size`` x ``size``.

    ``ref_mask`` must have the reference's size (a mask of another image is a mistake worth
    reporting), must not be empty and must not cover the whole image, before or after resizing."""
    ref = image_array(reference, "reference")
    m_r = mask_array(ref_mask, "ref_mask", allow_full=False)
    if m_r.shape != ref.shape[:2]:
        raise InputError(f"ref_mask is {m_r.shape[0]}x{m_r.shape[1]} (HxW) but the reference image is "
                         f"{ref.shape[0]}x{ref.shape[1]}")
    nor = image_array(normal, "normal")
    m_r = mask_array(m_r, "ref_mask", shape=(size, size), allow_full=False)
    return _resized(ref, size), m_r, _resized(nor, size)


def prepare_targets(target_masks: Any, size: int) -> List[np.ndarray]:
    """Target masks ``M_T`` as bool ``(size, size)`` arrays (nearest resize), in the given order.

    Takes a sequence of masks (arrays, PIL images, paths, :class:`o2mag.masks.targets.TargetMask`) or
    one ``(N, H, W)`` / ``(H, W)`` array or tensor. An empty target mask is an error (it would make
    a "defect" sample without a defect), also one that vanishes when resized, and so is no target
    mask at all."""
    if isinstance(target_masks, (np.ndarray, torch.Tensor)):
        arr = target_masks
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        if arr.ndim == 2:
            arr = arr[None]
        items = list(arr)
    elif isinstance(target_masks, (str, bytes, os.PathLike, Image.Image)) or \
            not hasattr(target_masks, "__iter__"):
        raise TypeError("target_masks must be a sequence of masks or an (N, H, W) array, got "
                        f"{type(target_masks).__name__}")
    else:
        items = list(target_masks)
    out = []
    for k, m in enumerate(items):
        m = getattr(m, "mask", m)  # o2mag.masks.targets.TargetMask
        out.append(mask_array(m, f"target_masks[{k}]", shape=(size, size)))
    if not out:
        raise ValueError("target_masks is empty: give at least one target mask")
    return out


def token_indices(tokenizer, prompt: str, word: Optional[str]) -> List[int]:
    """Positions (in the padded 77-token sequence, BOS at 0) of ``word``'s tokens inside ``prompt``.

    ``word`` may be several words ("broken large"): the phrase's tokens must occur in a row. An
    empty word (or None) gives no position (DAE then amplifies nothing)."""
    if not word:
        return []
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    w = tokenizer(word, add_special_tokens=False).input_ids
    if not w:
        raise InputError(f"anomaly word {word!r} has no tokens")
    found: List[int] = []
    for s in range(len(ids) - len(w) + 1):
        if ids[s : s + len(w)] == w:
            found.extend(range(s, s + len(w)))
    if not found:
        raise InputError(f"anomaly word {word!r} does not occur in the prompt {prompt!r}")
    return sorted(set(found))
