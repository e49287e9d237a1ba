"""An independent statement of the tri-source attention formula (docs/architecture.md, "The op"), for cross-checking.

Written from the contract text alone: it imports nothing from ``o2mag_kernels``. Where the
reference backend runs two dense attentions and stitches them, this walks the batch in Python,
builds the explicit key-index sets F and G and the routed query sets for each batch row, and does
float64 NumPy arithmetic on exactly the keys each query needs (a max-shifted softmax). A bug would
have to be made twice, in two different ways, to pass the parity tests unnoticed.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _np64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a tensor (every fp16/bf16/fp32 value is representable in float64)."""
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _row(mask, b: int):
    """Row ``b`` of a (1 or B, L) bool mask as a NumPy bool vector; None stays None."""
    if mask is None:
        return None
    m = mask.detach().cpu().numpy().astype(bool)
    return m[0] if m.shape[0] == 1 else m[b]


def _softmax_rows(logits: np.ndarray, values: np.ndarray):
    """(H, n, m) logits and (H, m, D) values -> (H, n, D) outputs and (H, n) natural-log sum-exp."""
    top = logits.max(axis=-1, keepdims=True)
    w = np.exp(logits - top)
    z = w.sum(axis=-1, keepdims=True)
    return (w @ values) / z, (top + np.log(z))[..., 0]


def formula_attention(q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask=None, bg_key_mask=None,
                      *, scale=None, fg_gain=1.0):
    """Return ``(out, lse)`` as float64 CPU tensors of shapes (B, H, Lq, D) and (B, H, Lq).

    For batch b, head h, query i: if ``query_mask[b, i]`` and F = {j : fg_key_mask[b, j]} is not
    empty, softmax over F of ``fg_gain * scale * <q_i, k_fg_j>`` applied to ``v_fg``; otherwise
    softmax over G = {j : bg_key_mask[b, j]} (all background keys when G is empty) of
    ``scale * <q_i, k_bg_j>`` applied to ``v_bg``. Size-1 batch dims of sources and masks broadcast.
    """
    qn, kf, vf, kb, vb = (_np64(t) for t in (q, k_fg, v_fg, k_bg, v_bg))
    B, H, Lq, D = qn.shape
    Lf, Lb = kf.shape[2], kb.shape[2]
    s = D ** -0.5 if scale is None else float(scale)
    out = np.full((B, H, Lq, D), np.nan)
    lse = np.full((B, H, Lq), np.nan)
    for b in range(B):
        fb = b if kf.shape[0] > 1 else 0
        bb = b if kb.shape[0] > 1 else 0
        fg_row = _row(fg_key_mask, b)
        bg_row = _row(bg_key_mask, b)
        F = np.arange(Lf) if fg_row is None else np.flatnonzero(fg_row)
        G = np.arange(Lb) if bg_row is None else np.flatnonzero(bg_row)
        if G.size == 0:
            G = np.arange(Lb)
        inside = _row(query_mask, b)
        fg_queries = np.flatnonzero(inside) if F.size > 0 else np.zeros(0, dtype=np.int64)
        bg_queries = np.setdiff1d(np.arange(Lq), fg_queries)
        for queries, keys, K, V, factor in (
            (fg_queries, F, kf[fb], vf[fb], fg_gain * s),
            (bg_queries, G, kb[bb], vb[bb], s),
        ):
            if queries.size == 0:
                continue
            logits = factor * (qn[b][:, queries, :] @ K[:, keys, :].transpose(0, 2, 1))
            o, l = _softmax_rows(logits, V[:, keys, :])
            out[b][:, queries, :] = o
            lse[b][:, queries] = l
    assert not np.isnan(out).any() and math.isfinite(s)  # every query got exactly one source
    return torch.from_numpy(out), torch.from_numpy(lse)
