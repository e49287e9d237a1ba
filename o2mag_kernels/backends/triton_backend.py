"""Triton backend of :func:`o2mag_kernels.tri_source_attention`: one fused launch for the whole op.

The routing tables come from the call's :class:`~o2mag_kernels.TriSourceMask` (prebuilt by the
caller, or built by the api from the three masks with a few sync-free torch ops); the kernel
(``triton_kernel.tri_source_fwd``) then runs one grid over (query tiles, batch·head).

Eager calls launch directly; under ``torch.compile`` the launch goes through the custom op
``o2mag::tri_source_attention_fwd`` (with a fake implementation), one opaque graph node. The op has
no backward: when autograd would need one, :func:`triton_attention` raises (use
``backend="torch"`` or ``"auto"``).

Which tile configs may run on a GPU is decided by :mod:`o2mag_kernels.tuning` (spill-free configs,
narrowed to those a committed hardware sweep of the GPU's family proved).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple, Union

import torch
import triton

from . import triton_kernel as K
from .. import tuning
from ..mask import TriSourceMask
from ..validation import Problem

__all__ = ["status", "runnable", "auto_ok", "auto_choice", "is_interpreted", "triton_attention", "run_op",
           "mask_tables", "tri_source_attention_op", "POISON_OUTPUT"]

MIN_TRITON = (3, 0)
MIN_CAPABILITY = (8, 0)  # tensor-core (mma.sync / wgmma) GPUs
# Debug switch for tests and the hardware sweep: fill the outputs with NaN before the launch, so
# an element the kernel fails to write shows up instead of hiding behind stale memory.
POISON_OUTPUT = False


def _triton_version() -> Tuple[int, ...]:
    parts = []
    for p in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def is_interpreted() -> bool:
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
    The interpreter's module imports numpy; where numpy is missing the kernel cannot have been
    built for it, so the answer is False rather than an ImportError."""
    try:  # imported here, not at the top: it pulls in numpy (see the docstring)
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(K.tri_source_fwd, InterpretedFunction)


def runnable(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(usable, reason) for running the fused kernel on tensors of ``device`` (None: any device);
    cheap and cached per device, as every ``backend="triton"`` call asks it."""
    dev = None if device is None else torch.device(device)
    return _runnable(None if dev is None else dev.type,
                     None if dev is None or dev.type != "cuda" else
                     (dev.index if dev.index is not None else torch.cuda.current_device()))


@functools.lru_cache(maxsize=None)
def _runnable(dev_type: Optional[str], index: Optional[int]) -> Tuple[bool, str]:
    if _triton_version() < MIN_TRITON:
        return False, f"triton {triton.__version__} is too old (need >= 3.0)"
    if is_interpreted():
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            why = "(TRITON_INTERPRET was set when triton was imported)"
        else:
            why = "(TRITON_INTERPRET=1)"
        return True, f"triton {triton.__version__} CPU interpreter {why}; slow, for testing"
    if dev_type is not None and dev_type != "cuda":
        return False, (f"{dev_type} tensors need TRITON_INTERPRET=1 set before triton is imported "
                       "(the fused kernel runs on CUDA)")
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU, slowly)"
    cap = torch.cuda.get_device_capability(index)
    if cap < MIN_CAPABILITY:
        return False, f"GPU compute capability {cap[0]}.{cap[1]} < 8.0 is not supported"
    return True, f"triton {triton.__version__} on CUDA (sm_{cap[0]}{cap[1]})"


def status(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """(usable, reason) with what the committed sweeps say for this GPU (for reports such as
    :func:`o2mag_kernels.available_backends`). Usable means it can run; whether ``auto`` picks it
    is :func:`auto_ok`."""
    ok, why = runnable(device)
    if not ok or is_interpreted():
        return ok, why
    dev = None if device is None else torch.device(device)
    return ok, f"{why}; {tuning.describe(torch.cuda.get_device_capability(dev))}"


def auto_ok(device: torch.device, dtype=torch.float16, head_dim=None) -> Tuple[bool, str]:
    """Whether ``backend="auto"`` may pick the kernel on ``device`` for ``dtype``: it must run
    there, the dtype must be fp16/bf16 (fp32's 3xTF32 tiles spill: the torch backend's exact fp32
    SDPA is the better path), and it must be proven on this GPU family by a committed hardware
    sweep (or the user opted in with ``O2MAG_TRITON=on``)."""
    ok, why = runnable(device)
    if not ok or device.type != "cuda":
        return False, why
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"{dtype}: auto runs fp32 on the torch backend (exact fp32 SDPA)"
    return tuning.trusted(torch.cuda.get_device_capability(device), dtype, head_dim)


def auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int,
                tokens: int) -> Tuple[str, str]:
    """(registry name, why) of what ``backend="auto"`` runs for a CUDA call: the kernel where it is
    proven and measured fastest at this layer (:func:`auto_ok`), else the torch strategy the
    committed sweeps measured fastest there (``torch:<strategy>``), else ``torch`` (the device's
    default strategy, or the one ``O2MAG_TORCH_STRATEGY`` forces)."""
    ok, why = runnable(device)
    if ok and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        ok, why = tuning.trusted(torch.cuda.get_device_capability(device), dtype, head_dim,
                                 tokens=tokens)
        if ok:
            return "triton", why
    if os.environ.get("O2MAG_TORCH_STRATEGY") or device.type != "cuda" or dtype == torch.float64:
        return "torch", why
    strategy, reason = tuning.torch_strategy(torch.cuda.get_device_capability(device),
                                             tuning.dtype_name(dtype), head_dim, tokens)
    return ("torch" if strategy is None else f"torch:{strategy}"), f"{why}; {reason}"


# ---------------------------------------------------------------------------------------- launch


def _batch_stride(t: torch.Tensor) -> int:
    """Stride of dim 0, or 0 when the tensor has batch 1 (it serves every target)."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernel assumes unit stride along the head dim (true for diffusers views)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _dot_settings(dtype: torch.dtype):
    """(DOT_FP32, PREC) constexprs for a dtype.

    fp32 uses 3xTF32 on tensor cores (close to fp32 accuracy). The triton 3.9 interpreter computes
    ``tl.dot`` wrongly on bf16 operands, so under the interpreter only, bf16 dots run in fp32 (loads,
    casts and stores still take the bf16 path).
    """
    dot_fp32 = dtype == torch.bfloat16 and is_interpreted()
    return dot_fp32, K.precision(4 if dtype == torch.float32 else 2)


def _grid(Lq: int, BH: int):
    # one spare program per (batch, head): the tile that holds the foreground/background split
    return lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) + 1, BH)


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    q = args["Q"]
    cap = torch.cuda.get_device_capability(q.device)
    keep = set(tuning.prune(args["HEAD_DIM"], args["LQ_BUCKET"], args["LK_BUCKET"], q.dtype,
                            10 * cap[0] + cap[1]))
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


def mask_tables(mask: TriSourceMask) -> Tuple[torch.Tensor, ...]:
    """(qperm, fidx, tiles64, tiles128, bg_bytes, counts); a dummy pointer for absent tables."""
    dummy = mask.counts
    tiles = mask.tiles or {}
    return (mask.qperm, dummy if mask.fidx is None else mask.fidx, tiles.get(64, dummy),
            tiles.get(128, dummy), dummy if mask.bg_bytes is None else mask.bg_bytes, mask.counts)


def _launch(q, k_fg, v_fg, k_bg, v_bg, qperm, fidx, tiles64, tiles128, bg_bytes, counts,
            scale: float, fg_gain: float, fg_all: bool, bg_all: bool, store_lse: bool,
            config=None):
    """Allocate the outputs and launch once. ``config`` forces a tile (BLOCK_M, BLOCK_N,
    num_warps, num_stages); otherwise autotune on a GPU, the first allowed config under the
    interpreter. Returns (out, lse); lse is empty unless ``store_lse``."""
    B, H, Lq, D = q.shape
    Lf, Lb = k_fg.shape[2], k_bg.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq) if store_lse else (0,), dtype=torch.float32, device=q.device)
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if Lq == 0:
        return out, lse
    if B * H > 65535:
        raise ValueError(f"q: batch*heads must be at most 65535 for the triton backend, got {B * H}")
    q, k_fg, v_fg, k_bg, v_bg = (_last_dim_unit(t) for t in (q, k_fg, v_fg, k_bg, v_bg))
    d0, d1 = K.split_head_dim(D)
    dot_fp32, precision = _dot_settings(q.dtype)
    lq_bucket = K.length_bucket(Lq)
    lk_bucket = K.length_bucket(max(Lf, Lb))
    args = (
        q, k_fg, v_fg, k_bg, v_bg, out, lse if store_lse else counts,
        qperm, fidx, tiles64, tiles128, bg_bytes, counts,
        q.stride(0), q.stride(1), q.stride(2),
        k_fg.stride(0), k_fg.stride(1), k_fg.stride(2),
        v_fg.stride(0), v_fg.stride(1), v_fg.stride(2),
        k_bg.stride(0), k_bg.stride(1), k_bg.stride(2),
        v_bg.stride(0), v_bg.stride(1), v_bg.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        _batch_stride(qperm), _batch_stride(fidx), _batch_stride(tiles64),
        _batch_stride(tiles128), _batch_stride(bg_bytes), _batch_stride(counts),
        B // k_fg.shape[0], B // k_bg.shape[0], H, Lq, Lf, Lb,
        tiles64.shape[-1], tiles128.shape[-1],
        scale * fg_gain * K.LOG2E, scale * K.LOG2E,
        lq_bucket, lk_bucket,
    )
    d_chunk, k_chunk = K.chunking(D, q.element_size())
    meta = dict(HEAD_DIM=D, BLOCK_D0=d0, BLOCK_D1=d1, FG_ALL=fg_all, BG_ALL=bg_all,
                STORE_LSE=store_lse, DOT_FP32=dot_fp32, PREC=precision, D_CHUNK=d_chunk,
                K_CHUNK=k_chunk)
    if config is None and is_interpreted():
        # the interpreter is no GPU family: committed sweeps do not reorder its configs
        config = tuning.prune(D, lq_bucket, lk_bucket, q.dtype, 90, sweeps=())[0]
    if config is None:
        with torch.cuda.device(q.device):
            _tuned_kernel()[_grid(Lq, B * H)](*args, **meta)
    else:
        bm, bn, warps, stages = config
        if bn not in K.TILE_SIZES:
            raise ValueError(f"config: BLOCK_N must be one of {K.TILE_SIZES}, got {bn}")
        grid = _grid(Lq, B * H)({"BLOCK_M": bm})
        if is_interpreted():
            K.tri_source_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        else:
            with torch.cuda.device(q.device):
                K.tri_source_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                       num_warps=warps, num_stages=stages)
    return out, lse


# ------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("o2mag::tri_source_attention_fwd", mutates_args=())
def tri_source_attention_op(
    q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor, k_bg: torch.Tensor,
    v_bg: torch.Tensor, qperm: torch.Tensor, fidx: torch.Tensor, tiles64: torch.Tensor,
    tiles128: torch.Tensor, bg_bytes: torch.Tensor, counts: torch.Tensor, scale: float,
    fg_gain: float, fg_all: bool, bg_all: bool, store_lse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward over prebuilt routing tables: (out (B,H,Lq,D) in q's dtype, lse (B,H,Lq)
    float32, or an empty lse without ``store_lse``). Inputs pre-validated."""
    return _launch(q, k_fg, v_fg, k_bg, v_bg, qperm, fidx, tiles64, tiles128, bg_bytes, counts,
                   scale, fg_gain, fg_all, bg_all, store_lse)


@tri_source_attention_op.register_fake
def _(q, k_fg, v_fg, k_bg, v_bg, qperm, fidx, tiles64, tiles128, bg_bytes, counts, scale, fg_gain,
      fg_all, bg_all, store_lse):
    B, H, Lq, D = q.shape
    lse_shape = (B, H, Lq) if store_lse else (0,)
    return q.new_empty((B, H, Lq, D)), q.new_empty(lse_shape, dtype=torch.float32)


def run_op(problem: Problem, q, k_fg, v_fg, k_bg, v_bg, mask: TriSourceMask, *, store_lse: bool,
           config=None):
    """Launch over a mask object: directly when eager (no dispatcher overhead), through the custom
    op while ``torch.compile`` traces."""
    tables = mask_tables(mask)
    flags = (float(problem.scale), float(problem.fg_gain), mask.fg_key_mask is None,
             mask.bg_key_mask is None, store_lse)
    if config is None and torch.compiler.is_compiling():
        return tri_source_attention_op(q, k_fg, v_fg, k_bg, v_bg, *tables, *flags)
    return _launch(q, k_fg, v_fg, k_bg, v_bg, *tables, *flags, config=config)


def triton_attention(
    problem: Problem, q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor, k_bg: torch.Tensor,
    v_bg: torch.Tensor, mask: TriSourceMask, *, return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused tri-source attention (forward only) over the call's validated arguments and its mask
    (:func:`o2mag_kernels.validation.as_mask`).

    Raises ``TypeError`` for float64 (no fp64 tensor-core path), ``ValueError`` for head dims
    above 256, and ``RuntimeError`` when autograd would need a backward (use ``backend="torch"``).
    """
    if q.dtype == torch.float64:
        raise TypeError("q: the triton backend supports float16, bfloat16 and float32, not float64 "
                        "(use backend='torch' or 'reference')")
    if problem.D > K.MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {problem.D} exceeds the triton backend's maximum "
                         f"{K.MAX_HEAD_DIM} (use backend='torch')")
    if torch.is_grad_enabled() and (q.requires_grad or k_fg.requires_grad or v_fg.requires_grad
                                    or k_bg.requires_grad or v_bg.requires_grad):
        raise RuntimeError(
            "backend='triton' is forward-only and an input requires grad: use backend='torch' "
            "(differentiable) or 'auto', or call it under torch.no_grad()")
    out, lse = run_op(problem, q, k_fg, v_fg, k_bg, v_bg, mask, store_lse=return_lse)
    return (out, lse) if return_lse else out
