"""Shared case builders and tolerances for the ``o2mag_kernels`` tests (any backend).

Test modules import these directly (``from tests.kernels.helpers import ...``) or use the
fixtures of ``conftest.py``:

* ``make_case(**spec) -> Case``: seeded random inputs of ``tri_source_attention`` (see
  :func:`build_case` for every knob: sizes, dtype, mask densities, broadcast batches, strided
  ``(B, L, H*D)`` views, caller-expanded sources, input magnitude).
* ``lowp_bound(case, exact, **op_kwargs) -> float``: the error a fp16/bf16 result may show against
  the float64 formula, derived from the reference backend run in that low precision.
* ``formula``: the independent float64 formula (``formula.py``), returns ``(out, lse)``.

All three fixtures are session-scoped so Hypothesis tests may use them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from o2mag_kernels.tools import parity
from o2mag_kernels.tools.parity import max_abs_err  # noqa: F401  (re-exported for the tests)
from o2mag_kernels.validation import validate

Density = Union[float, str, None]
"""A mask spec: a float in [0, 1] (Bernoulli probability per position; 0.0 = empty, 1.0 = full),
``"single"`` (exactly one True position, at a seeded random place), or None (pass no mask: only
allowed for key masks, where it means "all usable")."""


@dataclass(frozen=True)
class Case:
    """One call's inputs. ``args`` is the positional argument tuple of ``tri_source_attention``."""

    q: torch.Tensor
    k_fg: torch.Tensor
    v_fg: torch.Tensor
    k_bg: torch.Tensor
    v_bg: torch.Tensor
    query_mask: torch.Tensor
    fg_key_mask: Optional[torch.Tensor]
    bg_key_mask: Optional[torch.Tensor]

    @property
    def args(self):
        return (self.q, self.k_fg, self.v_fg, self.k_bg, self.v_bg,
                self.query_mask, self.fg_key_mask, self.bg_key_mask)

    @property
    def tensors(self):
        """The five float tensors (q, k_fg, v_fg, k_bg, v_bg)."""
        return self.args[:5]

    def with_tensors(self, q, k_fg, v_fg, k_bg, v_bg) -> "Case":
        return replace(self, q=q, k_fg=k_fg, v_fg=v_fg, k_bg=k_bg, v_bg=v_bg)

    def to(self, dtype: torch.dtype) -> "Case":
        """Same case with the float tensors cast to ``dtype`` (copies; masks unchanged)."""
        return self.with_tensors(*(t.to(dtype) for t in self.tensors))

    def problem(self, scale=None, fg_gain=1.0, backend="reference"):
        """The validated :class:`Problem` (what backends receive) for this case."""
        return validate(*self.args, scale, fg_gain, backend)


def _mask(gen: torch.Generator, batch: int, length: int, density: Density) -> Optional[torch.Tensor]:
    if density is None:
        return None
    if density == "single":
        m = torch.zeros(batch, length, dtype=torch.bool)
        if length:
            m[torch.arange(batch), torch.randint(0, length, (batch,), generator=gen)] = True
        return m
    if not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], 'single' or None, got {density!r}")
    return torch.rand(batch, length, generator=gen) < density


def _source(gen, batch, H, L, D, dtype, strided, expand_to, magnitude):
    """A (batch, H, L, D) tensor; ``strided`` makes it a transposed (batch, L, H*D) view and
    ``expand_to`` makes a size-1 source a stride-0 expansion to that batch."""
    base = torch.randn(batch, L, H * D, generator=gen, dtype=torch.float64) * magnitude
    x = base.to(dtype).view(batch, L, H, D).transpose(1, 2)
    x = x if strided else x.contiguous()
    if expand_to is not None and batch == 1:
        x = x.expand(expand_to, -1, -1, -1)
    return x


def build_case(
    B: int = 2, H: int = 2, Lq: int = 16, Lf: int = 16, Lb: int = 16, D: int = 16, *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    q_density: Density = 0.5,
    fg_density: Density = 0.5,
    bg_density: Density = 0.5,
    Bf: Optional[int] = None,
    Bb: Optional[int] = None,
    q_mask_batch: Optional[int] = None,
    fg_mask_batch: Optional[int] = None,
    bg_mask_batch: Optional[int] = None,
    strided: bool = False,
    expand_sources: bool = False,
    q_magnitude: float = 1.0,
    k_magnitude: float = 1.0,
) -> Case:
    """Seeded random inputs.

    Values are drawn in float64 and rounded to ``dtype``, so the same ``seed`` gives the same case
    in every precision up to rounding. ``Bf``/``Bb`` are the source batches (default ``B``);
    ``*_mask_batch`` the masks' batches (default: the batch they are indexed by, ``B`` for the query
    mask and the source's batch for key masks). ``strided=True`` builds every float tensor as
    ``x.view(B, L, H, D).transpose(1, 2)`` of a contiguous ``(B, L, H*D)`` tensor, as diffusers hands
    them over. ``expand_sources=True`` passes size-1 sources as stride-0 ``expand(B, ...)`` views.
    ``q_magnitude``/``k_magnitude`` scale q and both keys (large values test softmax stability).
    """
    if q_density is None:
        raise ValueError("query_mask is required: q_density cannot be None")
    gen = torch.Generator().manual_seed(seed)
    Bf = B if Bf is None else Bf
    Bb = B if Bb is None else Bb
    expand_to = B if expand_sources else None
    q = _source(gen, B, H, Lq, D, dtype, strided, None, q_magnitude)
    k_fg = _source(gen, Bf, H, Lf, D, dtype, strided, expand_to, k_magnitude)
    v_fg = _source(gen, Bf, H, Lf, D, dtype, strided, expand_to, 1.0)
    k_bg = _source(gen, Bb, H, Lb, D, dtype, strided, expand_to, k_magnitude)
    v_bg = _source(gen, Bb, H, Lb, D, dtype, strided, expand_to, 1.0)
    query_mask = _mask(gen, B if q_mask_batch is None else q_mask_batch, Lq, q_density)
    fg_key_mask = _mask(gen, Bf if fg_mask_batch is None else fg_mask_batch, Lf, fg_density)
    bg_key_mask = _mask(gen, Bb if bg_mask_batch is None else bg_mask_batch, Lb, bg_density)
    return Case(q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask)


def low_precision_bound(case: Case, exact: torch.Tensor, *, scale=None, fg_gain=1.0,
                        factor: float = 2.0, floor: float = 1e-5) -> float:
    """Largest error vs the float64 formula allowed for a fp16/bf16 result of ``case``: the
    package's one rule (``o2mag_kernels.tools.parity``), from the reference run in the case's dtype."""
    dtype = case.q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"low_precision_bound is for float16/bfloat16 cases, got {dtype}")
    return parity.low_precision_bound(case.problem(scale, fg_gain), case.args, exact, dtype,
                                      factor=factor, floor=floor)
