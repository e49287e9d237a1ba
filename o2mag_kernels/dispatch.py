"""Which backend serves a call of :func:`o2mag_kernels.tri_source_attention`, and the report of
:func:`o2mag_kernels.available_backends`.

``auto`` takes the torch backend off CUDA, for float64, above head dim 256 and whenever autograd
will need a backward (the fused kernel is forward-only); otherwise it asks, once per (device,
dtype, head dim), whether the fused kernel is proven and faster there (:mod:`o2mag_kernels.tuning`)
and caches the verdict: the question reads committed files, the answer does not change within a
process (:func:`clear_auto_cache` forgets it, for tests that change ``O2MAG_TRITON``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from .backends import auto_choice, triton_auto_ok, triton_runnable, triton_status

# (CUDA device index, dtype, head dim, token bucket) -> the registry name auto runs
_AUTO_CACHE: Dict[Tuple[int, torch.dtype, int, int], str] = {}
_REPORT_HEAD_DIMS = (40, 64, 80, 128, 160, 256)  # SD's head dims, for the per-dim verdicts


def _token_bucket(n: int) -> int:
    """Power-of-two bucket of a key length (auto's verdicts are cached per bucket)."""
    return 1 << max(0, (max(1, n) - 1).bit_length())


def pick_backend(backend: str, q: torch.Tensor, tensors: Sequence[torch.Tensor] = ()) -> str:
    """Registry name for a call (:data:`o2mag_kernels.backends.REGISTRY`): the backend asked for,
    or what 'auto' picks -- the torch backend off CUDA, for float64, above head dim 256 and when
    autograd needs a backward; otherwise the fastest of the kernel and the torch strategies that
    the committed sweeps measured at this head dim and length (``torch:<strategy>``). An explicit
    'triton' that cannot run here raises ``RuntimeError``."""
    if backend == "triton":
        ok, why = triton_runnable(q.device)
        if not ok:
            raise RuntimeError(f"backend='triton' is not usable here: {why}")
        return backend
    if backend != "auto":
        return backend
    if not q.is_cuda or q.dtype == torch.float64 or q.shape[-1] > 256:
        return "torch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    tokens = tensors[3].shape[2] if len(tensors) > 3 else q.shape[2]
    key = (q.device.index if q.device.index is not None else torch.cuda.current_device(), q.dtype,
           q.shape[-1], _token_bucket(tokens))
    pick = _AUTO_CACHE.get(key)
    if pick is None:
        pick = _AUTO_CACHE[key] = auto_choice(q.device, q.dtype, q.shape[-1], key[3])[0]
    return pick


def clear_auto_cache() -> None:
    """Forget auto's cached verdicts (they follow ``O2MAG_TRITON`` and the committed sweeps)."""
    _AUTO_CACHE.clear()


def _auto_report() -> str:
    """What ``auto`` would pick for fp16 CUDA tensors here, and why (per SD head dim when it picks
    the kernel at all: a sweep may find the torch backend faster at some)."""
    if not torch.cuda.is_available():
        return "picks 'torch' (no CUDA device here)"
    cuda = torch.device("cuda")
    pick, why = triton_auto_ok(cuda, torch.float16)
    auto = ("picks 'triton' for fp16 CUDA tensors: " if pick else
            "picks 'torch' for fp16 CUDA tensors, not 'triton': ") + why
    if pick:
        dims = {d: triton_auto_ok(cuda, torch.float16, d) for d in _REPORT_HEAD_DIMS}
        auto += "; " + "; ".join(f"head dim {d}: {'triton' if ok else 'torch'} ({why})"
                                 for d, (ok, why) in dims.items())
    return auto


def describe_backends() -> Dict[str, Tuple[bool, str]]:
    """Map each backend name to (usable here, reason); ``auto`` says what it would pick on CUDA."""
    ok_triton, why_triton = triton_status()
    return {
        "reference": (True, "literal two-softmax formula, float32/float64; always available"),
        "torch": (True, "routed / compacted SDPA in PyTorch; CPU and CUDA, differentiable"),
        "triton": (ok_triton, why_triton),
        "auto": (True, _auto_report()),
    }
