"""The fused tri-source attention kernel (Triton): tile configs, head-dim padding and the kernel.

One launch covers every batch, head and query tile: grid = (cdiv(Lq, BLOCK_M), B·H). The routing
tables come from a :class:`o2mag_kernels.TriSourceMask` (built once per mask set):

* queries are read through a per-batch permutation with the foreground-routed ones first, so a
  query tile is wholly foreground, wholly background, or the one tile per (batch, head) that
  straddles the boundary. Pure tiles run one source's loop with no per-row masking; the straddling
  tile runs both loops, each row masked to its own source (rows of the other source see ``-inf``
  logits, which leaves their running max, sum and accumulator unchanged, so one accumulator serves
  both loops);
* the foreground source (the reference defect, a small region) is read through the compacted list
  of its usable keys: masked keys cost nothing;
* the background source (the normal image, mostly usable) is read in contiguous key tiles from two
  per-batch tile lists: *full* tiles (every key usable: no masking at all) and *partial* tiles
  (masked per key with a byte mask); tiles with no usable key are skipped. Without a background key
  mask every tile is full but the tail.

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


FP32_PRECISION = "tf32x3"


def precision(itemsize: int) -> str:
    """The ``tl.dot`` input precision for a dtype size: fp32 uses FP32_PRECISION; fp16/bf16 dots
    are exact products in fp32 whatever it says."""
    return FP32_PRECISION if itemsize == 4 else "tf32"


def dtype_class(itemsize: int) -> str:
    return "fp32" if itemsize == 4 else "half"


@triton.jit
def _load_rows(ptr, rows, stride, offs_d, rows_ok, d_ok, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr):
    """Load a (len(rows), len(offs_d)) tile, masking only what can be out of range."""
    p = ptr + rows[:, None] * stride + offs_d[None, :]
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
def _mm(a, b, acc, DOT_FP32: tl.constexpr, PREC: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _block(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, kj, in_b, usable, sk_l, sv_l, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    KEY_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """One key block (rows ``kj`` of K and V) into the running softmax state.

    With KEY_MASK, ``in_b`` masks the loads (keys in range) and ``usable`` the logits (keys that
    count); without it (full background tiles) nothing is masked at all.
    """
    if D_CHUNK > 0:
        # fp32, large head dim: logits summed over K_CHUNK-column chunks (Q re-read from cache),
        # output columns [d_out, d_out + D_CHUNK) only.
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for dk in range(0, HEAD_DIM, K_CHUNK):
            offs_c = dk + tl.arange(0, K_CHUNK)
            c_ok = offs_c < HEAD_DIM
            qc = _load_rows(q_rows, tl.zeros([BLOCK_M], dtype=tl.int64), 0, offs_c, m_ok, c_ok,
                            True, True)
            kc = _load_rows(K, kj, sk_l, offs_c, in_b, c_ok, KEY_MASK, True)
            s = _mm(qc, tl.trans(kc), s, DOT_FP32, PREC)
    else:
        offs_d0 = tl.arange(0, BLOCK_D0)
        k0 = _load_rows(K, kj, sk_l, offs_d0, in_b, offs_d0 < HEAD_DIM, KEY_MASK,
                        BLOCK_D0 > HEAD_DIM)
        s = _mm(q0, tl.trans(k0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PREC)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            k1 = _load_rows(K, kj, sk_l, offs_d1, in_b, offs_d1 < HEAD_DIM, KEY_MASK,
                            BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
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
        v = _load_rows(V, kj, sv_l, offs_o, in_b, offs_o < HEAD_DIM, KEY_MASK, True)
        acc0 = _mm(p, v, acc0 * alpha[:, None], DOT_FP32, PREC)
    else:
        v0 = _load_rows(V, kj, sv_l, offs_d0, in_b, offs_d0 < HEAD_DIM, KEY_MASK,
                        BLOCK_D0 > HEAD_DIM)
        acc0 = _mm(p.to(v0.dtype), v0, acc0 * alpha[:, None], DOT_FP32, PREC)
        if BLOCK_D1 > 0:
            v1 = _load_rows(V, kj, sv_l, offs_d1, in_b, offs_d1 < HEAD_DIM, KEY_MASK,
                            BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
            acc1 = _mm(p.to(v1.dtype), v1, acc1 * alpha[:, None], DOT_FP32, PREC)
    return acc0, acc1, m_new, l_i


@triton.jit
def _foreground(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, IDX, n_keys, sk_l, sv_l, qk_scale,
    FG_ALL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The foreground source: its usable keys, gathered through the compacted index list
    (FG_ALL: all keys in order, no list)."""
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_b = offs_n < n_keys
        if FG_ALL:
            kj = offs_n.to(tl.int64)
        else:
            kj = tl.load(IDX + offs_n, mask=in_b, other=0).to(tl.int64)
        acc0, acc1, m_i, l_i = _block(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, in_b,
            sk_l, sv_l, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK,
            True, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _background(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out,
    K, V, TILES, n_tiles, MASK, n_full, n_part, Lb, sk_l, sv_l, qk_scale,
    BG_ALL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The background source in contiguous BLOCK_N-key tiles: full tiles with no masking, then
    partial tiles masked per key; tiles without a usable key never come up. TILES holds the full
    tiles' indices in its first row and the partial ones' in its second (``n_tiles`` wide).
    BG_ALL (no mask): every tile is full but a short tail."""
    offs = tl.arange(0, BLOCK_N)
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
            offs < BLOCK_N, sk_l, sv_l, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1,
            D_CHUNK, K_CHUNK, False, DOT_FP32, PREC)
    if BG_ALL:
        if Lb % BLOCK_N != 0:  # the tail tile
            kj = offs.to(tl.int64) + n_full * BLOCK_N
            in_b = kj < Lb
            acc0, acc1, m_i, l_i = _block(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, in_b,
                sk_l, sv_l, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
                K_CHUNK, True, DOT_FP32, PREC)
    else:
        for i in range(0, n_part):
            t = tl.load(TILES + n_tiles + i)
            kj = offs.to(tl.int64) + t * BLOCK_N
            in_b = kj < Lb
            usable = tl.load(MASK + kj, mask=in_b, other=0) != 0
            acc0, acc1, m_i, l_i = _block(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, K, V, kj, in_b, usable,
                sk_l, sv_l, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
                K_CHUNK, True, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _sources(
    acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, is_fg,
    KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
    KB, VB, TILES, n_tiles, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
    FG_ALL: tl.constexpr, BG_ALL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, D_CHUNK: tl.constexpr, K_CHUNK: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
):
    """The one source a (pure) query tile reads."""
    if is_fg:
        acc0, acc1, m_i, l_i = _foreground(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, KF, VF, FIDX, n_kf, skf_l, svf_l,
            qk_scale_fg, FG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
            K_CHUNK, DOT_FP32, PREC)
    else:
        acc0, acc1, m_i, l_i = _background(
            acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, d_out, KB, VB, TILES, n_tiles, BMASK,
            n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg, BG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK, DOT_FP32, PREC)
    return acc0, acc1, m_i, l_i


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
    sqp_b, sfi_b, st64_b, st128_b, sbm_b, sc_b,
    div_f, div_b, H, Lq, Lf, Lb, n_t64, n_t128,
    qk_scale_fg, qk_scale_bg,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    FG_ALL: tl.constexpr, BG_ALL: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_CHUNK: tl.constexpr = 0, K_CHUNK: tl.constexpr = 0,
):
    """One (query tile, batch·head) program; grid = (cdiv(Lq, BLOCK_M) + 1, B·H).

    The first cdiv(n_fg, BLOCK_M) tiles hold foreground-routed queries, the rest background ones,
    so no tile mixes sources (the spare program of the grid covers the split; programs past the
    end do nothing). COUNTS rows (int32): [foreground-routed queries, usable foreground keys, full
    64-key tiles, partial 64-key tiles, full 128-key tiles, partial 128-key tiles]. A table's batch
    stride is 0 when one table serves every target; target ``b`` reads source row ``b // div``.
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
            TILES = TILES64 + b * st64_b
            n_tiles = n_t64
            n_full = tl.load(c + 2)
            n_part = tl.load(c + 3)
        else:
            TILES = TILES128 + b * st128_b
            n_tiles = n_t128
            n_full = tl.load(c + 4)
            n_part = tl.load(c + 5)
        offs_m = row_start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < row_end
        qi = tl.load(QPERM + b * sqp_b + offs_m, mask=m_ok, other=0).to(tl.int64)
        q_rows = Q + b * sq_b + h * sq_h + qi[:, None] * sq_l
        o_rows = O + b * so_b + h * so_h + qi[:, None] * so_l
        bf = b // div_f
        bb = b // div_b
        KF = KF + bf * skf_b + h * skf_h
        VF = VF + bf * svf_b + h * svf_h
        KB = KB + bb * skb_b + h * skb_h
        VB = VB + bb * svb_b + h * svb_h
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
                    KB, VB, TILES, n_tiles, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
                    FG_ALL, BG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK,
                    K_CHUNK, DOT_FP32, PREC)
                l_safe = tl.where(l_i > 0.0, l_i, 1.0)
                offs_o = d_out + tl.arange(0, D_CHUNK)
                tl.store(o_rows + offs_o[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty),
                         mask=m_ok[:, None] & (offs_o < HEAD_DIM)[None, :])
        else:
            offs_d0 = tl.arange(0, BLOCK_D0)
            q0 = _load_rows(q_rows, zero_rows, 0, offs_d0, m_ok, offs_d0 < HEAD_DIM, True,
                            BLOCK_D0 > HEAD_DIM)
            acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
            if BLOCK_D1 > 0:
                offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
                q1 = _load_rows(q_rows, zero_rows, 0, offs_d1, m_ok, offs_d1 < HEAD_DIM, True,
                                BLOCK_D0 + BLOCK_D1 > HEAD_DIM)
                acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
            else:
                q1 = q0
                acc1 = acc0
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc0, acc1, m_i, l_i = _sources(
                acc0, acc1, m_i, l_i, q0, q1, q_rows, m_ok, 0, is_fg,
                KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
                KB, VB, TILES, n_tiles, BMASK, n_full, n_part, Lb, skb_l, svb_l, qk_scale_bg,
                FG_ALL, BG_ALL, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D0, BLOCK_D1, D_CHUNK, K_CHUNK,
                DOT_FP32, PREC)
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
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
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            tl.store(LSE + (b * H + h) * Lq + qi, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,
                     mask=m_ok)
