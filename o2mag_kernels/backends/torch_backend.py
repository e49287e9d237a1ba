"""Efficient pure-PyTorch tri-source attention (CPU and CUDA, differentiable).

Each query needs ONE source. Exact strategies, picked per device (``STRATEGY``) or forced with
the environment variable ``O2MAG_TORCH_STRATEGY=routed|stitch|masked|augmented``:

* ``routed`` — gather the queries that take the foreground and those that take the background,
  gather only the usable keys of each source, run one unmasked ``scaled_dot_product_attention``
  per (batch group, source) and scatter the rows back. Work is Σ_i |keys(i)|; no Lq×L score matrix
  is materialised. Fastest on a CPU, where gathers are cheap next to the attention.
* ``stitch`` — every query attends the foreground's compacted usable keys (few: the defect) and
  the background (its usable keys compacted when one mask serves the batch, else a boolean
  ``attn_mask``), then one ``torch.where`` picks each row. No row gathers or scatters and no host
  synchronisation after the mask's first use: on a GPU it does strictly less work than two masked
  SDPA calls and a select, which it is built to beat.
* ``augmented`` — the stitch, with per-target background key exclusion done inside ONE plain
  SDPA call per group of targets instead of a boolean ``attn_mask`` (which keeps SDPA off its
  fastest kernels): a column appended to the head dim, q' = [q, s·e_b] and k' = [k, -s·x], where
  e_b is one-hot for the query's target and x marks the keys that target may not use, adds
  exactly 0 to a usable key's logit and -s² = -EXCLUDE_LOGIT/scale to an excluded one, whose
  weight then underflows to exactly 0 in fp32. With batch-1 sources the targets are folded into
  the query length over one shared k' (one column per target, ``fold_width`` targets per call).
  Exact while every logit is below EXCLUDE_LOGIT / 2 - 52 in magnitude; see ``_augmented_bg``.

Index lists come from the :class:`~o2mag_kernels.TriSourceMask` (its host-side counts are read
once per mask object), so a prebuilt mask costs no synchronisation per call. The log-sum-exp
(``return_lse``) always takes the routed path with an explicit fp32/fp64 softmax, since SDPA does
not return it.

NaN rule (the op's contract): a NaN or infinity in what a row reads -- its query, or a usable key or
value of its source -- makes that whole row NaN (and its log-sum-exp); a non-finite key or value
that the row may not read does not change it. Sources that reach SDPA with excluded keys still
in them (through an ``attn_mask`` or the augmented columns) are read with non-finite entries set
to 0, and ``_poison_rows`` then marks the rows that read one (SDPA itself is not consistent
here: its CPU kernels return 0 for a NaN query row).

While ``torch.compile`` traces a call whose mask has not read its host-side counts yet (reading
them would break the graph), the ``masked`` strategy runs instead: both sources with boolean
``attn_mask`` and one select, data-independent and exact (``TriSourceMask.host()`` called once
before compiling avoids it).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..mask import TriSourceMask
from ..validation import Problem, accumulate_dtype

# Elements of one float32 score chunk on the LSE path (about 64 MiB).
_LSE_CHUNK_ELEMENTS = 1 << 24

STRATEGIES = ("routed", "stitch", "masked", "augmented")
# Per device type; anything else uses "routed". ``O2MAG_TORCH_STRATEGY`` overrides (benchmarks).
STRATEGY = {"cpu": "routed", "cuda": "stitch"}


def pick_strategy(device: torch.device) -> str:
    """The strategy for tensors on ``device`` (the ``O2MAG_TORCH_STRATEGY`` variable overrides)."""
    forced = os.environ.get("O2MAG_TORCH_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"O2MAG_TORCH_STRATEGY must be one of {STRATEGIES}, got {forced!r}")
        return forced
    return STRATEGY.get(device.type, "routed")


def _gather(x: torch.Tensor, idx: Optional[torch.Tensor]):
    """Rows ``idx`` of the token dim of a (B, H, L, D) tensor; ``None`` selects everything (no
    copy). The copy is laid out (B, L, H, D) -- diffusers' projection layout, which SDPA's CPU
    kernels run about twice as fast as (B, H, L, D) -- and returned as a (B, H, L', D) view.
    Size-1 sources are gathered before any broadcast, so once, not once per target."""
    return x if idx is None else x.transpose(1, 2).index_select(1, idx).transpose(1, 2)


def _unbroadcast(x: torch.Tensor) -> torch.Tensor:
    """A source the caller expanded over the batch (stride 0) becomes its size-1 original view."""
    return x[:1] if x.shape[0] > 1 and x.stride(0) == 0 else x


def _unbroadcast_pair(k: torch.Tensor, v: torch.Tensor):
    """A source's K and V, each back to size 1 when the caller expanded it -- but only when both
    are: a stride-0 K beside a real batch-B V stays as given (the strategies' size-1 paths take
    one batch for both)."""
    k1, v1 = _unbroadcast(k), _unbroadcast(v)
    return (k1, v1) if k1.shape[0] == v1.shape[0] else (k, v)


def _attend(q, k, v, scale: float, want_lse: bool, mask=None):
    """softmax(scale·q·kᵀ)·v over the keys given (``mask``: bool, broadcastable, True = usable);
    returns (out, lse or None). ``k``/``v`` have q's batch or batch 1 (never copied per row)."""
    B, H, Lq, D = q.shape
    if not want_lse:
        k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
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


def _keys(host: dict, which: str, row: int, L: int):
    """Index list of one mask row's usable keys, or None when every key is usable."""
    rows = host[which]
    if rows is None:
        return None
    idx, n = rows[min(row, len(rows) - 1)]
    return None if n == L else idx[:n]


def _route_group(q, k_fg, v_fg, k_bg, v_bg, mask, row: int, problem: Problem, out, lse):
    """Routed attention for batch rows that share mask row ``row`` (one routing, one key set),
    written into ``out`` ((B, Lq, H, D) memory, the layout the caller hands back as (B, H, Lq, D))
    and, when given, ``lse`` (B, H, Lq). Every row is written exactly once."""
    Lq = q.shape[2]
    host = mask.host()
    n_fg = host["n_qfg"][min(row, len(host["n_qfg"]) - 1)] if problem.Lf > 0 else 0
    perm = host["qperm"][min(row, host["qperm"].shape[0] - 1)]
    want_lse = lse is not None
    parts = []  # (query indices or None, out, lse)
    if n_fg > 0:
        qi = None if n_fg == Lq else perm[:n_fg]
        kf = _keys(host, "fidx", row, problem.Lf)
        parts.append((qi, *_attend(_gather(q, qi), _gather(k_fg, kf), _gather(v_fg, kf),
                                   problem.scale * problem.fg_gain, want_lse)))
    if n_fg < Lq:
        qi = None if n_fg == 0 else perm[n_fg:]
        kb = _keys(host, "bidx", row, problem.Lb)
        parts.append((qi, *_attend(_gather(q, qi), _gather(k_bg, kb), _gather(v_bg, kb),
                                   problem.scale, want_lse)))
    # in place into fresh buffers (no zero fill, no clone per part; autograd flows to o and l)
    for qi, o, l in parts:
        if qi is None:
            out.copy_(o.transpose(1, 2))
        else:
            out.index_copy_(1, qi, o.transpose(1, 2))
        if want_lse:
            lse.copy_(l) if qi is None else lse.index_copy_(2, qi, l)


def _routed(problem: Problem, q, k_fg, v_fg, k_bg, v_bg, mask, want_lse: bool):
    B, H, Lq, D = q.shape
    out = q.new_empty(B, Lq, H, D)  # diffusers' layout: its output reshape is then free
    lse = q.new_empty(B, H, Lq, dtype=accumulate_dtype(q.dtype)) if want_lse else None
    if mask.batch == 1 or B == 1:
        # One routing for the whole batch: size-1 sources are gathered once, then expanded (a view).
        k_fg, v_fg, k_bg, v_bg = (_unbroadcast(x) for x in (k_fg, v_fg, k_bg, v_bg))
        _route_group(q, k_fg, v_fg, k_bg, v_bg, mask, 0, problem, out, lse)
    else:
        for b in range(B):
            bf = b if problem.Bf == B else 0
            bb = b if problem.Bb == B else 0
            _route_group(q[b:b + 1], k_fg[bf:bf + 1], v_fg[bf:bf + 1], k_bg[bb:bb + 1],
                         v_bg[bb:bb + 1], mask, b, problem, out[b:b + 1],
                         None if lse is None else lse[b:b + 1])
    return out.transpose(1, 2), lse


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and infinities set to 0 (a copy): what SDPA may read of a source whose
    excluded keys still take part in the computation (see the NaN rule in the module doc)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., L) flags: the last dim of ``x`` holds a NaN or an infinity. Exact: a row's max and min
    are finite only when all of it is (both propagate NaN; +inf is a max, -inf a min), and, unlike
    a sum, they cannot overflow. Two vectorised reductions, no full-size temporaries (``isfinite``
    builds three; ``aminmax`` over the last dim is about 4x slower than both on a CPU)."""
    return ~(torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1)))


def _poison_rows(problem: Problem, out: torch.Tensor, lse: Optional[torch.Tensor], q, k_fg, v_fg,
                 k_bg, v_bg, mask: TriSourceMask):
    """The NaN rule: rows whose query, or a usable key or value of their source, is not finite
    become NaN (out and lse). B·H·Lq flags from row-wise min/max, then one select. On a GPU device
    ops only (no host read); on a CPU, where reading a value back is free, one sum per tensor
    first shows that nothing is non-finite (the common case: no flags, no select), except while
    ``torch.compile`` traces the call."""
    host_free = out.device.type == "cpu" and not torch.compiler.is_compiling()
    tensors = (q, *map(_unbroadcast, (k_fg, v_fg, k_bg, v_bg)))
    if host_free and all(bool(torch.isfinite(x.sum())) for x in tensors):
        # a sum is finite only when every element is (NaN and infinities propagate; an overflow
        # only sends the call to the exact check below): no row to mark, the common case
        return out, lse
    B, Lf, Lb = problem.B, problem.Lf, problem.Lb
    use_fg, fg, bg = mask.effective(B, Lf, Lb)
    bad = _nonfinite_rows(q)                                                   # (B, H, Lq)

    def source_bad(k, v, usable):  # (B or 1, H): a usable key or value of the source is not finite
        if k.shape[2] == 0:
            return torch.zeros(1, k.shape[1], dtype=torch.bool, device=k.device)
        k, v = _unbroadcast(k), _unbroadcast(v)  # never a per-target copy of a shared source
        keys = _nonfinite_rows(k) | _nonfinite_rows(v)                         # (Bs, H, L)
        return (keys & usable[:, None, :]).any(dim=-1)

    fg_bad = source_bad(k_fg, v_fg, fg[:1] if fg.stride(0) == 0 else fg)
    bg_bad = source_bad(k_bg, v_bg, bg[:1] if bg.stride(0) == 0 else bg)
    bad = bad | torch.where(use_fg[:, None, :], fg_bad[:, :, None], bg_bad[:, :, None])
    if host_free and not bool(bad.any()):  # (a traced call must not read a value back: a graph break)
        return out, lse
    if out.requires_grad or (lse is not None and lse.requires_grad):
        # out of place: SDPA's backward may need the output it returned
        out = out.masked_fill(bad[..., None], float("nan"))
        return out, None if lse is None else lse.masked_fill(bad, float("nan"))
    out.masked_fill_(bad[..., None], float("nan"))  # a fresh result of this call: no copy
    if lse is not None:
        lse.masked_fill_(bad, float("nan"))
    return out, lse


def _foreground_all(problem: Problem, q, k_fg, v_fg, mask: TriSourceMask, fg):
    """Every query over the foreground: its compacted usable keys when one mask row serves the
    batch, else a boolean ``attn_mask`` (rows without a usable key are never selected)."""
    host = mask.host()
    scale = problem.scale * problem.fg_gain
    if host["fidx"] is None or len(host["fidx"]) == 1:
        kf = _keys(host, "fidx", 0, problem.Lf)
        return _attend(q, _gather(k_fg, kf), _gather(v_fg, kf), scale, False)[0]
    safe = fg | ~fg.any(dim=1, keepdim=True)
    return _attend(q, _finite(k_fg), _finite(v_fg), scale, False, safe[:, None, None, :])[0]


def _background_masked(problem: Problem, q, k_bg, v_bg, mask: TriSourceMask, bg):
    """Every query over the background: compacted usable keys when one mask row serves the batch,
    else a boolean ``attn_mask``."""
    host = mask.host()
    if host["bidx"] is None or len(host["bidx"]) == 1:
        kb = _keys(host, "bidx", 0, problem.Lb)
        return _attend(q, _gather(k_bg, kb), _gather(v_bg, kb), problem.scale, False)[0]
    return _attend(q, _finite(k_bg), _finite(v_bg), problem.scale, False, bg[:, None, None, :])[0]


def _select(use_fg, out_fg, out_bg):
    if out_bg is None:
        return out_fg
    if out_fg is None:
        return out_bg
    return torch.where(use_fg[:, None, :, None], out_fg, out_bg)


def _stitch(problem: Problem, q, k_fg, v_fg, k_bg, v_bg, mask, background=None):
    """Both sources for every query, foreground keys compacted, one select (see module doc).
    ``background`` replaces how the background part is computed (the augmented strategy)."""
    B, Lq, Lf, Lb = problem.B, problem.Lq, problem.Lf, problem.Lb
    host = mask.host()
    n_qfg = host["n_qfg"] if Lf > 0 else [0]
    use_fg, fg, bg = mask.effective(B, Lf, Lb)
    (k_fg, v_fg), (k_bg, v_bg) = _unbroadcast_pair(k_fg, v_fg), _unbroadcast_pair(k_bg, v_bg)
    out_fg = _foreground_all(problem, q, k_fg, v_fg, mask, fg) if max(n_qfg) > 0 else None
    out_bg = None
    if min(n_qfg) < Lq:
        out_bg = (background or _background_masked)(problem, q, k_bg, v_bg, mask, bg)
    return _select(use_fg, out_fg, out_bg)


def _masked(problem: Problem, q, k_fg, v_fg, k_bg, v_bg, mask):
    """Both sources for every query through boolean ``attn_mask`` s, one select; no host value is
    read, so it traces into one graph (see module doc)."""
    B, Lf, Lb = problem.B, problem.Lf, problem.Lb
    use_fg, fg, bg = mask.effective(B, Lf, Lb)
    k_fg, v_fg, k_bg, v_bg = (_unbroadcast(_finite(x)) for x in (k_fg, v_fg, k_bg, v_bg))
    out_bg, _ = _attend(q, k_bg, v_bg, problem.scale, False, bg[:, None, None, :])
    if Lf == 0:
        return out_bg
    safe = fg | ~fg.any(dim=1, keepdim=True)  # rows with no usable key are never selected
    out_fg, _ = _attend(q, k_fg, v_fg, problem.scale * problem.fg_gain, False, safe[:, None, None, :])
    return torch.where(use_fg[:, None, :, None], out_fg, out_bg)


# The augmented strategy: an excluded key's logit is lowered by EXCLUDE_LOGIT (in softmax units,
# after the scale). exp(-104) is below float32's smallest subnormal, so an excluded key's weight is
# exactly 0 whenever it trails the row's best usable logit by more than 104 after the shift, i.e.
# while every logit is below (EXCLUDE_LOGIT - 104) / 2 in magnitude. The shift is split over the
# two appended columns (s and -s, s² = EXCLUDE_LOGIT / scale), so each stays far inside float16's
# range (s = 251 for SD's scale 40**-0.5).
EXCLUDE_LOGIT = 1.0e4
# SDPA's fast CUDA kernels need equal q/k and v head dims: pad v there (the CPU kernels do not).
PAD_V = {"cuda": True}


def fold_width(head_dim: int) -> int:
    """Targets folded into one SDPA call over a shared k': the columns left before the head dim's
    next multiple of 32 (SDPA kernels pad to such widths anyway), at least 8."""
    return max(8, 32 * math.ceil((head_dim + 1) / 32) - head_dim)


def exclusion_column(problem: Problem, dtype: torch.dtype) -> Optional[float]:
    """s for the appended columns, or None when s² would not be finite in ``dtype``'s
    products (then the background runs with a boolean ``attn_mask`` instead)."""
    s = math.sqrt(EXCLUDE_LOGIT / problem.scale)
    return s if s * s < torch.finfo(dtype).max / 16 else None


def _augmented_bg(problem: Problem, q, k_bg, v_bg, mask: TriSourceMask, bg):
    """Every query over its own target's usable background keys through plain SDPA calls (see
    the module doc); falls back to the stitch's background for a shared mask or a tiny scale."""
    s = exclusion_column(problem, q.dtype)
    if mask.bg_key_mask is None or mask.bg_key_mask.shape[0] == 1 or s is None:
        return _background_masked(problem, q, k_bg, v_bg, mask, bg)
    B, H, Lq, D = q.shape
    Lb = problem.Lb
    k_bg, v_bg = _finite(k_bg), _finite(v_bg)
    cols = mask.exclusion_columns(q.dtype, -s)  # (B, Lb): -s where excluded, else 0
    pad = PAD_V.get(q.device.type, False)
    if k_bg.shape[0] == 1:
        out = q.new_empty(B, Lq, H, D)  # diffusers' layout (free output reshape)
        width = fold_width(D)
        for start in range(0, B, width):
            n = min(width, B - start)
            qa = q.new_zeros(n, Lq, H, D + n)
            qa[..., :D] = q[start:start + n].transpose(1, 2)
            qa[..., D:].diagonal(dim1=0, dim2=3).fill_(s)  # target b's own column
            ka = torch.cat([k_bg, cols[start:start + n].t()[None, None].expand(1, H, Lb, n)], -1)
            va = F.pad(v_bg, (0, n)) if pad else v_bg
            o = F.scaled_dot_product_attention(
                qa.view(1, n * Lq, H, D + n).transpose(1, 2), ka, va, scale=problem.scale)
            out[start:start + n] = o[..., :D].transpose(1, 2).reshape(n, Lq, H, D)
        return out.transpose(1, 2)
    qa = torch.cat([q, q.new_full((B, H, Lq, 1), s)], -1)
    ka = torch.cat([k_bg, cols[:, None, :, None].expand(B, H, Lb, 1)], -1)
    va = F.pad(v_bg, (0, 1)) if pad else v_bg
    return F.scaled_dot_product_attention(qa, ka, va, scale=problem.scale)[..., :D]


def torch_attention(
    problem: Problem, q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor, k_bg: torch.Tensor,
    v_bg: torch.Tensor, mask: TriSourceMask, *, return_lse: bool = False,
    strategy: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Tri-source attention in PyTorch over the call's validated arguments and its mask
    (:func:`o2mag_kernels.validation.as_mask`). ``strategy`` overrides :func:`pick_strategy`."""
    if problem.Lq == 0:
        out = q.clone()  # empty; a clone (not new_empty) keeps the result in q's autograd graph
        lse_dtype = accumulate_dtype(q.dtype)
        return (out, q.new_empty(q.shape[:3], dtype=lse_dtype)) if return_lse else out
    strategy = strategy or pick_strategy(q.device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not mask.host_read and not return_lse and torch.compiler.is_compiling():
        strategy = "masked"
    lse = None
    if strategy == "masked" and not return_lse:
        out = _masked(problem, q, k_fg, v_fg, k_bg, v_bg, mask)
    elif return_lse or strategy == "routed":
        out, lse = _routed(problem, q, k_fg, v_fg, k_bg, v_bg, mask, return_lse)
    elif strategy == "augmented":
        out = _stitch(problem, q, k_fg, v_fg, k_bg, v_bg, mask, background=_augmented_bg)
    else:
        out = _stitch(problem, q, k_fg, v_fg, k_bg, v_bg, mask)
    out, lse = _poison_rows(problem, out, lse, q, k_fg, v_fg, k_bg, v_bg, mask)
    return (out, lse) if return_lse else out
