"""A reusable tri-source mask: every routing table any backend needs, built once per mask set.

Modelled on FlexAttention's ``BlockMask``: the grafting layer builds one per resolution and mask
set and passes it to :func:`o2mag_kernels.tri_source_attention` for every head, layer, step and
CFG half, so a call is argument checks plus one kernel launch. Everything here is a handful of
torch ops on the masks' own device with no host synchronisation (so it may be built while a CUDA
graph is being captured, and never stalls the GPU queue).

What the tables are (per mask batch row; batch 1 serves every target):

* ``qperm`` (int32, Lq): a stable permutation of the queries with the foreground-routed ones
  first; ``counts[:, 0]`` how many. A query is foreground-routed when it is inside the query mask
  and its batch has at least one usable foreground key (the contract's fallback).
* ``fidx`` (int32, Lf): the usable foreground keys first (stable); ``counts[:, 1]`` how many.
* ``tiles[n]`` (int32, (2, cdiv(Lb, n)) for n in 64, 128): background key tiles of n keys; row 0
  lists the *full* tiles (every key usable), row 1 the *partial* ones (some usable); tiles with no
  usable key are in neither. ``counts[:, 2:6]`` = full/partial counts for 64, then 128.
* ``bg_bytes`` (uint8, Lb): the usable background keys, after the contract's fallback (a batch
  with no usable background key uses all of them).

``None`` key masks stay ``None`` ("all usable", any length); the kernel then walks that source
densely with no table.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, TypedDict

import torch
import torch.nn.functional as F

TILE_SIZES = (64, 128)  # background tile sizes the fused kernel may run with (its BLOCK_N)

KeyRows = List[Tuple[torch.Tensor, int]]  # per mask row: (key indices, usable keys first; count)


class HostFacts(TypedDict):
    """What the torch backend reads back to the host once per mask (:meth:`TriSourceMask.host`)."""

    n_qfg: List[int]  # foreground-routed queries per mask row
    qperm: torch.Tensor  # the query permutation as int64
    fidx: Optional[KeyRows]  # None for a None foreground key mask
    bidx: Optional[KeyRows]  # None for a None background key mask


def true_first(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable permutation (int32, same shape) putting each row's True positions first, and the
    number of True entries per row (int32). O(L) cumsum/scatter, no host sync."""
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


def _tile_lists(bg: torch.Tensor, tile: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tiles (Bb, 2, T) int32, n_full (Bb,), n_part (Bb,)) for ``tile``-key background tiles."""
    Bb, Lb = bg.shape
    T = -(-Lb // tile)
    m = bg.to(torch.int32)
    if T * tile != Lb:
        m = F.pad(m, (0, T * tile - Lb))
    cnt = m.view(Bb, T, tile).sum(-1)
    full = cnt == tile
    part = (cnt > 0) & ~full
    full_perm, n_full = true_first(full)
    part_perm, n_part = true_first(part)
    return torch.stack([full_perm, part_perm], 1).contiguous(), n_full, n_part


def check_mask_type(name: str, m: object) -> None:
    """A mask must be a 2-D bool tensor (batch, length); TypeError/ValueError naming it."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {m.dtype}")
    if m.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(m.shape)}")


class TriSourceMask:
    """Routing tables of one (query, foreground key, background key) mask set.

    Build with :func:`tri_source_mask`. Valid for any number of heads, head dim, dtype, scale and
    gain; the batch is 1 (serves any number of targets) or the masks' common batch, and the
    lengths are fixed by the masks given (a ``None`` key mask accepts any length).
    """

    __slots__ = ("query_mask", "fg_key_mask", "bg_key_mask", "use_fg", "fg_any", "qperm", "fidx",
                 "tiles", "bg_bytes", "counts", "batch", "Lq", "Lf", "Lb", "device", "_host",
                 "_columns")

    def __init__(self, query_mask: torch.Tensor, fg_key_mask: Optional[torch.Tensor],
                 bg_key_mask: Optional[torch.Tensor], use_fg: torch.Tensor,
                 fg_any: Optional[torch.Tensor], qperm: torch.Tensor, fidx: Optional[torch.Tensor],
                 tiles: Optional[Dict[int, torch.Tensor]], bg_bytes: Optional[torch.Tensor],
                 counts: torch.Tensor, batch: int, Lf: Optional[int], Lb: Optional[int]) -> None:
        self.query_mask: torch.Tensor = query_mask
        self.fg_key_mask: Optional[torch.Tensor] = fg_key_mask
        self.bg_key_mask: Optional[torch.Tensor] = bg_key_mask  # fallback applied
        self.use_fg: torch.Tensor = use_fg
        self.fg_any: Optional[torch.Tensor] = fg_any
        self.qperm: torch.Tensor = qperm
        self.fidx: Optional[torch.Tensor] = fidx
        self.tiles: Optional[Dict[int, torch.Tensor]] = tiles
        self.bg_bytes: Optional[torch.Tensor] = bg_bytes
        self.counts: torch.Tensor = counts
        self.batch: int = batch
        self.Lq: int = query_mask.shape[1]
        self.Lf: Optional[int] = Lf
        self.Lb: Optional[int] = Lb
        self.device: torch.device = query_mask.device
        self._host: Optional[HostFacts] = None
        self._columns: Dict[Tuple[torch.dtype, float], torch.Tensor] = {}

    def __repr__(self) -> str:
        lf = "any" if self.Lf is None else self.Lf
        lb = "any" if self.Lb is None else self.Lb
        return (f"TriSourceMask(batch={self.batch}, Lq={self.Lq}, Lf={lf}, Lb={lb}, "
                f"device={self.device})")

    def check(self, B: int, Lq: int, Lf: int, Lb: int, device: torch.device) -> None:
        """Raise ``ValueError`` (naming ``query_mask``) when this mask cannot serve a call."""
        if self.batch not in (1, B):
            raise ValueError(f"query_mask: the TriSourceMask has batch {self.batch} but q has batch "
                             f"{B} (a mask serves batch 1 or its own batch)")
        if self.Lq != Lq:
            raise ValueError(f"query_mask: the TriSourceMask has {self.Lq} queries but q has {Lq}")
        if self.Lf is not None and self.Lf != Lf:
            raise ValueError(f"query_mask: the TriSourceMask has {self.Lf} foreground keys but "
                             f"k_fg has {Lf}")
        if self.Lb is not None and self.Lb != Lb:
            raise ValueError(f"query_mask: the TriSourceMask has {self.Lb} background keys but "
                             f"k_bg has {Lb}")
        if self.device != device:
            raise ValueError(f"query_mask: the TriSourceMask is on {self.device} but q is on {device}")

    def for_lengths(self, Lf: int, Lb: int) -> TriSourceMask:
        """This mask, or (when a ``None`` foreground mask meets an empty foreground source) the
        equivalent explicit one: with no foreground key every query takes the background."""
        if self.fg_key_mask is None and Lf == 0:
            empty = torch.zeros(1, 0, dtype=torch.bool, device=self.device)
            return tri_source_mask(self.query_mask, empty, self.bg_key_mask)
        return self

    def effective(self, B: int, Lf: int,
                  Lb: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(use_fg (B, Lq), fg keys (B, Lf), bg keys (B, Lb)) bool views for the torch and
        reference backends; ``None`` key masks become all-True."""
        fg = (torch.ones(1, Lf, dtype=torch.bool, device=self.device) if self.fg_key_mask is None
              else self.fg_key_mask)
        bg = (torch.ones(1, Lb, dtype=torch.bool, device=self.device) if self.bg_key_mask is None
              else self.bg_key_mask)
        use_fg = self.use_fg if (self.fg_key_mask is not None or Lf > 0) else \
            torch.zeros_like(self.use_fg)
        return use_fg.expand(B, self.Lq), fg.expand(B, Lf), bg.expand(B, Lb)

    def exclusion_columns(self, dtype: torch.dtype, value: float) -> torch.Tensor:
        """(rows, Lb) in ``dtype``: ``value`` at the background keys a row may not use, 0 at the
        usable ones (the torch backend's augmented strategy appends these to the keys' head
        dim). Built on the mask's device without a host read, cached per (dtype, value); needs a
        background key mask."""
        if self.bg_key_mask is None:
            raise ValueError("exclusion_columns: this mask has no background key mask")
        key = (dtype, float(value))
        cols = self._columns.get(key)
        if cols is None:
            zero = torch.zeros((), dtype=dtype, device=self.device)
            cols = self._columns[key] = torch.where(self.bg_key_mask, zero, zero + value)
        return cols

    @property
    def host_read(self) -> bool:
        """Whether :meth:`host` has read its facts yet (after that, no call synchronises)."""
        return self._host is not None

    def host(self) -> HostFacts:
        """Host-side facts for the torch backend, read once (one synchronisation) and cached:
        ``n_qfg`` (foreground-routed queries per mask row), ``qperm`` as int64, and ``fidx`` /
        ``bidx``: per key-mask row (index list with the usable keys first, their count), or None
        for a ``None`` mask."""
        if self._host is None:
            n_q = self.counts[:self.use_fg.shape[0], 0]
            fidx = bidx = n_f = n_b = None
            if self.fg_key_mask is not None:
                fidx, n_f = self.fidx.long(), self.counts[:self.fidx.shape[0], 1]
            if self.bg_key_mask is not None:
                bidx, n_b = true_first(self.bg_key_mask)
                bidx = bidx.long()
            n_q, n_f, n_b = ([int(x) for x in t.tolist()] if t is not None else None
                             for t in (n_q, n_f, n_b))
            self._host = {
                "n_qfg": n_q,
                "qperm": self.qperm.long(),
                "fidx": None if fidx is None else [(fidx[r], n_f[r]) for r in range(len(n_f))],
                "bidx": None if bidx is None else [(bidx[r], n_b[r]) for r in range(len(n_b))],
            }
        return self._host


def tri_source_mask(query_mask: torch.Tensor, fg_key_mask: Optional[torch.Tensor] = None,
                    bg_key_mask: Optional[torch.Tensor] = None) -> TriSourceMask:
    """Build the routing tables of a mask set once (see the module docstring).

    ``query_mask`` bool (1 or B, Lq): True = the query takes the foreground source;
    ``fg_key_mask`` bool (1 or B, Lf) or None (all usable); ``bg_key_mask`` bool (1 or B, Lb) or
    None. Masks of batch B and batch 1 may be mixed. Raises ``TypeError``/``ValueError`` naming
    the argument.
    """
    check_mask_type("query_mask", query_mask)
    device = query_mask.device
    batches = {query_mask.shape[0]}
    for name, m in (("fg_key_mask", fg_key_mask), ("bg_key_mask", bg_key_mask)):
        if m is None:
            continue
        check_mask_type(name, m)
        if m.device != device:
            raise ValueError(f"{name} is on {m.device} but query_mask is on {device}")
        batches.add(m.shape[0])
    if 0 in batches:
        raise ValueError("query_mask and the key masks must have a batch of at least 1")
    big = batches - {1}
    if len(big) > 1:
        raise ValueError(f"the masks' batch sizes must each be 1 or one common B, got "
                         f"{sorted(batches)} (query_mask, fg_key_mask, bg_key_mask)")
    batch = max(batches)

    ncols = 6
    parts: Dict[int, torch.Tensor] = {}
    if fg_key_mask is None:
        fg_any = None
        use_fg = query_mask
        fidx = None
        n_kf = None
    else:
        fg_any = fg_key_mask.any(dim=1)
        use_fg = query_mask & fg_any[:, None]
        fidx, n_kf = true_first(fg_key_mask)
    qperm, n_qfg = true_first(use_fg)
    parts[0] = n_qfg
    if n_kf is not None:
        parts[1] = n_kf
    if bg_key_mask is None:
        bg = tiles = bg_bytes = None
    else:
        bg = bg_key_mask | ~bg_key_mask.any(dim=1, keepdim=True)
        bg_bytes = bg.to(torch.uint8)  # a copy, not .view(uint8): inductor cannot lower that on bool
        tiles = {}
        for col, size in ((2, 64), (4, 128)):
            tiles[size], parts[col], parts[col + 1] = _tile_lists(bg, size)
    counts = torch.zeros(batch, ncols, dtype=torch.int32, device=device)
    for col, v in parts.items():
        counts[:, col] = v  # broadcasts a batch-1 column over the batch
    return TriSourceMask(
        query_mask, fg_key_mask, bg, use_fg, fg_any, qperm, fidx, tiles, bg_bytes, counts, batch,
        None if fg_key_mask is None else fg_key_mask.shape[1],
        None if bg_key_mask is None else bg_key_mask.shape[1])
