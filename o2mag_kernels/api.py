"""Public entry point and backend dispatch for tri-source attention (contract: docs/architecture.md)."""
from __future__ import annotations

import os
from typing import Dict, Tuple

import torch

from .validation import validate
from .backends.reference import reference_attention
from .backends.torch_backend import torch_attention


def _ask_triton(check: str, *args) -> Tuple[bool, str]:
    """``triton_backend.<check>(*args)``, or (False, why) when triton cannot be imported (missing
    or too old): the one guard around the optional dependency."""
    try:
        from .backends import triton_backend
    except ImportError as exc:
        return False, f"triton is not importable: {exc}"
    return getattr(triton_backend, check)(*args)


def _triton_status(device: torch.device | None = None) -> Tuple[bool, str]:
    """Whether the fused Triton kernel can run here (for tensors on ``device``) and why not."""
    return _ask_triton("status", device)


def _triton_runnable(device: torch.device) -> Tuple[bool, str]:
    """The per-call check of an explicit ``backend="triton"`` (cached per device)."""
    return _ask_triton("runnable", device)


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """Map each backend name to (usable here, reason). ``auto`` says what it would pick on CUDA."""
    ok_triton, why_triton = _triton_status()
    cuda = torch.cuda.is_available()
    if cuda:
        pick, why_auto = _auto_triton(torch.device("cuda"), torch.float16)
        auto = ("picks 'triton' for fp16 CUDA tensors: " if pick else
                "picks 'torch' for fp16 CUDA tensors, not 'triton': ") + why_auto
        if pick:  # the per-head-dim verdicts (a sweep may find the torch backend faster at some)
            dims = {d: _auto_triton(torch.device("cuda"), torch.float16, d) for d in (40, 64, 80, 128, 160, 256)}
            auto += "; " + "; ".join(f"head dim {d}: {'triton' if ok else 'torch'} ({why})"
                                     for d, (ok, why) in dims.items())
    else:
        auto = "picks 'torch' (no CUDA device here)"
    return {
        "reference": (True, "literal two-softmax formula, float32/float64; always available"),
        "torch": (True, "routed / compacted SDPA in PyTorch; CPU and CUDA, differentiable"),
        "triton": (ok_triton, why_triton),
        "auto": (True, auto),
    }


def _auto_triton(device: torch.device, dtype, head_dim=None) -> Tuple[bool, str]:
    return _ask_triton("auto_ok", device, dtype, head_dim)


_AUTO_CACHE: Dict[tuple, bool] = {}


def _pick(backend: str, q: torch.Tensor, tensors=()) -> str:
    """Backend for a call; 'auto' avoids the forward-only Triton op when autograd needs a backward.
    An explicit 'triton' that cannot run here raises ``RuntimeError``."""
    if backend == "triton":
        ok, why = _triton_runnable(q.device)
        if not ok:
            raise RuntimeError(f"backend='triton' is not usable here: {why}")
        return backend
    if backend != "auto":
        return backend
    if not q.is_cuda or q.dtype == torch.float64 or q.shape[-1] > 256:
        return "torch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    key = (q.device.index if q.device.index is not None else torch.cuda.current_device(), q.dtype,
           q.shape[-1])
    pick = _AUTO_CACHE.get(key)
    if pick is None:
        pick = _AUTO_CACHE[key] = _auto_triton(q.device, q.dtype, q.shape[-1])[0]
    return "triton" if pick else "torch"


def tri_source_attention(
    q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask=None, bg_key_mask=None, *,
    scale=None, fg_gain=1.0, return_lse=False, backend="auto",
):
    """Attention of target queries over a foreground OR a background source, chosen per query.

    For batch ``b``, head ``h``, query ``i``: if ``query_mask[b, i]`` and the foreground key set
    ``F = {j : fg_key_mask[b, j]}`` is non-empty, the row is ``softmax(fg_gain·scale·q·k_fgᵀ)`` over
    ``F`` applied to ``v_fg``; otherwise softmax over the usable background keys (all of them when
    none is usable) applied to ``v_bg``.

    Shapes: ``q`` (B, H, Lq, D); ``k_fg``/``v_fg`` (Bf, H, Lf, D); ``k_bg``/``v_bg`` (Bb, H, Lb, D)
    with Bf, Bb in {1, B} (size 1 broadcasts without a copy); ``query_mask`` bool (1 or B, Lq); key
    masks bool (1 or B, L) or None for "all usable". ``query_mask`` may instead be a prebuilt
    :class:`TriSourceMask` (from :func:`tri_source_mask`; the key masks are then None): reuse one
    across heads, layers and steps and a call is argument checks plus one kernel launch. Returns
    (B, H, Lq, D) in q's dtype, and with ``return_lse`` also the natural-log sum-exp of the chosen
    row's scaled logits, (B, H, Lq), float32 (float64 for float64 inputs).

    ``backend``: "auto" (Triton for CUDA tensors when no grad is needed and the kernel is proven
    on this GPU family, else torch), "triton" (one fused launch; CUDA, or CPU under
    ``TRITON_INTERPRET=1``), "torch" (differentiable), "reference" (two dense attentions and a
    stitch; slow, obviously right). Bad arguments raise ``TypeError``/``ValueError`` naming the
    argument before any work.
    """
    problem = validate(q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask,
                       scale, fg_gain, backend)
    chosen = _pick(backend, q, (q, k_fg, v_fg, k_bg, v_bg))
    args = (problem, q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask)
    if chosen == "reference":
        return reference_attention(*args, return_lse=return_lse)
    if chosen == "torch":
        return torch_attention(*args, return_lse=return_lse)
    from .backends.triton_backend import triton_attention

    return triton_attention(*args, return_lse=return_lse)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
