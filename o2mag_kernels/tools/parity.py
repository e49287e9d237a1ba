"""How close a backend's result must be to the float64 formula: one rule for the tests, the
``check`` command and the hardware sweep.

float32 (and float64): an absolute tolerance scaled by the largest output. float16/bfloat16:
at most ``factor`` (2) times the error that the reference formula itself makes when computed in
that precision, plus half a unit in the last place at the largest output (rounding an
fp32-accurate result to the dtype, which the low-precision reference may happen not to pay) and a
tiny floor for fp32 accumulation -- so the bound adapts to the case instead of being a guess.
"""
from __future__ import annotations

import torch

from ..backends.reference import reference_attention
from ..validation import Problem, as_mask


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (0.0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.detach().to(actual.device).double()).abs().max())


def low_precision_bound(problem: Problem, args, exact: torch.Tensor, dtype: torch.dtype, *,
                        factor: float = 2.0, floor: float = 1e-5) -> float:
    """Largest error vs ``exact`` allowed for a float16/bfloat16 result of the call ``args``
    (q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask in ``dtype``)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"low_precision_bound is for float16/bfloat16, got {dtype}")
    lowp = reference_attention(problem, *args[:5], as_mask(problem, *args[5:]), compute_dtype=dtype)
    own_error = max_abs_err(lowp, exact)
    top = float(exact.abs().max()) if exact.numel() else 0.0
    return factor * own_error + 0.5 * torch.finfo(dtype).eps * top + floor


def bound(problem: Problem, args, exact: torch.Tensor, dtype: torch.dtype, *,
          fp32_atol: float = 1e-5) -> float:
    """The parity bound of a result in ``dtype`` (see the module docstring)."""
    if dtype in (torch.float16, torch.bfloat16):
        return low_precision_bound(problem, args, exact, dtype)
    top = float(exact.abs().max()) if exact.numel() else 0.0
    return fp32_atol * max(1.0, top)
