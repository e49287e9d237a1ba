"""Triton backend of :func:`o2mag_kernels.tri_source_attention`: one fused launch for the whole op.

The wrapper builds small routing tables with a few torch ops (no host synchronisation, so it can be
captured in a CUDA graph): per target batch, a stable permutation of the queries with the
foreground-routed ones first, and of each source's usable keys first, plus the three counts. The
kernel (``_triton_kernel.tri_source_fwd``) then runs one grid over (query tiles, batch·head).

The launch is wrapped in the custom op ``o2mag::tri_source_attention_fwd`` (with a fake
implementation) so ``torch.compile`` treats it as one opaque node. The op has no backward: when
autograd would need one, :func:`triton_attention` raises (use ``backend="torch"`` or ``"auto"``).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton

from . import _triton_kernel as K
from ._validate import Problem, key_mask_sets
from .flops import useful_flops, useful_key_visits  # noqa: F401  (re-exported for benchmarks)

__all__ = ["status", "triton_attention", "useful_flops", "useful_key_visits", "is_interpreted"]

MIN_TRITON = (3, 0)
MIN_CAPABILITY = (8, 0)  # the kernels are tuned and AOT-checked for sm_80 and sm_90
# Debug switch for tests: fill the output with NaN before the launch, so an element the kernel
# fails to write shows up instead of hiding behind whatever memory ``torch.empty`` returned.
POISON_OUTPUT = False


def _triton_version() -> Tuple[int, ...]:
    parts = []
    for p in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def is_interpreted() -> bool:
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(K.tri_source_fwd, InterpretedFunction)


def status(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(usable, reason) for running the fused kernel on tensors of ``device`` (None: any device)."""
    if _triton_version() < MIN_TRITON:
        return False, f"triton {triton.__version__} is too old (need >= 3.0)"
    interp = is_interpreted()
    if interp:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            why = "(TRITON_INTERPRET was set when triton was imported)"
        else:
            why = "(TRITON_INTERPRET=1)"
        return True, f"triton {triton.__version__} CPU interpreter {why}; slow, for testing"
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type != "cuda":
        return False, (f"{dev.type} tensors need TRITON_INTERPRET=1 set before triton is imported "
                       "(the fused kernel runs on CUDA)")
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU, slowly)"
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        return False, f"GPU compute capability {cap[0]}.{cap[1]} < 8.0 is not supported"
    return True, f"triton {triton.__version__} on CUDA (sm_{cap[0]}{cap[1]})"


# --------------------------------------------------------------------------------------- routing


def _true_first(mask: torch.Tensor):
    """Stable permutation (int32, same shape) putting the True positions of each row first, and
    the number of True entries per row (int32). O(L) cumsum/scatter, no host sync."""
    n = mask.shape[1]
    m = mask.to(torch.int32)
    inv = 1 - m
    before_true = torch.cumsum(m, dim=1, dtype=torch.int32) - m
    count = m.sum(dim=1, keepdim=True, dtype=torch.int32)
    before_false = torch.cumsum(inv, dim=1, dtype=torch.int32) - inv
    pos = torch.where(mask, before_true, count + before_false).long()
    src = torch.arange(n, device=mask.device, dtype=torch.int32).expand_as(m)
    perm = torch.empty_like(m).scatter_(1, pos, src)
    return perm, count.squeeze(1)


def routing_tables(problem: Problem, query_mask, fg_key_mask, bg_key_mask):
    """(qperm, fidx, bidx, counts): tables the kernel reads. Tables stay batch-1 when every batch
    shares a mask (the kernel then uses batch stride 0); counts is int32 (B, 3)."""
    B = problem.B
    fg, bg, fg_any = key_mask_sets(problem, fg_key_mask, bg_key_mask, query_mask.device)  # 1|B rows
    use_fg = query_mask & fg_any[:, None]           # (1|B, Lq): query in M_T and a usable fg key
    qperm, n_q = _true_first(use_fg)
    fidx, n_f = _true_first(fg)
    bidx, n_b = _true_first(bg)
    counts = torch.stack([n_q.expand(B), n_f.expand(B), n_b.expand(B)], dim=1).contiguous()
    return qperm, fidx, bidx, counts


# ---------------------------------------------------------------------------------------- launch


def _batch_stride(t: torch.Tensor, B: int) -> int:
    """Stride of dim 0, or 0 when a size-1 batch broadcasts over B targets."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernel assumes unit stride along the head dim (true for diffusers views)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dot_settings(dtype: torch.dtype):
    """(DOT_FP32, INPUT_PRECISION) constexprs for a dtype.

    fp32 uses 3xTF32 on tensor cores (close to fp32 accuracy). The triton 3.9 interpreter computes
    ``tl.dot`` wrongly on bf16 operands, so under the interpreter only, bf16 dots run in fp32 (loads,
    casts and stores still take the bf16 path).
    """
    dot_fp32 = dtype == torch.bfloat16 and is_interpreted()
    return dot_fp32, ("tf32x3" if dtype == torch.float32 else "tf32")


def _grid(Lq: int, BH: int):
    return lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), BH)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    q = args["Q"]
    major, minor = torch.cuda.get_device_capability(q.device)
    keep = set(K.prune(args["HEAD_DIM"], args["LQ_BUCKET"], args["LK_BUCKET"], q.element_size(),
                       10 * major + minor))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                   c.num_stages) in keep]


_tuned = None


def _tuned_kernel():
    """The autotuned kernel (built lazily: the interpreter path never needs it)."""
    global _tuned
    if _tuned is None:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in K.CONFIGS]
        _tuned = triton.autotune(configs=configs, key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM"],
                                 prune_configs_by={"early_config_prune": _prune})(K.tri_source_fwd)
    return _tuned


def _launch(problem: Problem, q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask,
            config=None):
    """Allocate outputs, build routing tables and launch once. ``config`` forces a tile
    (BLOCK_M, BLOCK_N, num_warps, num_stages); otherwise autotune on GPU, first pruned config
    under the interpreter."""
    B, H, Lq, D = problem.B, problem.H, problem.Lq, problem.D
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if Lq == 0:
        return out, lse
    if B * H > 65535:
        raise ValueError(f"batch*heads must be at most 65535 for the triton backend, got {B * H}")
    q, k_fg, v_fg, k_bg, v_bg = (_last_dim_unit(t) for t in (q, k_fg, v_fg, k_bg, v_bg))
    qperm, fidx, bidx, counts = routing_tables(problem, query_mask, fg_key_mask, bg_key_mask)
    if fidx.numel() == 0:  # Lf == 0: never read, but give the kernel a real pointer
        fidx = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    d0, d1 = K.split_head_dim(D)
    dot_fp32, precision = _dot_settings(q.dtype)
    lq_bucket = K.length_bucket(Lq)
    lk_bucket = K.length_bucket(max(problem.Lf, problem.Lb))
    log2e = K.LOG2E
    args = (
        q, k_fg, v_fg, k_bg, v_bg, out, lse, qperm, fidx, bidx, counts,
        q.stride(0), q.stride(1), q.stride(2),
        _batch_stride(k_fg, B), k_fg.stride(1), k_fg.stride(2),
        _batch_stride(v_fg, B), v_fg.stride(1), v_fg.stride(2),
        _batch_stride(k_bg, B), k_bg.stride(1), k_bg.stride(2),
        _batch_stride(v_bg, B), v_bg.stride(1), v_bg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _batch_stride(qperm, B), _batch_stride(fidx, B), _batch_stride(bidx, B),
        H, Lq,
        problem.scale * problem.fg_gain * log2e, problem.scale * log2e,
        lq_bucket, lk_bucket,
    )
    d_chunk, k_chunk = K.chunking(D, q.element_size())
    meta = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
                D_CHUNK=d_chunk, K_CHUNK=k_chunk)
    if config is None and is_interpreted():
        config = K.prune(D, lq_bucket, lk_bucket, q.element_size(), 80)[0]
    if config is None:
        with torch.cuda.device(q.device):
            _tuned_kernel()[_grid(Lq, B * H)](*args, **meta)
    else:
        bm, bn, warps, stages = config
        grid = (triton.cdiv(Lq, bm), B * H)
        if is_interpreted():
            K.tri_source_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        else:
            with torch.cuda.device(q.device):
                K.tri_source_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                       num_warps=warps, num_stages=stages)
    return out, lse


# ------------------------------------------------------------------------------------- custom op


def _problem_of(q, k_fg, k_bg, scale: float, fg_gain: float) -> Problem:
    B, H, Lq, D = q.shape
    return Problem(B=B, H=H, Lq=Lq, Lf=k_fg.shape[2], Lb=k_bg.shape[2], D=D, Bf=k_fg.shape[0],
                   Bb=k_bg.shape[0], scale=scale, fg_gain=fg_gain)


@torch.library.custom_op("o2mag::tri_source_attention_fwd", mutates_args=())
def tri_source_attention_op(
    q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor, k_bg: torch.Tensor,
    v_bg: torch.Tensor, query_mask: torch.Tensor, fg_key_mask: Optional[torch.Tensor],
    bg_key_mask: Optional[torch.Tensor], scale: float, fg_gain: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (out (B,H,Lq,D) in q's dtype, lse (B,H,Lq) float32). Inputs pre-validated."""
    problem = _problem_of(q, k_fg, k_bg, scale, fg_gain)
    return _launch(problem, q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask)


@tri_source_attention_op.register_fake
def _(q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask, scale, fg_gain):
    B, H, Lq, D = q.shape
    return (q.new_empty((B, H, Lq, D)), q.new_empty((B, H, Lq), dtype=torch.float32))


def triton_attention(
    problem: Problem, q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask,
    *, return_lse: bool = False,
):
    """Fused tri-source attention (forward only). Arguments were validated by the caller.

    Raises ``TypeError`` for float64 (no fp64 tensor-core path), ``ValueError`` for head dims
    above 256, and ``RuntimeError`` when autograd would need a backward (use ``backend="torch"``).
    """
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend supports float16, bfloat16 and float32, not float64 "
                        "(use backend='torch' or 'reference')")
    if problem.D > K.MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {problem.D} exceeds the triton backend's maximum "
                         f"{K.MAX_HEAD_DIM} (use backend='torch')")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_fg, v_fg, k_bg, v_bg)):
        raise RuntimeError(
            "backend='triton' is forward-only and an input requires grad: use backend='torch' "
            "(differentiable) or 'auto', or call it under torch.no_grad()")
    out, lse = tri_source_attention_op(q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask,
                                       bg_key_mask, float(problem.scale), float(problem.fg_gain))
    return (out, lse) if return_lse else out
