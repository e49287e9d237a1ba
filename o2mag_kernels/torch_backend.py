"""Efficient pure-PyTorch tri-source attention (CPU and CUDA, differentiable).

Each query needs ONE source, so instead of two dense attentions and a stitch we route: gather the
queries that take the foreground and those that take the background, gather only the usable keys of
each source, run one ``scaled_dot_product_attention`` per (batch group, source), and scatter the rows
back. Work is Σ_i |keys(i)| instead of 2·Lq·L, and no Lq×L score matrix is materialised (SDPA's
fused kernels stream over keys).

Batches are processed together when every mask is shared by the whole batch (the common
"one reference, one normal image, many targets with the same mask" case is then a single call
per source); otherwise one group per target batch row, which the grafting layer keeps small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import Problem, accumulate_dtype, effective_key_masks

# Elements of one float32 score chunk on the LSE path (about 64 MiB).
_LSE_CHUNK_ELEMENTS = 1 << 24


def _gather(x: torch.Tensor, idx, dim: int = 2):
    """``x.index_select(dim, idx)`` that skips the copy when ``idx`` selects everything in order.

    Sources are gathered before any batch broadcast, so a size-1 source is gathered once, not once
    per target.
    """
    return x if idx is None else x.index_select(dim, idx)


def _unbroadcast(x: torch.Tensor) -> torch.Tensor:
    """A source the caller expanded over the batch (stride 0) becomes its size-1 original view."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


def _attend(q, k, v, scale: float, want_lse: bool):
    """softmax(scale·q·kᵀ)·v over all keys given; returns (out, lse or None).

    ``k``/``v`` have q's batch or batch 1 (shared by every row of q); a shared source is never
    materialised per batch row.
    """
    B, H, Lq, D = q.shape
    if not want_lse:
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, scale=scale), None
    # SDPA does not expose the log-sum-exp publicly, so this path streams over query chunks with
    # fp32 (or fp64) accumulation and never holds more than one chunk of scores. With a shared
    # source, q's batch is folded into its rows so matmul never broadcasts (copies) k or v.
    acc = accumulate_dtype(q.dtype)
    fold = k.shape[0] == 1 and B > 1
    L = k.shape[2]
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, B * H * L))
    kt = k.to(acc).transpose(-1, -2)
    va = v.to(acc)
    outs, lses = [], []
    for start in range(0, Lq, rows):
        qc = q[:, :, start:start + rows].to(acc)
        r = qc.shape[2]
        if fold:
            qc = qc.transpose(0, 1).reshape(1, H, B * r, D)
        s = torch.matmul(qc, kt) * scale
        lse = torch.logsumexp(s, dim=-1)
        o = torch.matmul(torch.exp(s - lse[..., None]), va)
        if fold:
            o = o.reshape(H, B, r, D).transpose(0, 1)
            lse = lse.reshape(H, B, r).transpose(0, 1)
        outs.append(o.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _indices(mask_row: torch.Tensor):
    """Positions of True entries, or None when all are True (so callers can skip a gather)."""
    if bool(mask_row.all()):
        return None
    return mask_row.nonzero().squeeze(1)


def _route_group(q, k_fg, v_fg, k_bg, v_bg, use_fg_row, fg_row, bg_row, problem, want_lse):
    """Attention for a group of batch rows that share one query routing and one pair of key sets."""
    B, H, Lq, D = q.shape
    out_dtype = accumulate_dtype(q.dtype)
    n_fg = int(use_fg_row.sum())  # the count also says when a query set is all rows (no 2nd sync)
    parts = []  # (query indices or None, out, lse)
    if n_fg > 0:
        qi = None if n_fg == Lq else use_fg_row.nonzero().squeeze(1)
        kf = _indices(fg_row)
        o, l = _attend(_gather(q, qi), _gather(k_fg, kf), _gather(v_fg, kf),
                       problem.scale * problem.fg_gain, want_lse)
        parts.append((qi, o, l))
    if n_fg < Lq:
        qi = None if n_fg == 0 else (~use_fg_row).nonzero().squeeze(1)
        kb = _indices(bg_row)
        o, l = _attend(_gather(q, qi), _gather(k_bg, kb), _gather(v_bg, kb), problem.scale, want_lse)
        parts.append((qi, o, l))
    if len(parts) == 1 and parts[0][0] is None:
        _, out, lse = parts[0]
    else:
        # The two query sets partition the rows, so every row of the fresh buffer is written once
        # (in place: no zero fill, no full clone per part; autograd flows to o and l).
        out = q.new_empty(B, H, Lq, D)
        lse = q.new_empty(B, H, Lq, dtype=out_dtype) if want_lse else None
        for qi, o, l in parts:
            out.index_copy_(2, qi, o)
            if want_lse:
                lse.index_copy_(2, qi, l)
    return out, lse  # lse (when asked) is already out_dtype: _attend accumulates in it


def torch_attention(
    problem: Problem, q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask,
    *, return_lse: bool = False,
):
    B, Lq = problem.B, problem.Lq
    if Lq == 0:
        out = q.clone()  # empty; a clone (not new_empty) keeps the result in q's autograd graph
        lse_dtype = accumulate_dtype(q.dtype)
        return (out, q.new_empty(q.shape[:3], dtype=lse_dtype)) if return_lse else out
    fg_mask, bg_mask, fg_any = effective_key_masks(problem, fg_key_mask, bg_key_mask, q.device)
    use_fg = query_mask.expand(B, Lq) & fg_any[:, None]

    shared = all(m is None or m.shape[0] == 1 for m in (query_mask, fg_key_mask, bg_key_mask))
    if shared or B == 1:
        # One routing for the whole batch: size-1 sources are gathered once, then expanded (a view).
        k_fg, v_fg, k_bg, v_bg = (_unbroadcast(x) for x in (k_fg, v_fg, k_bg, v_bg))
        out, lse = _route_group(
            q, k_fg, v_fg, k_bg, v_bg, use_fg[0], fg_mask[0], bg_mask[0], problem, return_lse)
    else:
        outs, lses = [], []
        for b in range(B):
            bf = b if problem.Bf == B else 0
            bb = b if problem.Bb == B else 0
            o, l = _route_group(
                q[b:b + 1], k_fg[bf:bf + 1], v_fg[bf:bf + 1], k_bg[bb:bb + 1], v_bg[bb:bb + 1],
                use_fg[b], fg_mask[b], bg_mask[b], problem, return_lse)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, dim=0)
        lse = torch.cat(lses, dim=0) if return_lse else None
    return (out, lse) if return_lse else out
