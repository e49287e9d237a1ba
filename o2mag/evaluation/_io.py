"""The one place this package imports o2mag's image and mask readers from.

Evaluation reads files exactly as ``o2mag generate`` does (RGB images; masks are pixel > 127,
16-bit and alpha-drawn masks included), so a tree written by the generator reads back as written.
"""

from ..masks.images import MASK_EXTENSIONS, image_files, load_image, load_mask, resize_image, resize_mask

__all__ = ["MASK_EXTENSIONS", "image_files", "load_image", "load_mask", "resize_image", "resize_mask"]
