"""Image-quality metrics of the generation papers: KID and IC-LPIPS.

Both take the network as an argument, so they run with any feature extractor or perceptual
distance (the pretrained Inception / LPIPS networks from :mod:`o2mag.evaluation.backbones`, or a
small network in tests). Images are float tensors (N, 3, H, W) in [0, 1]; each metric converts
them to what its network expects, the same way for real and generated images (DFMGAN-derived
IC-LPIPS code fed references in [0, 255] and generated images in [-1, 1]; here both go in [-1, 1]).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from ..checks import is_int

__all__ = ["extract_features", "kid", "ic_lpips", "nearest_assignment"]


def _check_images(images, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [0, 1], got {images.dtype}")
    if images.shape[0] and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1] (got values in [{float(images.min()):.3g}, "
                         f"{float(images.max()):.3g}])")
    return images


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: Callable[[torch.Tensor], torch.Tensor], *,
                     batch_size: int = 32, device: torch.device | str = "cpu", uint8: bool = False,
                     progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Run ``extractor`` over ``images`` in batches; returns (N, F) float64 features on the CPU.

    ``uint8``: hand the extractor uint8 images in [0, 255] (torch-fidelity's Inception wants
    that) instead of floats in [0, 1].
    """
    images = _check_images(images, "images")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device)
        if uint8:
            x = (x * 255).round().to(torch.uint8)
        f = extractor(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        out.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


def kid(real_features: torch.Tensor, fake_features: torch.Tensor, *, subset_size: int = 1000,
        subsets: int = 100, seed: int = 0) -> Dict[str, float]:
    """Kernel Inception Distance from features: torchmetrics' unbiased MMD, cubic polynomial kernel.

    ``subset_size`` is capped at the smaller of the two sets (the cap is reported as
    ``subset_size`` in the result), so small sets never fail or sample with replacement. Subsets
    are drawn from a generator seeded with ``seed`` (repeatable), without touching the global RNG.
    Returns ``{"kid_mean", "kid_std", "subset_size", "subsets", "n_real", "n_fake"}``.
    """
    for name, f in (("real_features", real_features), ("fake_features", fake_features)):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, F), got {type(f).__name__}")
        if f.ndim != 2:
            raise ValueError(f"{name} must have shape (N, F), got {tuple(f.shape)}")
        if f.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 samples for the unbiased estimate, got {f.shape[0]}")
        if not torch.isfinite(f).all():
            raise ValueError(f"{name} holds NaN or infinite values")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"real_features have {real_features.shape[1]} dims but fake_features have "
                         f"{fake_features.shape[1]}")
    for name, v in (("subset_size", subset_size), ("subsets", subsets)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2 (unbiased MMD), got {subset_size}")
    m = min(subset_size, real_features.shape[0], fake_features.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=m)
    metric.update(real_features.double().cpu(), real=True)
    metric.update(fake_features.double().cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid_mean": float(mean), "kid_std": float(std), "subset_size": m, "subsets": subsets,
            "n_real": int(real_features.shape[0]), "n_fake": int(fake_features.shape[0])}


def _distance_batches(distance, a: torch.Tensor, b: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``distance`` on aligned pairs (a[k], b[k]) in batches, inputs scaled to [-1, 1]."""
    out = []
    for s in range(0, a.shape[0], batch_size):
        x = a[s:s + batch_size].to(device) * 2 - 1
        y = b[s:s + batch_size].to(device) * 2 - 1
        d = distance(x, y)
        out.append(d.reshape(-1).double().cpu())
    res = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    if res.shape[0] != a.shape[0]:
        raise ValueError(f"distance must return one value per pair: got {res.shape[0]} for {a.shape[0]} pairs")
    return res


@torch.no_grad()
def nearest_assignment(generated: torch.Tensor, references: torch.Tensor, distance, *, batch_size: int = 32,
                       device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Index of the nearest reference (by ``distance``) for every generated image."""
    n, r = generated.shape[0], references.shape[0]
    d = torch.empty(n, r, dtype=torch.float64)
    for j in tqdm(range(r), desc="IC-LPIPS assign", disable=not progress, leave=False):
        ref = references[j:j + 1].expand(n, -1, -1, -1)
        d[:, j] = _distance_batches(distance, generated, ref, batch_size, device)
    return d.argmin(dim=1)


@torch.no_grad()
def ic_lpips(generated: torch.Tensor, references: torch.Tensor, distance: Callable, *, batch_size: int = 32,
             device: torch.device | str = "cpu", max_pairs_per_cluster: Optional[int] = None, seed: int = 0,
             progress: bool = False) -> Dict[str, object]:
    """Intra-cluster LPIPS: diversity of generated images around each reference.

    Each generated image joins the cluster of its nearest reference (by ``distance``); the score
    is the mean pairwise distance inside each cluster, averaged over the clusters that hold at
    least two images. ``distance(x, y)`` takes two (B, 3, H, W) batches in [-1, 1] and returns B
    distances (e.g. an LPIPS network). ``max_pairs_per_cluster`` samples that many pairs (seeded)
    instead of all of them. Returns ``{"ic_lpips", "clusters", "cluster_sizes", "used_clusters"}``.
    """
    generated = _check_images(generated, "generated")
    references = _check_images(references, "references")
    if generated.shape[0] < 2:
        raise ValueError(f"generated needs at least 2 images, got {generated.shape[0]}")
    if references.shape[0] < 1:
        raise ValueError("references is empty")
    if generated.shape[1:] != references.shape[1:]:
        raise ValueError(f"generated images are {tuple(generated.shape[1:])} but references are "
                         f"{tuple(references.shape[1:])}: resize them to one size first")
    if not callable(distance):
        raise TypeError(f"distance must be callable, got {type(distance).__name__}")
    assign = nearest_assignment(generated, references, distance, batch_size=batch_size, device=device,
                                progress=progress)
    rng = np.random.default_rng(seed)
    per_cluster = []
    sizes = []
    for j in tqdm(range(references.shape[0]), desc="IC-LPIPS clusters", disable=not progress, leave=False):
        members = torch.nonzero(assign == j).flatten().tolist()
        sizes.append(len(members))
        if len(members) < 2:
            continue
        pairs: Sequence = list(itertools.combinations(members, 2))
        if max_pairs_per_cluster is not None and len(pairs) > max_pairs_per_cluster:
            pick = rng.choice(len(pairs), size=max_pairs_per_cluster, replace=False)
            pairs = [pairs[k] for k in sorted(pick)]
        a = generated[[p for p, _ in pairs]]
        b = generated[[q for _, q in pairs]]
        per_cluster.append(float(_distance_batches(distance, a, b, batch_size, device).mean()))
    if not per_cluster:
        raise ValueError("no cluster holds two generated images: IC-LPIPS is undefined "
                         "(give more generated images or fewer references)")
    return {"ic_lpips": float(np.mean(per_cluster)), "clusters": per_cluster, "cluster_sizes": sizes,
            "used_clusters": len(per_cluster)}

