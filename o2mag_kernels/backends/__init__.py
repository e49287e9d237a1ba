"""The backends of :func:`o2mag_kernels.tri_source_attention`, behind one signature.

Every backend is a :class:`Backend`: it takes the validated call's :class:`~o2mag_kernels.validation.Problem`,
the five tensors and the call's :class:`~o2mag_kernels.TriSourceMask` (built once by the api: the
prebuilt one, or one built from the three masks, adjusted for an empty foreground source) and
returns ``out``, or ``(out, lse)`` with ``return_lse``. :data:`REGISTRY` maps each backend name to
its function; the api validates, builds the mask, picks a name and calls the function.

The fused backend is optional: triton may be missing (it is a Linux-only dependency) or too old.
:func:`load_triton` is the one place that imports it, on first use rather than with the package,
so ``import o2mag_kernels`` stays cheap and ``TRITON_INTERPRET`` may still be set after importing
the package (it counts only if set before triton is imported).
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Dict, Optional, Protocol, Tuple, Union

import torch

from ..mask import TriSourceMask
from ..validation import Problem
from .reference import reference_attention
from .torch_backend import STRATEGIES, torch_attention

Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Backend(Protocol):
    """The signature every backend has (arguments validated, mask built once by the caller)."""

    def __call__(self, problem: Problem, q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor,
                 k_bg: torch.Tensor, v_bg: torch.Tensor, mask: TriSourceMask, *,
                 return_lse: bool) -> Result: ...


def load_triton() -> Tuple[Optional[ModuleType], str]:
    """(the triton backend module, "") or (None, why not): the one guard around the optional
    dependency (see the module docstring)."""
    try:
        from . import triton_backend  # deferred: optional dependency, imported on first use (module docstring)
    except ImportError as exc:
        return None, f"triton is not importable: {exc}"
    return triton_backend, ""


def triton_status(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """Whether the fused Triton kernel can run here (for tensors on ``device``; None: any device)
    and why not, with what the committed sweeps say for this GPU."""
    module, why = load_triton()
    return (False, why) if module is None else module.status(device)


def triton_runnable(device: torch.device) -> Tuple[bool, str]:
    """The per-call check of an explicit ``backend="triton"`` (cheap: cached per device)."""
    module, why = load_triton()
    return (False, why) if module is None else module.runnable(device)


def triton_auto_ok(device: torch.device, dtype: torch.dtype,
                   head_dim: Optional[int] = None) -> Tuple[bool, str]:
    """Whether ``backend="auto"`` may pick the fused kernel for ``dtype`` (and ``head_dim``) on
    ``device``, and why (not)."""
    module, why = load_triton()
    return (False, why) if module is None else module.auto_ok(device, dtype, head_dim)


def auto_choice(device: torch.device, dtype: torch.dtype, head_dim: int,
                tokens: int) -> Tuple[str, str]:
    """(registry name, why) of what ``backend="auto"`` runs for a CUDA call (the triton backend's
    :func:`auto_choice`); ("torch", why) when triton is not importable."""
    module, why = load_triton()
    return ("torch", why) if module is None else module.auto_choice(device, dtype, head_dim, tokens)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fused(problem: Problem, q: torch.Tensor, k_fg: torch.Tensor, v_fg: torch.Tensor,
           k_bg: torch.Tensor, v_bg: torch.Tensor, mask: TriSourceMask, *,
           return_lse: bool = False) -> Result:
    """The triton backend's entry, through the guard (the dispatcher has checked it can run)."""
    module, why = load_triton()
    if module is None:
        raise RuntimeError(f"backend='triton' is not usable here: {why}")
    return module.triton_attention(problem, q, k_fg, v_fg, k_bg, v_bg, mask, return_lse=return_lse)


REGISTRY: Dict[str, Backend] = {
    "reference": reference_attention,
    "torch": torch_attention,
    "triton": _fused,
}
# what ``auto`` may also run: the torch backend with the strategy a hardware sweep measured fastest
REGISTRY.update({f"torch:{s}": functools.partial(torch_attention, strategy=s) for s in STRATEGIES})
