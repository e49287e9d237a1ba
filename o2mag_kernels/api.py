"""The public op, typed: :func:`tri_source_attention` and :func:`available_backends`.

The machinery lives elsewhere (contract: docs/architecture.md): argument checks in
:mod:`~o2mag_kernels.validation`, the routing tables in :mod:`~o2mag_kernels.mask`, the backend
choice in :mod:`~o2mag_kernels.dispatch`, the backends in :mod:`~o2mag_kernels.backends`.
"""
from __future__ import annotations

from typing import Dict, Literal, Optional, Tuple, Union, overload

import torch

from .backends import REGISTRY

from .dispatch import describe_backends, pick_backend
from .mask import TriSourceMask
from .validation import as_mask, validate

Tensor = torch.Tensor


@overload
def tri_source_attention(
    q: Tensor, k_fg: Tensor, v_fg: Tensor, k_bg: Tensor, v_bg: Tensor,
    query_mask: Union[Tensor, TriSourceMask], fg_key_mask: Optional[Tensor] = ...,
    bg_key_mask: Optional[Tensor] = ..., *, scale: Optional[float] = ..., fg_gain: float = ...,
    return_lse: Literal[False] = ..., backend: str = ...,
) -> Tensor: ...


@overload
def tri_source_attention(
    q: Tensor, k_fg: Tensor, v_fg: Tensor, k_bg: Tensor, v_bg: Tensor,
    query_mask: Union[Tensor, TriSourceMask], fg_key_mask: Optional[Tensor] = ...,
    bg_key_mask: Optional[Tensor] = ..., *, scale: Optional[float] = ..., fg_gain: float = ...,
    return_lse: Literal[True], backend: str = ...,
) -> Tuple[Tensor, Tensor]: ...


def tri_source_attention(
    q: Tensor, k_fg: Tensor, v_fg: Tensor, k_bg: Tensor, v_bg: Tensor,
    query_mask: Union[Tensor, TriSourceMask], fg_key_mask: Optional[Tensor] = None,
    bg_key_mask: Optional[Tensor] = None, *, scale: Optional[float] = None, fg_gain: float = 1.0,
    return_lse: bool = False, backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
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
    chosen = pick_backend(backend, q, (q, k_fg, v_fg, k_bg, v_bg))
    mask = as_mask(problem, query_mask, fg_key_mask, bg_key_mask)
    return REGISTRY[chosen](problem, q, k_fg, v_fg, k_bg, v_bg, mask, return_lse=return_lse)


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """Map each backend name to (usable here, reason). ``auto`` says what it would pick on CUDA."""
    return describe_backends()
