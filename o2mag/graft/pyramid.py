"""The masks of grafting at every attention resolution: validated once, downsampled once.

:class:`MaskPyramid` is the one owner of "which token is inside M_R / M_T at this layer": the
reference mask and the target masks (image or latent space) are downsampled to each layer's token
grid with the config's mode per use ("max" = adaptive max-pooling, so a small defect never
vanishes; "nearest" = nearest sampling), cached per resolution and device, and turned into the
:class:`o2mag_kernels.TriSourceMask` that every head, layer, step and CFG half of that resolution
reuses.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from o2mag_kernels import TriSourceMask, tri_source_mask


def as_mask(name: str, x, ndim: int) -> torch.Tensor:
    """Validate a mask and return it as float32 0/1 on the CPU (True/ >= 0.5 -> 1)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != ndim:
        want = "(H, W)" if ndim == 2 else "(N, H, W)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype == torch.bool:
        return x.float()
    if x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} must hold values in [0, 1] (bool or 0/1 float)")
        return (x >= 0.5).float()
    if x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{name} integer masks must hold only 0 and 1")
        return x.float()
    raise TypeError(f"{name} must be bool, 0/1 integer or float in [0, 1], got {x.dtype}")


def token_grid(length: int, height: int, width: int) -> Tuple[int, int]:
    """The (h, w) grid of a layer with ``length`` tokens for a mask of size (height, width): UNets
    halve with rounding up, so try ceil(size / 2^k) first, then the closest-aspect factor pair."""
    s = 1
    while s <= 2 * max(height, width):
        h, w = -(-height // s), -(-width // s)
        if h * w == length:
            return h, w
        s *= 2
    pairs = [(h, length // h) for h in range(1, length + 1) if length % h == 0]
    aspect = math.log(height / width)
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - aspect))


def downsample(mask: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """(N, H, W) float 0/1 -> (N, h*w) bool, by adaptive max pooling or nearest sampling."""
    x = mask[:, None]
    if tuple(mask.shape[-2:]) == tuple(size):
        y = x
    elif mode == "max":
        y = F.adaptive_max_pool2d(x, size)
    else:
        y = F.interpolate(x, size=size, mode="nearest")
    return (y[:, 0] >= 0.5).flatten(1)


class LayerMasks(NamedTuple):
    """Masks of one self-attention resolution in one mode, flattened, as the op takes them."""

    query: torch.Tensor  # (N, L) bool: target query inside M_T
    fg: torch.Tensor  # (1, L) bool: reference key inside M_R
    bg: Optional[torch.Tensor]  # (N, L) bool: normal key usable (outside M_T) or None
    qsel: Optional[torch.Tensor]  # (N, L) bool: Q-graft phase, take the reference Q
    routing: TriSourceMask  # the three masks above, built once for every call at this resolution


class MaskPyramid:
    """M_R (H, W) and M_T (N, H, W) at every layer resolution (see the module docstring)."""

    def __init__(self, ref: torch.Tensor, targets: torch.Tensor, config):
        self.ref, self.targets, self.config = ref, targets, config
        self._down: Dict[tuple, torch.Tensor] = {}
        self._layers: Dict[tuple, LayerMasks] = {}

    @property
    def num_targets(self) -> int:
        return self.targets.shape[0]

    def grid(self, length: int, hw=None) -> Tuple[int, int]:
        return tuple(hw) if hw is not None else token_grid(length, *self.targets.shape[-2:])

    def mask(self, which: str, mode: str, length: int, hw, device) -> torch.Tensor:
        """``which`` = "ref" -> (1, L) or "tgt" -> (N, L) bool on ``device``, cached."""
        size = self.grid(length, hw)
        key = (which, mode, size, str(device))
        m = self._down.get(key)
        if m is None:
            base = self.ref[None] if which == "ref" else self.targets
            m = downsample(base, size, mode).to(device)
            self._down[key] = m
        return m

    def layer(self, mode: str, length: int, device, hw=None) -> LayerMasks:
        """The masks a self-attention layer with ``length`` tokens uses in ``mode`` ('graft' or
        'qgraft'); built once per resolution, mode and device."""
        key = (mode, self.grid(length, hw), str(device))
        got = self._layers.get(key)
        if got is not None:
            return got
        cfg = self.config
        if mode == "qgraft":
            m = cfg.qgraft_mask_mode
            t = self.mask("tgt", m, length, hw, device)
            bg = ~t if cfg.exclude_target_from_background else None
            fg, qsel = self.mask("ref", m, length, hw, device), t
        else:
            t = self.mask("tgt", cfg.target_mask_mode, length, hw, device)
            excl = self.mask("tgt", cfg.exclusion_mask_mode, length, hw, device)
            bg = ~excl if cfg.exclude_target_from_background else None
            fg, qsel = self.mask("ref", cfg.reference_mask_mode, length, hw, device), None
        got = LayerMasks(t, fg, bg, qsel, tri_source_mask(t, fg, bg))
        self._layers[key] = got
        return got

    def stitch(self, size: Tuple[int, int], device) -> torch.Tensor:
        """M_T at latent ``size`` (h, w) as float 0/1 (N, 1, h, w), downsampled exactly like the
        TriAG query masks, so the background blend and the grafting agree on the defect."""
        h, w = size
        m = self.mask("tgt", self.config.target_mask_mode, h * w, (h, w), device)
        return m.view(-1, 1, h, w).float()

    def prepare(self, sizes, device, modes=("graft", "qgraft")) -> None:
        """Build every layer's masks for the latent grids ``sizes`` now, host-side counts included
        (so nothing is built, and no value read back, while ``torch.compile`` traces a UNet call)."""
        for h, w in sizes:
            for mode in modes:
                self.layer(mode, h * w, device, (h, w)).routing.host()
            self.mask("tgt", self.config.dae_mask_mode, h * w, (h, w), device)
