"""The literal formula: two full masked softmax attentions, then a per-query stitch.

This is the authors' way of computing grafted attention and the yardstick every other backend is
tested against. It spends 2·Lq·L key visits per query row and builds dense score matrices, so it is
slow on purpose: it is written to be obviously right, not fast.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..mask import TriSourceMask
from ..validation import Problem, accumulate_dtype


def _masked_softmax_attention(q, k, v, key_mask, logit_scale, compute_dtype):
    # q (B,H,Lq,D), k/v (B or 1,H,L,D), key_mask (B,L) with at least one True per row.
    s = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * logit_scale
    s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s.float() if compute_dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    # a key the row may not read contributes nothing, not even 0 * NaN (the op's NaN rule)
    v = v.to(compute_dtype).masked_fill(~key_mask[:, None, :, None], 0)
    return torch.matmul(p, v), lse


def reference_attention(
    problem: Problem, q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor, k_bg: torch.Tensor,
    v_bg: torch.Tensor, mask: TriSourceMask, *, compute_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Tri-source attention by the literal formula (docs/architecture.md, "The op"), over the
    call's validated arguments and its mask (:func:`o2mag_kernels.validation.as_mask`).

    ``compute_dtype`` defaults to float64 for float64 inputs and float32 otherwise; tests also run it
    in float16/bfloat16 to measure how much error plain low-precision arithmetic makes.
    """
    if compute_dtype is None:
        compute_dtype = accumulate_dtype(q.dtype)
    use_fg, fg_mask, bg_mask = mask.effective(problem.B, problem.Lf, problem.Lb)
    # Rows with no usable foreground key never take the foreground result; give them a dummy key
    # set so their (unused) softmax stays finite.
    fg_mask_safe = fg_mask | ~fg_mask.any(dim=1, keepdim=True)
    if problem.Lf > 0:
        out_fg, lse_fg = _masked_softmax_attention(
            q, k_fg, v_fg, fg_mask_safe, problem.fg_gain * problem.scale, compute_dtype)
    else:
        out_fg = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
        lse_fg = torch.zeros(q.shape[:3], dtype=out_fg.real.dtype, device=q.device)
    out_bg, lse_bg = _masked_softmax_attention(q, k_bg, v_bg, bg_mask, problem.scale, compute_dtype)
    use_fg = use_fg[:, None, :]  # (B, 1, Lq)
    out = torch.where(use_fg[..., None], out_fg, out_bg).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(use_fg, lse_fg, lse_bg)
    return out, lse.to(accumulate_dtype(compute_dtype))
