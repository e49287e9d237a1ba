"""KID and IC-LPIPS on injected networks; pretrained loaders up to the missing weight file."""
import numpy as np
import pytest
import torch
from torchmetrics.image.kid import poly_mmd

from o2mag.errors import InputError, MissingInputError
from o2mag.evaluation import backbones
from o2mag.evaluation.quality import extract_features, ic_lpips, kid, nearest_assignment


def _feats(n, d=16, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    a, b = _feats(200, seed=0), _feats(200, seed=1)
    same = kid(a, b, subset_size=100, subsets=50)
    shifted = kid(a, _feats(200, shift=1.0, seed=2), subset_size=100, subsets=50)
    assert abs(same["kid_mean"]) < 0.02
    assert shifted["kid_mean"] > 0.2 and shifted["kid_mean"] > 10 * abs(same["kid_mean"])
    # the very same features: the unbiased estimator pairs each x with itself in the cross term,
    # a -O(1/m) bias, still tiny against a real shift
    ident = kid(a, a, subset_size=200, subsets=3)
    assert abs(ident["kid_mean"]) < 0.02 * shifted["kid_mean"]


def test_kid_is_the_unbiased_cubic_mmd_on_whole_sets():
    """With the subset as large as both sets, every subset is the whole set: one exact value."""
    a, b = _feats(30, seed=3), _feats(30, shift=0.5, seed=4)
    k = kid(a, b, subset_size=1000, subsets=4)
    # hand formula: k(x, y) = (x.y / d + 1) ** 3; unbiased MMD^2
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m = a.shape[0]
    want = ((kxx.sum() - kxx.diag().sum()) + (kyy.sum() - kyy.diag().sum())) / (m * (m - 1)) - 2 * kxy.mean()
    assert k["kid_mean"] == pytest.approx(float(want), rel=1e-9)
    assert k["kid_std"] == pytest.approx(0.0, abs=1e-9)
    assert float(poly_mmd(a, b)) == pytest.approx(float(want), rel=1e-9)


def test_kid_subset_size_never_exceeds_the_samples_and_is_repeatable():
    a, b = _feats(7), _feats(12, shift=0.3, seed=5)
    k = kid(a, b, subset_size=1000, subsets=5)
    assert k["subset_size"] == 7 and k["n_real"] == 7 and k["n_fake"] == 12
    assert kid(a, b, subset_size=5, subsets=5, seed=1)["subset_size"] == 5
    assert kid(a, b, subset_size=5, subsets=5, seed=1) == kid(a, b, subset_size=5, subsets=5, seed=1)
    state = torch.get_rng_state()
    kid(a, b, subset_size=5, subsets=5)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("kwargs,needle", [
    (dict(real_features=torch.zeros(1, 4)), "at least 2"),
    (dict(fake_features=torch.zeros(5, 3)), "dims"),
    (dict(real_features=np.zeros((5, 4))), "torch.Tensor"),
    (dict(subset_size=1), "subset_size"),
    (dict(subsets=0), "subsets"),
])
def test_kid_bad_input(kwargs, needle):
    args = dict(real_features=_feats(5, 4), fake_features=_feats(5, 4, seed=1))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=needle):
        kid(**args)


def _l1(x, y):
    """A transparent 'perceptual' distance: mean absolute difference, per pair."""
    return (x - y).abs().mean(dim=(1, 2, 3))


def test_ic_lpips_hand_computed():
    """Two references (black, white); generated greys 0.1, 0.2 near black and 0.8, 0.9, 1.0 near white.

    In [-1, 1] a grey g becomes 2g - 1, so the L1 distance between greys a and b is 2|a - b|.
    Black cluster: one pair, 2 * 0.1 = 0.2. White cluster: pairs 0.2, 0.4, 0.2 -> 0.8 / 3.
    IC = (0.2 + 0.8 / 3) / 2.
    """
    grey = lambda v: torch.full((1, 3, 4, 4), v)  # noqa: E731
    refs = torch.cat([grey(0.0), grey(1.0)])
    gen = torch.cat([grey(v) for v in (0.1, 0.2, 0.8, 0.9, 1.0)])
    assert nearest_assignment(gen, refs, _l1).tolist() == [0, 0, 1, 1, 1]
    r = ic_lpips(gen, refs, _l1, batch_size=2)
    assert r["cluster_sizes"] == [2, 3] and r["used_clusters"] == 2
    assert r["ic_lpips"] == pytest.approx((0.2 + 0.8 / 3) / 2, rel=1e-6)


def test_ic_lpips_scales_both_sides_alike():
    """Identical generated images have zero diversity whatever the references look like."""
    gen = torch.rand(1, 3, 8, 8).repeat(4, 1, 1, 1)
    assert ic_lpips(gen, torch.rand(2, 3, 8, 8), _l1)["ic_lpips"] == pytest.approx(0.0, abs=1e-12)


def test_ic_lpips_errors():
    gen, refs = torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ic_lpips(gen * 3, refs, _l1)
    with pytest.raises(ValueError, match="resize"):
        ic_lpips(gen, torch.rand(2, 3, 4, 4), _l1)
    two = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    with pytest.raises(ValueError, match="no cluster"):
        ic_lpips(two, two, _l1)  # each generated image sits alone with its own reference
    with pytest.raises(TypeError, match="distance"):
        ic_lpips(gen, refs, "lpips")


def test_tiny_networks_run_through_the_metrics():
    imgs = torch.rand(6, 3, 32, 32)
    f = extract_features(imgs, backbones.tiny_feature_extractor(0), batch_size=4)
    assert f.shape == (6, 64) and f.dtype == torch.float64
    d = backbones.tiny_distance(0)
    r = ic_lpips(imgs, imgs[:2], d, batch_size=4)
    assert r["ic_lpips"] > 0 and sum(r["cluster_sizes"]) == 6


# ------------------------------------------------------------------------------ pretrained loaders


@pytest.mark.parametrize("loader,kind", [
    (lambda: backbones.inception_extractor(), "inception"),
    (lambda: backbones.lpips_distance("alex"), "alex"),
    (lambda: backbones.lpips_distance("vgg"), "vgg"),
    (lambda: backbones.resnet34_classifier(3), "resnet34"),
])
def test_pretrained_loaders_name_the_missing_file(loader, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingInputError) as e:
        loader()
    msg = str(e.value)
    assert backbones.WEIGHT_FILES[kind] in msg and str(tmp_path) in msg and "\n" not in msg


def test_explicit_weights_path_must_exist(tmp_path):
    with pytest.raises(MissingInputError, match="resnet34 weights file not found"):
        backbones.resnet34_classifier(3, weights=tmp_path / "nope.pth")


def test_present_file_then_needs_the_optional_packages(tmp_path, monkeypatch):
    """With the weight file in the hub cache, the next step is importing torchvision/torch-fidelity:
    where they are absent (this CPU torch build has no matching torchvision) the error says how to
    install them; where present, the weights load (checked on machines that have them)."""
    import importlib.util

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / backbones.WEIGHT_FILES["resnet34"]).write_bytes(b"not a state dict")
    assert backbones.weights_file("resnet34") == ckpt / backbones.WEIGHT_FILES["resnet34"]
    has_tv = importlib.util.find_spec("torchvision") is not None
    with pytest.raises(InputError, match="o2mag\\[eval\\]" if not has_tv else "cannot read weights"):
        backbones.resnet34_classifier(3)
