"""A tiny MVTec-like dataset and a matching synthetic tree, drawn in code (seeded, no download).

``o2mag evaluate detect`` with no data runs on these so that the whole evaluation (split, training,
metrics, report) can be seen working offline in about a minute on a CPU. Two categories, two defect
types each, 96 px images. The "synthetic" samples are drawn with the same defect painter as the real
ones (other seeds) and written with o2mag's own :class:`~o2mag.runs.store.OutputStore`, so the tree has
exactly the layout and manifest ``o2mag generate`` writes. The numbers it produces demonstrate
the machinery; they say nothing about O2MAG's images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..sources.sample import brushed_metal
from ..runs.store import OutputStore
from ..files import atomic_write

__all__ = ["make_demo_data", "DEMO_CATEGORIES", "DEMO_SIZE"]

DEMO_SIZE = 96
N_TRAIN_GOOD, N_TEST_GOOD, N_TEST_DEFECT, N_SYNTHETIC = 20, 8, 9, 24


def _fabric(size: int, seed: int) -> np.ndarray:
    """Woven texture: two crossing sinusoidal threads with jitter and a warm tint."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    period = size / rng.uniform(10, 12)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
    lum = 120 + 25 * weave + 6 * rng.standard_normal((size, size))
    return np.clip(lum[..., None] * np.array([1.1, 0.95, 0.8]), 0, 255).astype(np.uint8)


def _blob(size: int, rng: np.random.Generator, radius: Tuple[float, float]) -> np.ndarray:
    """An irregular filled polygon (a stain, hole or dent), as a bool mask."""
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(*radius) * size
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    pts = [(float(cx + r * rng.uniform(0.6, 1.0) * np.cos(a)), float(cy + r * rng.uniform(0.6, 1.0) * np.sin(a)))
           for a in angles]
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(pts, fill=255)
    return np.asarray(img) > 127


def _line(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin straight scratch, as a bool mask."""
    p0 = rng.uniform(0.15, 0.45, 2) * size
    p1 = p0 + rng.uniform(0.3, 0.45) * size * np.array([np.cos(a := rng.uniform(0, np.pi)), np.sin(a)])
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).line([tuple(p0), tuple(np.clip(p1, 0, size - 1))], fill=255, width=max(2, size // 32))
    return np.asarray(img) > 127


def _paint(base: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    out = base.astype(np.float64)
    out[mask] = 0.25 * out[mask] + 0.75 * np.asarray(colour, dtype=np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


_Defect = Callable[[np.ndarray, np.random.Generator], Tuple[np.ndarray, np.ndarray]]


def _defects(size: int) -> Dict[str, Tuple[Callable[[int], np.ndarray], Dict[str, _Defect]]]:
    return {
        "plate": (lambda seed: brushed_metal(size, seed), {
            "scratch": lambda img, rng: (lambda m: (_paint(img, m, (40, 40, 45)), m))(_line(size, rng)),
            "dent": lambda img, rng: (lambda m: (_paint(img, m, (235, 235, 240)), m))(_blob(size, rng, (0.06, 0.12))),
        }),
        "fabric": (lambda seed: _fabric(size, seed), {
            "hole": lambda img, rng: (lambda m: (_paint(img, m, (20, 15, 10)), m))(_blob(size, rng, (0.05, 0.1))),
            "stain": lambda img, rng: (lambda m: (_paint(img, m, (60, 140, 60)), m))(_blob(size, rng, (0.08, 0.14))),
        }),
    }


DEMO_CATEGORIES = ("fabric", "plate")


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def make_demo_data(folder: str | os.PathLike, size: int = DEMO_SIZE) -> Tuple[Path, Path]:
    """Write the demo MVTec-like root and synthetic tree under ``folder``; returns both roots.

    Layout: ``<folder>/mvtec/<category>/{train/good, test/<defect>, ground_truth/<defect>}`` and
    ``<folder>/synthetic/<category>/<defect>/{image,mask}/NNN.png + manifest.jsonl``. Same files
    on every machine (fixed seeds); existing files are rewritten identically.
    """
    root = Path(folder)
    mvtec, synth = root / "mvtec", root / "synthetic"
    for ci, (cat, (texture, defects)) in enumerate(sorted(_defects(size).items())):
        seed0 = 10_000 * (ci + 1)
        for i in range(N_TRAIN_GOOD):
            _save(texture(seed0 + i), mvtec / cat / "train" / "good" / f"{i:03d}.png")
        for i in range(N_TEST_GOOD):
            _save(texture(seed0 + 500 + i), mvtec / cat / "test" / "good" / f"{i:03d}.png")
        for di, (defect, paint) in enumerate(sorted(defects.items())):
            for i in range(N_TEST_DEFECT):
                rng = np.random.default_rng([seed0, di, i])
                img, mask = paint(texture(seed0 + 1000 + 100 * di + i), rng)
                _save(img, mvtec / cat / "test" / defect / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, mvtec / cat / "ground_truth" / defect / f"{i:03d}_mask.png")
            reference = mvtec / cat / "test" / defect / "000.png"  # inside the held-back third
            store = OutputStore(synth, cat, defect, overwrite=True,
                                settings={"model": "embedded-demo", "source": "mvtec", "reference": str(reference)})
            for i in range(N_SYNTHETIC):
                rng = np.random.default_rng([seed0, di, 1000 + i])
                img, mask = paint(texture(seed0 + 5000 + 100 * di + i), rng)
                store.write(i, img, mask, {"seed": [seed0, di, 1000 + i]})
    return mvtec, synth
