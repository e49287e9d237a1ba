"""A contact sheet of a defect folder: every generated image at a glance, mask outlined in red.

The first thing to look at after ``o2mag generate``: whether the defects sit where the masks say,
whether they look like the reference, whether any sample is broken. ``o2mag generate`` and ``o2mag dataset``
rewrite ``<out>/<category>/<defect>/contact_sheet.png`` at the end of every run, whatever the run
made (a group finished before a crash gets its sheet on the rerun; a deleted sheet comes back): it
is derived from the samples, never an input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..checks import is_int
from ..files import atomic_write
from .store import complete_samples

__all__ = ["write_contact_sheet", "contact_sheet", "CONTACT_SHEET_NAME"]

CONTACT_SHEET_NAME = "contact_sheet.png"
_OUTLINE = (255, 40, 40)


def _tile(img_path: Path, mask_path: Path, size: int) -> Image.Image:
    img = Image.open(img_path).convert("RGB").resize((size, size), Image.BICUBIC)
    m = Image.open(mask_path).convert("L").resize((size, size), Image.NEAREST).point(lambda v: 255 if v > 127 else 0)
    inner = m.filter(ImageFilter.MinFilter(3))
    edge = (np.asarray(m) > 0) & ~(np.asarray(inner) > 0)
    arr = np.asarray(img).copy()
    arr[edge] = _OUTLINE
    return Image.fromarray(arr)


def contact_sheet(defect_dir: str | os.PathLike, *, max_samples: int = 64, tile: int = 128) -> Optional[Image.Image]:
    """The sheet as a PIL image (None when the folder holds no complete sample).

    Shows the first ``max_samples`` samples by index, ``tile`` px each, with the index under
    each tile and a header naming the folder and how many samples it holds.
    """
    for name, v, lo in (("max_samples", max_samples, 1), ("tile", tile, 16)):
        if not is_int(v) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    d = Path(defect_dir)
    samples = [(i, img, mask) for i, img, mask, _ in complete_samples(d)]
    if not samples:
        return None
    shown = samples[:max_samples]
    cols = min(8, math.ceil(math.sqrt(len(shown))))
    rows = math.ceil(len(shown) / cols)
    pad, label_h, header_h = 4, 14, 18
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, header_h + rows * (tile + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    more = f" (first {len(shown)} shown)" if len(shown) < len(samples) else ""
    draw.text((pad, 3), f"{d.parent.name}/{d.name}: {len(samples)} samples{more}; red = mask outline", fill=(0, 0, 0))
    for k, (index, img, mask) in enumerate(shown):
        x = pad + (k % cols) * (tile + pad)
        y = header_h + (k // cols) * (tile + label_h + pad)
        sheet.paste(_tile(img, mask, tile), (x, y))
        draw.text((x, y + tile + 1), f"{index:03d}", fill=(0, 0, 0))
    return sheet


def write_contact_sheet(defect_dir: str | os.PathLike, path: str | os.PathLike | None = None, **kwargs) -> Optional[Path]:
    """Write the sheet (default ``<defect_dir>/contact_sheet.png``, atomically); returns its path,
    or None when there is no sample to show."""
    sheet = contact_sheet(defect_dir, **kwargs)
    if sheet is None:
        return None
    dest = Path(path) if path is not None else Path(defect_dir) / CONTACT_SHEET_NAME
    return atomic_write(dest, lambda f: sheet.save(f, format="PNG"))
