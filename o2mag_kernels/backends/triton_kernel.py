"""The fused tri-source attention kernel (Triton): tile configs, head-dim padding and the kernel.

One launch covers every batch, head and query tile: grid = (cdiv(Lq, BLOCK_M) + 1, B·H). The
routing tables come from a :class:`o2mag_kernels.TriSourceMask` (built once per mask set):

* queries are read through a per-batch permutation with the foreground-routed ones first; the
  first cdiv(n_fg, BLOCK_M) query tiles are foreground tiles and the rest background tiles, so no
  tile mixes sources and no row is masked to a source (the one spare program per batch·head
  covers the split);
* the foreground source (the reference defect, a small region) is read through the compacted list
  of its usable keys: masked keys cost nothing;
* the background source (the normal image, mostly usable) is read in contiguous key tiles from two
  per-batch tile lists: *full* tiles (every key usable: no masking at all) and *partial* tiles
  (masked per key with a byte mask); tiles with no usable key are skipped. Without a background key
  mask every tile is full but the tail. :class:`KernelVariant` switches this loop to one dense
  walk over every tile (``bg_dense``) or full tiles' K/V to TMA descriptors (``tma``).

NaN rule (SDPA's): a row reads its query and the usable keys of its source, nothing else. Excluded
keys get ``-inf`` logits by a select (never an addition: ``NaN + -inf`` is NaN) and their V is never
loaded (masked loads: ``0 * NaN`` would be NaN), so a NaN or inf there cannot reach any row.

Loads the hardware wants: diffusers hands over ``(B, L, H·D)`` views, whose per-head offset ``h·D``
(40 elements at head dim 40) is not a multiple of 16 elements, so Triton's launcher cannot mark it
16-divisible and the loads fall back to 2-byte scalars without ``cp.async`` or pipelining. When the
host has checked that every stride but the last of every tensor read or written is a multiple of 8
elements and every base pointer 16-byte aligned, ``ALIGNED`` says so at each offset formed from a
stride (``tl.multiple_of``), which restores 16-byte vector loads and ``cp.async``.

Head dims are padded with masked loads so that every ``tl.dot`` is at least 64 wide in each
dimension (40 -> 64, 80 -> 128, 160 -> 128 + 64, ...): Triton >= 3.6 miscompiles narrow (<= 32)
dots on Hopper (out-of-range shared-memory accesses), and tensor cores gain nothing from them.

Online softmax in base 2 with float32 accumulators; ``fg_gain`` is folded into the foreground
loop's logit scale. float32 inputs use 3xTF32 dots; above head dim 64 they run column-chunked
(logits over 64-column chunks of Q and K, the output 64 columns per pass over the keys) so that
nothing spills.

This module does not import torch: the config tables and the kernel stand on triton alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

MAX_HEAD_DIM = 256
MIN_DOT = 64  # no dot narrower than this, in any dimension
LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634

# Every tile shape the autotuner may pick: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N is
# also the background tile size, so it must be one of TILE_SIZES (the mask object holds tile
# lists for each).
CONFIGS = (
    (128, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 64, 8, 3),
    (64, 64, 8, 2),
    (64, 64, 8, 1),  # large head dims: one stage keeps shared memory and registers in budget
)
TILE_SIZES = (64, 128)

# Head-dim buckets the configs are checked for (SD 1.x/2.x use 40, 64, 80, 160). A head dim uses
# the configs of the bucket with the same padded dot widths (see ``split_head_dim``).
HEAD_DIMS = (40, 64, 80, 128, 160, 256)

FP32_WHOLE_HEAD_DIM = 64  # fp32 above this runs column-chunked
FP32_D_CHUNK = 64
FP32_K_CHUNK = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def split_head_dim(head_dim: int) -> tuple:
    """(BLOCK_D0, BLOCK_D1): padded dot widths covering ``head_dim`` (BLOCK_D1 = 0: one piece).

    Each piece is a power of two of at least ``MIN_DOT``; a second piece is used only when it
    saves work over padding to the next power of two (160 = 128 + 64 rather than 256).
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if head_dim <= MIN_DOT:
        return MIN_DOT, 0
    lead = 1 << (head_dim.bit_length() - 1)
    if lead == head_dim:
        return head_dim, 0
    tail = max(MIN_DOT, _next_pow2(head_dim - lead))
    if tail >= lead:
        return 2 * lead, 0
    return lead, tail


def chunking(head_dim: int, itemsize: int) -> tuple:
    """(D_CHUNK, K_CHUNK) constexprs: (0, 0) holds the head dim whole (fp16/bf16, fp32 up to
    FP32_WHOLE_HEAD_DIM); otherwise fp32 runs column-chunked."""
    if itemsize != 4 or head_dim <= FP32_WHOLE_HEAD_DIM:
        return 0, 0
    return FP32_D_CHUNK, FP32_K_CHUNK


def head_dim_bucket(head_dim: int) -> int:
    """The checked bucket with the same dot widths as ``head_dim`` (the smallest covering it)."""
    width = split_head_dim(head_dim)
    for b in HEAD_DIMS:
        if split_head_dim(b) == width:
            return b
    for b in HEAD_DIMS:
        if sum(split_head_dim(b)) >= sum(width):
            return b
    raise ValueError(f"head dim {head_dim} is above {MAX_HEAD_DIM}")


def length_bucket(n: int) -> int:
    """Autotune key for a length: next power of two, clamped to [64, 16384]."""
    return min(16384, max(64, _next_pow2(max(1, n))))


@dataclass(frozen=True)
class KernelVariant:
    """Which background loop a launch runs; each switch is a constexpr of the kernel.

    * ``bg_dense``: the background as ONE loop over every key tile, each key picked by its byte of
      the mask (no tile lists, no second loop; tiles without a usable key are walked too) instead
      of the full-tile list then the partial-tile list. It changes nothing without a background
      key mask (that walk is already dense).
    * ``tma``: full background tiles' K and V through device-side tensor descriptors (TMA on
      Hopper) instead of pointer loads; partial tiles keep pointer loads (a TMA tile cannot skip
      excluded keys' V). Needs aligned inputs (the host's ``ALIGNED`` check) and the whole-head
      path (not fp32 above head dim 64), and cannot be combined with ``bg_dense``.
    * ``warp_specialize``: refused. Triton 3.6 documents ``tl.range(..., warp_specialize=True)``
      as Blackwell-only; compiled for sm_90 (3.6 and 3.9) this loop comes out with no
      warp-specialised partition at all, so there is nothing for a Hopper card to time.

    The default (all False) is the tile-list algorithm with pointer loads.
    """

    bg_dense: bool = False
    tma: bool = False
    warp_specialize: bool = False

    @property
    def name(self) -> str:
        """'default', or the switches that are on joined by '+' (e.g. 'bg_dense')."""
        on = [f for f in ("bg_dense", "tma", "warp_specialize") if getattr(self, f)]
        return "+".join(on) or "default"

    def problem(self) -> str:
        """'' when the kernel has this variant, else why not."""
        if self.warp_specialize:
            return ("warp_specialize: Triton 3.6 offers automatic warp specialisation on Blackwell "
                    "only; on sm_90 this loop compiles to no warp-specialised code")
        if self.bg_dense and self.tma:
            return "bg_dense and tma cannot be combined (masked tiles must not read excluded V)"
        return ""

    @staticmethod
    def named(name: str) -> "KernelVariant":
        """The variant called ``name`` (see :attr:`name`)."""
        flags = set() if name == "default" else set(name.split("+"))
        unknown = flags - {"bg_dense", "tma", "warp_specialize"}
        if unknown:
            raise ValueError(f"unknown kernel variant switch(es) {sorted(unknown)} in {name!r}")
        return KernelVariant(**{f: True for f in flags})


DEFAULT_VARIANT = KernelVariant()
# Every variant the kernel has: the AOT check compiles each and the hardware sweep runs each, so a
# card can decide between them; the autotuner and ``auto`` use the default.
VARIANTS = (DEFAULT_VARIANT, KernelVariant(bg_dense=True), KernelVariant(tma=True))


FP32_PRECISION = "tf32x3"


def precision(itemsize: int) -> str:
    """The ``tl.dot`` input precision for a dtype size: fp32 uses FP32_PRECISION; fp16/bf16 dots
    are exact products in fp32 whatever it says."""
    return FP32_PRECISION if itemsize == 4 else "tf32"


def dtype_class(itemsize: int) -> str:
    return "fp32" if itemsize == 4 else "half"


@triton.jit
def _base(i, s_i, j, s_j, ALIGNED: tl.constexpr):
    """The element offset ``i * s_i + j * s_j`` of a (batch, head) slice, declared a multiple of
    8 when the host checked that every stride is (``ALIGNED``): with 16-byte aligned base
    pointers, that lets Triton prove 16-byte vector loads (the hint must sit on the op that
    computes the offset, so the product is formed here)."""
    off = i * s_i + j * s_j
    if ALIGNED:
        off = tl.multiple_of(off, 8)
    return off


@triton.jit
def _row_offsets(rows, stride, ALIGNED: tl.constexpr):
    """``rows[:, None] * stride``, shape (N, 1), declared multiples of 8 under ``ALIGNED``."""
    off = rows[:, None] * stride
    if ALIGNED:
        off = tl.multiple_of(off, [8, 8])
    return off


@triton.jit
def _load_rows(ptr, rows, stride, offs_d, rows_ok, d_ok, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Load a (len(rows), len(offs_d)) tile, masking only what can be out of range."""
    p = ptr + _row_offsets(rows, stride, ALIGNED) + offs_d[None, :]
    if MASK_ROWS:
        if MASK_D:
            return tl.load(p, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            return tl.load(p, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_D:
            return tl.load(p, mask=d_ok[None, :], other=0.0)
        else:
            return tl.load(p)


@triton.jit
def _tile(ptr, desc, rows, stride, offs_d, rows_ok, row0, COL0: tl.constexpr,
          MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
          DESC: tl.constexpr, ALIGNED: tl.constexpr):
    """Rows ``rows`` x columns ``offs_d`` (= COL0 + arange) of K or V: through the tensor
    descriptor ``desc`` (DESC: the whole tile from row ``row0``; the TMA zero-fills columns past
    the head dim) or through pointers (columns past the head dim masked when MASK_D)."""
    if DESC:
        return desc.load([row0, COL0])
    else:
        return _load_rows(ptr, rows, stride, offs_d, rows_ok, offs_d < HEAD_DIM, MASK_ROWS,
                          MASK_D, ALIGNED)


@triton.jit
def _mm(a, b, acc, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _block(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, kj, in_b, usable, sk_l, sv_l, qk_scale, KD0, KD1, VD0, VD1, row0,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    KEY_MASK: tl.constexpr, BOUND: tl.constexpr, DESC: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """One key block (rows ``kj`` of K and V) into the running softmax state.

    KEY_MASK: only the keys in ``usable`` count -- the others get ``-inf`` logits (selected, so
    a NaN or inf in their K cannot leak) and zero values (V is loaded with ``usable`` as its
    mask, so their V is never read: ``0 * NaN`` would be NaN). BOUND: ``in_b`` masks the K loads
    (keys past the end; ``usable`` must then lie within ``in_b``). Without KEY_MASK (full tiles)
    nothing is masked at all. DESC: K and V come through the tensor descriptors (TMA) as the tile
    starting at row ``row0``; full tiles only.
    """
    if D_CHUNK > 0:
        # fp32, large head dim: logits summed over K_CHUNK-column chunks (Q re-read from cache),
        # output columns [d_out, d_out + D_CHUNK) only.
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for dk in range(0, HEAD_DIM, K_CHUNK):
            offs_c = dk + tl.arange(0, K_CHUNK)
            c_ok = offs_c < HEAD_DIM
            qc = _load_rows(q_rows, tl.zeros([BLOCK_M], dtype=tl.int64), 0, offs_c, m_ok, c_ok,
                            True, True, ALIGNED)
            kc = _load_rows(K, kj, sk_l, offs_c, in_b, c_ok, BOUND, True, ALIGNED)
            s = _mm(qc, tl.trans(kc), s, DOT_FP32, PREC)
    else:
        offs_d0 = tl.arange(0, BLOCK_D0)
        k0 = _tile(K, KD0, kj, sk_l, offs_d0, in_b, row0, 0, BOUND, BLOCK_D0 > HEAD_DIM, HEAD_DIM,
                   DESC, ALIGNED)
        s = _mm(q0, tl.trans(k0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PREC)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            k1 = _tile(K, KD1, kj, sk_l, offs_d1, in_b, row0, BLOCK_D0, BOUND,
                       BLOCK_D0 + BLOCK_D1 > HEAD_DIM, HEAD_DIM, DESC, ALIGNED)
            s = _mm(q1, tl.trans(k1), s, DOT_FP32, PREC)
    if KEY_MASK:
        s = tl.where(usable[None, :], s, float("-inf"))
    # Base-2 online softmax; the logit scale (log2(e) folded in) is applied in the same FMA as the
    # max subtraction. m_i starts finite, so a row with only -inf logits keeps its state.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if D_CHUNK > 0:
        offs_o = d_out + tl.arange(0, D_CHUNK)
        v = _load_rows(V, kj, sv_l, offs_o, usable, offs_o < HEAD_DIM, KEY_MASK, True, ALIGNED)
        acc0 = _mm(p, v, acc0 * alpha[:, None], DOT_FP32, PREC)
    else:
        v0 = _tile(V, VD0, kj, sv_l, offs_d0, usable, row0, 0, KEY_MASK, BLOCK_D0 > HEAD_DIM,
                   HEAD_DIM, DESC, ALIGNED)
        acc0 = _mm(p.to(v0.dtype), v0, acc0 * alpha[:, None], DOT_FP32, PREC)
        if BLOCK_D1 > 0:
            v1 = _tile(V, VD1, kj, sv_l, offs_d1, usable, row0, BLOCK_D0, KEY_MASK,
                       BLOCK_D0 + BLOCK_D1 > HEAD_DIM, HEAD_DIM, DESC, ALIGNED)
            acc1 = _mm(p.to(v1.dtype), v1, acc1 * alpha[:, None], DOT_FP32, PREC)
    return acc0, acc1, m_new, l_i


@triton.jit
def _foreground(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, IDX, n_keys, sk_l, sv_l, qk_scale,
    FG_ALL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The foreground source: its usable keys, gathered through the compacted index list
    (FG_ALL: all keys in order, no list). Lanes past ``n_keys`` load nothing."""
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_b = offs_n < n_keys
        if FG_ALL:
            kj = offs_n.to(tl.int64)
        else:
            kj = tl.load(IDX + offs_n, mask=in_b, other=0).to(tl.int64)
        acc0, acc1, m_i, l_i = _block(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, in_b,
            sk_l, sv_l, qk_scale, K, K, V, V, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
            D_CHUNK, K_CHUNK, True, True, False, ALIGNED, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _background(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, TILES, MASK, n_full, n_part, Lb, sk_l, sv_l, qk_scale, KD0, KD1, VD0, VD1,
    BG_ALL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    TMA: tl.constexpr, ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The background source in contiguous BLOCK_N-key tiles: full tiles with no masking, then
    partial tiles masked per key; tiles without a usable key never come up. TILES holds the full
    tiles' indices in its first row and the partial ones' in its second (``cdiv(Lb, BLOCK_N)``
    wide). BG_ALL (no mask): every tile is full but a short tail. TMA: full tiles' K and V come
    through the tensor descriptors."""
    offs = tl.arange(0, BLOCK_N)
    n_tiles = (Lb + BLOCK_N - 1) // BLOCK_N
    if BG_ALL:
        n_full = Lb // BLOCK_N
    for i in range(0, n_full):
        if BG_ALL:
            t = i
        else:
            t = tl.load(TILES + i)
        kj = offs.to(tl.int64) + t * BLOCK_N
        acc0, acc1, m_i, l_i = _block(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, offs < BLOCK_N,
            offs < BLOCK_N, sk_l, sv_l, qk_scale, KD0, KD1, VD0, VD1, t * BLOCK_N, HEAD_DIM,
            BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK, False, False, TMA, ALIGNED,
            DOT_FP32, PREC)
    if BG_ALL:
        if Lb % BLOCK_N != 0:  # the tail tile
            kj = offs.to(tl.int64) + n_full * BLOCK_N
            in_b = kj < Lb
            acc0, acc1, m_i, l_i = _block(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, in_b,
                sk_l, sv_l, qk_scale, K, K, V, V, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0,
                BLOCK_D1, D_CHUNK, K_CHUNK, True, True, False, ALIGNED, DOT_FP32, PREC)
    else:
        for i in range(0, n_part):
            t = tl.load(TILES + n_tiles + i)
            kj = offs.to(tl.int64) + t * BLOCK_N
            in_b = kj < Lb
            usable = tl.load(MASK + kj, mask=in_b, other=0) != 0
            acc0, acc1, m_i, l_i = _block(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, usable,
                sk_l, sv_l, qk_scale, K, K, V, V, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0,
                BLOCK_D1, D_CHUNK, K_CHUNK, True, True, False, ALIGNED, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _background_dense(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, MASK, Lb, sk_l, sv_l, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The background source as ONE loop over every BLOCK_N-key tile, each key picked by its byte
    of the mask (no tile lists, no second loop; tiles without a usable key are walked too), then
    the tail tile."""
    offs = tl.arange(0, BLOCK_N)
    for t in range(0, Lb // BLOCK_N):
        kj = offs.to(tl.int64) + t * BLOCK_N
        usable = tl.load(MASK + kj) != 0
        acc0, acc1, m_i, l_i = _block(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, offs < BLOCK_N, usable,
            sk_l, sv_l, qk_scale, K, K, V, V, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
            D_CHUNK, K_CHUNK, True, False, False, ALIGNED, DOT_FP32, PREC)
    if Lb % BLOCK_N != 0:
        kj = offs.to(tl.int64) + (Lb // BLOCK_N) * BLOCK_N
        in_b = kj < Lb
        usable = tl.load(MASK + kj, mask=in_b, other=0) != 0
        acc0, acc1, m_i, l_i = _block(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, usable,
            sk_l, sv_l, qk_scale, K, K, V, V, 0, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
            D_CHUNK, K_CHUNK, True, True, False, ALIGNED, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _sources(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, is_fg,
    KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
    KB, VB, TILES, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
    FG_ALL: tl.constexpr, BG_ALL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    BG_DENSE: tl.constexpr, TMA: tl.constexpr, ALIGNED: tl.constexpr, DOT_FP32: tl.constexpr,
    PREC: tl.constexpr,
):
    """The one source a query tile reads (the background as the variant says)."""
    if is_fg:
        acc0, acc1, m_i, l_i = _foreground(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, KF, VF, FIDX, n_kf, skf_l, svf_l,
            qk_scale_fg, FG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
            K_CHUNK, ALIGNED, DOT_FP32, PREC)
    elif BG_DENSE and not BG_ALL:
        acc0, acc1, m_i, l_i = _background_dense(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, KB, VB, BMASK, Lb, skb_l, svb_l,
            qk_scale_bg, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK,
            ALIGNED, DOT_FP32, PREC)
    else:
        if TMA:
            # (Lb, HEAD_DIM) descriptors with (BLOCK_N, BLOCK_D) tiles; the TMA zero-fills what
            # lies past either extent (the host checked the 16-byte alignment TMA needs)
            kd0 = tl.make_tensor_descriptor(KB, shape=[Lb, HEAD_DIM], strides=[skb_l, 1],
                                            block_shape=[BLOCK_N, BLOCK_D0])
            vd0 = tl.make_tensor_descriptor(VB, shape=[Lb, HEAD_DIM], strides=[svb_l, 1],
                                            block_shape=[BLOCK_N, BLOCK_D0])
            if BLOCK_D1 > 0:
                kd1 = tl.make_tensor_descriptor(KB, shape=[Lb, HEAD_DIM], strides=[skb_l, 1],
                                                block_shape=[BLOCK_N, BLOCK_D1])
                vd1 = tl.make_tensor_descriptor(VB, shape=[Lb, HEAD_DIM], strides=[svb_l, 1],
                                                block_shape=[BLOCK_N, BLOCK_D1])
            else:
                kd1 = kd0
                vd1 = vd0
        else:
            kd0 = KB
            vd0 = VB
            kd1 = KB
            vd1 = VB
        acc0, acc1, m_i, l_i = _background(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, KB, VB, TILES, BMASK,
            n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg, kd0, kd1, vd0, vd1, BG_ALL, HEAD_DIM,
            BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK, TMA, ALIGNED, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


# Long on purpose: a kernel's signature is its strides (30 lines), and the body only sets up the
# program's pointers and calls the two loops, which are the helpers above. The reason sits here, not
# in the docstring, because the docstring is part of the source hash that keys the GPU evidence.
@triton.jit
def tri_source_fwd(
    Q, KF, VF, KB, VB, O, LSE,
    QPERM, FIDX, TILES64, TILES128, BMASK, COUNTS,
    sq_b, sq_h, sq_l,
    skf_b, skf_h, skf_l,
    svf_b, svf_h, svf_l,
    skb_b, skb_h, skb_l,
    svb_b, svb_h, svb_l,
    so_b, so_h, so_l,
    sqp_b, sfi_b, sbm_b, sc_b,
    div_f, div_b, H, Lq, Lf, Lb,
    qk_scale_fg, qk_scale_bg,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    FG_ALL: tl.constexpr, BG_ALL: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_CHUNK: tl.constexpr = 0, K_CHUNK: tl.constexpr = 0,
    ALIGNED: tl.constexpr = False, BG_DENSE: tl.constexpr = False, TMA: tl.constexpr = False,
):
    """One (query tile, batch·head) program; grid = (cdiv(Lq, BLOCK_M) + 1, B·H).

    The first cdiv(n_fg, BLOCK_M) tiles hold foreground-routed queries, the rest background ones,
    so no tile mixes sources (the spare program of the grid covers the split; programs past the
    end do nothing). COUNTS rows (int32): [foreground-routed queries, usable foreground keys, full
    64-key tiles, partial 64-key tiles, full 128-key tiles, partial 128-key tiles]. A table's batch
    stride is 0 when one table serves every target (the tile lists follow the byte mask's: both
    come from the background key mask); target ``b`` reads source row ``b // div``.

    ALIGNED (the host checked every stride but the last of the six tensors is a multiple of 8
    elements and every base pointer 16-byte aligned) tells Triton so at each offset formed from a
    stride; BG_DENSE and TMA pick the background loop's variant (:class:`KernelVariant`).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    c = COUNTS + b * sc_b
    # the mask object routes no query to the foreground when it has no usable key
    n_qfg = tl.load(c)
    n_fg_tiles = (n_qfg + BLOCK_M - 1) // BLOCK_M
    is_fg = pid_m < n_fg_tiles
    if is_fg:
        row_start = pid_m * BLOCK_M
        row_end = n_qfg
    else:
        row_start = n_qfg + (pid_m - n_fg_tiles) * BLOCK_M
        row_end = Lq
    if row_start < row_end:
        if FG_ALL:
            n_kf = Lf
        else:
            n_kf = tl.load(c + 1)
        if BLOCK_N == 64:
            TILES = TILES64 + b * ((sbm_b != 0) * 2 * ((Lb + 63) // 64))
            n_full = tl.load(c + 2)
            n_part = tl.load(c + 3)
        else:
            TILES = TILES128 + b * ((sbm_b != 0) * 2 * ((Lb + 127) // 128))
            n_full = tl.load(c + 4)
            n_part = tl.load(c + 5)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < row_end
        qi = tl.load(QPERM + b * sqp_b + offs_m, mask=m_ok, other=0).to(tl.int64)
        q_rows = Q + _base(b, sq_b, h, sq_h, ALIGNED) + _row_offsets(qi, sq_l, ALIGNED)
        o_rows = O + _base(b, so_b, h, so_h, ALIGNED) + _row_offsets(qi, so_l, ALIGNED)
        bf = b // div_f
        bb = b // div_b
        KF = KF + _base(bf, skf_b, h, skf_h, ALIGNED)
        VF = VF + _base(bf, svf_b, h, svf_h, ALIGNED)
        KB = KB + _base(bb, skb_b, h, skb_h, ALIGNED)
        VB = VB + _base(bb, svb_b, h, svb_h, ALIGNED)
        FIDX = FIDX + b * sfi_b
        BMASK = BMASK + b * sbm_b
        zero_rows = tl.zeros([BLOCK_M], dtype=tl.int64)

        if D_CHUNK > 0:
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for d_out in range(0, HEAD_DIM, D_CHUNK):
                acc = tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32)
                # every pass reaches the same running max and sum: restart them per pass
                m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
                l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc, _unused, m_i, l_i = _sources(
                    acc, acc, m_i, l_i, acc, acc, q_rows, m_ok, d_out, is_fg,
                    KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
                    KB, VB, TILES, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
                    FG_ALL, BG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
                    K_CHUNK, BG_DENSE, False, ALIGNED, DOT_FP32, PREC)
                l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a NaN sum stays NaN (the NaN rule)
                offs_o = d_out + tl.arange(0, D_CHUNK)
                tl.store(o_rows + offs_o[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
                         mask=m_ok[:, None] & (offs_o < HEAD_DIM)[None, :])
        else:
            offs_d0 = tl.arange(0, BLOCK_D0)
            q0 = _load_rows(q_rows, zero_rows, 0, offs_d0, m_ok, offs_d0 < HEAD_DIM, True,
                            BLOCK_D0 > HEAD_DIM, ALIGNED)
            acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
            if BLOCK_D1 > 0:
                offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
                q1 = _load_rows(q_rows, zero_rows, 0, offs_d1, m_ok, offs_d1 < HEAD_DIM, True,
                                BLOCK_D0 + BLOCK_D1 > HEAD_DIM, ALIGNED)
                acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
            else:
                q1 = q0
                acc1 = acc0
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc0, acc1, m_i, l_i = _sources(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, 0, is_fg,
                KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
                KB, VB, TILES, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
                FG_ALL, BG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK,
                BG_DENSE, TMA, ALIGNED, DOT_FP32, PREC)
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a NaN sum stays NaN (the NaN rule)
            if BLOCK_D0 > HEAD_DIM:
                tl.store(o_rows + offs_d0[None, :], (acc0 / l_safe[:, None]).to(O.dtype.element_ty),
                         mask=m_ok[:, None] & (offs_d0 < HEAD_DIM)[None, :])
            else:
                tl.store(o_rows + offs_d0[None, :], (acc0 / l_safe[:, None]).to(O.dtype.element_ty),
                         mask=m_ok[:, None])
            if BLOCK_D1 > 0:
                tl.store(o_rows + offs_d1[None, :], (acc1 / l_safe[:, None]).to(O.dtype.element_ty),
                         mask=m_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :])
        if STORE_LSE:
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a NaN sum stays NaN (the NaN rule)
            tl.store(LSE + (b * H + h) * Lq + qi, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,
                     mask=m_ok)
