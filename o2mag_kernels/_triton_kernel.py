"""The fused tri-source attention kernel (Triton), its tile configs and head-dim split.

One launch covers every batch, head and query tile: grid = (cdiv(Lq, BLOCK_M), B·H). The wrapper
hands over, per target batch, a stable permutation of the queries with the foreground-routed ones
first (and their count), and the usable keys of each source first (and their counts). A query tile
reads its rows through that permutation, so a tile lies wholly in the foreground part (runs only the
foreground key loop), wholly in the background part (only the background loop), or straddles the
boundary (at most one tile per batch and head: both loops, each row masked to its own source). Keys
are gathered through the index lists up to the loaded counts, so unusable keys cost nothing.

Online softmax in base 2 with float32 accumulators; ``fg_gain`` is folded into the foreground loop's
logit scale. Rows of a source they do not use see only ``-inf`` logits in that loop, which leaves
their running max, sum and accumulator unchanged; that is why one accumulator serves both loops.

Head dims that are not a power of two are split into two power-of-two dot pieces (80 = 64 + 16,
160 = 128 + 32, 40 = 32 + 16) instead of padding to the next power of two.

float32 above head dim 64 (3xTF32 dots; hi/lo operand halves of whole head-dim tiles spill
registers) runs column-chunked instead: logits are summed over 32-column chunks of Q and K, and the
output is produced 64 columns at a time, one pass over the keys per 64 columns (logits recomputed
per pass). Registers then no longer grow with the head dim.

This module does not import torch: the config tables and the kernel stand on triton alone.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_HEAD_DIM = 256
LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634

# Every tile shape the autotuner may pick: (BLOCK_M, BLOCK_N, num_warps, num_stages).
CONFIGS = (
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
    (128, 32, 8, 2),
    (64, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
    (64, 32, 4, 2),
    (64, 32, 4, 1),
    (64, 64, 8, 2),   # 8 warps on 64 rows: large head dims (registers spread over 256 threads)
    (64, 32, 8, 2),
    (64, 32, 8, 1),
    (128, 32, 8, 1),
    (32, 64, 4, 2),   # small layers (64-256 tokens): more programs, less padding
    (32, 32, 4, 2),
    (16, 32, 4, 2),
)

# Head-dim buckets the product is tuned and AOT-checked for (SD 1.x/2.x use 40, 64, 80, 160). A
# head dim uses the configs of the smallest bucket whose dot width (see split_head_dim) covers it.
HEAD_DIMS = (40, 64, 80, 128, 160, 256)

_ALL = frozenset(CONFIGS)


def _but(*drop):
    return frozenset(c for c in CONFIGS if c not in drop)


def _only(*keep):
    return frozenset(keep)


# Which configs may run, per (SM family, dtype class, head-dim bucket). Every entry compiles with
# no register spill (``o2mag-kernels aot-check`` proves it for sm_80 and sm_90 and fails if one
# spills); configs that spilled were removed here. sm_80 (mma.sync keeps operands in registers) is
# much tighter than sm_90 (wgmma reads them from shared memory). fp32 uses 3xTF32 dots (operands
# split into hi/lo TF32 halves), which need about three times the registers: whole head-dim tiles
# fit only up to 64, so larger fp32 head dims run the column-chunked path (see ``_tile_chunked``).
ALLOWED = {
    (80, "half", 40): _ALL,
    (80, "half", 64): _but((64, 128, 4, 2)),
    (80, "half", 80): _but((64, 128, 4, 2), (128, 64, 8, 3)),
    (80, "half", 128): _only((128, 32, 8, 2), (128, 32, 8, 1), (64, 64, 8, 2), (64, 32, 8, 2),
                             (64, 32, 8, 1), (64, 32, 4, 2), (64, 32, 4, 1), (32, 64, 4, 2),
                             (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "half", 160): _only((128, 32, 8, 1), (64, 32, 8, 2), (64, 32, 8, 1), (64, 32, 4, 1),
                             (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "half", 256): _only((64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2), (16, 32, 4, 2)),
    (90, "half", 40): _ALL,
    (90, "half", 64): _ALL,
    (90, "half", 80): _but((32, 64, 4, 2)),
    (90, "half", 128): _but((64, 128, 4, 2), (128, 128, 8, 2)),
    (90, "half", 160): _only((128, 64, 8, 2), (128, 32, 8, 2), (128, 32, 8, 1), (64, 64, 8, 2),
                             (64, 32, 8, 2), (64, 32, 8, 1), (64, 32, 4, 2), (64, 32, 4, 1),
                             (32, 32, 4, 2), (16, 32, 4, 2)),
    (90, "half", 256): _only((128, 32, 8, 1), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1),
                             (64, 32, 4, 1), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "fp32", 40): _only((64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "fp32", 64): _only((32, 32, 4, 2), (16, 32, 4, 2)),
    (90, "fp32", 40): _only((64, 32, 4, 1)),
    (90, "fp32", 64): _only((64, 32, 4, 1), (32, 32, 4, 2), (16, 32, 4, 2)),
    # fp32 above FP32_WHOLE_HEAD_DIM: the column-chunked path (registers do not grow with D)
    (80, "fp32", 80): _only((64, 32, 4, 1), (64, 32, 8, 2), (64, 32, 8, 1), (128, 32, 8, 1),
                            (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "fp32", 128): _only((64, 32, 8, 2), (64, 32, 8, 1), (32, 64, 4, 2)),
    (80, "fp32", 160): _only((64, 32, 8, 2), (64, 32, 8, 1), (128, 32, 8, 1), (32, 64, 4, 2),
                             (32, 32, 4, 2), (16, 32, 4, 2)),
    (80, "fp32", 256): _only((64, 32, 8, 2), (64, 32, 8, 1), (32, 64, 4, 2), (16, 32, 4, 2)),
    (90, "fp32", 80): _only((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1), (64, 32, 8, 2),
                            (64, 32, 8, 1), (128, 32, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2),
                            (16, 32, 4, 2)),
    (90, "fp32", 128): _only((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1), (64, 32, 8, 2),
                             (64, 32, 8, 1), (128, 32, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2),
                             (16, 32, 4, 2)),
    (90, "fp32", 160): _only((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1), (64, 32, 8, 2),
                             (64, 32, 8, 1), (128, 32, 8, 1), (32, 64, 4, 2), (16, 32, 4, 2)),
    (90, "fp32", 256): _only((128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1), (64, 32, 8, 2),
                             (64, 32, 8, 1), (128, 32, 8, 1), (32, 64, 4, 2), (32, 32, 4, 2),
                             (16, 32, 4, 2)),
}
FP32_WHOLE_HEAD_DIM = 64  # fp32 above this runs column-chunked
FP32_D_CHUNK = 64
FP32_K_CHUNK = 32


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def split_head_dim(head_dim: int) -> tuple:
    """(BLOCK_D0, BLOCK_D1): power-of-two dot widths covering ``head_dim`` (BLOCK_D1 = 0: no tail).

    A dot needs a reduction width of at least 16; the tail is used only when it saves work over
    padding the whole head dim to the next power of two.
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if head_dim <= 16:
        return 16, 0
    lead = 1 << (head_dim.bit_length() - 1)
    if lead == head_dim:
        return head_dim, 0
    tail = max(16, _next_pow2(head_dim - lead))
    if tail >= lead:
        return 2 * lead, 0
    return lead, tail


def chunking(head_dim: int, itemsize: int) -> tuple:
    """(D_CHUNK, K_CHUNK) constexprs: (0, 0) runs the head dim whole (fp16/bf16, fp32 up to
    FP32_WHOLE_HEAD_DIM); otherwise fp32 runs column-chunked (see ``_tile_chunked``)."""
    if itemsize != 4 or head_dim <= FP32_WHOLE_HEAD_DIM:
        return 0, 0
    return FP32_D_CHUNK, FP32_K_CHUNK


def head_dim_bucket(head_dim: int) -> int:
    """The tuned bucket whose dot width (BLOCK_D0 + BLOCK_D1) is the smallest covering head_dim's."""
    width = sum(split_head_dim(head_dim))
    for b in HEAD_DIMS:
        if sum(split_head_dim(b)) >= width:
            return b
    raise ValueError(f"head dim {head_dim} is above {MAX_HEAD_DIM}")


def length_bucket(n: int) -> int:
    """Autotune key for a length: next power of two, clamped to [16, 16384]."""
    return min(16384, max(16, _next_pow2(max(1, n))))


def allowed_configs(head_dim: int, itemsize: int = 2, arch: int = 80):
    """Configs (in CONFIGS order) that compile without spills for this head dim, dtype and SM."""
    family = 90 if arch >= 90 else 80
    kind = "fp32" if itemsize == 4 else "half"
    ok = ALLOWED.get((family, kind, head_dim_bucket(head_dim)), frozenset())
    return [c for c in CONFIGS if c in ok]


def supported(head_dim: int, itemsize: int) -> bool:
    """Whether some config covers this head dim and dtype size on both sm_80 and sm_90."""
    return bool(allowed_configs(head_dim, itemsize, 80)) and bool(allowed_configs(head_dim, itemsize, 90))


def prune(head_dim: int, lq: int, lk: int, itemsize: int = 2, arch: int = 80):
    """The configs worth timing for one call: no spill for the head dim and SM, and no tile much
    larger than the problem. ``lq``/``lk`` are (bucketed) query and key lengths. Small layers keep
    small tiles, large ones drop the smallest (they only add programs and repeated K/V reads)."""
    fits = allowed_configs(head_dim, itemsize, arch)
    out = []
    for cfg in fits:
        bm, bn, _, _ = cfg
        if bm > max(32, _next_pow2(lq)) or bn > max(32, _next_pow2(lk)):
            continue
        if lq >= 1024 and bm < 64 and any(c[0] >= 64 for c in fits):
            continue
        if lq > 64 and bm == 16 and any(c[0] > 16 for c in fits):
            continue
        out.append(cfg)
    return out or fits[-1:]  # always leave something runnable


def all_variants(head_dims=HEAD_DIMS, itemsize: int = 2, arch: int = 80):
    """Every (head_dim bucket, config) pair the autotuner can ever pick on this SM family."""
    return [(d, cfg) for d in head_dims for cfg in allowed_configs(d, itemsize, arch)]


@triton.jit
def _attend_source(
    acc0, acc1, m_i, l_i, q0, q1,
    K, V, IDX, n_keys, sk_l, sv_l, row_ok, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Stream one source's usable keys (gathered through IDX) into the running softmax state."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    d0_ok = offs_d0 < HEAD_DIM
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < n_keys
        kj = tl.load(IDX + offs_n, mask=n_ok, other=0).to(tl.int64)
        k0 = tl.load(K + kj[:, None] * sk_l + offs_d0[None, :],
                     mask=n_ok[:, None] & d0_ok[None, :], other=0.0)
        if DOT_FP32:
            s = tl.dot(q0.to(tl.float32), tl.trans(k0.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q0, tl.trans(k0), input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            d1_ok = offs_d1 < HEAD_DIM
            k1 = tl.load(K + kj[:, None] * sk_l + offs_d1[None, :],
                         mask=n_ok[:, None] & d1_ok[None, :], other=0.0)
            if DOT_FP32:
                s += tl.dot(q1.to(tl.float32), tl.trans(k1.to(tl.float32)), input_precision="ieee")
            else:
                s += tl.dot(q1, tl.trans(k1), input_precision=INPUT_PRECISION)
        s = tl.where(row_ok[:, None] & n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(V + kj[:, None] * sv_l + offs_d0[None, :],
                     mask=n_ok[:, None] & d0_ok[None, :], other=0.0)
        if DOT_FP32:
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v0.to(tl.float32), input_precision="ieee")
        else:
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=INPUT_PRECISION)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            d1_ok = offs_d1 < HEAD_DIM
            v1 = tl.load(V + kj[:, None] * sv_l + offs_d1[None, :],
                         mask=n_ok[:, None] & d1_ok[None, :], other=0.0)
            if DOT_FP32:
                acc1 = acc1 * alpha[:, None] + tl.dot(p, v1.to(tl.float32), input_precision="ieee")
            else:
                acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1,
                                                      input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit
def _attend_source_chunked(
    acc, m_i, l_i, q_rows, m_ok,
    K, V, IDX, n_keys, sk_l, sv_l, row_ok, qk_scale, d_out,
    HEAD_DIM: tl.constexpr, K_CHUNK: tl.constexpr, D_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """fp32 variant of :func:`_attend_source` for one output column chunk [d_out, d_out+D_CHUNK).

    Nothing head-dim wide lives in registers: the logits are summed over K_CHUNK-wide column chunks
    of Q (re-read from cache) and K, and only D_CHUNK columns of V and of the accumulator are held.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_c0 = tl.arange(0, K_CHUNK)
    offs_o = d_out + tl.arange(0, D_CHUNK)
    o_ok = offs_o < HEAD_DIM
    for start_n in range(0, n_keys, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < n_keys
        kj = tl.load(IDX + offs_n, mask=n_ok, other=0).to(tl.int64)
        k_rows = K + kj[:, None] * sk_l
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for dk in range(0, HEAD_DIM, K_CHUNK):
            offs_c = dk + offs_c0
            c_ok = offs_c < HEAD_DIM
            qc = tl.load(q_rows + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            kc = tl.load(k_rows + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            s = tl.dot(qc, tl.trans(kc), s, input_precision=INPUT_PRECISION)
        s = tl.where(row_ok[:, None] & n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kj[:, None] * sv_l + offs_o[None, :],
                    mask=n_ok[:, None] & o_ok[None, :], other=0.0)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tile_chunked(
    q_rows, m_ok, start_m, n_qfg,
    KF, VF, FIDX, n_kf, skf_l, svf_l, qk_scale_fg,
    KB, VB, BIDX, n_kb, skb_l, svb_l, qk_scale_bg,
    o_rows, lse_ptrs,
    HEAD_DIM: tl.constexpr, K_CHUNK: tl.constexpr, D_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One query tile, fp32, head dim above what fits in registers: one pass over the keys per
    D_CHUNK output columns (the logits are recomputed per pass; 3xTF32 operands of a whole
    head-dim row would spill). Every pass reaches the same running max and sum, so the lse of the
    last pass is stored."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_fg = offs_m < n_qfg
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d_out in range(0, HEAD_DIM, D_CHUNK):
        acc = tl.zeros([BLOCK_M, D_CHUNK], dtype=tl.float32)
        # Finite start for the running max: rows that see only -inf logits stay unchanged.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if start_m < n_qfg:
            acc, m_i, l_i = _attend_source_chunked(
                acc, m_i, l_i, q_rows, m_ok, KF, VF, FIDX, n_kf, skf_l, svf_l, row_fg,
                qk_scale_fg, d_out, HEAD_DIM, K_CHUNK, D_CHUNK, BLOCK_M, BLOCK_N, INPUT_PRECISION)
        if start_m + BLOCK_M > n_qfg:
            acc, m_i, l_i = _attend_source_chunked(
                acc, m_i, l_i, q_rows, m_ok, KB, VB, BIDX, n_kb, skb_l, svb_l, offs_m >= n_qfg,
                qk_scale_bg, d_out, HEAD_DIM, K_CHUNK, D_CHUNK, BLOCK_M, BLOCK_N, INPUT_PRECISION)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        offs_o = d_out + tl.arange(0, D_CHUNK)
        tl.store(o_rows + offs_o[None, :], (acc / l_safe[:, None]).to(o_rows.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_o < HEAD_DIM)[None, :])
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(lse_ptrs, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, mask=m_ok)


@triton.jit
def tri_source_fwd(
    Q, KF, VF, KB, VB, O, LSE,
    QPERM, FIDX, BIDX, COUNTS,
    sq_b, sq_h, sq_l,
    skf_b, skf_h, skf_l,
    svf_b, svf_h, svf_l,
    skb_b, skb_h, skb_l,
    svb_b, svb_h, svb_l,
    so_b, so_h, so_l,
    sqp_b, sfi_b, sbi_b,
    H, Lq,
    qk_scale_fg, qk_scale_bg,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_CHUNK: tl.constexpr = 0, K_CHUNK: tl.constexpr = 0,
):
    """One (query tile, batch·head) program. COUNTS is int32 (B, 3): [n_fg_queries, n_fg_keys,
    n_bg_keys]; QPERM/FIDX/BIDX are int32 permutations (batch stride 0 when shared by all)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n_qfg = tl.load(COUNTS + b * 3)
    n_kf = tl.load(COUNTS + b * 3 + 1)
    n_kb = tl.load(COUNTS + b * 3 + 2)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    qi = tl.load(QPERM + b * sqp_b + offs_m, mask=m_ok, other=0).to(tl.int64)
    q_rows = Q + b * sq_b + h * sq_h + qi[:, None] * sq_l
    if D_CHUNK > 0:  # fp32 with a large head dim: column-chunked, see _tile_chunked
        _tile_chunked(
            q_rows, m_ok, start_m, n_qfg,
            KF + b * skf_b + h * skf_h, VF + b * svf_b + h * svf_h, FIDX + b * sfi_b, n_kf,
            skf_l, svf_l, qk_scale_fg,
            KB + b * skb_b + h * skb_h, VB + b * svb_b + h * svb_h, BIDX + b * sbi_b, n_kb,
            skb_l, svb_l, qk_scale_bg,
            O + b * so_b + h * so_h + qi[:, None] * so_l, LSE + (b * H + h) * Lq + qi,
            HEAD_DIM, K_CHUNK, D_CHUNK, BLOCK_M, BLOCK_N, INPUT_PRECISION)
    else:
        offs_d0 = tl.arange(0, BLOCK_D0)
        d0_ok = offs_d0 < HEAD_DIM
        q0 = tl.load(q_rows + offs_d0[None, :], mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
        if BLOCK_D1 > 0:
            offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            d1_ok = offs_d1 < HEAD_DIM
            q1 = tl.load(q_rows + offs_d1[None, :], mask=m_ok[:, None] & d1_ok[None, :], other=0.0)
            acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
        else:
            q1 = q0
            acc1 = acc0
        # Finite start for the running max: rows that see only -inf logits in a loop stay unchanged.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_fg = offs_m < n_qfg

        if start_m < n_qfg:
            acc0, acc1, m_i, l_i = _attend_source(
                acc0, acc1, m_i, l_i, q0, q1,
                KF + b * skf_b + h * skf_h, VF + b * svf_b + h * svf_h, FIDX + b * sfi_b, n_kf,
                skf_l, svf_l, row_fg, qk_scale_fg,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, DOT_FP32, INPUT_PRECISION)
        if start_m + BLOCK_M > n_qfg:
            acc0, acc1, m_i, l_i = _attend_source(
                acc0, acc1, m_i, l_i, q0, q1,
                KB + b * skb_b + h * skb_h, VB + b * svb_b + h * svb_h, BIDX + b * sbi_b, n_kb,
                skb_l, svb_l, offs_m >= n_qfg, qk_scale_bg,
                HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, DOT_FP32, INPUT_PRECISION)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o_rows = O + b * so_b + h * so_h + qi[:, None] * so_l
        tl.store(o_rows + offs_d0[None, :], (acc0 / l_safe[:, None]).to(O.dtype.element_ty),
                 mask=m_ok[:, None] & d0_ok[None, :])
        if BLOCK_D1 > 0:
            tl.store(o_rows + offs_d1[None, :], (acc1 / l_safe[:, None]).to(O.dtype.element_ty),
                     mask=m_ok[:, None] & d1_ok[None, :])
        lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
        tl.store(LSE + (b * H + h) * Lq + qi, lse, mask=m_ok)
