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

import contextlib
import functools
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import triton

from . import triton_kernel as K
from .triton_kernel import DEFAULT_VARIANT, KernelVariant
from .. import tuning
from ..mask import TriSourceMask
from ..validation import Problem

__all__ = ["status", "runnable", "auto_ok", "auto_choice", "is_interpreted", "triton_attention",
           "run_op", "mask_tables", "tri_source_attention_op", "POISON_OUTPUT", "KernelVariant",
           "inputs_aligned", "kernel_args", "chosen_configs"]

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
    try:
        from triton.runtime.interpreter import InterpretedFunction  # deferred: pulls in numpy (docstring)
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


def _last_dim_unit(t: torch.Tensor) -> torch.Tensor:
    """The kernel assumes unit stride along the head dim (true for diffusers views)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def inputs_aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """The kernel's ``ALIGNED`` condition, checked on the tensors of one launch (host facts only,
    no sync): every stride but the last of every tensor the kernel reads or writes is a multiple
    of 8 elements (16 bytes in fp16/bf16) and every base pointer is 16-byte aligned. A dimension of
    size 1 is exempt: the kernel only ever multiplies its stride by 0. When it holds, the kernel
    declares every offset it forms from a stride a multiple of 8 elements, which gives Triton
    16-byte vector loads and ``cp.async`` on diffusers' ``(B, L, H·D)`` views (head dim 40's
    per-head offset is 40 elements: not 16-divisible, so the launcher alone cannot prove it)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        strides = t.stride()
        for i in range(len(strides) - 1):
            if strides[i] % 8 and t.shape[i] > 1:
                return False
    return True


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


def _allowed(head_dim: int, lq: int, lk: int, dtype: torch.dtype, arch: int,
             variant: KernelVariant, sweeps=None):
    """The configs the autotuner may time for one call: tuning's rule for the default variant
    (compiled clean, proven by a sweep, fastest first); for another variant, those whose build
    of that variant compiled clean (unproven: only a benchmark forces a variant), or the default
    variant's for a dtype the AOT check does not compile that variant in (fp32)."""
    if variant == DEFAULT_VARIANT:
        return tuning.prune(head_dim, lq, lk, dtype, arch, sweeps=sweeps)
    fits = tuning.spill_free(head_dim, dtype, arch, variant=variant.name)
    if not fits and tuning.dtype_name(dtype) == "fp32":
        fits = tuning.spill_free(head_dim, dtype, arch)
    if not fits:
        raise RuntimeError(f"no config of the {variant.name} variant compiles cleanly for head dim "
                           f"{head_dim} ({tuning.dtype_name(dtype)}) on sm_{arch}")
    return [c for c in fits if c[0] <= max(64, lq) and c[1] <= max(64, lk)] or fits[-1:]


def _pruner(variant: KernelVariant):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        cap = torch.cuda.get_device_capability(q.device)
        keep = set(_allowed(args["HEAD_DIM"], args["LQ_BUCKET"], args["LK_BUCKET"], q.dtype,
                            10 * cap[0] + cap[1], variant))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in keep]
    return prune


_TUNED: Dict[KernelVariant, object] = {}


def _tuned_kernel(variant: KernelVariant = DEFAULT_VARIANT):
    """The autotuned kernel of a variant (built lazily: the interpreter path never needs it)."""
    if variant not in _TUNED:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in K.CONFIGS]
        _TUNED[variant] = triton.autotune(
            configs=configs, key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM"],
            prune_configs_by={"early_config_prune": _pruner(variant)})(K.tri_source_fwd)
    return _TUNED[variant]


# (device index, q dtype, head dim, Lq bucket, Lk bucket, stores lse, variant) -> the config the
# autotuner chose there: later launches with that key skip the autotuner's per-call work and
# launch the jit function directly (the autotuner's own key is the same: its key arguments and
# the dtypes of the tensor arguments, of which only q's and the lse slot's vary).
_CHOSEN: Dict[tuple, Tuple[int, int, int, int]] = {}


def chosen_configs() -> Dict[tuple, Tuple[int, int, int, int]]:
    """The configs chosen so far per shape bucket (a copy; see ``_CHOSEN``)."""
    return dict(_CHOSEN)


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (the TMA variant)."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def mask_tables(mask: TriSourceMask) -> Tuple[torch.Tensor, ...]:
    """(qperm, fidx, tiles64, tiles128, bg_bytes, counts); a dummy pointer for absent tables."""
    dummy = mask.counts
    tiles = mask.tiles or {}
    return (mask.qperm, dummy if mask.fidx is None else mask.fidx, tiles.get(64, dummy),
            tiles.get(128, dummy), dummy if mask.bg_bytes is None else mask.bg_bytes, mask.counts)


def kernel_args(q, k_fg, v_fg, k_bg, v_bg, out, lse, qperm, fidx, tiles64, tiles128, bg_bytes,
                counts, scale: float, fg_gain: float) -> tuple:
    """The kernel's positional arguments for one launch (``lse``: the lse tensor, or any int32
    table when it is not stored); a table's batch stride is 0 when it has batch 1 (it serves every
    target). Also what ``aot-check`` compiles at: the values Triton's launcher specialises on
    come from here."""
    B, H, Lq, _ = q.shape
    Lf, Lb = k_fg.shape[2], k_bg.shape[2]
    return (
        q, k_fg, v_fg, k_bg, v_bg, out, lse,
        qperm, fidx, tiles64, tiles128, bg_bytes, counts,
        *q.stride()[:3], *k_fg.stride()[:3], *v_fg.stride()[:3],
        *k_bg.stride()[:3], *v_bg.stride()[:3], *out.stride()[:3],
        *(0 if t.shape[0] == 1 else t.stride(0) for t in (qperm, fidx, bg_bytes, counts)),
        B // k_fg.shape[0], B // k_bg.shape[0], H, Lq, Lf, Lb,
        scale * fg_gain * K.LOG2E, scale * K.LOG2E,
        K.length_bucket(Lq), K.length_bucket(max(Lf, Lb)),
    )


@functools.lru_cache(maxsize=256)
def kernel_meta(head_dim: int, dtype: torch.dtype, fg_all: bool, bg_all: bool, store_lse: bool,
                aligned: bool, variant: KernelVariant) -> dict:
    """The kernel's constexprs for one launch but the tile (BLOCK_M, BLOCK_N); cached (a launch's
    host time matters): callers must not modify the dict."""
    d0, d1 = K.split_head_dim(head_dim)
    dot_fp32, precision = _dot_settings(dtype)
    d_chunk, k_chunk = K.chunking(head_dim, 4 if dtype == torch.float32 else 2)
    return dict(HEAD_DIM=head_dim, BLOCK_D0=d0, BLOCK_D1=d1, FG_ALL=fg_all, BG_ALL=bg_all,
                STORE_LSE=store_lse, DOT_FP32=dot_fp32, PREC=precision, D_CHUNK=d_chunk,
                K_CHUNK=k_chunk, ALIGNED=aligned, BG_DENSE=variant.bg_dense, TMA=variant.tma)


def _check_variant(variant: KernelVariant, aligned: bool, meta: dict, device: torch.device) -> None:
    """ValueError when this launch cannot run ``variant`` as asked (a forced variant must not
    silently time something else)."""
    why = variant.problem()
    if not why and variant.tma:
        if not aligned:
            why = ("tma needs every stride but the last a multiple of 8 elements and 16-byte "
                   "aligned base pointers (inputs_aligned)")
        elif meta["D_CHUNK"] > 0:
            why = "tma runs the whole-head path only (not fp32 above head dim 64)"
        elif device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
            why = "tma needs a Hopper (sm_90) or newer GPU"
    if why:
        raise ValueError(f"variant: {why}")


_NO_LSE: Dict[torch.device, torch.Tensor] = {}


def _no_lse(device: torch.device) -> torch.Tensor:
    """The empty lse of a launch that does not store it (one per device: nothing is written)."""
    t = _NO_LSE.get(device)
    if t is None:
        t = _NO_LSE[device] = torch.empty((0,), dtype=torch.float32, device=device)
    return t


def _launch(q, k_fg, v_fg, k_bg, v_bg, qperm, fidx, tiles64, tiles128, bg_bytes, counts,
            scale: float, fg_gain: float, fg_all: bool, bg_all: bool, store_lse: bool,
            config=None, variant: Optional[KernelVariant] = None):
    """Allocate the outputs and launch once. ``config`` forces a tile (BLOCK_M, BLOCK_N,
    num_warps, num_stages); otherwise the config chosen earlier for this shape bucket, or the
    autotuner on a GPU (its choice is then remembered), or the first allowed config under the
    interpreter. ``variant`` (a :class:`KernelVariant`; None: the default) picks the background
    loop. Returns (out, lse); lse is empty unless ``store_lse``."""
    variant = DEFAULT_VARIANT if variant is None else variant
    B, H, Lq, D = q.shape
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = (torch.empty((B, H, Lq), dtype=torch.float32, device=q.device) if store_lse else
           _no_lse(q.device))
    if POISON_OUTPUT:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if Lq == 0:
        return out, lse
    if B * H > 65535:
        raise ValueError(f"q: batch*heads must be at most 65535 for the triton backend, got {B * H}")
    q, k_fg, v_fg, k_bg, v_bg = (_last_dim_unit(t) for t in (q, k_fg, v_fg, k_bg, v_bg))
    aligned = inputs_aligned((q, k_fg, v_fg, k_bg, v_bg, out))
    meta = kernel_meta(D, q.dtype, fg_all, bg_all, store_lse, aligned, variant)
    if variant is not DEFAULT_VARIANT:
        _check_variant(variant, aligned, meta, q.device)
    args = kernel_args(q, k_fg, v_fg, k_bg, v_bg, out, lse if store_lse else counts, qperm, fidx,
                       tiles64, tiles128, bg_bytes, counts, scale, fg_gain)
    grid = _grid(Lq, B * H)
    interpreted = is_interpreted()
    if config is None:
        key = (q.device.index, q.dtype, D, args[-2], args[-1], store_lse, variant)
        config = _CHOSEN.get(key)
    if config is None and interpreted:
        # the interpreter is no GPU family: committed sweeps do not reorder its configs
        config = _CHOSEN[key] = tuple(_allowed(D, args[-2], args[-1], q.dtype, 90, variant,
                                               sweeps=())[0])
    if config is None:  # first launch of this shape bucket on a GPU: autotune, remember
        if variant.tma:
            triton.set_allocator(_tma_allocator)
        tuned = _tuned_kernel(variant)
        with torch.cuda.device(q.device):
            tuned[grid](*args, **meta)
        best = tuned.best_config
        _CHOSEN[key] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps,
                        best.num_stages)
        return out, lse
    bm, bn, warps, stages = config
    if bn not in K.TILE_SIZES:
        raise ValueError(f"config: BLOCK_N must be one of {K.TILE_SIZES}, got {bn}")
    g = grid({"BLOCK_M": bm})
    if interpreted:
        K.tri_source_fwd[g](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        return out, lse
    if variant.tma:
        triton.set_allocator(_tma_allocator)
    here = q.device.index is None or q.device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if here else torch.cuda.device(q.device):
        K.tri_source_fwd[g](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                            num_stages=stages)
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
           config=None, variant: Optional[KernelVariant] = None):
    """Launch over a mask object: directly when eager (no dispatcher overhead), through the custom
    op while ``torch.compile`` traces (default variant, autotuned). ``config`` forces a tile
    (BLOCK_M, BLOCK_N, num_warps, num_stages) and ``variant`` a :class:`KernelVariant` (a
    benchmark's knobs; a variant this launch cannot run raises ``ValueError``)."""
    tables = mask_tables(mask)
    flags = (float(problem.scale), float(problem.fg_gain), mask.fg_key_mask is None,
             mask.bg_key_mask is None, store_lse)
    if config is None and variant is None and torch.compiler.is_compiling():
        return tri_source_attention_op(q, k_fg, v_fg, k_bg, v_bg, *tables, *flags)
    return _launch(q, k_fg, v_fg, k_bg, v_bg, *tables, *flags, config=config, variant=variant)


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
