"""A contact sheet of a defect folder: every generated image at a glance, mask outlined in red.

The first thing to look at after ``o2mag generate``: whether the defects sit where the masks say,
whether they look like the reference, whether any sample is broken. ``o2mag generate`` and ``o2mag dataset``
rewrite ``<out>/<category>/<defect>/contact_sheet.png`` at the end of every run, whatever the run
made (a group finished before a crash gets its sheet on the rerun; a deleted sheet comes back): it
is derived from the samples, never an input. A sample whose image or mask cannot be read is a
grey tile with a red X and one warning line naming the file.
"""

from __future__ import annotations

import math
import os
import sys
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
_REJECTED_GREY = 200
_CROSS = (0, 0, 0)


def _unreadable(size: int) -> Image.Image:
    """The tile of a sample whose image or mask cannot be read: grey, crossed out in red."""
    tile = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(tile)
    draw.line((0, 0, size - 1, size - 1), fill=_OUTLINE, width=3)
    draw.line((0, size - 1, size - 1, 0), fill=_OUTLINE, width=3)
    return tile


def _read(path: Path, mode: str) -> Optional[Image.Image]:
    """The image at ``path`` in ``mode``, or None (and one warning line naming it) when it cannot be
    read: truncated or damaged (a disk that filled up, a copy cut short) is shown, not fatal."""
    try:
        with Image.open(path) as f:
            return f.convert(mode)
    except OSError as e:
        print(f"o2mag: warning: contact sheet: cannot read {path} ({e}); drawn as a grey tile with a red X",
              file=sys.stderr)
        return None


def _tile(img_path: Path, mask_path: Path, size: int, rejected: bool = False) -> Image.Image:
    img, m = _read(img_path, "RGB"), _read(mask_path, "L")
    if img is None or m is None:
        return _unreadable(size)
    img = img.resize((size, size), Image.BICUBIC)
    m = m.resize((size, size), Image.NEAREST).point(lambda v: 255 if v > 127 else 0)
    inner = m.filter(ImageFilter.MinFilter(3))
    edge = (np.asarray(m) > 0) & ~(np.asarray(inner) > 0)
    arr = np.asarray(img).copy()
    arr[edge] = _OUTLINE
    if rejected:  # faded to grey, crossed out
        arr = (0.35 * arr + 0.65 * _REJECTED_GREY).astype(np.uint8)
        tile = Image.fromarray(arr)
        draw = ImageDraw.Draw(tile)
        draw.line((0, 0, size - 1, size - 1), fill=_CROSS, width=3)
        draw.line((0, size - 1, size - 1, 0), fill=_CROSS, width=3)
        return tile
    return Image.fromarray(arr)


def contact_sheet(defect_dir: str | os.PathLike, *, max_samples: int = 64, tile: int = 128,
                  omit_rejected: bool = False) -> Optional[Image.Image]:
    """The sheet as a PIL image (None when the folder holds no sample to show).

    Shows the first ``max_samples`` samples by index, ``tile`` px each, with the index under
    each tile and a header naming the folder and how many samples it holds. Samples a reviewer
    rejected (manifest ``"review": "rejected"``, from ``o2mag curate`` or ``o2mag review``) are
    faded and crossed out, or left out with ``omit_rejected``; the header counts them.
    """
    for name, v, lo in (("max_samples", max_samples, 1), ("tile", tile, 16)):
        if not is_int(v) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    d = Path(defect_dir)
    every = [(i, img, mask, rec.get("review") == "rejected") for i, img, mask, rec in complete_samples(d)]
    rejected = sum(r for *_, r in every)
    samples = [s for s in every if not (omit_rejected and s[3])]
    if not samples:
        return None
    shown = samples[:max_samples]
    cols = min(8, math.ceil(math.sqrt(len(shown))))
    rows = math.ceil(len(shown) / cols)
    pad, label_h, header_h = 4, 14, 18
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, header_h + rows * (tile + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    more = f" (first {len(shown)} shown)" if len(shown) < len(samples) else ""
    rej = (f"; {rejected} rejected " + ("left out" if omit_rejected else "crossed out")) if rejected else ""
    draw.text((pad, 3), f"{d.parent.name}/{d.name}: {len(samples)} samples{more}; red = mask outline{rej}",
              fill=(0, 0, 0))
    for k, (index, img, mask, is_rejected) in enumerate(shown):
        x = pad + (k % cols) * (tile + pad)
        y = header_h + (k // cols) * (tile + label_h + pad)
        sheet.paste(_tile(img, mask, tile, is_rejected), (x, y))
        draw.text((x, y + tile + 1), f"{index:03d}" + (" rejected" if is_rejected else ""), fill=(0, 0, 0))
    return sheet


def write_contact_sheet(defect_dir: str | os.PathLike, path: str | os.PathLike | None = None, **kwargs) -> Optional[Path]:
    """Write the sheet (default ``<defect_dir>/contact_sheet.png``, atomically); returns its path,
    or None when there is no sample to show."""
    sheet = contact_sheet(defect_dir, **kwargs)
    if sheet is None:
        return None
    dest = Path(path) if path is not None else Path(defect_dir) / CONTACT_SHEET_NAME
    return atomic_write(dest, lambda f: sheet.save(f, format="PNG"))
