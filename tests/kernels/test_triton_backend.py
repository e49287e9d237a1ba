"""The fused Triton backend against the float64 formula.

On CI the kernel runs on CPU under ``TRITON_INTERPRET=1`` (the same kernel source that runs on a
GPU, interpreted op by op in NumPy), so every case here is small. Tests marked ``cuda`` repeat the
parity matrix on a real GPU (autotuned configs, fp16/bf16 tensor cores, 3xTF32 for fp32) and smoke
test CUDA graphs and ``torch.compile``.

bf16 under the interpreter: triton 3.9's interpreter computes ``tl.dot`` wrongly on bf16 operands
(checked: a 16x16 bf16 product comes out off by ~1e10; fp16 is exact). So under the interpreter the
kernel is launched with ``DOT_FP32=True`` for bf16, which upcasts the dot operands only; bf16 loads,
casts and stores still run. The bf16 dot path itself is covered by the ``cuda`` tests and by
``aot-check`` (compiled for sm_80/sm_90).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from o2mag_kernels import tri_source_attention, tri_source_mask
from o2mag_kernels import dispatch, tuning
from o2mag_kernels.backends import triton_backend as tb
from o2mag_kernels.backends import triton_kernel as K
from o2mag_kernels.flops import useful_flops
from o2mag_kernels.tools.synthetic import mask_set
from tests.kernels.helpers import max_abs_err

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

if not CUDA and not tb.is_interpreted():
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1 (set before importing triton)",
                allow_module_level=True)

# every (BLOCK_M, BLOCK_N) the configs use, with 4 warps / 2 stages (the interpreter ignores both)
TILES = sorted({(bm, bn, 4, 2) for bm, bn, _, _ in K.CONFIGS})
# every kernel variant; the interpreter runs each (TMA through its emulation of tensor descriptors)
VARIANTS = K.VARIANTS
VIDS = [v.name for v in VARIANTS]


def tma_refused(case) -> bool:
    """Whether the tma variant must refuse this case: unaligned inputs or fp32's column chunks."""
    chunked = K.chunking(case.q.shape[-1], case.q.element_size()) != (0, 0)
    return chunked or not tb.inputs_aligned(case.tensors)


def run_triton(case, *, scale=None, fg_gain=1.0, config=None, prebuilt=False, variant=None,
               finite=True):
    """(out, lse) from the fused kernel, with the outputs poisoned with NaN before the launch.
    ``config`` forces a tile and ``variant`` a kernel variant; ``prebuilt`` passes a
    TriSourceMask instead of the three masks. ``finite``: every element must be finite."""
    args = case.args
    if prebuilt or config is not None or variant is not None:
        args = (*case.args[:5], tri_source_mask(*case.args[5:]), None, None)
    old = tb.POISON_OUTPUT
    tb.POISON_OUTPUT = True
    try:
        if config is None and variant is None:
            out, lse = tri_source_attention(*args, scale=scale, fg_gain=fg_gain, return_lse=True,
                                            backend="triton")
        else:
            problem = case.problem(scale, fg_gain, backend="triton")
            out, lse = tb.run_op(problem, *case.tensors, args[5], store_lse=True, config=config,
                                 variant=variant)
    finally:
        tb.POISON_OUTPUT = old
    B, H, Lq, D = case.q.shape
    assert out.shape == (B, H, Lq, D) and out.dtype == case.q.dtype
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32
    if finite:
        assert torch.isfinite(out).all(), "an output element is non-finite or was left unwritten"
        assert torch.isfinite(lse).all(), "an lse element is non-finite or was left unwritten"
    return out, lse


def check(case, formula, lowp_bound, *, scale=None, fg_gain=1.0, config=None, fp32_atol=1e-5,
          prebuilt=False, variant=None):
    """Parity with the float64 formula. fp32: tight; fp16/bf16: at most twice the low-precision
    reference's own error (+ half an ulp of the output); lse fp32-accurate in every dtype (logits
    are accumulated in fp32 from the exactly representable inputs)."""
    exact, exact_lse = formula(*case.args, scale=scale, fg_gain=fg_gain)
    out, lse = run_triton(case, scale=scale, fg_gain=fg_gain, config=config, prebuilt=prebuilt,
                          variant=variant)
    err = max_abs_err(out, exact)
    top = float(exact.abs().max()) if exact.numel() else 0.0
    if case.q.dtype == torch.float32:
        bound = fp32_atol * max(1.0, top)
    else:
        bound = lowp_bound(case, exact, scale=scale, fg_gain=fg_gain)
    assert err <= bound, f"{case.q.dtype} {config}: max error {err:.3g} > {bound:.3g}"
    lse_err = max_abs_err(lse, exact_lse)
    lse_top = float(exact_lse.abs().max()) if exact_lse.numel() else 0.0
    lse_tol = (1e-5 if not CUDA or case.q.device.type == "cpu" else 1e-4) * max(1.0, lse_top)
    assert lse_err <= lse_tol, f"lse error {lse_err:.3g} > {lse_tol:.3g}"
    return out


def on(case, device):
    return case if device == "cpu" else type(case)(*(
        None if t is None else t.to(device) for t in case.args))


def with_masks(case, q, fg, bg):
    return type(case)(*case.tensors, q, fg, bg)


LOWP = [torch.float16, torch.bfloat16]
ALL = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


# ------------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("D, dtype", [(d, t) for d in (40, 64, 80, 160) for t in ALL],
                         ids=lambda x: IDS.get(x, str(x)))
def test_head_dims(D, dtype, make_case, formula, lowp_bound):
    case = make_case(B=2, H=2, Lq=77, Lf=63, Lb=70, D=D, dtype=dtype, q_density=0.4)
    check(case, formula, lowp_bound, fg_gain=1 / 0.7)


@pytest.mark.parametrize("D", [72, 80, 160, 200, 256])
def test_fp32_column_chunked(D, make_case, formula, lowp_bound):
    """fp32 above head dim 64 runs column-chunked (64 output columns per pass over the keys,
    logits summed over 32-column chunks): odd tails of both chunkings, tiles wholly foreground,
    wholly background and straddling, at fp32 accuracy (same bound as the whole-tile path)."""
    assert K.chunking(D, 4) != (0, 0) and K.chunking(D, 2) == (0, 0)
    case = make_case(B=2, H=1, Lq=150, Lf=137, Lb=145, D=D, dtype=torch.float32, q_density=0.4,
                     q_magnitude=3.0)
    for tile in ((64, 64, 4, 2), (128, 128, 8, 3)):
        check(case, formula, lowp_bound, fg_gain=1 / 0.7, config=tile)


def test_head_dim_256_and_odd_tail(make_case, formula, lowp_bound):
    """256 (largest), and 200 / 24 / 8, padded to dots of at least 64 columns."""
    for D in (256, 200, 24, 8):
        case = make_case(B=1, H=1, Lq=40, Lf=33, Lb=50, D=D, dtype=torch.float16)
        check(case, formula, lowp_bound, fg_gain=2.0)


@pytest.mark.parametrize("L", [1, 63, 257])
def test_odd_lengths(L, make_case, formula, lowp_bound):
    case = make_case(B=2, H=1, Lq=L, Lf=L, Lb=L, D=40, dtype=torch.float16, q_density=0.5)
    check(case, formula, lowp_bound)
    # query and key lengths independently odd
    case = make_case(B=1, H=2, Lq=L, Lf=max(1, L // 2), Lb=L + 2, D=64, dtype=torch.float32)
    check(case, formula, lowp_bound)


def test_length_1024_sparse(make_case, formula, lowp_bound):
    case = make_case(B=1, H=1, Lq=1024, Lf=1024, Lb=1024, D=40, dtype=torch.float16,
                     q_density=0.05, fg_density=0.05, bg_density=0.95)
    check(case, formula, lowp_bound, fg_gain=1 / 0.7)


MASKS = [0.0, 1.0, "single", 0.01, 0.05, 0.5]


@pytest.mark.parametrize("density", MASKS, ids=str)
@pytest.mark.parametrize("which", ["q", "fg", "bg"])
def test_masks_varied_independently(which, density, make_case, formula, lowp_bound):
    dens = {"q_density": 0.5, "fg_density": 0.3, "bg_density": 0.6}
    dens[f"{which}_density"] = density
    case = make_case(B=2, H=2, Lq=130, Lf=120, Lb=110, D=64, dtype=torch.float32, **dens)
    check(case, formula, lowp_bound)


def test_key_masks_none(make_case, formula, lowp_bound):
    case = make_case(B=2, H=2, Lq=77, Lf=63, Lb=64, D=40, fg_density=None, bg_density=None)
    check(case, formula, lowp_bound)


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_batches_and_broadcast(B, make_case, formula, lowp_bound):
    # every combination of shared / per-target sources and masks over the batch sizes
    Bf, Bb = (1, B) if B % 2 else (B, 1)
    case = make_case(B=B, H=2, Lq=65, Lf=47, Lb=66, D=40, dtype=torch.float16, Bf=Bf, Bb=Bb,
                     q_mask_batch=B, fg_mask_batch=1, bg_mask_batch=Bb)
    check(case, formula, lowp_bound, fg_gain=3.0)
    case = make_case(B=B, H=1, Lq=65, Lf=47, Lb=66, D=64, Bf=1, Bb=1, q_mask_batch=1,
                     fg_mask_batch=1, bg_mask_batch=1, expand_sources=True)
    check(case, formula, lowp_bound)


def test_strided_views(make_case, formula, lowp_bound):
    """(B, L, H*D) views transposed to (B, H, L, D): same bits as contiguous, no copy needed."""
    case = make_case(B=3, H=2, Lq=77, Lf=64, Lb=63, D=40, dtype=torch.float16, strided=True,
                     Bf=1, Bb=3)
    assert not case.q.is_contiguous()
    out = check(case, formula, lowp_bound)
    dense = case.with_tensors(*(t.contiguous() for t in case.tensors))
    assert torch.equal(out, run_triton(dense)[0])
    # a non-unit stride along the head dim is handled too (copied once in the wrapper)
    odd = case.with_tensors(*(t.transpose(-1, -2).contiguous().transpose(-1, -2)
                              for t in case.tensors))
    assert odd.q.stride(-1) != 1
    assert torch.equal(out, run_triton(odd)[0])


def test_inputs_never_copied_per_target(make_case):
    """Size-1 sources broadcast through stride 0: no tensor of the sources' size is allocated."""
    case = make_case(B=4, H=2, Lq=64, Lf=64, Lb=64, D=40, Bf=1, Bb=1, strided=True)
    run_triton(case)  # warm (compile caches etc.)
    big = case.k_fg.numel()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.sizes.append((str(func), t.numel()))
            return out

    with Sizes() as mode:
        run_triton(case)
    # aten.set_ re-points a tensor at existing storage (the interpreter does it): no allocation
    copies = [s for s in mode.sizes if s[1] >= big and s[1] != case.q.numel() and "set_" not in s[0]]
    assert not copies, f"unexpected full-size float tensors: {copies}"


def test_fg_gain_scale_lse(make_case, formula, lowp_bound):
    case = make_case(B=2, H=2, Lq=100, Lf=90, Lb=80, D=64, dtype=torch.float32, q_magnitude=4.0)
    check(case, formula, lowp_bound, scale=0.05, fg_gain=1 / 0.7)
    check(case, formula, lowp_bound, scale=0.3, fg_gain=2.5)


@pytest.mark.parametrize("dtype", LOWP, ids=IDS.get)
def test_large_magnitudes_stay_finite(dtype, make_case, formula, lowp_bound):
    case = make_case(B=1, H=2, Lq=70, Lf=64, Lb=66, D=64, dtype=dtype, q_magnitude=30.0,
                     k_magnitude=10.0)
    out, _ = run_triton(case, fg_gain=1 / 0.7)
    exact, _ = formula(*case.args, fg_gain=1 / 0.7)
    assert max_abs_err(out, exact) <= 5 * lowp_bound(case, exact, fg_gain=1 / 0.7) + 0.05


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_every_tile_config(tile, variant, make_case, formula, lowp_bound):
    """Each (BLOCK_M, BLOCK_N) the autotuner may pick, in every kernel variant, on cases whose
    query tiles are foreground, background and split between them, with full, partial and
    skipped key tiles (blob masks: most tiles whole; scattered: most partial), fp16 and fp32
    column-chunked (which tma refuses)."""
    for kind, L, D in (("blob", 576, 40), ("scattered", 300, 80)):
        case = make_case(B=2, H=1, Lq=L, Lf=L, Lb=L, D=D, dtype=torch.float16, seed=L)
        q, fg, bg = mask_set(kind, 2, L, density=0.1, seed=1)
        bg[:, :128] = False  # background keys excluded in bulk: whole tiles to skip
        case = with_masks(case, q, fg, bg)
        m = tri_source_mask(*case.args[5:])
        full, part = (m.counts[:, 2], m.counts[:, 3]) if tile[1] == 64 else (m.counts[:, 4], m.counts[:, 5])
        if kind == "blob":
            assert (full > 0).all() and (part > 0).all(), "the case must have full and partial tiles"
            assert (full + part < m.tiles[tile[1]].shape[-1]).all(), "and skipped ones"
        check(case, formula, lowp_bound, config=tile, fg_gain=1 / 0.7, variant=variant)
    fp32 = case.to(torch.float32)  # column-chunked (D=80 > 64)
    if variant.tma:
        with pytest.raises(ValueError, match="whole-head"):
            run_triton(fp32, config=tile, variant=variant)
    else:
        check(fp32, formula, lowp_bound, config=tile, variant=variant)


def test_empty_sources_and_queries(make_case, formula, lowp_bound):
    case = make_case(B=2, H=2, Lq=33, Lf=0, Lb=20, D=40, q_density=1.0)
    check(case, formula, lowp_bound)
    empty_q = make_case(B=2, H=2, Lq=0, Lf=5, Lb=20, D=40)
    out, lse = tri_source_attention(*empty_q.args, return_lse=True, backend="triton")
    assert out.shape == (2, 2, 0, 40) and lse.shape == (2, 2, 0)


def test_useful_flops_counts_needed_keys(make_case):
    case = make_case(B=3, H=2, Lq=20, Lf=15, Lb=12, D=40, Bf=1, fg_mask_batch=1, bg_density=0.0)
    problem = case.problem()
    want = 0
    for b in range(3):
        qm, fm = case.query_mask[b], case.fg_key_mask[0]
        nb = case.k_bg.shape[2]  # empty bg mask: all background keys
        for i in range(20):
            want += int(fm.sum()) if (qm[i] and fm.any()) else nb
    assert useful_flops(problem, *case.args[5:]) == 4 * 40 * 2 * want


def test_float64_and_too_large_head_dim_rejected(make_case):
    case = make_case(B=1, H=1, Lq=8, Lf=8, Lb=8, D=16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tri_source_attention(*case.args, backend="triton")
    case = make_case(B=1, H=1, Lq=8, Lf=8, Lb=8, D=272)
    with pytest.raises(ValueError, match="head dim"):
        tri_source_attention(*case.args, backend="triton")


def test_requires_grad_raises_clearly(make_case):
    case = make_case(B=1, H=1, Lq=8, Lf=8, Lb=8, D=16)
    k = case.k_fg.clone().requires_grad_(True)
    args = list(case.args)
    args[1] = k
    with pytest.raises(RuntimeError, match="backend='torch'"):
        tri_source_attention(*args, backend="triton")
    with torch.no_grad():  # no backward needed: fine
        tri_source_attention(*args, backend="triton")


def test_status_reports_interpreter():
    ok, why = tb.status(torch.device("cpu"))
    assert ok == tb.is_interpreted()
    assert ("interpreter" in why) if ok else ("TRITON_INTERPRET" in why)


def test_custom_op_fake_and_schema(make_case):
    """register_fake matches the real op (shapes, dtypes, strides), as torch.compile needs."""
    case = make_case(B=2, H=2, Lq=20, Lf=17, Lb=18, D=40, dtype=torch.float16)
    m = tri_source_mask(*case.args[5:])
    for lse in (True, False):
        torch.library.opcheck(tb.tri_source_attention_op,
                              (*case.tensors, *tb.mask_tables(m), 0.15, 1.4, False, False, lse),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    none = tri_source_mask(case.query_mask)  # no key masks: dummy table pointers, dense walk
    torch.library.opcheck(tb.tri_source_attention_op,
                          (*case.tensors, *tb.mask_tables(none), 0.15, 1.4, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), H=st.integers(1, 2), Lq=st.integers(1, 90), Lf=st.integers(0, 70),
       Lb=st.integers(1, 70), D=st.sampled_from([1, 8, 17, 33, 40, 48, 72, 96]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       qd=st.sampled_from([0.0, 0.1, 0.5, 1.0, "single"]),
       fd=st.sampled_from([None, 0.0, 0.05, 0.5, 1.0, "single"]),
       bd=st.sampled_from([None, 0.0, 0.3, 1.0, "single"]),
       shared=st.booleans(), strided=st.booleans(), gain=st.sampled_from([1.0, 1 / 0.7, 4.0]),
       tile=st.sampled_from([None] + TILES), variant=st.sampled_from((None,) + VARIANTS))
def test_random_shapes_and_masks(B, H, Lq, Lf, Lb, D, dtype, qd, fd, bd, shared, strided, gain,
                                 tile, variant, make_case, formula, lowp_bound):
    """Odd head dims (padded; unaligned below a multiple of 8), tiles smaller/larger than the
    lengths, split query tiles, every kernel variant (tma must refuse what it cannot run)."""
    if Lf == 0 and fd == "single":
        fd = None
    one = 1 if shared else None
    case = make_case(B=B, H=H, Lq=Lq, Lf=Lf, Lb=Lb, D=D, dtype=dtype, q_density=qd,
                     fg_density=fd, bg_density=bd, Bf=one, Bb=one, q_mask_batch=one,
                     strided=strided, seed=Lq * 7 + Lb)
    if variant is not None and variant.tma and tma_refused(case):
        with pytest.raises(ValueError, match="tma"):
            run_triton(case, fg_gain=gain, config=tile, variant=variant)
        return
    check(case, formula, lowp_bound, fg_gain=gain, config=tile, variant=variant)


def test_traces_under_torch_compile(make_case):
    """The op is one opaque graph node (fake impl for shapes); aot_eager needs no C++ compiler."""
    case = make_case(B=2, H=2, Lq=40, Lf=33, Lb=35, D=40, dtype=torch.float16)
    eager = tri_source_attention(*case.args, fg_gain=1.5, backend="triton")
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: tri_source_attention(*a, fg_gain=1.5, backend="triton"),
                       backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(*case.args), eager)
    torch._dynamo.reset()
    assert torch.equal(_compiled_op(case, backend="aot_eager"), tri_source_attention(*case.args,
                                                                                   backend="triton"))


# ----------------------------------------------------------- alignment hints: the host's decision


def _diffusers(B, L, H, D, dtype=torch.float16, offset=0):
    """(B, H, L, D) view of a (B, L, H·D) projection that starts ``offset`` elements into a wider
    buffer (offset 0: diffusers' layout)."""
    buf = torch.zeros(B, L, H * D + offset, dtype=dtype)
    return buf[..., offset:].view(B, L, H, D).transpose(1, 2)


def _shifted(t):
    """The same values, contiguous, at a base pointer one element past 16-byte alignment."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.parametrize("make, aligned", [
    (lambda: torch.zeros(2, 8, 64, 40, dtype=torch.float16), True),  # contiguous, D=40
    (lambda: torch.zeros(2, 8, 64, 64, dtype=torch.float16), True),  # contiguous, D=64
    (lambda: _diffusers(2, 64, 8, 40), True),  # SD 1.x: (B, L, 320) as 8 heads of 40
    (lambda: _diffusers(2, 64, 8, 80), True),
    (lambda: _diffusers(2, 64, 8, 160), True),
    (lambda: _diffusers(2, 64, 5, 64), True),  # SD 2.x: 5 heads of 64
    (lambda: _diffusers(2, 64, 10, 64, torch.bfloat16), True),
    (lambda: _diffusers(2, 64, 3, 40), True),  # odd H: h·40 and 3·40 are still multiples of 8
    (lambda: _diffusers(2, 64, 8, 40, torch.float32), True),  # fp32: 8 elements = 32 bytes
    (lambda: _diffusers(2, 64, 8, 40, offset=8), True),  # 16 bytes in, row stride 328
    (lambda: _diffusers(2, 64, 8, 40, offset=1), False),  # odd offset: pointer 2 bytes off
    (lambda: _diffusers(2, 64, 8, 40, torch.float32, offset=4), False),  # row stride 324
    (lambda: _diffusers(2, 64, 8, 20), False),  # per-head offset 20 elements
    (lambda: torch.zeros(2, 8, 64, 36, dtype=torch.float16), False),  # row stride 36
    (lambda: _diffusers(1, 64, 8, 40).expand(4, -1, -1, -1), True),  # batch-1 source, stride 0
    (lambda: torch.zeros(64 * 320, dtype=torch.float16).as_strided((1, 8, 64, 40), (7, 40, 320, 1)),
     True),  # a size-1 dim's stride is never used
    (lambda: torch.zeros(4000, dtype=torch.float16).as_strided((2, 8, 1, 40), (320, 40, 3, 1)),
     True),
], ids=["contig40", "contig64", "sd1-40", "sd1-80", "sd1-160", "sd2-64-H5", "sd2-64-H10-bf16",
        "H3-40", "fp32-40", "offset8", "offset1", "fp32-offset4", "D20", "contig36",
        "expanded", "size1-odd-stride", "L1-odd-stride"])
def test_host_decides_alignment_per_launch(make, aligned):
    """``inputs_aligned``: every stride but the last a multiple of 8 elements (dims of size 1
    exempt) and a 16-byte aligned base pointer, checked on the tensors of the launch."""
    t = make()
    assert tb.inputs_aligned((t,)) is aligned
    other = torch.zeros(2, 8, 64, 40, dtype=t.dtype)
    assert tb.inputs_aligned((other, t, other)) is aligned  # one tensor decides for all


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.tma], ids=lambda v: v.name)
def test_hinted_and_unhinted_paths_agree(variant, make_case, formula, lowp_bound, monkeypatch):
    """Diffusers views (aligned: the kernel gets ALIGNED=True) and the same values at a base
    pointer one element off (ALIGNED=False) both match the formula, and each other exactly."""
    seen = []
    real = tb.kernel_meta
    monkeypatch.setattr(tb, "kernel_meta", lambda *a: seen.append(a[5]) or real(*a))
    case = make_case(B=2, H=3, Lq=90, Lf=70, Lb=150, D=40, dtype=torch.float16, strided=True,
                     Bf=1, Bb=1, q_density=0.4)
    shifted = case.with_tensors(*(_shifted(t) for t in case.tensors))
    a = check(case, formula, lowp_bound, config=(64, 64, 4, 2), variant=variant, fg_gain=1.4)
    b = check(shifted, formula, lowp_bound, config=(64, 64, 4, 2), variant=variant, fg_gain=1.4)
    assert seen == [True, False]
    assert torch.equal(a, b)


def test_variant_switches_and_refusals(make_case):
    assert [v.name for v in VARIANTS] == ["default", "bg_dense", "tma"]
    for v in VARIANTS:
        assert K.KernelVariant.named(v.name) == v and not v.problem()
    with pytest.raises(ValueError, match="unknown"):
        K.KernelVariant.named("turbo")
    case = make_case(B=1, H=2, Lq=40, Lf=30, Lb=70, D=40, dtype=torch.float16)
    for bad, why in ((K.KernelVariant(warp_specialize=True), "Blackwell"),
                     (K.KernelVariant(bg_dense=True, tma=True), "cannot be combined")):
        with pytest.raises(ValueError, match=why):
            run_triton(case, variant=bad)
    shifted = case.with_tensors(*(_shifted(t) for t in case.tensors))
    with pytest.raises(ValueError, match="inputs_aligned"):
        run_triton(shifted, variant=K.KernelVariant(tma=True))


def test_chosen_config_is_cached_per_shape_bucket(make_case, monkeypatch):
    """The first launch of a shape bucket picks its config (the autotuner on a GPU, tuning's
    first allowed config here) and remembers it; later launches of the bucket launch the jit
    function directly with it and never ask again."""
    monkeypatch.setattr(tb, "_CHOSEN", {})
    case = make_case(B=2, H=2, Lq=77, Lf=63, Lb=70, D=40, dtype=torch.float16)
    first, _ = run_triton(case)
    (key, cfg), = tb.chosen_configs().items()
    assert key[1:6] == (torch.float16, 40, 128, 128, True) and cfg in K.CONFIGS + tuple(TILES)

    def boom(*a, **k):
        raise AssertionError("asked for configs again")

    monkeypatch.setattr(tb, "_allowed", boom)
    again, _ = run_triton(case)  # same bucket: cached, direct launch
    assert torch.equal(first, again)
    longer = make_case(B=2, H=2, Lq=300, Lf=63, Lb=70, D=40, dtype=torch.float16)
    with pytest.raises(AssertionError, match="again"):  # another bucket is chosen afresh
        run_triton(longer)


# --------------------------------------------------------------------------- the NaN rule (SDPA's)

NAN_LB = 520  # key tiles of 64 and 128: [0, 128) excluded (skipped), key 200 excluded (partial),
#               [256, 512) usable (full), [512, 520) the tail


def _nan_case(make_case, dtype=torch.float16):
    case = make_case(B=2, H=2, Lq=150, Lf=130, Lb=NAN_LB, D=40, dtype=dtype, strided=True,
                     Bf=1, Bb=1, q_density=0.4, fg_density=0.5, fg_mask_batch=1, bg_mask_batch=1)
    fg = case.fg_key_mask.clone()
    fg[:, 3], fg[:, 4] = False, True
    bg = torch.ones(1, NAN_LB, dtype=torch.bool)
    bg[:, :128] = False
    bg[:, 200] = False
    case = with_masks(case, case.query_mask, fg, bg)
    m = tri_source_mask(*case.args[5:])
    assert m.tiles[64].shape[-1] * 64 >= NAN_LB and int(m.counts[0, 2]) > 0 and int(m.counts[0, 3]) > 0
    use_fg = m.effective(2, 130, NAN_LB)[0]
    assert use_fg.any() and (~use_fg).any()
    return case, use_fg


def _poison(case, which, index, value=float("nan")):
    """A copy of the case with ``value`` written into tensor ``which`` at ``index``."""
    tensors = dict(zip(("q", "k_fg", "v_fg", "k_bg", "v_bg"), (t.clone() for t in case.tensors)))
    tensors[which][index] = value
    return case.with_tensors(*tensors.values())


def _rows_equal(a, b, keep):
    """a and b are bitwise equal on the rows where ``keep`` (B, H, Lq) is True."""
    keep = keep.to(a.device)
    return torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("tile", [(64, 64, 4, 2), (128, 128, 4, 2)], ids=str)
def test_nan_reaches_exactly_the_rows_that_read_it(tile, variant, make_case):
    """A NaN in a query, or in a usable key or value of a source, makes exactly the rows that
    read it NaN (every other element bitwise as in the clean run); a NaN or inf in a key or value
    no row may read (excluded foreground key; background keys in a skipped tile and in a partial
    tile; another head's columns next to this head's in a (B, L, H·D) view) changes nothing."""
    case, use_fg = _nan_case(make_case)
    _check_nan_rule(case, use_fg, tile, variant)


def _check_nan_rule(case, use_fg, tile, variant):
    run = lambda c: run_triton(c, config=tile, variant=variant, finite=False)  # noqa: E731
    clean, clean_lse = run(case)
    assert torch.isfinite(clean).all()
    fg_rows = use_fg[:, None, :].expand(2, 2, -1)
    head = torch.zeros(2, 2, 150, dtype=torch.bool)
    head[:, 1] = True
    # what no row may read: bitwise unchanged
    for which, index, value in (("k_fg", (0, 1, 3), float("nan")), ("v_fg", (0, 1, 3), float("inf")),
                                ("k_bg", (0, 0, 5), float("nan")), ("v_bg", (0, 0, 5), float("nan")),
                                ("k_bg", (0, 1, 200), float("inf")), ("v_bg", (0, 1, 200), float("nan")),
                                ("v_bg", (0, 0, 200), float("-inf"))):
        out, lse = run(_poison(case, which, index, value))
        assert torch.equal(out, clean) and torch.equal(lse, clean_lse), (which, index, value)
    other_head = case.with_tensors(case.q, *(t.clone() for t in case.tensors[1:]))
    for t in other_head.tensors[1:]:
        t[:, 1] = float("nan")  # head 1's K and V: head 0 must not see its columns
    out, _ = run(other_head)
    assert _rows_equal(out, clean, ~head) and torch.isnan(out[:, 1]).all()
    # one query row
    out, lse = run(_poison(case, "q", (1, 0, 7)))
    row = torch.zeros(2, 2, 150, dtype=torch.bool)
    row[1, 0, 7] = True
    assert torch.isnan(out[1, 0, 7]).all() and torch.isnan(lse[1, 0, 7])
    assert _rows_equal(out, clean, ~row) and _rows_equal(lse, clean_lse, ~row)
    # a usable key or value: the rows of its source and head, all of them, and no other
    for which, index, readers in (("k_fg", (0, 1, 4), fg_rows & head), ("v_fg", (0, 1, 4), fg_rows & head),
                                  ("k_bg", (0, 1, 300), ~fg_rows & head),  # a full tile
                                  ("v_bg", (0, 1, 201), ~fg_rows & head),  # a partial tile
                                  ("k_bg", (0, 0, 515), ~fg_rows & ~head)):  # the tail
        out, _ = run(_poison(case, which, index))
        assert torch.isnan(out[readers.to(out.device)]).all(), (which, index)
        assert _rows_equal(out, clean, ~readers), (which, index)


# --------------------------------------------------------------------------------------- CUDA

GPU_CASES = [
    dict(B=2, H=2, Lq=77, Lf=63, Lb=70, D=40),
    dict(B=2, H=8, Lq=1024, Lf=1024, Lb=1024, D=80, q_density=0.3, fg_density=0.05,
         bg_density=0.95),
    dict(B=4, H=8, Lq=256, Lf=256, Lb=256, D=160, Bf=1, Bb=1, q_mask_batch=1, fg_mask_batch=1,
         bg_mask_batch=1, strided=True),
    dict(B=1, H=8, Lq=4096, Lf=4096, Lb=4096, D=40, q_density=0.1, fg_density=0.01,
         strided=True),
    dict(B=3, H=2, Lq=64, Lf=64, Lb=64, D=64, Bf=1, Bb=3, fg_density="single"),
    dict(B=2, H=2, Lq=257, Lf=1, Lb=63, D=128, bg_density=0.0),
    dict(B=1, H=2, Lq=63, Lf=77, Lb=100, D=256, fg_density=1.0),
]


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("spec, dtype", [(s, t) for s in GPU_CASES for t in ALL],
                         ids=lambda x: f"D{x['D']}-L{x['Lq']}-B{x['B']}" if isinstance(x, dict) else IDS[x])
def test_gpu_parity(spec, dtype, make_case, formula, lowp_bound):
    assert not tb.is_interpreted(), "unset TRITON_INTERPRET to test the kernel on the GPU"
    case = on(make_case(dtype=dtype, **spec), "cuda")
    # fp32 runs on tensor cores with 3xTF32: close to, not exactly, fp32 accuracy
    check(case, formula, lowp_bound, fg_gain=1 / 0.7, fp32_atol=1e-4)


@pytest.mark.cuda
@cuda_only
def test_gpu_every_config_runs(make_case, formula, lowp_bound):
    case = on(make_case(B=2, H=2, Lq=300, Lf=200, Lb=250, D=80, dtype=torch.float16), "cuda")
    major, minor = torch.cuda.get_device_capability()
    for cfg in tuning.allowed_configs(80, "fp16", 10 * major + minor):
        check(case, formula, lowp_bound, config=cfg)


@pytest.mark.cuda
@cuda_only
def test_gpu_cuda_graph_and_compile(make_case):
    case = on(make_case(B=2, H=4, Lq=256, Lf=256, Lb=256, D=64, dtype=torch.float16), "cuda")
    eager = tri_source_attention(*case.args, backend="triton")  # warms up autotuning
    static = [None if t is None else t.clone() for t in case.args]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tri_source_attention(*static, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    compiled = torch.compile(lambda *a: tri_source_attention(*a, backend="triton"))
    assert torch.equal(compiled(*case.args), eager)
    # the custom op itself traces as one node (its fake implementation gives the shapes)
    assert torch.equal(_compiled_op(case), eager)


def _compiled_op(case, backend="inductor"):
    """The fused custom op over a prebuilt mask, through ``torch.compile(fullgraph=True)``."""
    mask = tri_source_mask(*case.args[5:])
    flags = (case.q.shape[-1] ** -0.5, 1.0, mask.fg_key_mask is None, mask.bg_key_mask is None, False)
    op = torch.compile(lambda *t: tb.tri_source_attention_op(*t, *tb.mask_tables(mask), *flags)[0],
                       fullgraph=True, backend=backend)
    return op(*case.tensors)


@pytest.mark.cuda
@cuda_only
def test_gpu_auto_picks_triton_only_where_proven(make_case, monkeypatch):
    """auto runs the kernel for fp16/bf16 once a sweep (or O2MAG_TRITON=on) vouches for this GPU
    family, never for fp32 (the torch backend's exact SDPA), never with O2MAG_TRITON=off."""
    case = on(make_case(B=1, H=2, Lq=64, Lf=64, Lb=64, D=64, dtype=torch.float16), "cuda")
    fp32 = case.to(torch.float32)
    for setting, fp16_pick in (("on", "triton"), ("off", "torch")):
        monkeypatch.setenv("O2MAG_TRITON", setting)
        dispatch.clear_auto_cache()
        assert dispatch.pick_backend("auto", case.q, case.tensors) == fp16_pick
        assert dispatch.pick_backend("auto", fp32.q, fp32.tensors) == "torch"
    dispatch.clear_auto_cache()
    monkeypatch.setenv("O2MAG_TRITON", "on")
    a = tri_source_attention(*case.args, backend="auto")
    assert torch.equal(a, tri_source_attention(*case.args, backend="triton"))
    dispatch.clear_auto_cache()


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
def test_gpu_variants_and_nan_rule(variant, make_case, formula, lowp_bound):
    """Every variant on the card at each config its build compiled clean for (fp16 and bf16, a
    diffusers-strided case), and the NaN rule at the first of them."""
    assert not tb.is_interpreted(), "unset TRITON_INTERPRET to test the kernel on the GPU"
    major, minor = torch.cuda.get_device_capability()
    if variant.tma and major < 9:
        pytest.skip("the tma variant needs sm_90 (TMA)")
    configs = tuning.spill_free(80, "fp16", 10 * major + minor, variant=variant.name)
    assert configs, variant.name
    for dtype in LOWP:
        case = on(make_case(B=2, H=8, Lq=300, Lf=250, Lb=330, D=80, dtype=dtype, strided=True,
                            Bf=1, Bb=1, q_density=0.3, bg_density=0.8), "cuda")
        for cfg in configs:
            check(case, formula, lowp_bound, config=cfg, variant=variant, fg_gain=1 / 0.7,
                  fp32_atol=1e-4)
    case, use_fg = _nan_case(make_case)
    _check_nan_rule(on(case, "cuda"), use_fg, tuning.spill_free(40, "fp16", 10 * major + minor,
                                                                  variant=variant.name)[0], variant)


@pytest.mark.cuda
@cuda_only
def test_gpu_cached_config_launches_directly(make_case, monkeypatch):
    """After the first (autotuned) launch of a shape bucket, later launches reuse its config
    without the autotuner and give the same bits."""
    monkeypatch.setattr(tb, "_CHOSEN", {})
    case = on(make_case(B=2, H=4, Lq=256, Lf=256, Lb=256, D=40, dtype=torch.float16,
                        strided=True), "cuda")
    first = tri_source_attention(*case.args, backend="triton")
    assert len(tb.chosen_configs()) == 1

    def boom(*a, **k):
        raise AssertionError("the autotuner ran again")

    monkeypatch.setattr(tb, "_tuned_kernel", boom)
    assert torch.equal(tri_source_attention(*case.args, backend="triton"), first)
