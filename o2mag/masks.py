"""The public mask API in one import, kept because scripts written against earlier releases use it.

The code lives in rooms of its own: :mod:`o2mag.images` (image and mask files, conversion,
resizing), :mod:`o2mag.foreground` (where the object is), :mod:`o2mag.targets` (target masks
``M_T``), with :mod:`o2mag.morphology` and :mod:`o2mag.checks` beneath them. New code imports
from those modules.
"""
from .foreground import foreground_mask, resolve_foreground
from .images import MASK_EXTENSIONS, load_image, load_mask, resize_image, resize_mask, to_mask
from .targets import (MASK_KINDS, TargetMask, affine_masks, folder_masks, perlin_masks, perlin_noise,
                      target_masks)

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
