"""Property tests (Hypothesis) of the op's contract over random small shapes and masks.

Shapes, broadcast batches, mask densities (including empty and full), strided layouts, scale and
fg_gain are drawn at random; examples are derandomized and the example database is off, so CI runs
the same examples every time. All arithmetic is float64 so properties can be checked tightly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from o2mag_kernels import tri_source_attention

BACKENDS = ("torch", "reference")
TOL = dict(rtol=1e-9, atol=1e-10)
PROPERTY_SETTINGS = settings(max_examples=75, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])
DENSITY = st.sampled_from([0.0, 1.0, "single", 0.2, 0.5, 0.8])


@st.composite
def specs(draw):
    """Keyword arguments of ``make_case`` plus ``op`` (scale, fg_gain) for one random call."""
    B = draw(st.integers(1, 3))

    def batch():
        return draw(st.sampled_from(sorted({1, B})))

    spec = dict(
        B=B, H=draw(st.integers(1, 2)), Lq=draw(st.integers(0, 12)), Lf=draw(st.integers(0, 12)),
        Lb=draw(st.integers(1, 12)), D=draw(st.integers(1, 8)), dtype=torch.float64,
        seed=draw(st.integers(0, 2**16)), Bf=batch(), Bb=batch(), q_mask_batch=batch(),
        fg_mask_batch=batch(), bg_mask_batch=batch(), strided=draw(st.booleans()),
        q_density=draw(DENSITY),
        fg_density=draw(st.one_of(st.none(), DENSITY)), bg_density=draw(st.one_of(st.none(), DENSITY)),
    )
    op = dict(scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
              fg_gain=draw(st.floats(0.25, 4.0)))
    return spec, op


def _run(case, backend, op):
    return tri_source_attention(*case.args, return_lse=True, backend=backend, **op)


def _row(mask, b):
    return None if mask is None else mask[0 if mask.shape[0] == 1 else b]


def _routing(case, b):
    """(query uses fg [Lq] bool, usable fg keys [Lf], usable bg keys [Lb]) for batch row b, from the
    contract's wording."""
    Lf, Lb = case.k_fg.shape[2], case.k_bg.shape[2]
    fg = _row(case.fg_key_mask, b)
    fg = torch.ones(Lf, dtype=torch.bool) if fg is None else fg
    bg = _row(case.bg_key_mask, b)
    bg = torch.ones(Lb, dtype=torch.bool) if bg is None or not bg.any() else bg
    use_fg = _row(case.query_mask, b) & bool(fg.any())
    return use_fg, fg, bg


def _src(x, b):
    return x[0 if x.shape[0] == 1 else b]


@PROPERTY_SETTINGS
@given(specs())
def test_backends_agree_with_formula(make_case, formula, spec_op):
    spec, op = spec_op
    case = make_case(**spec)
    exact, exact_lse = formula(*case.args, **op)
    for backend in BACKENDS:
        out, lse = _run(case, backend, op)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(out, exact, **TOL, msg=lambda m: f"{backend} out: {m}")
        torch.testing.assert_close(lse, exact_lse, **TOL, msg=lambda m: f"{backend} lse: {m}")


@PROPERTY_SETTINGS
@given(specs())
def test_each_row_is_plain_attention_over_its_key_set(make_case, spec_op):
    """Rows outside the query mask (or with no usable fg key) equal plain SDPA over the usable
    background keys; the other rows equal plain SDPA over the usable fg keys with scale·fg_gain."""
    spec, op = spec_op
    case = make_case(**spec)
    D = case.q.shape[-1]
    scale = D ** -0.5 if op["scale"] is None else op["scale"]
    for backend in BACKENDS:
        out, _ = _run(case, backend, op)
        for b in range(case.q.shape[0]):
            use_fg, fg, bg = _routing(case, b)
            q = case.q[b:b + 1]
            plain_bg = F.scaled_dot_product_attention(
                q, _src(case.k_bg, b)[None], _src(case.v_bg, b)[None], attn_mask=bg[None], scale=scale)
            torch.testing.assert_close(out[b, :, ~use_fg], plain_bg[0, :, ~use_fg], **TOL)
            if use_fg.any():
                plain_fg = F.scaled_dot_product_attention(
                    q, _src(case.k_fg, b)[None], _src(case.v_fg, b)[None], attn_mask=fg[None],
                    scale=scale * op["fg_gain"])
                torch.testing.assert_close(out[b, :, use_fg], plain_fg[0, :, use_fg], **TOL)


@PROPERTY_SETTINGS
@given(specs(), st.randoms(use_true_random=False))
def test_key_order_within_a_source_does_not_matter(make_case, spec_op, rnd):
    """Permuting a source's keys together with their values and mask changes nothing."""
    spec, op = spec_op
    case = make_case(**spec)
    pf = torch.tensor(rnd.sample(range(case.k_fg.shape[2]), case.k_fg.shape[2]), dtype=torch.long)
    pb = torch.tensor(rnd.sample(range(case.k_bg.shape[2]), case.k_bg.shape[2]), dtype=torch.long)
    perm = lambda x, p, dim: None if x is None else x.index_select(dim, p)  # noqa: E731
    permuted = type(case)(case.q, perm(case.k_fg, pf, 2), perm(case.v_fg, pf, 2),
                          perm(case.k_bg, pb, 2), perm(case.v_bg, pb, 2), case.query_mask,
                          perm(case.fg_key_mask, pf, 1), perm(case.bg_key_mask, pb, 1))
    for backend in BACKENDS:
        for a, b in zip(_run(case, backend, op), _run(permuted, backend, op)):
            torch.testing.assert_close(a, b, **TOL)


@PROPERTY_SETTINGS
@given(specs(), st.randoms(use_true_random=False))
def test_query_order_permutes_the_output(make_case, spec_op, rnd):
    spec, op = spec_op
    case = make_case(**spec)
    Lq = case.q.shape[2]
    p = torch.tensor(rnd.sample(range(Lq), Lq), dtype=torch.long)
    permuted = case.with_tensors(case.q.index_select(2, p), *case.tensors[1:])
    permuted = type(permuted)(*permuted.args[:5], case.query_mask.index_select(1, p), *case.args[6:])
    for backend in BACKENDS:
        for a, b in zip(_run(case, backend, op), _run(permuted, backend, op)):
            torch.testing.assert_close(a.index_select(2, p), b, **TOL)


@PROPERTY_SETTINGS
@given(specs(), st.floats(-3.0, 3.0))
def test_shifting_all_keys_of_a_source_changes_nothing(make_case, spec_op, shift):
    """k_j + c shifts every logit of row i by the same <q_i, c>: the softmax is unchanged
    (the LSE moves by exactly that amount, so only outputs are compared)."""
    spec, op = spec_op
    case = make_case(**spec)
    c = torch.linspace(-1.0, 1.0, case.q.shape[-1], dtype=torch.float64) * shift
    shifted = case.with_tensors(case.q, case.k_fg + c, case.v_fg, case.k_bg - c, case.v_bg)
    for backend in BACKENDS:
        torch.testing.assert_close(_run(case, backend, op)[0], _run(shifted, backend, op)[0],
                                   rtol=1e-8, atol=1e-9)


@PROPERTY_SETTINGS
@given(specs())
def test_batch_rows_are_independent(make_case, spec_op):
    """Row b of a batched call equals a call on row b alone (sources/masks broadcast correctly)."""
    spec, op = spec_op
    case = make_case(**spec)
    for backend in BACKENDS:
        out, lse = _run(case, backend, op)
        for b in range(case.q.shape[0]):
            one = type(case)(*(None if x is None else x[b:b + 1] if x.shape[0] > 1 else x
                               for x in case.args))
            o, l = _run(one, backend, op)
            torch.testing.assert_close(out[b:b + 1], o, **TOL)
            torch.testing.assert_close(lse[b:b + 1], l, **TOL)


@PROPERTY_SETTINGS
@given(specs())
def test_output_is_a_convex_combination_of_used_values(make_case, spec_op):
    """Each output coordinate lies between the min and max of the values it may attend to."""
    spec, op = spec_op
    case = make_case(**spec)
    for backend in BACKENDS:
        out, _ = _run(case, backend, op)
        for b in range(case.q.shape[0]):
            use_fg, fg, bg = _routing(case, b)
            for rows, v, keys in ((use_fg, _src(case.v_fg, b), fg), (~use_fg, _src(case.v_bg, b), bg)):
                if not rows.any():
                    continue
                lo = v[:, keys].amin(dim=1, keepdim=True)  # (H, 1, D)
                hi = v[:, keys].amax(dim=1, keepdim=True)
                o = out[b][:, rows]
                assert torch.all(o >= lo - 1e-12) and torch.all(o <= hi + 1e-12), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties_are_not_vacuous(backend, make_case):
    """The routing helper above agrees with the op on a case with both sources in use, so the
    property tests compare against something that can disagree."""
    case = make_case(B=2, H=1, Lq=8, Lf=6, Lb=5, D=4, dtype=torch.float64, q_density=0.5,
                     fg_density=0.5, seed=3)
    case.query_mask[:, :2] = torch.tensor([True, False])
    case.fg_key_mask[:, 0] = True
    out = tri_source_attention(*case.args, backend=backend)
    swapped = tri_source_attention(*case.args[:5], ~case.query_mask, *case.args[6:], backend=backend)
    assert not torch.allclose(out, swapped)
