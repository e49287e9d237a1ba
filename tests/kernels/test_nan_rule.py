"""The op's NaN rule, on every backend (the Triton kernel under the interpreter).

Contract (docs/architecture.md §4): a NaN or an infinity in what a row reads -- its query, or a
usable key or value of the source it reads -- makes that row's output non-finite (the ``torch``
backend makes the whole row NaN); a non-finite key or value that the row may NOT read does not
change the row. Each case plants non-finite values in a clean input and compares with the clean
run: rows that read them must not be finite, every other row must equal the clean run.
"""
from __future__ import annotations

import pytest
import torch

from o2mag_kernels import tri_source_attention
from o2mag_kernels.backends.torch_backend import STRATEGIES
from o2mag_kernels.validation import validate

try:
    from o2mag_kernels.backends import triton_backend as tb

    TRITON = tb.status(torch.device("cpu"))[0]
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    TRITON = False

BACKENDS = (["reference"] + [f"torch-{s}" for s in STRATEGIES]
            + (["triton"] if TRITON else []))
B, H, L, D = 3, 2, 130, 40  # 130 keys: full and partial 64-key tiles, an odd tail


def _case(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k_fg, v_fg, k_bg, v_bg = (torch.randn(1, H, L, D, generator=g).to(dtype) for _ in range(4))
    qm = torch.zeros(B, L, dtype=torch.bool)
    qm[:, 10:40] = True                          # queries 10..39 take the foreground
    fm = torch.zeros(1, L, dtype=torch.bool)
    fm[:, 70:90] = True                          # foreground keys 70..89 usable
    bm = torch.ones(B, L, dtype=torch.bool)
    bm[:, :64] = False                           # a fully excluded leading tile
    bm[:, 100:110] = False                       # and a partial one
    bm[1, 64:] = False                           # target 1: no usable key -> all keys (fallback)
    return [q, k_fg, v_fg, k_bg, v_bg], (qm, fm, bm)


def _run(backend, tensors, masks):
    if backend.startswith("torch-"):
        from o2mag_kernels.backends.torch_backend import torch_attention
        from o2mag_kernels.validation import as_mask

        problem = validate(*tensors, *masks, None, 1.4, "torch")
        return torch_attention(problem, *tensors, as_mask(problem, *masks), strategy=backend[6:])
    if backend == "triton":
        with torch.no_grad():
            return tri_source_attention(*tensors, *masks, fg_gain=1.4, backend="triton")
    return tri_source_attention(*tensors, *masks, fg_gain=1.4, backend=backend)


def _check(backend, tensors, masks, bad_rows, through_value=False):
    """``bad_rows`` (B, H, L) bool: the rows that read a planted non-finite value;
    ``through_value``: they read it only through a value (which poisons one column)."""
    clean_tensors, _ = _case()
    clean = _run(backend, clean_tensors, masks)
    out = _run(backend, tensors, masks)
    assert not torch.isfinite(out[bad_rows]).all(dim=-1).any(), \
        f"{backend}: a row that reads a non-finite value came out finite"
    good = ~bad_rows
    assert torch.isfinite(out[good]).all(), f"{backend}: a row that reads no NaN is not finite"
    torch.testing.assert_close(out[good], clean[good], atol=1e-6, rtol=1e-6)
    if backend.startswith("torch-") or backend == "reference":
        # torch and reference make every element of a row that reads a NaN query or key NaN
        if not through_value or backend.startswith("torch-"):
            assert torch.isnan(out[bad_rows]).all(), f"{backend}: a poisoned row is only partly NaN"


def _rows(fg: bool, batch=None, head=None):
    """(B, H, L) rows that read the foreground (fg=True) or the background, of one batch/head."""
    _, (qm, fm, _) = _case()
    use_fg = (qm & fm.any(dim=1, keepdim=True))[:, None, :].expand(B, H, L)
    rows = use_fg if fg else ~use_fg
    sel = torch.zeros(B, H, L, dtype=torch.bool)
    sel[slice(None) if batch is None else batch, slice(None) if head is None else head] = True
    return rows & sel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_bad_query_row_poisons_that_row_only(backend, value):
    tensors, masks = _case()
    tensors[0][1, 0, 50, 7] = value      # a background-routed query
    tensors[0][2, 1, 20, 0] = value      # a foreground-routed query
    bad = torch.zeros(B, H, L, dtype=torch.bool)
    bad[1, 0, 50] = bad[2, 1, 20] = True
    _check(backend, tensors, masks, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_nan_query_gives_all_nan(backend):
    tensors, masks = _case()
    tensors[0].fill_(float("nan"))
    out = _run(backend, tensors, masks)
    assert not torch.isfinite(out).all(dim=-1).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["k", "v"])
def test_a_usable_foreground_key_poisons_the_rows_that_read_it(backend, which):
    tensors, masks = _case()
    t = tensors[1] if which == "k" else tensors[2]
    t[0, 1, 75, 3] = float("nan")        # foreground key 75 (usable), head 1
    _check(backend, tensors, masks, _rows(True, head=1), through_value=which == "v")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["k", "v"])
def test_a_usable_background_key_poisons_the_rows_that_read_it(backend, which):
    tensors, masks = _case()
    t = tensors[3] if which == "k" else tensors[4]
    t[0, 0, 120, 5] = float("nan")       # usable for targets 0 and 2; target 1 uses every key
    _check(backend, tensors, masks, _rows(False, head=0), through_value=which == "v")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["k_fg", "v_fg", "k_bg", "v_bg"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
def test_a_key_no_row_may_read_changes_nothing(backend, which, value):
    tensors, masks = _case()
    idx = {"k_fg": 1, "v_fg": 2, "k_bg": 3, "v_bg": 4}[which]
    if which.endswith("fg"):
        keys = [5, 100]                   # foreground keys outside 70..89
    else:
        keys = [3, 63, 105]               # excluded background keys for targets 0 and 2 ...
        masks = (masks[0], masks[1], masks[2].clone())
        masks[2][1] = masks[2][0]         # ... and for target 1 too (no fallback this time)
    for j in keys:
        tensors[idx][0, :, j, :] = value
    _check(backend, tensors, masks, torch.zeros(B, H, L, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference"] + [f"torch-{s}" for s in STRATEGIES])
def test_lse_follows_the_rule(backend):
    tensors, masks = _case()
    tensors[0][0, 0, 50, 1] = float("nan")
    if backend.startswith("torch-"):
        from o2mag_kernels.backends.torch_backend import torch_attention
        from o2mag_kernels.validation import as_mask

        problem = validate(*tensors, *masks, None, 1.0, "torch")
        out, lse = torch_attention(problem, *tensors, as_mask(problem, *masks), return_lse=True,
                                   strategy=backend[6:])
    else:
        out, lse = tri_source_attention(*tensors, *masks, return_lse=True, backend=backend)
    assert torch.isnan(lse[0, 0, 50]) and torch.isfinite(lse[0, 0, :50]).all()
    assert torch.isfinite(lse[1:]).all()


@pytest.mark.parametrize("backend", [f"torch-{s}" for s in STRATEGIES])
def test_finite_values_whose_sum_overflows_mark_no_row(backend):
    """On a CPU the torch backend first sums each input (a finite sum proves every element
    finite). Values whose sum overflows are still finite: the exact row check must then run
    and mark nothing. float16 values of 6e4 overflow a float16 sum; as values they are usable."""
    tensors, masks = _case(torch.float16)
    tensors[4][0, :, 64:, :] = 6.0e4              # background values: the sum is inf, each is finite
    assert not torch.isfinite(tensors[4].sum())
    out = _run(backend, tensors, masks)
    assert torch.isfinite(out).all()
    want = _run("reference", [t.double() for t in tensors], masks)
    low = _run("reference", tensors, masks).double()  # the reference in float16: its rounding error
    assert (out.double() - want).abs().max() <= 2 * (low - want).abs().max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_whose_logit_is_minus_inf(backend):
    """The one documented difference between backends: an infinite key whose every term of q.k
    agrees gives the logit -inf, a softmax weight of exactly 0, as in SDPA. The reference and the
    kernel compute logits and so return the finite row of the other keys (the run with that key
    excluded); the torch backend flags rows from the inputs, not the logits, and makes them NaN."""
    tensors, masks = _case()
    tensors[0] = tensors[0].abs() + 0.1            # every query component positive
    j = 120                                        # a usable background key for targets 0 and 2
    tensors[3][0, :, j, :] = float("-inf")         # so every q.k term with it is -inf
    out = _run(backend, tensors, masks)
    rows = _rows(fg=False) & (torch.arange(B) != 1)[:, None, None]  # target 1 reads every key (fallback)
    if backend.startswith("torch-"):
        assert torch.isnan(out[rows]).all()
        return
    without = masks[2].clone()
    without[:, j] = False
    clean_tensors, _ = _case()
    clean_tensors[0] = clean_tensors[0].abs() + 0.1
    want = _run(backend, clean_tensors, (masks[0], masks[1], without))
    torch.testing.assert_close(out[rows], want[rows], atol=1e-6, rtol=1e-6)
