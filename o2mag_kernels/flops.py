"""Useful work of one tri-source attention call (backend independent, for benchmarks).

A query needs the keys of ONE source: |F| usable foreground keys when it is routed to the
foreground, else |G| usable background keys (all of them when none is usable). Useful FLOPs count
only those: 4·D·H·Σ_i |keys(i)| (two matmuls of 2·D flops per query-key pair). Padded or masked
work a kernel may do is deliberately not counted.
"""
from __future__ import annotations

import torch

from .validation import Problem, effective_key_masks


def useful_key_visits(problem: Problem, query_mask, fg_key_mask, bg_key_mask) -> int:
    """Σ over batches and queries of the number of keys the query's softmax runs over (one head)."""
    use_fg, fg, bg = effective_key_masks(problem, query_mask, fg_key_mask, bg_key_mask)
    n_f = fg.sum(dim=1, dtype=torch.int64)                      # (B,)
    n_b = bg.sum(dim=1, dtype=torch.int64)                      # (B,)
    n_qf = use_fg.sum(dim=1, dtype=torch.int64)                 # (B,)
    return int((n_qf * n_f + (problem.Lq - n_qf) * n_b).sum())


def useful_flops(problem: Problem, query_mask, fg_key_mask=None, bg_key_mask=None) -> int:
    """4·D·H·Σ_i |keys(i)|: the FLOPs a kernel that skips every unneeded key must still do."""
    return 4 * problem.D * problem.H * useful_key_visits(problem, query_mask, fg_key_mask, bg_key_mask)
