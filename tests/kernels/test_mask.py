"""The reusable mask object: its tables, its contract, and that every backend honours it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from o2mag_kernels import TriSourceMask, tri_source_attention, tri_source_mask
from o2mag_kernels.mask import true_first
from o2mag_kernels.tools.synthetic import KINDS, grid_of, mask_set
from o2mag_kernels.backends.torch_backend import torch_attention
from tests.kernels.helpers import max_abs_err

try:
    from o2mag_kernels.backends import triton_backend as tb

    TRITON = tb.status(torch.device("cpu"))[0]
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    TRITON = False


def brute_tiles(bg_row: torch.Tensor, size: int):
    """(full tile ids, partial tile ids) of one effective background row, by definition."""
    full, part = [], []
    L = bg_row.numel()
    for t in range(-(-L // size)):
        chunk = bg_row[t * size:(t + 1) * size]
        n = int(chunk.sum())
        if n == size:
            full.append(t)
        elif n > 0:
            part.append(t)
    return full, part


@pytest.mark.parametrize("L", [1, 63, 64, 65, 128, 130, 300])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.97, 1.0])
def test_tables_match_their_definition(L, p):
    g = torch.Generator().manual_seed(L)
    q = torch.rand(3, L, generator=g) < 0.4
    fg = torch.rand(3, L, generator=g) < p
    bg = torch.rand(3, L, generator=g) < p
    bg[1, : L // 2] = False  # a row with a long excluded run
    m = tri_source_mask(q, fg, bg)
    assert m.batch == 3 and (m.Lq, m.Lf, m.Lb) == (L, L, L)
    for b in range(3):
        fg_any = bool(fg[b].any())
        use = q[b] & fg_any
        assert torch.equal(m.use_fg[b], use)
        want_q = torch.cat([use.nonzero().squeeze(1), (~use).nonzero().squeeze(1)])
        assert m.qperm[b].tolist() == want_q.tolist()
        assert int(m.counts[b, 0]) == int(use.sum())
        assert m.fidx[b][: int(fg[b].sum())].tolist() == fg[b].nonzero().squeeze(1).tolist()
        assert int(m.counts[b, 1]) == int(fg[b].sum())
        eff = bg[b] if bg[b].any() else torch.ones_like(bg[b])  # the contract's fallback
        assert torch.equal(m.bg_key_mask[b], eff)
        assert torch.equal(m.bg_bytes[b].bool(), eff)
        for size, col in ((64, 2), (128, 4)):
            full, part = brute_tiles(eff, size)
            nf, npart = int(m.counts[b, col]), int(m.counts[b, col + 1])
            assert (nf, npart) == (len(full), len(part))
            assert m.tiles[size][b, 0, :nf].tolist() == full
            assert m.tiles[size][b, 1, :npart].tolist() == part


def test_true_first_is_stable():
    g = torch.Generator().manual_seed(3)
    for L in (1, 7, 100):
        for p in (0.0, 0.3, 1.0):
            mask = torch.rand(3, L, generator=g) < p
            perm, count = true_first(mask)
            assert perm.dtype == torch.int32 and count.tolist() == mask.sum(1).tolist()
            for b in range(3):
                want = torch.cat([mask[b].nonzero().squeeze(1), (~mask[b]).nonzero().squeeze(1)])
                assert perm[b].tolist() == want.tolist()


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


SYNCING = ("_local_scalar_dense", "nonzero", "item", "is_nonzero", "masked_select", "unique")


def test_built_without_a_host_synchronisation():
    """No op that needs a value on the host (so building never stalls a GPU queue and can be
    captured in a CUDA graph)."""
    q, fg, bg = mask_set("blob", 4, 1024, seed=2)
    for args in ((q, fg, bg), (q, None, None), (q[:1], fg, None), (q, None, bg)):
        with _Ops() as ops:
            tri_source_mask(*args)
        bad = [n for n in ops.names if any(s in n for s in SYNCING)]
        assert not bad, bad


def test_bad_arguments_are_named():
    q = torch.zeros(2, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="query_mask"):
        tri_source_mask(q.float())
    with pytest.raises(TypeError, match="query_mask"):
        tri_source_mask([[True]])
    with pytest.raises(ValueError, match="query_mask"):
        tri_source_mask(q[0])
    with pytest.raises(TypeError, match="fg_key_mask"):
        tri_source_mask(q, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="bg_key_mask"):
        tri_source_mask(q, None, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch sizes"):
        tri_source_mask(q, torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 1"):
        tri_source_mask(torch.zeros(0, 8, dtype=torch.bool))


def _tensors(B, H, Lq, Lf, Lb, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    kf, vf = (torch.randn(1, H, Lf, D, generator=g).to(dtype) for _ in range(2))
    kb, vb = (torch.randn(1, H, Lb, D, generator=g).to(dtype) for _ in range(2))
    return q, kf, vf, kb, vb


def test_a_mask_refuses_calls_it_cannot_serve():
    q, fg, bg = mask_set("scattered", 2, 64, density=0.3, seed=1)
    m = tri_source_mask(q, fg, bg)
    good = _tensors(2, 2, 64, 64, 64, 8)
    tri_source_attention(*good, m, backend="torch")
    with pytest.raises(ValueError, match="fg_key_mask must be None"):
        tri_source_attention(*good, m, fg, backend="torch")
    with pytest.raises(ValueError, match="bg_key_mask must be None"):
        tri_source_attention(*good, m, None, bg, backend="torch")
    with pytest.raises(ValueError, match="batch 2 but q has batch 3"):
        tri_source_attention(*_tensors(3, 2, 64, 64, 64, 8), m, backend="torch")
    with pytest.raises(ValueError, match="64 queries but q has 65"):
        tri_source_attention(*_tensors(2, 2, 65, 64, 64, 8), m, backend="torch")
    with pytest.raises(ValueError, match="64 foreground keys but k_fg has 63"):
        tri_source_attention(*_tensors(2, 2, 64, 63, 64, 8), m, backend="torch")
    with pytest.raises(ValueError, match="64 background keys but k_bg has 70"):
        tri_source_attention(*_tensors(2, 2, 64, 64, 70, 8), m, backend="torch")
    # a batch-1 mask serves any batch; None key masks accept any length
    one = tri_source_mask(q[:1])
    for B, Lf, Lb in ((1, 10, 64), (5, 0, 3), (3, 64, 200)):
        out = tri_source_attention(*_tensors(B, 2, 64, Lf, Lb, 8), one, backend="torch")
        assert out.shape == (B, 2, 64, 8)


BACKENDS = ["reference", "torch-routed", "torch-stitch"] + (["triton"] if TRITON else [])


def _run(backend, *args, **kw):
    if backend.startswith("torch-"):
        from o2mag_kernels.validation import as_mask, validate

        args = (*args, None, None)[:8]
        problem = validate(*args, kw.get("scale"), kw.get("fg_gain", 1.0), "torch")
        return torch_attention(problem, *args[:5], as_mask(problem, *args[5:]), strategy=backend[6:])
    return tri_source_attention(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_mask_serves_heads_dims_dtypes_and_scales(kind, backend, formula):
    """The same mask object across head dims, head counts, dtypes, scales and gains gives what
    the three raw masks give, and matches the float64 formula."""
    L = 130
    qm, fg, bg = mask_set(kind, 3, L, density=0.2, seed=4)
    m = tri_source_mask(qm, fg, bg)
    dtypes = [torch.float32] if backend != "triton" else [torch.float32, torch.float16]
    for D, H, dtype, scale, gain in ((40, 2, dtypes[-1], None, 1 / 0.7), (64, 1, dtypes[0], 0.3, 2.0)):
        t = _tensors(3, H, L, L, L, D, dtype, seed=D)
        with_mask = _run(backend, *t, m, scale=scale, fg_gain=gain)
        raw = _run(backend, *t, qm, fg, bg, scale=scale, fg_gain=gain)
        assert torch.equal(with_mask, raw)
        exact, _ = formula(*t, qm, fg, bg, scale=scale, fg_gain=gain)
        tol = 2e-5 if dtype == torch.float32 else 4e-3
        assert max_abs_err(with_mask, exact) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_foreground_source_with_a_prebuilt_mask(backend, formula):
    """A mask with no foreground key mask meeting Lf = 0: every query takes the background."""
    qm = torch.ones(2, 33, dtype=torch.bool)
    m = tri_source_mask(qm)
    t = _tensors(2, 2, 33, 0, 31, 40)
    exact, _ = formula(*t, qm)
    assert max_abs_err(_run(backend, *t, m), exact) <= 2e-5


def test_host_facts_are_read_once():
    q, fg, bg = mask_set("blob", 2, 256, seed=3)
    m = tri_source_mask(q, fg, bg)
    first = m.host()
    assert m.host() is first
    assert first["n_qfg"] == m.counts[:, 0].tolist()
    assert isinstance(m, TriSourceMask) and "Lq=256" in repr(m)


def test_synthetic_blob_masks_look_like_grafting_masks():
    """Blob masks: each target covers about the asked density, is one connected region, and the
    background keys are the complement of the target's mask."""
    q, fg, bg = mask_set("blob", 4, 4096, density=0.05, seed=0)
    h, w = grid_of(4096)
    assert (h, w) == (64, 64)
    frac = q.float().mean(1)
    assert ((frac > 0.025) & (frac < 0.1)).all(), frac
    assert 0.03 < float(fg.float().mean()) < 0.07
    assert torch.equal(bg, ~q)
    for row in q:  # 4-connected: a flood fill from one pixel reaches all of it
        grid = row.view(h, w)
        seen = torch.zeros_like(grid)
        stack = [tuple(grid.nonzero()[0].tolist())]
        while stack:
            y, x = stack.pop()
            if 0 <= y < h and 0 <= x < w and grid[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        assert torch.equal(seen, grid)
    with pytest.raises(ValueError, match="kind"):
        mask_set("stripes", 1, 64)
