"""A small built-in example (brushed-metal plate with a scratch), generated in code.

It lets ``o2mag`` run end to end with no dataset: a normal image, a reference anomaly image (a
second plate of the same kind with a drawn scratch) and the scratch's binary mask. Everything is
drawn from fixed seeds with numpy and Pillow, so the sample is the same on every machine and no
image files need to ship with the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..checks import is_int
from ..files import atomic_write

__all__ = ["Sample", "embedded_sample", "brushed_metal"]

_NORMAL_SEED = 1
_REFERENCE_SEED = 2


@dataclass
class Sample:
    """Inputs for one O2MAG run: normal image, reference anomaly image, its mask ``M_R``, prompt."""

    normal: Image.Image
    reference: Image.Image
    ref_mask: np.ndarray
    category: str = "synthetic_surface"
    defect: str = "scratch"
    prompt: str = "a photo of a scratch on a brushed metal surface"
    anomaly_word: str = "scratch"

    def save(self, folder: str | os.PathLike) -> dict[str, Path]:
        """Write ``normal.png``, ``reference.png`` and ``reference_mask.png`` (0/255) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"normal": folder / "normal.png", "reference": folder / "reference.png",
                 "ref_mask": folder / "reference_mask.png"}
        mask = Image.fromarray(self.ref_mask.astype(np.uint8) * 255)
        for name, im in (("normal", self.normal), ("reference", self.reference), ("ref_mask", mask)):
            atomic_write(paths[name], lambda f, im=im: im.save(f, format="PNG"))
        return paths


def _blur_1d(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Three box passes along one axis (close to a Gaussian), wrapping around (the texture tiles)."""
    if radius <= 0:
        return a
    k = 2 * radius + 1
    for _ in range(3):
        c = np.cumsum(np.concatenate([np.take(a, np.arange(-radius - 1, 0), axis=axis), a,
                                      np.take(a, np.arange(0, radius), axis=axis)], axis=axis), axis=axis)
        n = a.shape[axis]
        a = (np.take(c, np.arange(k, k + n), axis=axis) - np.take(c, np.arange(0, n), axis=axis)) / k
    return a


def brushed_metal(size: int, seed: int) -> np.ndarray:
    """An HxWx3 uint8 brushed-metal texture: long horizontal grain, soft shading, cool tint."""
    rng = np.random.default_rng(seed)
    grain = _blur_1d(rng.standard_normal((size, size)), max(2, size // 10), axis=1)
    grain = _blur_1d(grain, max(1, size // 512), axis=0)
    grain /= grain.std() + 1e-12
    fine = rng.standard_normal((size, size)) * 0.35
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    a, b = rng.uniform(-1, 1, 2)
    shading = 0.5 * (a * (xx - 0.5) + b * (yy - 0.5)) + 0.25 * np.cos(np.pi * (xx + 0.3 * yy))
    lum = 150 + 12 * grain + 4 * fine + 25 * shading
    tint = np.array([0.97, 1.0, 1.05])
    return np.clip(lum[..., None] * tint, 0, 255).astype(np.uint8)


def _draw_scratch(base: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a thin curved scratch (dark groove with a bright rim); returns (image, mask)."""
    size = base.shape[0]
    rng = np.random.default_rng(seed + 1000)
    ss = 4  # supersampling for smooth edges
    big = size * ss
    p0 = np.array([0.25, 0.30]) + rng.uniform(-0.05, 0.05, 2)
    p2 = np.array([0.72, 0.62]) + rng.uniform(-0.05, 0.05, 2)
    p1 = (p0 + p2) / 2 + np.array([-0.12, 0.10])
    t = np.linspace(0, 1, 64)[:, None]
    curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2) * big
    pts = [(float(x), float(y)) for x, y in curve]
    width = max(1.0, size / 96)
    layers = []
    for w in (width * 2.2, width):
        layer = Image.new("L", (big, big), 0)
        ImageDraw.Draw(layer).line(pts, fill=255, width=max(1, int(round(w * ss))), joint="curve")
        layers.append(np.asarray(layer.resize((size, size), Image.BOX), dtype=np.float64) / 255.0)
    rim, groove = layers
    img = base.astype(np.float64)
    img = img * (1 - 0.35 * rim[..., None]) + 225 * 0.35 * rim[..., None]
    img = img * (1 - 0.8 * groove[..., None]) + 55 * 0.8 * groove[..., None]
    mask_img = Image.fromarray((rim > 0.2).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), np.asarray(mask_img) > 127


def embedded_sample(size: int = 256) -> Sample:
    """The built-in brushed-metal scratch sample at ``size`` x ``size`` pixels (32..1024)."""
    if not is_int(size):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be in [32, 1024], got {size}")
    size = int(size)
    normal = brushed_metal(size, _NORMAL_SEED)
    reference, mask = _draw_scratch(brushed_metal(size, _REFERENCE_SEED), _REFERENCE_SEED)
    return Sample(normal=Image.fromarray(normal), reference=Image.fromarray(reference),
                  ref_mask=mask)
