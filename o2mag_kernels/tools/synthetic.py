"""Synthetic mask sets of the shapes grafting produces, for the hardware sweep, benchmarks and tests.

Real masks are blobs: the reference defect ``M_R`` and affine copies of it at new places ``M_T``,
on a square token grid (a latent of h x w tokens, row-major). Most key tiles are then wholly
usable or wholly excluded, which the fused kernel exploits; scattered (Bernoulli) masks are the
worst case, where almost every tile is partial. ``empty`` and ``full`` are the corner cases.

Every set is (query_mask (B, L), fg_key_mask (1, L), bg_key_mask (B, L)) as the grafting layer
passes them: queries inside each target's ``M_T`` take the reference keys inside ``M_R``, the
others take the normal image's keys outside their own ``M_T``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

KINDS = ("blob", "scattered", "empty", "full")


def grid_of(length: int) -> Tuple[int, int]:
    """(h, w) with h * w == length and h as close to sqrt(length) as possible (h <= w)."""
    h = int(math.isqrt(length))
    while h > 1 and length % h:
        h -= 1
    return max(h, 1), length // max(h, 1)


def _blob(h: int, w: int, density: float, angle: float, scale: float, cy: float, cx: float,
          wobble: torch.Tensor) -> torch.Tensor:
    """An irregular blob covering about ``density`` of the grid: an ellipse (aspect 1.6) whose
    radius wobbles with the angle, rotated by ``angle``, scaled, centred at (cy, cx) in [0, 1]."""
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    y, x = torch.meshgrid(ys - cy, xs - cx, indexing="ij")
    y, x = y * h / max(h, w), x * w / max(h, w)
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    area = density * (h * w) / max(h, w) ** 2
    a = math.sqrt(area * 1.6 / math.pi) * scale
    b = a / 1.6
    theta = torch.atan2(v / b, u / a)
    r = torch.sqrt((u / a) ** 2 + (v / b) ** 2)
    bound = 1.0 + sum(wobble[k] * torch.cos((k + 2) * theta + wobble[k + 3] * 6.28)
                      for k in range(3))
    return (r <= bound).flatten()


def mask_set(kind: str, batch: int, length: int, density: float = 0.05, seed: int = 0,
             device="cpu"):
    """(query_mask (batch, L), fg_key_mask (1, L), bg_key_mask (batch, L)), bool, on ``device``.

    ``density`` is the fraction of the grid a defect covers (``blob``, ``scattered``). For
    ``blob``, each target's mask is a rotated (any angle), scaled (0.8-1.2x), moved copy of the
    reference blob; ``bg_key_mask`` is the complement of each target's mask (the normal keys
    inside the new defect are excluded, as in the paper's preset).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    g = torch.Generator().manual_seed(seed)
    if kind == "empty":
        q = torch.zeros(batch, length, dtype=torch.bool)
        fg = torch.zeros(1, length, dtype=torch.bool)
    elif kind == "full":
        q = torch.ones(batch, length, dtype=torch.bool)
        fg = torch.ones(1, length, dtype=torch.bool)
    elif kind == "scattered":
        q = torch.rand(batch, length, generator=g) < density
        fg = torch.rand(1, length, generator=g) < density
    else:
        h, w = grid_of(length)
        wobble = torch.rand(6, generator=g, dtype=torch.float64) * torch.tensor(
            [0.25, 0.15, 0.1, 1.0, 1.0, 1.0], dtype=torch.float64)

        def place(angle, scale):
            cy, cx = (0.2 + 0.6 * torch.rand(2, generator=g, dtype=torch.float64)).tolist()
            return _blob(h, w, density, angle, scale, cy, cx, wobble)

        fg = place(0.0, 1.0)[None]
        rows = []
        for _ in range(batch):
            angle = float(torch.rand(1, generator=g)) * 2 * math.pi
            scale = 0.8 + 0.4 * float(torch.rand(1, generator=g))
            rows.append(place(angle, scale))
        q = torch.stack(rows)
    return q.to(device), fg.to(device), (~q).to(device)
