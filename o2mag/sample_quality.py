"""A quality record per generated sample: *presence*, *leakage*, *likeness* and one combined *score*.

Model-free heuristics on the pixels the pipeline already has (README "Curating a generated folder"
gives each formula with its reason and its limits). All colour work is in CIE L*a*b* (Pillow's
``ImageCms``), where a Euclidean distance (Delta E 1976) roughly follows perceived difference.

- ``presence`` = median over ``M_T`` of dE(generated, baseline) / (1 + c): how much the image
  changed where the defect should be, in units of the baseline's own texture contrast ``c`` (the
  median dE between the baseline and its Gaussian blur, outside the dilated mask) -- a change as
  large as the texture's own grain is no defect.
- ``leakage`` = mean over the pixels outside ``M_T`` dilated by ``margin`` of
  dE(generated, baseline) / (1 + c): change where nothing should change.
- ``likeness`` = exp(-D / 20), D = |mean_T - mean_R| + |std_T - std_R| + |grad_T - grad_R|: L*a*b*
  mean and standard deviation vectors and the mean L* gradient magnitude of the generated image
  inside ``M_T`` against the reference inside ``M_R`` (dE units; 20 is a clearly visible difference).
- ``score`` = (p * l * k) ** (1/3) with p = 1 - exp(-presence), k = exp(-leakage / 0.5), l = likeness:
  every part in [0, 1], the geometric mean drops to 0 when any one fails.

The *baseline* is the normal branch's replay (the normal image through the VAE, what the generated
image shows outside ``M_T``) when generating; ``o2mag curate --rescore`` has no model and uses the
normal image itself, so VAE reconstruction error then counts as change (``"baseline"`` says which).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np
from PIL import Image, ImageCms
from scipy import ndimage

__all__ = ["sample_quality", "combine", "lab", "QUALITY_VERSION", "LIKENESS_SCALE", "LEAKAGE_SCALE"]

QUALITY_VERSION = 1
LIKENESS_SCALE = 20.0  # dE: a clearly visible difference of region statistics
LEAKAGE_SCALE = 0.5  # leakage at which the clean factor falls to 1/e
_BLUR = 2.0  # px: Gaussian sigma separating texture from shading

_SRGB_TO_LAB = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")


def _rgb(image: Any, name: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name} must be a PIL image or a (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def lab(image: Any, name: str = "image") -> np.ndarray:
    """(H, W, 3) float32 CIE L*a*b*: L* in [0, 100], a* and b* around 0."""
    out = np.asarray(ImageCms.applyTransform(_rgb(image, name), _SRGB_TO_LAB), dtype=np.float32).copy()
    out[..., 0] *= 100.0 / 255.0
    out[..., 1:] -= 128.0
    return out


def _mask(mask: Any, shape, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[2] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, the image is {tuple(shape)}")
    return m.astype(bool) if m.dtype == bool else m > (127 if m.dtype == np.uint8 else 0.5)


def _region_stats(img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """[mean L*a*b* (3), std L*a*b* (3), mean |grad L*| (1)] inside ``region``."""
    grad = np.hypot(ndimage.sobel(img[..., 0], 0), ndimage.sobel(img[..., 0], 1)) / 8.0
    px = img[region]
    return np.concatenate([px.mean(0), px.std(0), [grad[region].mean()]])


def combine(presence: float, leakage: float, likeness: float) -> float:
    """The combined score in [0, 1] (module docstring)."""
    p = 1.0 - math.exp(-max(presence, 0.0))
    k = math.exp(-max(leakage, 0.0) / LEAKAGE_SCALE)
    l = min(max(likeness, 0.0), 1.0)
    return float((p * l * k) ** (1.0 / 3.0))


def _short(x: float) -> float:
    """Four significant digits: enough to rank, short in the manifest."""
    return float(f"{x:.4g}")


def sample_quality(image: Any, baseline: Any, mask: Any, reference: Any, ref_mask: Any, *,
                   margin: Optional[int] = None, baseline_kind: str = "replay") -> Dict[str, Any]:
    """The quality record of one sample (a JSON-ready dict, see the module docstring).

    ``image``: the generated image; ``baseline``: the normal branch's replay (or the normal image);
    ``mask``: ``M_T`` at the image's size; ``reference`` and ``ref_mask``: the reference defect
    and ``M_R`` (any size). ``margin``: pixels ``M_T`` is dilated by before leakage is measured
    (default ``max(2, side // 32)``: the VAE's 8-pixel latent cells blend over a pixel or two).
    """
    gen, base = lab(image, "image"), lab(baseline, "baseline")
    if gen.shape != base.shape:
        raise ValueError(f"baseline is {base.shape[:2]}, the image is {gen.shape[:2]}")
    m = _mask(mask, gen.shape[:2], "mask")
    ref = lab(reference, "reference")
    m_r = _mask(ref_mask, ref.shape[:2], "ref_mask")
    if margin is None:
        margin = max(2, max(gen.shape[:2]) // 32)
    grown = ndimage.binary_dilation(m, iterations=margin) if m.any() and margin > 0 else m
    outside = ~grown
    blur = np.stack([ndimage.gaussian_filter(base[..., c], _BLUR) for c in range(3)], -1)
    grain = np.linalg.norm(base - blur, axis=-1)
    contrast = float(np.median(grain[outside])) if outside.any() else float(np.median(grain))
    d = np.linalg.norm(gen - base, axis=-1)
    presence = float(np.median(d[m])) / (1.0 + contrast) if m.any() else 0.0
    leakage = float(d[outside].mean()) / (1.0 + contrast) if outside.any() else 0.0
    if m.any() and m_r.any():
        dist = np.abs(_region_stats(gen, m) - _region_stats(ref, m_r))
        likeness = math.exp(-(float(np.linalg.norm(dist[:3])) + float(np.linalg.norm(dist[3:6]))
                              + float(dist[6])) / LIKENESS_SCALE)
    else:
        likeness = 0.0
    return {"presence": _short(presence), "leakage": _short(leakage), "likeness": _short(likeness),
            "score": _short(combine(presence, leakage, likeness)), "contrast": _short(contrast),
            "baseline": baseline_kind, "margin": int(margin), "version": QUALITY_VERSION}
