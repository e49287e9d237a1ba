"""The one place that knows how the tri-branch UNet batch is ordered.

Per classifier-free-guidance half the rows are ``[reference, normal, target_1 .. target_N]`` and the
halves are ``[uncond, cond]`` (diffusers' order, so ``noise_pred.chunk(2)`` still splits them).
With ``include_sources=False`` a half holds only ``[target_1 .. target_N]``: the batch the
K/V-cache replay mode runs, where the source branches come from a :class:`o2mag.graft.SourceCache`.

Everything else (pipeline, processors, tests) slices and assembles through this class, never through
hard-coded row numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..checks import is_int

BRANCHES = ("reference", "normal", "target")


@dataclass(frozen=True)
class Branches:
    """A batch split by branch. Each tensor stacks the CFG halves first (``[uncond, cond]``):
    ``reference``/``normal`` have ``num_halves`` rows (None without sources), ``targets`` has
    ``num_halves * num_targets`` rows ordered half-major."""

    reference: Optional[torch.Tensor]
    normal: Optional[torch.Tensor]
    targets: torch.Tensor


class BranchLayout:
    """Batch order of a tri-branch denoising step (see module docstring)."""

    def __init__(self, num_targets: int, cfg: bool = True, include_sources: bool = True):
        if not is_int(num_targets):
            raise TypeError(f"num_targets must be an int, got {type(num_targets).__name__}")
        if num_targets < 1:
            raise ValueError(f"num_targets must be >= 1, got {num_targets}")
        if not isinstance(cfg, bool):
            raise TypeError(f"cfg must be a bool, got {type(cfg).__name__}")
        if not isinstance(include_sources, bool):
            raise TypeError(f"include_sources must be a bool, got {type(include_sources).__name__}")
        self.num_targets = num_targets
        self.cfg = cfg
        self.include_sources = include_sources

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_halves(self) -> int:
        """2 with classifier-free guidance (uncond, cond), else 1 (cond only)."""
        return 2 if self.cfg else 1

    @property
    def halves(self) -> tuple:
        return ("uncond", "cond") if self.cfg else ("cond",)

    @property
    def cond_half(self) -> int:
        """Index of the conditional half (the one DAE acts on)."""
        return self.num_halves - 1

    @property
    def num_sources(self) -> int:
        return 2 if self.include_sources else 0

    @property
    def rows_per_half(self) -> int:
        return self.num_sources + self.num_targets

    @property
    def batch_size(self) -> int:
        return self.num_halves * self.rows_per_half

    def __repr__(self) -> str:
        return (f"BranchLayout(num_targets={self.num_targets}, cfg={self.cfg}, "
                f"include_sources={self.include_sources})")

    def __eq__(self, other) -> bool:
        return isinstance(other, BranchLayout) and (
            (self.num_targets, self.cfg, self.include_sources)
            == (other.num_targets, other.cfg, other.include_sources))

    def __hash__(self) -> int:
        return hash((self.num_targets, self.cfg, self.include_sources))

    # ---- row indices ---------------------------------------------------------------------------
    def _half(self, half) -> int:
        if isinstance(half, str):
            if half not in self.halves:
                raise ValueError(f"half must be one of {self.halves}, got {half!r}")
            return self.halves.index(half)
        if not is_int(half) or not 0 <= half < self.num_halves:
            raise ValueError(f"half must be an int in [0, {self.num_halves}) or a name, got {half!r}")
        return half

    def _halves(self, half) -> List[int]:
        return list(range(self.num_halves)) if half is None else [self._half(half)]

    def half_slice(self, half) -> slice:
        """All rows of one CFG half."""
        h = self._half(half)
        return slice(h * self.rows_per_half, (h + 1) * self.rows_per_half)

    def target_slice(self, half) -> slice:
        """The target rows of one CFG half (contiguous, so slicing gives a view)."""
        h = self._half(half)
        start = h * self.rows_per_half + self.num_sources
        return slice(start, start + self.num_targets)

    def source_slice(self, half) -> slice:
        """The ``[reference, normal]`` rows of one half (contiguous); needs ``include_sources``."""
        self._need_sources("source_slice")
        h = self._half(half)
        return slice(h * self.rows_per_half, h * self.rows_per_half + 2)

    def _need_sources(self, what: str) -> None:
        if not self.include_sources:
            raise ValueError(f"{what}: this layout holds only target rows (include_sources=False)")

    def rows(self, branch: str, half=None, target: Optional[int] = None) -> List[int]:
        """Row indices of ``branch`` ('reference' | 'normal' | 'target') in ``half`` (None: all
        halves, uncond first); for targets optionally only target number ``target`` (0-based)."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if target is not None:
            if branch != "target":
                raise ValueError("target= only applies to branch='target'")
            if not is_int(target) or not 0 <= target < self.num_targets:
                raise ValueError(f"target must be an int in [0, {self.num_targets}), got {target!r}")
        out: List[int] = []
        for h in self._halves(half):
            base = h * self.rows_per_half
            if branch == "reference":
                self._need_sources("rows('reference')")
                out.append(base)
            elif branch == "normal":
                self._need_sources("rows('normal')")
                out.append(base + 1)
            elif target is None:
                out.extend(range(base + self.num_sources, base + self.rows_per_half))
            else:
                out.append(base + self.num_sources + target)
        return out

    @property
    def reference_rows(self) -> List[int]:
        return self.rows("reference")

    @property
    def normal_rows(self) -> List[int]:
        return self.rows("normal")

    @property
    def target_rows(self) -> List[int]:
        return self.rows("target")

    # ---- assemble / split ----------------------------------------------------------------------
    def _per_half(self, name: str, x: Optional[torch.Tensor], per_half: int, dim: int):
        """Return a list (one per half) of tensors with ``per_half`` rows along ``dim``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        n = x.shape[dim]
        if n == per_half:
            return [x] * self.num_halves
        if n == per_half * self.num_halves:
            return list(torch.split(x, per_half, dim=dim))
        allowed = f"{per_half}" + ("" if self.num_halves == 1 else f" or {per_half * self.num_halves}")
        raise ValueError(f"{name} must have {allowed} rows along dim {dim}, got {n}")

    def assemble(self, reference: Optional[torch.Tensor] = None, normal: Optional[torch.Tensor] = None,
                 targets: Optional[torch.Tensor] = None, dim: int = 0) -> torch.Tensor:
        """Build the full batch. Each source has 1 row (shared by both halves) or ``num_halves`` rows
        (uncond first); ``targets`` has ``N`` rows (shared) or ``num_halves * N`` (half-major)."""
        if targets is None:
            raise ValueError("targets is required")
        t = self._per_half("targets", targets, self.num_targets, dim)
        if self.include_sources:
            if reference is None or normal is None:
                raise ValueError("reference and normal are required when include_sources=True")
            r = self._per_half("reference", reference, 1, dim)
            n = self._per_half("normal", normal, 1, dim)
            parts: List[torch.Tensor] = []
            for h in range(self.num_halves):
                parts += [r[h], n[h], t[h]]
        else:
            if reference is not None or normal is not None:
                raise ValueError("reference/normal must be None when include_sources=False")
            parts = t
        return torch.cat(parts, dim=dim)

    def split(self, x: torch.Tensor, dim: int = 0) -> Branches:
        """Inverse of :meth:`assemble`: the rows of each branch, CFG halves stacked uncond first."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[dim] != self.batch_size:
            raise ValueError(f"x must have {self.batch_size} rows along dim {dim} for {self!r}, "
                             f"got {x.shape[dim]}")
        def take(rows: Sequence[int]) -> torch.Tensor:
            return x.index_select(dim, torch.tensor(list(rows), device=x.device))
        if not self.include_sources:
            return Branches(None, None, x)
        targets = torch.cat([x.narrow(dim, s.start, self.num_targets)
                             for s in (self.target_slice(h) for h in range(self.num_halves))], dim=dim)
        return Branches(take(self.reference_rows), take(self.normal_rows), targets)

    def for_replay(self, num_targets: Optional[int] = None) -> "BranchLayout":
        """The target-only layout (same CFG setting) for K/V-cache replay batches."""
        return BranchLayout(self.num_targets if num_targets is None else num_targets, self.cfg, False)
