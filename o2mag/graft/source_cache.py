"""The reference/normal branches' attention inputs, recorded once and replayed for later batches."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

SOURCE_KEYS = ("k_ref", "v_ref", "k_norm", "v_norm")
QGRAFT_KEYS = ("q_ref", "q_norm")


class SourceCache:
    """Reference/normal K and V (and Q during the Q-graft phase) per (step, processor name).

    The source branches replay their inverted latents, so their attention inputs do not depend on
    the targets: record them once (a full batch, ``BranchLayout(include_sources=True)``) and
    replay them for later batches that hold only target rows (``include_sources=False``). Each
    entry maps ``k_ref, v_ref, k_norm, v_norm`` (and ``q_ref, q_norm``) to a tensor of shape
    (num_halves, heads, tokens, head_dim), CFG halves uncond first. ``device`` (e.g. "cpu") keeps
    the cache off the accelerator; None keeps it where the UNet runs.
    """

    def __init__(self, device=None):
        self.device = None if device is None else torch.device(device)
        self._store: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        self.num_steps: Optional[int] = None
        self.num_halves: Optional[int] = None

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key) -> bool:
        return key in self._store

    def keys(self) -> List[Tuple[int, str]]:
        return sorted(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.num_steps = self.num_halves = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._store.values() for t in e.values())

    def _check(self, num_steps: int, num_halves: int, what: str) -> None:
        if self.num_steps is None:
            return
        if (num_steps, num_halves) != (self.num_steps, self.num_halves):
            raise RuntimeError(
                f"SourceCache {what}: it holds a run with num_steps={self.num_steps}, "
                f"num_halves={self.num_halves}, now asked for num_steps={num_steps}, "
                f"num_halves={num_halves}; clear() it first")

    def record(self, step: int, name: str, tensors: Dict[str, torch.Tensor], num_steps: int,
               num_halves: int) -> None:
        """Store copies (detached, on ``device``) of one layer's source tensors at one step."""
        self._check(num_steps, num_halves, "record")
        self.num_steps, self.num_halves = num_steps, num_halves
        self._store[(step, name)] = {
            k: t.detach().to(self.device or t.device, copy=True) for k, t in tensors.items()}

    def fetch(self, step: int, name: str, num_steps: int, num_halves: int, keys: Iterable[str],
              device, dtype) -> Dict[str, torch.Tensor]:
        """The tensors recorded for (step, name), on ``device`` in ``dtype``."""
        self._check(num_steps, num_halves, "replay")
        entry = self._store.get((step, name))
        missing = [k for k in keys if entry is None or k not in entry]
        if missing:
            raise RuntimeError(
                f"SourceCache has no {', '.join(missing)} for step {step}, layer {name!r}: record a "
                "full batch (BranchLayout(include_sources=True)) with the same config and schedule first")
        return {k: entry[k].to(device=device, dtype=dtype) for k in keys}
