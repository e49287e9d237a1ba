"""Every bad argument of ``tri_source_attention`` fails early with the right type and names itself.

Each case mutates one argument of a valid call. The error must be ``TypeError``/``ValueError`` as
listed, its message must name the offending argument, and it must be raised for every backend name
(validation runs before dispatch, so even ``backend="triton"`` on a machine without a GPU reports
the bad argument, not the missing GPU).
"""
from __future__ import annotations

import re

import pytest
import torch

from o2mag_kernels import tri_source_attention

B, H, LQ, LF, LB, D = 2, 2, 6, 5, 7, 8
ALL_BACKENDS = ("auto", "torch", "reference", "triton")


def valid_call():
    """Positional args and keyword args of a call that succeeds."""
    g = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(B, H, LQ, D, generator=g),
        k_fg=torch.randn(B, H, LF, D, generator=g), v_fg=torch.randn(B, H, LF, D, generator=g),
        k_bg=torch.randn(1, H, LB, D, generator=g), v_bg=torch.randn(1, H, LB, D, generator=g),
        query_mask=torch.rand(B, LQ, generator=g) < 0.5,
        fg_key_mask=torch.rand(B, LF, generator=g) < 0.5,
        bg_key_mask=torch.rand(1, LB, generator=g) < 0.5,
    )
    return args, dict(scale=None, fg_gain=1.0)


def call(args, kwargs, backend):
    order = ("q", "k_fg", "v_fg", "k_bg", "v_bg", "query_mask", "fg_key_mask", "bg_key_mask")
    return tri_source_attention(*(args[n] for n in order), backend=backend, **kwargs)


def _set(name, value):
    def mutate(args, kwargs):
        (args if name in args else kwargs)[name] = value(args) if callable(value) else value
    return mutate


def _cast(name, dtype):
    return _set(name, lambda a: a[name].to(dtype))


def _meta(name):
    return _set(name, lambda a: a[name].to("meta"))


# id -> (mutation, exception type, argument name the message must contain)
BAD = {
    # non-tensor arguments
    "q-list": (_set("q", lambda a: a["q"].tolist()), TypeError, "q"),
    "k_fg-none": (_set("k_fg", None), TypeError, "k_fg"),
    "v_fg-float": (_set("v_fg", 1.0), TypeError, "v_fg"),
    "k_bg-ndarray": (_set("k_bg", lambda a: a["k_bg"].numpy()), TypeError, "k_bg"),
    "v_bg-none": (_set("v_bg", None), TypeError, "v_bg"),
    "query_mask-none": (_set("query_mask", None), TypeError, "query_mask"),
    "query_mask-list": (_set("query_mask", lambda a: a["query_mask"].tolist()), TypeError, "query_mask"),
    "fg_key_mask-list": (_set("fg_key_mask", lambda a: a["fg_key_mask"].tolist()), TypeError,
                         "fg_key_mask"),
    "bg_key_mask-ndarray": (_set("bg_key_mask", lambda a: a["bg_key_mask"].numpy()), TypeError,
                            "bg_key_mask"),
    # wrong number of dimensions
    "q-3d": (_set("q", lambda a: a["q"][0]), ValueError, "q"),
    "k_fg-5d": (_set("k_fg", lambda a: a["k_fg"][None]), ValueError, "k_fg"),
    "v_fg-3d": (_set("v_fg", lambda a: a["v_fg"][0]), ValueError, "v_fg"),
    "k_bg-3d": (_set("k_bg", lambda a: a["k_bg"][0]), ValueError, "k_bg"),
    "v_bg-5d": (_set("v_bg", lambda a: a["v_bg"][None]), ValueError, "v_bg"),
    # dtypes
    "q-int": (_cast("q", torch.int32), TypeError, "q"),
    "q-complex": (_cast("q", torch.complex64), TypeError, "q"),
    "k_fg-float64": (_cast("k_fg", torch.float64), TypeError, "k_fg"),
    "v_fg-float16": (_cast("v_fg", torch.float16), TypeError, "v_fg"),
    "k_bg-bfloat16": (_cast("k_bg", torch.bfloat16), TypeError, "k_bg"),
    "v_bg-int64": (_cast("v_bg", torch.int64), TypeError, "v_bg"),
    # devices (the meta device stands in for a second device on a CPU-only machine)
    "k_fg-other-device": (_meta("k_fg"), ValueError, "k_fg"),
    "v_fg-other-device": (_meta("v_fg"), ValueError, "v_fg"),
    "k_bg-other-device": (_meta("k_bg"), ValueError, "k_bg"),
    "v_bg-other-device": (_meta("v_bg"), ValueError, "v_bg"),
    "query_mask-other-device": (_meta("query_mask"), ValueError, "query_mask"),
    "fg_key_mask-other-device": (_meta("fg_key_mask"), ValueError, "fg_key_mask"),
    "bg_key_mask-other-device": (_meta("bg_key_mask"), ValueError, "bg_key_mask"),
    # masks: dtype, ndim, batch, length
    "query_mask-uint8": (_cast("query_mask", torch.uint8), TypeError, "query_mask"),
    "query_mask-float": (_cast("query_mask", torch.float32), TypeError, "query_mask"),
    "fg_key_mask-int": (_cast("fg_key_mask", torch.int64), TypeError, "fg_key_mask"),
    "bg_key_mask-float": (_cast("bg_key_mask", torch.float32), TypeError, "bg_key_mask"),
    "query_mask-1d": (_set("query_mask", lambda a: a["query_mask"][0]), ValueError, "query_mask"),
    "fg_key_mask-3d": (_set("fg_key_mask", lambda a: a["fg_key_mask"][None]), ValueError, "fg_key_mask"),
    "bg_key_mask-1d": (_set("bg_key_mask", lambda a: a["bg_key_mask"][0]), ValueError, "bg_key_mask"),
    "query_mask-length": (_set("query_mask", torch.ones(B, LQ + 1, dtype=torch.bool)), ValueError,
                          "query_mask"),
    "fg_key_mask-length": (_set("fg_key_mask", torch.ones(B, LF - 1, dtype=torch.bool)), ValueError,
                           "fg_key_mask"),
    "bg_key_mask-length": (_set("bg_key_mask", torch.ones(1, LQ, dtype=torch.bool)), ValueError,
                           "bg_key_mask"),
    "query_mask-batch": (_set("query_mask", torch.ones(B + 1, LQ, dtype=torch.bool)), ValueError,
                         "query_mask"),
    "fg_key_mask-batch": (_set("fg_key_mask", torch.ones(3, LF, dtype=torch.bool)), ValueError,
                          "fg_key_mask"),
    "bg_key_mask-batch-0": (_set("bg_key_mask", torch.ones(0, LB, dtype=torch.bool)), ValueError,
                            "bg_key_mask"),
    # source batch, heads, head dim, v shape, empty background
    "k_fg-batch": (_set("k_fg", lambda a: torch.randn(3, H, LF, D)), ValueError, "k_fg"),
    "k_bg-batch": (_set("k_bg", lambda a: torch.randn(3, H, LB, D)), ValueError, "k_bg"),
    "k_fg-heads": (_set("k_fg", lambda a: torch.randn(B, H + 1, LF, D)), ValueError, "k_fg"),
    "k_bg-heads": (_set("k_bg", lambda a: torch.randn(1, 1, LB, D)), ValueError, "k_bg"),
    "k_fg-head-dim": (_set("k_fg", lambda a: torch.randn(B, H, LF, D + 1)), ValueError, "k_fg"),
    "k_bg-head-dim": (_set("k_bg", lambda a: torch.randn(1, H, LB, D // 2)), ValueError, "k_bg"),
    "v_fg-length": (_set("v_fg", lambda a: torch.randn(B, H, LF + 1, D)), ValueError, "v_fg"),
    "v_fg-batch": (_set("v_fg", lambda a: torch.randn(1, H, LF, D)), ValueError, "v_fg"),
    "v_bg-head-dim": (_set("v_bg", lambda a: torch.randn(1, H, LB, D + 8)), ValueError, "v_bg"),
    "k_bg-empty": (lambda a, k: a.update(k_bg=torch.randn(1, H, 0, D), v_bg=torch.randn(1, H, 0, D),
                                         bg_key_mask=None), ValueError, "k_bg"),
    "q-empty-batch": (_set("q", torch.randn(0, H, LQ, D)), ValueError, "q"),
    "q-empty-heads": (lambda a, k: a.update(q=torch.randn(B, 0, LQ, D), k_fg=torch.randn(B, 0, LF, D),
                                            v_fg=torch.randn(B, 0, LF, D), k_bg=torch.randn(1, 0, LB, D),
                                            v_bg=torch.randn(1, 0, LB, D)), ValueError, "q"),
    "q-zero-head-dim": (lambda a, k: a.update(q=torch.randn(B, H, LQ, 0), k_fg=torch.randn(B, H, LF, 0),
                                              v_fg=torch.randn(B, H, LF, 0), k_bg=torch.randn(1, H, LB, 0),
                                              v_bg=torch.randn(1, H, LB, 0)), ValueError, "q"),
    # scale and fg_gain
    "scale-zero": (_set("scale", 0.0), ValueError, "scale"),
    "scale-negative": (_set("scale", -0.125), ValueError, "scale"),
    "scale-nan": (_set("scale", float("nan")), ValueError, "scale"),
    "scale-inf": (_set("scale", float("inf")), ValueError, "scale"),
    "scale-str": (_set("scale", "0.125"), TypeError, "scale"),
    "scale-bool": (_set("scale", True), TypeError, "scale"),
    "scale-vector": (_set("scale", torch.ones(2)), TypeError, "scale"),
    "fg_gain-zero": (_set("fg_gain", 0), ValueError, "fg_gain"),
    "fg_gain-negative": (_set("fg_gain", -1.0), ValueError, "fg_gain"),
    "fg_gain-nan": (_set("fg_gain", float("nan")), ValueError, "fg_gain"),
    "fg_gain-inf": (_set("fg_gain", float("inf")), ValueError, "fg_gain"),
    "fg_gain-none": (_set("fg_gain", None), TypeError, "fg_gain"),
    "fg_gain-tensor-nan": (_set("fg_gain", torch.tensor(float("nan"))), ValueError, "fg_gain"),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_argument_is_named(bad, backend):
    mutate, exc_type, name = BAD[bad]
    args, kwargs = valid_call()
    mutate(args, kwargs)
    with pytest.raises(exc_type) as info:
        call(args, kwargs, backend)
    # The argument's name as a word ("q" must not merely occur inside "query_mask").
    assert re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", str(info.value)), str(info.value)


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, 3])
def test_unknown_backend(backend):
    args, kwargs = valid_call()
    with pytest.raises(ValueError, match="backend"):
        call(args, kwargs, backend)


def test_valid_call_passes_for_cpu_backends():
    """The unmutated call is valid, so every failure above comes from the one mutation."""
    args, kwargs = valid_call()
    for backend in ("auto", "torch", "reference"):
        assert call(args, kwargs, backend).shape == (B, H, LQ, D)


@pytest.mark.parametrize("value", [0.25, 2, torch.tensor(0.25), torch.tensor([2.0])])
def test_number_like_scale_and_gain_accepted(value):
    """Python ints and one-element tensors count as numbers (a config may hold either)."""
    args, _ = valid_call()
    ref = call(args, dict(scale=float(value), fg_gain=float(value)), "reference")
    out = call(args, dict(scale=value, fg_gain=value), "torch")
    torch.testing.assert_close(out, ref)


def test_optional_key_masks_and_broadcast_masks_are_valid():
    """None key masks and batch-1 masks are part of the contract, not errors."""
    args, kwargs = valid_call()
    args.update(fg_key_mask=None, bg_key_mask=None, query_mask=args["query_mask"][:1])
    assert call(args, kwargs, "torch").shape == (B, H, LQ, D)


def test_nothing_runs_before_validation(monkeypatch):
    """A bad argument is reported before any backend is entered."""
    from o2mag_kernels.backends import REGISTRY

    def boom(*a, **k):
        raise AssertionError("backend ran before validation")

    for name in REGISTRY:
        monkeypatch.setitem(REGISTRY, name, boom)
    args, kwargs = valid_call()
    args["bg_key_mask"] = args["bg_key_mask"].float()
    for backend in ALL_BACKENDS:
        with pytest.raises(TypeError, match="bg_key_mask"):
            call(args, kwargs, backend)
