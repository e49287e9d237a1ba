"""Masks and image files: the public mask names in one import.

The modules: :mod:`.images` (image and mask files, conversion, resizing), :mod:`.foreground`
(where the object is), :mod:`.targets` (target masks ``M_T``), with :mod:`.morphology` and
:mod:`o2mag.checks` beneath them.
"""
from .foreground import foreground_mask, resolve_foreground
from .images import (MASK_EXTENSIONS, MASK_SCALES, image_files, load_image, load_mask, read_mask, resize_image,
                     resize_mask, to_mask)
from .targets import (MASK_KINDS, TargetMask, affine_masks, folder_masks, perlin_masks, perlin_noise,
                      target_masks)

__all__ = [
    "TargetMask",
    "MASK_EXTENSIONS",
    "image_files",
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
    "read_mask",
    "MASK_SCALES",
    "resize_mask",
    "resize_image",
]
