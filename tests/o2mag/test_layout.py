"""BranchLayout is the only owner of the batch order: [reference, normal, targets] x [uncond, cond]."""
import pytest
import torch

from o2mag import BranchLayout


def test_row_order_with_cfg():
    lay = BranchLayout(num_targets=3)
    assert lay.batch_size == 10 and lay.num_halves == 2 and lay.halves == ("uncond", "cond")
    assert lay.reference_rows == [0, 5] and lay.normal_rows == [1, 6]
    assert lay.target_rows == [2, 3, 4, 7, 8, 9]
    assert lay.rows("target", "cond") == [7, 8, 9] and lay.rows("target", 0, target=2) == [4]
    assert lay.target_slice("cond") == slice(7, 10) and lay.source_slice(1) == slice(5, 7)
    assert lay.half_slice(0) == slice(0, 5) and lay.cond_half == 1


def test_row_order_without_cfg_and_replay():
    lay = BranchLayout(2, cfg=False)
    assert lay.batch_size == 4 and lay.halves == ("cond",) and lay.cond_half == 0
    assert (lay.reference_rows, lay.normal_rows, lay.target_rows) == ([0], [1], [2, 3])
    rep = BranchLayout(2, include_sources=False)
    assert rep.batch_size == 4 and rep.target_rows == [0, 1, 2, 3] and rep.target_slice(1) == slice(2, 4)
    assert BranchLayout(5).for_replay(2) == rep
    with pytest.raises(ValueError, match="include_sources"):
        rep.rows("reference")


def test_assemble_and_split_round_trip():
    lay = BranchLayout(3)
    ref, nor = torch.tensor([[10.0], [20.0]]), torch.tensor([[11.0], [21.0]])
    tg = torch.tensor([[12.0], [13.0], [14.0], [22.0], [23.0], [24.0]])
    x = lay.assemble(reference=ref, normal=nor, targets=tg)
    assert x[:, 0].tolist() == [10, 11, 12, 13, 14, 20, 21, 22, 23, 24]
    parts = lay.split(x)
    assert torch.equal(parts.reference, ref) and torch.equal(parts.normal, nor)
    assert torch.equal(parts.targets, tg)
    # one row shared by both halves (e.g. latents), along another dim
    shared = lay.assemble(reference=torch.zeros(1, 4, 2), normal=torch.ones(1, 4, 2),
                          targets=torch.full((3, 4, 2), 7.0))
    assert shared.shape == (10, 4, 2) and shared[5].sum() == 0 and shared[6].mean() == 1
    y = lay.assemble(reference=ref.T, normal=nor.T, targets=tg.T, dim=1)
    assert torch.equal(y, x.T)
    rep = BranchLayout(3, include_sources=False)
    assert torch.equal(rep.assemble(targets=tg), tg) and torch.equal(rep.split(tg).targets, tg)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(num_targets=0), ValueError, "num_targets"),
    (dict(num_targets=True), TypeError, "num_targets"),
    (dict(num_targets=2.0), TypeError, "num_targets"),
    (dict(num_targets=1, cfg=1), TypeError, "cfg"),
    (dict(num_targets=1, include_sources="no"), TypeError, "include_sources"),
])
def test_constructor_validation(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        BranchLayout(**kwargs)


def test_assemble_and_split_validation():
    lay = BranchLayout(2)
    with pytest.raises(ValueError, match="targets"):
        lay.assemble(reference=torch.zeros(1), normal=torch.zeros(1), targets=torch.zeros(3))
    with pytest.raises(ValueError, match="reference and normal"):
        lay.assemble(targets=torch.zeros(2))
    with pytest.raises(ValueError, match="None"):
        BranchLayout(2, include_sources=False).assemble(reference=torch.zeros(1), targets=torch.zeros(2))
    with pytest.raises(ValueError, match="rows"):
        lay.split(torch.zeros(7))
    with pytest.raises(ValueError, match="half"):
        lay.target_slice("conditional")
    with pytest.raises(ValueError, match="branch"):
        lay.rows("anomaly")
