"""Parity of the ``torch`` and ``reference`` backends with the independent float64 formula.

Every comparison is three-way (torch, reference, formula.py) and checks the output, its dtype and
shape, that it is finite, and the log-sum-exp. Cases cover the head dims of SD models, odd and
power-of-two lengths up to 4096, empty/full/single/random masks varied independently, broadcast
sources and masks, strided ``(B, L, H*D)`` views, fg_gain/scale, and large-magnitude inputs.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from o2mag_kernels import tri_source_attention
from o2mag_kernels.backends.torch_backend import STRATEGIES, pick_strategy, torch_attention
from o2mag_kernels.validation import as_mask

from tests.kernels.helpers import max_abs_err

BACKENDS = ("torch", "reference")
# (out atol, lse relative tol) against the float64 formula.
TIGHT = {torch.float64: (1e-10, 1e-12), torch.float32: (3e-5, 2e-6)}


def run_checked(case, backend, *, scale=None, fg_gain=1.0):
    """Call the op with return_lse and check what holds for every result: shape, dtypes, finite."""
    out, lse = tri_source_attention(*case.args, scale=scale, fg_gain=fg_gain, return_lse=True,
                                    backend=backend)
    B, H, Lq, D = case.q.shape
    assert out.shape == (B, H, Lq, D) and out.dtype == case.q.dtype
    assert lse.shape == (B, H, Lq)
    assert lse.dtype == (torch.float64 if case.q.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all(), f"{backend}: non-finite output"
    assert torch.isfinite(lse).all(), f"{backend}: non-finite lse"
    return out, lse


def assert_lse_close(lse, exact_lse, rtol, what):
    err = max_abs_err(lse, exact_lse)
    top = float(exact_lse.abs().max()) if exact_lse.numel() else 0.0
    assert err <= rtol * max(1.0, top), f"{what}: lse error {err:.3g} (|lse| up to {top:.3g})"


def logit_error_allowance(case, scale, fg_gain, compute_dtype=None):
    """Output error explained by rounding the logits in the inputs' dtype.

    A logit's rounding error is a few ulps of sum_d |q_d k_d| (scaled); a logit error of delta moves
    the softmax weights by a relative ~delta and so the output by up to ~2·delta·max|v|. Negligible
    for unit-scale inputs, it matters when q and k are both large (ill-conditioned near-ties).
    """
    scale = case.q.shape[-1] ** -0.5 if scale is None else scale
    eps = torch.finfo(compute_dtype or case.q.dtype).eps
    q = case.q.double().abs()
    worst = 0.0
    for k, v, gain in ((case.k_fg, case.v_fg, fg_gain), (case.k_bg, case.v_bg, 1.0)):
        if k.shape[2] == 0:
            continue
        dots = float(torch.matmul(q, k.double().abs().transpose(-1, -2)).max())
        worst = max(worst, 4 * eps * scale * gain * dots * 2 * float(v.abs().max()))
    return worst


def check_tight(case, formula, *, scale=None, fg_gain=1.0):
    """float64/float32 cases: both backends match the formula to the dtype's accuracy."""
    exact, exact_lse = formula(*case.args, scale=scale, fg_gain=fg_gain)
    atol, rtol = TIGHT[case.q.dtype]
    atol += logit_error_allowance(case, scale, fg_gain)
    for backend in BACKENDS:
        out, lse = run_checked(case, backend, scale=scale, fg_gain=fg_gain)
        err = max_abs_err(out, exact)
        assert err <= atol, f"{backend}: max error {err:.3g} > {atol:g}"
        assert_lse_close(lse, exact_lse, rtol, backend)


def check_low_precision(case, formula, lowp_bound, *, scale=None, fg_gain=1.0):
    """fp16/bf16: error vs float64 at most twice the low-precision reference's own error (+ tiny)."""
    exact, exact_lse = formula(*case.args, scale=scale, fg_gain=fg_gain)
    bound = lowp_bound(case, exact, scale=scale, fg_gain=fg_gain)
    for backend in BACKENDS:
        out, lse = run_checked(case, backend, scale=scale, fg_gain=fg_gain)
        err = max_abs_err(out, exact)
        assert err <= bound, f"{backend} {case.q.dtype}: error {err:.3g} > bound {bound:.3g}"
        # Logits are accumulated in fp32 from the (exact) low-precision inputs: fp32-accurate LSE.
        assert_lse_close(lse, exact_lse, 1e-5, backend)


# name -> (build_case kwargs, op kwargs)
CASES = {
    "d40-odd-lengths": (dict(B=2, H=2, Lq=77, Lf=63, Lb=64, D=40), {}),
    "d64-pow2": (dict(B=1, H=2, Lq=64, Lf=64, Lb=64, D=64, fg_density=0.05), {}),
    "d80-gain": (dict(B=2, H=1, Lq=257, Lf=77, Lb=257, D=80), dict(fg_gain=1 / 0.7)),
    "d160-scale": (dict(B=3, H=2, Lq=63, Lf=257, Lb=63, D=160), dict(scale=0.05)),
    "d256": (dict(B=1, H=1, Lq=40, Lf=33, Lb=50, D=256), dict(fg_gain=2.0)),
    "all-length-1": (dict(B=2, H=2, Lq=1, Lf=1, Lb=1, D=40, q_density=1.0, fg_density=1.0), {}),
    "one-key-each": (dict(B=2, H=2, Lq=64, Lf=1, Lb=1, D=40, fg_density=1.0, bg_density=1.0), {}),
    "l1024-sparse": (dict(B=1, H=2, Lq=1024, Lf=1024, Lb=1024, D=40, q_density=0.05,
                          fg_density=0.05, bg_density=0.95), dict(fg_gain=1 / 0.7)),
    "b4-shared-sources": (dict(B=4, H=2, Lq=77, Lf=64, Lb=63, D=40, Bf=1, Bb=1, q_mask_batch=1,
                               fg_mask_batch=1, bg_mask_batch=1), {}),
    "b4-mixed-broadcast": (dict(B=4, H=2, Lq=77, Lf=64, Lb=63, D=64, Bf=1, Bb=4, q_mask_batch=4,
                                fg_mask_batch=1, bg_mask_batch=4), dict(fg_gain=3.0)),
    "strided": (dict(B=3, H=2, Lq=77, Lf=64, Lb=63, D=40, strided=True), {}),
    "strided-shared": (dict(B=3, H=2, Lq=64, Lf=64, Lb=64, D=80, strided=True, Bf=1, Bb=1,
                            q_mask_batch=1), dict(fg_gain=1 / 0.7)),
    "expanded-sources": (dict(B=3, H=2, Lq=63, Lf=77, Lb=64, D=40, Bf=1, Bb=1,
                              expand_sources=True), {}),
    "no-key-masks": (dict(B=2, H=2, Lq=77, Lf=63, Lb=64, D=40, fg_density=None, bg_density=None), {}),
    "fg-empty-everyone-bg": (dict(B=2, H=2, Lq=64, Lf=64, Lb=77, D=40, q_density=1.0,
                                  fg_density=0.0), {}),
    "bg-empty-falls-back": (dict(B=2, H=2, Lq=64, Lf=64, Lb=77, D=40, bg_density=0.0), {}),
    "large-q": (dict(B=2, H=2, Lq=77, Lf=64, Lb=63, D=40, q_magnitude=30.0), dict(fg_gain=1 / 0.7)),
    "large-q-and-k": (dict(B=1, H=2, Lq=64, Lf=64, Lb=64, D=64, q_magnitude=30.0, k_magnitude=30.0), {}),
}
LOWP_CASES = ["d40-odd-lengths", "d80-gain", "d160-scale", "one-key-each", "l1024-sparse",
              "b4-mixed-broadcast", "strided", "bg-empty-falls-back", "large-q"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_tight(name, dtype, make_case, formula):
    spec, op = CASES[name]
    check_tight(make_case(dtype=dtype, seed=zlib.crc32(name.encode()) % 1000, **spec), formula, **op)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("name", LOWP_CASES)
def test_parity_low_precision(name, dtype, make_case, formula, lowp_bound):
    spec, op = CASES[name]
    check_low_precision(make_case(dtype=dtype, seed=len(name), **spec), formula, lowp_bound, **op)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(CASES))
def test_torch_strategies(name, strategy, make_case, formula):
    """Both exact strategies of the torch backend (the device picks one; the other must hold too),
    float64, with and without a prebuilt mask."""
    from o2mag_kernels import tri_source_mask

    spec, op = CASES[name]
    case = make_case(dtype=torch.float64, seed=zlib.crc32(name.encode()) % 997, **spec)
    exact, _ = formula(*case.args, **op)
    atol = TIGHT[torch.float64][0] + logit_error_allowance(case, op.get("scale"), op.get("fg_gain", 1.0))
    problem = case.problem(op.get("scale"), op.get("fg_gain", 1.0), "torch")
    for masks in (case.args[5:], (tri_source_mask(*case.args[5:]), None, None)):
        out = torch_attention(problem, *case.tensors, as_mask(problem, *masks), strategy=strategy)
        assert out.shape == case.q.shape and out.dtype == case.q.dtype
        err = max_abs_err(out, exact)
        assert err <= atol, f"{strategy}: max error {err:.3g} > {atol:g}"


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv("O2MAG_TORCH_STRATEGY", raising=False)
    assert pick_strategy(torch.device("cpu")) == "routed"
    assert pick_strategy(torch.device("cuda")) == "stitch"
    monkeypatch.setenv("O2MAG_TORCH_STRATEGY", "stitch")
    assert pick_strategy(torch.device("cpu")) == "stitch"
    monkeypatch.setenv("O2MAG_TORCH_STRATEGY", "fast")
    with pytest.raises(ValueError, match="O2MAG_TORCH_STRATEGY"):
        pick_strategy(torch.device("cpu"))


DENSITIES = [0.0, 1.0, "single", 0.01, 0.05, 0.5]


@pytest.mark.parametrize("bg_density", DENSITIES, ids=lambda d: f"bg={d}")
@pytest.mark.parametrize("fg_density", DENSITIES, ids=lambda d: f"fg={d}")
@pytest.mark.parametrize("q_density", DENSITIES, ids=lambda d: f"q={d}")
def test_masks_varied_independently(q_density, fg_density, bg_density, make_case, formula):
    """Empty, full, single-pixel and random 1/5/50% masks, each mask independently, per batch row."""
    case = make_case(B=2, H=2, Lq=77, Lf=63, Lb=64, D=8, dtype=torch.float64, seed=7,
                     q_density=q_density, fg_density=fg_density, bg_density=bg_density)
    check_tight(case, formula, fg_gain=1.5)


@pytest.mark.parametrize("L", [1, 63, 64, 77, 257, 1024])
@pytest.mark.parametrize("which", ["Lq", "Lf", "Lb"])
def test_lengths(which, L, make_case, formula):
    """Each length on its own axis (the other two at 64), fp32, 5% random masks."""
    sizes = dict(Lq=64, Lf=64, Lb=64)
    sizes[which] = L
    case = make_case(B=2, H=2, D=40, dtype=torch.float32, seed=L, q_density=0.3, fg_density=0.05,
                     bg_density=0.5, **sizes)
    check_tight(case, formula, fg_gain=1 / 0.7)


@pytest.mark.parametrize("D", [40, 64, 80, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
def test_head_dims(D, dtype, make_case, formula, lowp_bound):
    case = make_case(B=2, H=2, Lq=77, Lf=64, Lb=257, D=D, dtype=dtype, seed=D)
    if dtype == torch.float32:
        check_tight(case, formula)
    else:
        check_low_precision(case, formula, lowp_bound)


@pytest.mark.parametrize("spec", [
    dict(B=1, H=1, Lq=4096, Lf=4096, Lb=4096, D=40, dtype=torch.float32),
    dict(B=2, H=1, Lq=64, Lf=4096, Lb=4096, D=40, dtype=torch.float64, Bf=1, Bb=1),
    dict(B=1, H=1, Lq=4096, Lf=257, Lb=4096, D=40, dtype=torch.bfloat16),
], ids=["f32-all-4096", "f64-keys-4096-shared", "bf16-q-4096"])
def test_length_4096(spec, make_case, formula, lowp_bound):
    """SD 1.5's largest self-attention (64x64 latent), with the paper's sparse masks."""
    case = make_case(seed=4096, q_density=0.05, fg_density=0.05, bg_density=0.95, **spec)
    if spec["dtype"] == torch.bfloat16:
        check_low_precision(case, formula, lowp_bound, fg_gain=1 / 0.7)
    else:
        check_tight(case, formula, fg_gain=1 / 0.7)


@pytest.mark.parametrize("spec", [
    dict(B=1, H=2, Lq=1024, Lf=1024, Lb=1024, D=64, dtype=torch.float32),
    dict(B=2, H=1, Lq=256, Lf=4096, Lb=4096, D=64, dtype=torch.float32, Bf=1, Bb=1),
    dict(B=2, H=1, Lq=64, Lf=9216, Lb=9216, D=64, dtype=torch.float64, Bf=1, Bb=1),
], ids=["sd2-sdxl32-1024", "sd2-sdxl64-4096-shared", "sd21-768-9216-shared"])
def test_sd2_and_sdxl_layers(spec, make_case, formula):
    """Head dim 64 at SD 2.x's and SDXL's token counts: 1024 (SD 2.x at 512 px; SDXL's 32x32
    level), 4096 (SD 2.x's 64x64; SDXL's 64x64) and 9216 (SD 2.1 at 768 px, 96x96). Few heads and
    queries keep the interpreter's time small; the keys are the full layer's."""
    case = make_case(seed=spec["Lf"], q_density=0.05, fg_density=0.05, bg_density=0.95, **spec)
    check_tight(case, formula, fg_gain=1 / 0.7)


@pytest.mark.parametrize(
    "Bf,Bb,qmb,fmb,bmb", list(itertools.product([1, 3], [1, 3], [1, 3], [1, 3], [1, 3])),
    ids=lambda v: str(v))
def test_broadcast_combinations(Bf, Bb, qmb, fmb, bmb, make_case, formula):
    """Sources of batch 1 or B and masks of batch 1 or B in every combination (B = 3).

    A key mask of batch B over a size-1 source (one reference image, per-target masks) is accepted
    by the op and means row b of the mask applies to target b.
    """
    case = make_case(B=3, H=2, Lq=33, Lf=40, Lb=31, D=8, dtype=torch.float64, seed=Bf + 2 * Bb,
                     Bf=Bf, Bb=Bb, q_mask_batch=qmb, fg_mask_batch=fmb, bg_mask_batch=bmb,
                     fg_density=0.3)
    check_tight(case, formula, fg_gain=2.0)


@pytest.mark.parametrize("mask_batch", [1, 4])
def test_user_expanded_sources_match_size_one(mask_batch, make_case):
    """Stride-0 ``expand(B, ...)`` sources give exactly the result of passing the size-1 source."""
    kw = dict(B=4, H=2, Lq=77, Lf=64, Lb=63, D=40, Bf=1, Bb=1, seed=3, q_mask_batch=mask_batch,
              fg_mask_batch=mask_batch, bg_mask_batch=mask_batch)
    plain, expanded = make_case(**kw), make_case(expand_sources=True, **kw)
    assert expanded.k_fg.stride(0) == 0 and expanded.k_fg.shape[0] == 4
    for lse in (False, True):
        a = tri_source_attention(*plain.args, backend="torch", return_lse=lse)
        b = tri_source_attention(*expanded.args, backend="torch", return_lse=lse)
        for x, y in zip(*((a, b) if lse else ((a,), (b,)))):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(tri_source_attention(*expanded.args, backend="reference"),
                               tri_source_attention(*plain.args, backend="reference"))


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage behind any tensor an ATen op returns while the mode is active.

    Storage, not ``numel``: views such as ``expand`` report a large logical size but allocate
    nothing, while a real copy owns a storage of its full size.
    """

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                n = t.untyped_storage().nbytes() // t.element_size()
                if n > self.largest[0]:
                    self.largest = (n, f"{func} -> {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("mask_batch", [1, 4])
@pytest.mark.parametrize("expand_sources", [False, True])
def test_shared_sources_are_not_copied_per_target(expand_sources, mask_batch, return_lse, make_case):
    """One reference and one normal source serving 4 targets: no op allocates more than one
    source's worth of elements (a per-target copy of the gathered keys would be ~4x that)."""
    B, H, L, D = 4, 2, 512, 16
    case = make_case(B=B, H=H, Lq=4, Lf=L, Lb=L, D=D, Bf=1, Bb=1, seed=11, q_density=0.5,
                     fg_density=0.6, bg_density=0.6, q_mask_batch=mask_batch, fg_mask_batch=mask_batch,
                     bg_mask_batch=mask_batch, expand_sources=expand_sources)
    case.query_mask[:, 0] = True  # both sources are used
    case.query_mask[:, 1] = False
    one_source = H * L * D
    with _LargestAllocation() as mode:
        tri_source_attention(*case.args, backend="torch", return_lse=return_lse)
    assert mode.largest[0] <= one_source, f"copy of a shared source: {mode.largest[1]}"


def test_strided_equals_contiguous(make_case, formula):
    """The same values as ``(B, L, H*D)`` transposed views or contiguous tensors: same result."""
    kw = dict(B=2, H=4, Lq=77, Lf=64, Lb=63, D=40, seed=5)
    strided, dense = make_case(strided=True, **kw), make_case(**kw)
    assert not strided.q.is_contiguous() and strided.q.stride(-1) == 1
    for backend in BACKENDS:
        a = tri_source_attention(*strided.args, backend=backend)
        b = tri_source_attention(*dense.args, backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    check_tight(strided, formula)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_output_every_call(backend, make_case, formula):
    """No output buffer is cached or aliased: poisoning one result (NaN) changes neither the inputs
    nor the next call's result, which is finite and equals the formula row by row."""
    case = make_case(B=2, H=2, Lq=77, Lf=64, Lb=63, D=40, seed=9, q_mask_batch=1)
    inputs = [t.clone() for t in case.tensors]
    first = tri_source_attention(*case.args, backend=backend)
    first.fill_(float("nan"))
    for before, now in zip(inputs, case.tensors):
        assert torch.equal(before, now)
    second = tri_source_attention(*case.args, backend=backend)
    assert torch.isfinite(second).all()
    exact, _ = formula(*case.args)
    assert max_abs_err(second, exact) <= TIGHT[torch.float32][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("magnitude", [30.0, 300.0])
def test_large_magnitude_stays_finite(dtype, magnitude, make_case, formula):
    """Logits in the hundreds or thousands (q scaled up) must not overflow the softmax."""
    case = make_case(B=2, H=2, Lq=64, Lf=64, Lb=63, D=64, dtype=dtype, seed=1, q_magnitude=magnitude)
    exact, _ = formula(*case.args, fg_gain=1 / 0.7)
    for backend in BACKENDS:
        out, _ = run_checked(case, backend, fg_gain=1 / 0.7)
        # Near-one-hot rows: the result is (close to) one value row, so tolerance is rounding-sized
        # (output rounding in fp16/bf16) plus what fp32 logit rounding explains at this magnitude.
        base = 3e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * float(exact.abs().max())
        tol = base + logit_error_allowance(case, None, 1 / 0.7, compute_dtype=torch.float32)
        err = max_abs_err(out, exact)
        assert err <= tol, f"{backend}: error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_foreground_source_and_empty_query_set(backend, make_case, formula):
    """Lf = 0 (no foreground keys at all: every query takes the background) and Lq = 0 both work."""
    case = make_case(B=2, H=2, Lq=33, Lf=0, Lb=31, D=8, dtype=torch.float64, q_density=1.0)
    check_tight(case, formula)
    empty = make_case(B=2, H=2, Lq=0, Lf=5, Lb=7, D=8)
    out, lse = tri_source_attention(*empty.args, backend=backend, return_lse=True)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)


def test_auto_on_cpu_is_the_torch_backend(make_case):
    case = make_case(B=2, H=2, Lq=77, Lf=64, Lb=63, D=40)
    assert torch.equal(tri_source_attention(*case.args), tri_source_attention(*case.args, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_bound_is_not_vacuous(dtype, make_case, formula, lowp_bound):
    """The fp16/bf16 bound is small enough to catch a real mistake: a result computed with the
    wrong foreground gain (rounded to the dtype) falls outside it."""
    case = make_case(B=2, H=2, Lq=77, Lf=64, Lb=63, D=40, dtype=dtype, seed=12, q_density=0.5)
    exact, _ = formula(*case.args, fg_gain=1 / 0.7)
    bound = lowp_bound(case, exact, fg_gain=1 / 0.7)
    wrong, _ = formula(*case.args, fg_gain=1.0)
    assert 0 < bound < max_abs_err(wrong.to(dtype), exact)
    with pytest.raises(ValueError):
        lowp_bound(case.to(torch.float32), exact)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", ["d40-odd-lengths", "d160-scale", "b4-mixed-broadcast", "strided-shared",
                                  "l1024-sparse", "large-q"])
def test_cpu_backends_on_cuda_tensors(name, dtype, make_case, formula, lowp_bound):
    """The torch (and reference) backends on CUDA tensors, where SDPA picks GPU kernels."""
    spec, op = CASES[name]
    cpu = make_case(dtype=dtype, seed=21, **spec)
    case = cpu.with_tensors(*(t.cuda() for t in cpu.tensors))
    case = type(case)(*case.args[:5], *(None if m is None else m.cuda() for m in case.args[5:]))
    if dtype == torch.float32:
        check_tight(case, formula, **op)
    else:
        check_low_precision(case, formula, lowp_bound, **op)


# The augmented strategy (per-target background exclusion inside plain SDPA calls): the shapes
# where its bookkeeping can go wrong. Each runs in float64 (tight) and, where listed, fp16/bf16.
AUGMENTED = {
    # 30 targets at head dim 40: two folded SDPA calls (fold_width(40) == 24)
    "beyond-fold": (dict(B=30, H=2, Lq=64, Lf=64, Lb=130, D=40, Bf=1, Bb=1, q_mask_batch=30,
                         fg_mask_batch=1, bg_mask_batch=30), {}),
    # head dim 80: 16 targets per call
    "fold-80": (dict(B=17, H=1, Lq=33, Lf=40, Lb=77, D=80, Bf=1, Bb=1, fg_mask_batch=1,
                     bg_mask_batch=17, bg_density=0.9), dict(fg_gain=1 / 0.7)),
    # per-target sources and masks: one appended column per target
    "per-target-sources": (dict(B=3, H=2, Lq=40, Lf=50, Lb=70, D=64), {}),
    # |logits| up to ~50 (the exclusion margin is 1e4 logit units)
    "large-logits": (dict(B=4, H=2, Lq=64, Lf=64, Lb=128, D=40, Bf=1, Bb=1, fg_mask_batch=1,
                          bg_mask_batch=4, q_magnitude=5.0, k_magnitude=5.0), {}),
    "strided-views": (dict(B=5, H=3, Lq=64, Lf=64, Lb=96, D=40, Bf=1, Bb=1, fg_mask_batch=1,
                           bg_mask_batch=5, strided=True, expand_sources=True), {}),
}


def _augmented_case(make_case, name, dtype, leading_excluded=True):
    spec, op = AUGMENTED[name]
    case = make_case(dtype=dtype, seed=zlib.crc32(name.encode()) % 991, **spec)
    bg = case.bg_key_mask.clone()
    if leading_excluded and bg.shape[0] > 2:
        bg[0, : bg.shape[1] // 2] = False  # fully excluded leading tiles for target 0
        bg[1] = False                      # target 1 may use no key: the fallback (all keys)
        bg[2] = True                       # target 2 uses every key
    return case.__class__(*case.args[:7], bg), op


@pytest.mark.parametrize("name", list(AUGMENTED))
def test_augmented_tight(name, make_case, formula):
    case, op = _augmented_case(make_case, name, torch.float64)
    exact, _ = formula(*case.args, **op)
    atol = TIGHT[torch.float64][0] + logit_error_allowance(case, op.get("scale"), op.get("fg_gain", 1.0))
    problem = case.problem(op.get("scale"), op.get("fg_gain", 1.0), "torch")
    out = torch_attention(problem, *case.tensors, as_mask(problem, *case.args[5:]),
                          strategy="augmented")
    assert max_abs_err(out, exact) <= atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", ["beyond-fold", "large-logits", "strided-views"])
def test_augmented_precision(name, dtype, make_case, formula, lowp_bound):
    case, op = _augmented_case(make_case, name, dtype)
    exact, _ = formula(*case.args, **op)
    problem = case.problem(op.get("scale"), op.get("fg_gain", 1.0), "torch")
    out = torch_attention(problem, *case.tensors, as_mask(problem, *case.args[5:]),
                          strategy="augmented")
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float32:
        bound = TIGHT[dtype][0] + logit_error_allowance(case, op.get("scale"), op.get("fg_gain", 1.0))
    else:
        bound = lowp_bound(case, exact, **op)
    assert max_abs_err(out, exact) <= bound


def test_augmented_falls_back_where_the_columns_cannot_be_finite(make_case, formula, lowp_bound):
    """fp16 with a tiny scale: s² would overflow fp16's products, so the background takes the
    boolean-mask path -- still exact."""
    from o2mag_kernels.backends.torch_backend import exclusion_column

    case, _ = _augmented_case(make_case, "fold-80", torch.float16)
    problem = case.problem(1e-4, 1.0, "torch")
    assert exclusion_column(problem, torch.float16) is None
    assert exclusion_column(problem, torch.float32) is not None
    exact, _ = formula(*case.args, scale=1e-4)
    out = torch_attention(problem, *case.tensors, as_mask(problem, *case.args[5:]),
                          strategy="augmented")
    assert max_abs_err(out, exact) <= lowp_bound(case, exact, scale=1e-4)


def test_augmented_columns_are_built_once_per_dtype(make_case):
    from o2mag_kernels import tri_source_mask

    case, _ = _augmented_case(make_case, "fold-80", torch.float32)
    m = tri_source_mask(*case.args[5:])
    a = m.exclusion_columns(torch.float32, -3.0)
    assert m.exclusion_columns(torch.float32, -3.0) is a
    assert torch.equal(a == -3.0, ~m.bg_key_mask) and torch.equal(a == 0, m.bg_key_mask)
    assert m.exclusion_columns(torch.float16, -3.0).dtype == torch.float16


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_source_with_expanded_k_and_a_real_batch_of_v(strategy):
    """K a stride-0 ``expand(B, ...)`` view, V of the source a real batch-B tensor (and the other
    way round), per-target masks: every torch strategy agrees with the float64 reference (the
    augmented one reshaped the size-1 K with the batch-B V and failed)."""
    from o2mag_kernels.validation import validate

    B, H, L, D = 3, 2, 40, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, L, D, generator=g)
    k_fg, v_fg = (torch.randn(1, H, L, D, generator=g) for _ in range(2))
    one, full = torch.randn(1, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    qm, fm, bm = (torch.rand(B, L, generator=g) > p for p in (0.7, 0.5, 0.3))
    for k_bg, v_bg in ((one.expand(B, -1, -1, -1), full), (full, one.expand(B, -1, -1, -1))):
        args = (q, k_fg, v_fg, k_bg, v_bg)
        want = tri_source_attention(*(x.double() for x in args), qm, fm, bm, backend="reference")
        problem = validate(*args, qm, fm, bm, None, 1.0, "torch")
        got = torch_attention(problem, *args, as_mask(problem, qm, fm, bm), strategy=strategy)
        # float32 rounding of 40-key softmaxes of O(1) values: orders of magnitude below 1e-5
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
