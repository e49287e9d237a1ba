"""Argument checking for :func:`o2mag_kernels.tri_source_attention`.

Every backend runs behind the same checks, so a bad call fails the same way (and before any kernel
launch) whichever backend would have served it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from .mask import TriSourceMask, check_mask_type, tri_source_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the accumulator and log-sum-exp dtype of every
    non-fused backend (one rule, so the backends cannot drift apart)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Problem:
    """Sizes of one call after validation (one place derives them for every backend)."""

    B: int
    H: int
    Lq: int
    Lf: int
    Lb: int
    D: int
    Bf: int
    Bb: int
    scale: float
    fg_gain: float


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _check_mask(name: str, m, batch_ok: tuple, length: int, device) -> None:
    check_mask_type(name, m)
    if m.shape[0] not in batch_ok:
        allowed = " or ".join(str(b) for b in sorted(set(batch_ok)))
        raise ValueError(f"{name} batch size must be {allowed}, got {m.shape[0]}")
    if m.shape[1] != length:
        raise ValueError(f"{name} length must be {length}, got {m.shape[1]}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but q is on {device}")


def _check_number(name: str, x, *, allow_zero: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = float(x)
        else:
            raise TypeError(f"{name} must be a Python float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite positive number, got {x}")
    return x


def validate(
    q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask, scale, fg_gain, backend
) -> Problem:
    """Check every argument; return the call's sizes. Raises ``TypeError``/``ValueError``.

    ``query_mask`` may be a prebuilt :class:`~o2mag_kernels.TriSourceMask`; the key masks must
    then be ``None`` (the mask object holds them).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    names = ("q", "k_fg", "v_fg", "k_bg", "v_bg")
    tensors = (q, k_fg, v_fg, k_bg, v_bg)
    for name, t in zip(names, tensors):
        _check_tensor(name, t, 4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    B, H, Lq, D = q.shape
    if B == 0 or H == 0:
        raise ValueError(f"q must have a non-empty batch and head dimension, got {tuple(q.shape)}")
    if D == 0:
        raise ValueError("q must have a non-zero head dimension")
    for kname, vname, k, v in (("k_fg", "v_fg", k_fg, v_fg), ("k_bg", "v_bg", k_bg, v_bg)):
        if k.shape[0] not in (1, B):
            raise ValueError(f"{kname} batch size must be 1 or {B} (q's), got {k.shape[0]}")
        if k.shape[1] != H:
            raise ValueError(f"{kname} has {k.shape[1]} heads but q has {H}")
        if k.shape[3] != D:
            raise ValueError(f"{kname} head dim is {k.shape[3]} but q's is {D}")
        if v.shape != k.shape:
            raise ValueError(f"{vname} shape {tuple(v.shape)} must equal {kname} shape {tuple(k.shape)}")
    Bf, Lf = k_fg.shape[0], k_fg.shape[2]
    Bb, Lb = k_bg.shape[0], k_bg.shape[2]
    if Lb == 0:
        raise ValueError("k_bg must hold at least one key: background is every query's fallback")
    if isinstance(query_mask, TriSourceMask):
        for name, m in (("fg_key_mask", fg_key_mask), ("bg_key_mask", bg_key_mask)):
            if m is not None:
                raise ValueError(f"{name} must be None when query_mask is a TriSourceMask "
                                 "(the mask object already holds the key masks)")
        query_mask.check(B, Lq, Lf, Lb, q.device)
    else:
        _check_mask("query_mask", query_mask, (1, B), Lq, q.device)
        if fg_key_mask is not None:
            _check_mask("fg_key_mask", fg_key_mask, (1, B), Lf, q.device)
        if bg_key_mask is not None:
            _check_mask("bg_key_mask", bg_key_mask, (1, B), Lb, q.device)
    scale = D ** -0.5 if scale is None else _check_number("scale", scale)
    fg_gain = _check_number("fg_gain", fg_gain)
    return Problem(B=B, H=H, Lq=Lq, Lf=Lf, Lb=Lb, D=D, Bf=Bf, Bb=Bb, scale=scale, fg_gain=fg_gain)


def as_mask(problem: Problem, query_mask, fg_key_mask, bg_key_mask) -> TriSourceMask:
    """The call's :class:`TriSourceMask` (the prebuilt one, or built now from the three masks),
    adjusted for an empty foreground source. Arguments were validated."""
    m = query_mask if isinstance(query_mask, TriSourceMask) else \
        tri_source_mask(query_mask, fg_key_mask, bg_key_mask)
    return m.for_lengths(problem.Lf, problem.Lb)


def effective_key_masks(problem: Problem, query_mask, fg_key_mask, bg_key_mask):
    """(use_fg (B, Lq), fg keys (B, Lf), bg keys (B, Lb)) bool views: the contract's sets with
    ``None`` = all usable and the empty-background fallback applied; ``use_fg`` says which queries
    take the foreground (inside the query mask, and their batch has a usable foreground key)."""
    m = as_mask(problem, query_mask, fg_key_mask, bg_key_mask)
    return m.effective(problem.B, problem.Lf, problem.Lb)
