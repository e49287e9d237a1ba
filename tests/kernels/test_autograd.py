"""Gradients of the ``torch`` backend (the differentiable path of the op).

``gradcheck`` in float64 compares the analytic gradients w.r.t. q, k_fg, v_fg, k_bg and v_bg with
finite differences, on small cases with mixed masks that exercise both routing paths (one routing
for the whole batch, and one group per batch row), broadcast sources and the LSE output.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from o2mag_kernels import tri_source_attention

# Small enough for finite differences to be quick, with every routing situation present.
SMALL = dict(H=2, Lq=6, Lf=5, Lb=7, D=4, dtype=torch.float64)


def _mixed_masks(case):
    """Row 0: some queries inside M_T with some usable fg keys. Last row (if any): empty fg set, so
    its queries inside M_T fall back to the background; empty bg set (all keys usable)."""
    qm, fm, bm = case.query_mask, case.fg_key_mask, case.bg_key_mask
    qm[0, :3], qm[0, 3:] = True, False
    fm[0] = torch.tensor([True, False, True, False, True])
    bm[0] = torch.tensor([False, True, True, False, True, True, False])
    if qm.shape[0] > 1:
        qm[-1, ::2] = True
    if fm.shape[0] > 1:
        fm[-1] = False
    if bm.shape[0] > 1:
        bm[-1] = False
    return case


def _grad_inputs(case):
    return tuple(t.detach().clone().requires_grad_(True) for t in case.tensors)


@pytest.mark.parametrize("strategy", ["routed", "stitch", "augmented"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("layout", ["per-row-masks", "shared-masks", "broadcast-sources"])
def test_gradcheck(layout, return_lse, strategy, make_case, monkeypatch):
    """The torch strategies (``O2MAG_TORCH_STRATEGY``; the LSE always takes the routed one)."""
    monkeypatch.setenv("O2MAG_TORCH_STRATEGY", strategy)
    if layout == "per-row-masks":
        case = make_case(B=2, seed=1, **SMALL)
    elif layout == "shared-masks":
        case = make_case(B=2, seed=2, q_mask_batch=1, fg_mask_batch=1, bg_mask_batch=1, **SMALL)
    else:
        case = make_case(B=3, seed=3, Bf=1, Bb=1, fg_mask_batch=3, **SMALL)
    case = _mixed_masks(case)
    masks = case.args[5:]

    def fn(q, k_fg, v_fg, k_bg, v_bg):
        return tri_source_attention(q, k_fg, v_fg, k_bg, v_bg, *masks, fg_gain=1 / 0.7,
                                    return_lse=return_lse, backend="torch")

    assert gradcheck(fn, _grad_inputs(case), eps=1e-6, atol=1e-7)


def test_gradcheck_strided_views():
    """Gradients flow back through (B, L, H*D) views into the caller's leaf tensors."""
    B, H, L, D = 2, 2, 6, 4
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(B, L, H * D, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(5)]
    masks = (torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool),   # query
             torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool),   # fg keys
             torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1]], dtype=torch.bool))   # bg keys

    def fn(*xs):
        views = [x.view(B, L, H, D).transpose(1, 2) for x in xs]
        return tri_source_attention(*views, *masks, backend="torch")

    assert gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["per-row-masks", "shared-masks"])
def test_gradients_match_reference_autograd(layout, make_case):
    """The reference backend is plain differentiable torch ops: its gradients are a second opinion
    at a realistic size (fp32, D=40), where finite differences would be too slow."""
    kw = dict(q_mask_batch=1, fg_mask_batch=1, bg_mask_batch=1) if layout == "shared-masks" else {}
    case = make_case(B=2, H=2, Lq=77, Lf=64, Lb=63, D=40, seed=6, Bf=1, fg_density=0.2, **kw)
    grads = {}
    for backend in ("torch", "reference"):
        xs = _grad_inputs(case)
        out, lse = tri_source_attention(*xs, *case.args[5:], fg_gain=1 / 0.7, return_lse=True,
                                        backend=backend)
        g = torch.Generator().manual_seed(0)
        w_out = torch.randn(out.shape, generator=g)
        w_lse = torch.randn(lse.shape, generator=g)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads[backend] = [x.grad for x in xs]
    for name, a, b in zip(("q", "k_fg", "v_fg", "k_bg", "v_bg"), grads["torch"], grads["reference"]):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_unused_keys_and_sources_get_zero_gradient(make_case):
    """Keys outside the usable sets, and a source no query reads, receive exactly zero gradient."""
    case = make_case(B=1, seed=8, **SMALL)
    case.query_mask[:] = False
    case.query_mask[0, 1] = True
    case.fg_key_mask[0] = torch.tensor([False, True, True, False, False])
    case.bg_key_mask[0] = torch.tensor([True, False, True, True, False, False, True])
    xs = _grad_inputs(case)
    tri_source_attention(*xs, *case.args[5:], backend="torch").sum().backward()
    q, k_fg, v_fg, k_bg, v_bg = (x.grad for x in xs)
    for name, grad, mask in (("k_fg", k_fg, case.fg_key_mask), ("v_fg", v_fg, case.fg_key_mask),
                             ("k_bg", k_bg, case.bg_key_mask), ("v_bg", v_bg, case.bg_key_mask)):
        assert torch.all(grad[:, :, ~mask[0]] == 0), f"{name}: gradient on an unusable key"
        assert grad[:, :, mask[0]].abs().sum() > 0, f"{name}: no gradient on usable keys"

    case.query_mask[:] = False  # now nobody reads the foreground
    xs = _grad_inputs(case)
    tri_source_attention(*xs, *case.args[5:], backend="torch").sum().backward()
    assert xs[1].grad is None or torch.all(xs[1].grad == 0)
    assert xs[2].grad is None or torch.all(xs[2].grad == 0)


def test_auto_with_grad_is_differentiable(make_case):
    case = make_case(B=2, H=2, Lq=9, Lf=8, Lb=7, D=8, seed=9)
    xs = _grad_inputs(case)
    tri_source_attention(*xs, *case.args[5:]).square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backward_through_an_empty_query_set(backend):
    """Lq = 0 returns an empty result that is still part of the graph (backward does not fail)."""
    xs = [torch.randn(2, 2, 0, 4, requires_grad=True)]
    xs += [torch.randn(2, 2, 3, 4, requires_grad=True) for _ in range(4)]
    out = tri_source_attention(*xs, torch.ones(2, 0, dtype=torch.bool), backend=backend)
    out.sum().backward()
    assert xs[0].grad is not None and xs[0].grad.shape == (2, 2, 0, 4)
