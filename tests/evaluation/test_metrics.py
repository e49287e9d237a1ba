"""Detection metrics: equal to scikit-learn on random and adversarial inputs; AUPRO by hand."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from o2mag.evaluation.metrics import (METRIC_KEYS, aupro, auroc, average_precision, detection_metrics, f1_max,
                                      f1_max_on_grid, image_scores_from_maps, precision_recall, pro_curve)

TOL = 1e-6


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f.max()


def _check_against_sklearn(s, y):
    assert abs(auroc(s, y) - roc_auc_score(y, s)) < TOL
    assert abs(average_precision(s, y) - average_precision_score(y, s)) < TOL
    assert abs(f1_max(s, y) - _sk_f1max(y, s)) < TOL
    p, r, t = precision_recall(s, y)
    P, R, T = precision_recall_curve(y, s)
    np.testing.assert_allclose(p, P, atol=TOL)
    np.testing.assert_allclose(r, R, atol=TOL)
    np.testing.assert_array_equal(t, T)


def _cases():
    rng = np.random.default_rng(0)
    for k in range(6):  # random, with and without heavy ties
        n = int(rng.integers(5, 3000))
        y = rng.random(n) < rng.uniform(0.05, 0.6)
        y[0], y[1] = True, False
        s = rng.normal(size=n) + y * rng.uniform(0, 2)
        yield f"random{k}", (np.round(s, 1) if k % 2 else s), y
    n = 400
    y = np.arange(n) % 7 == 0
    yield "constant", np.full(n, 0.3), y
    yield "two-values", np.where(np.arange(n) % 3 == 0, 1.0, 0.0), y
    yield "perfect", y.astype(float) * 2 - 1, y
    yield "inverted", -(y.astype(float)), y
    yield "single-positive", rng.random(n), np.arange(n) == 17
    yield "single-negative", rng.random(n), np.arange(n) != 17
    # values far outside [0, 1] that a float32 sigmoid would merge into ties
    yield "huge-logits", 50 + np.arange(n, dtype=float) * 1e-3 + y * 0.1, y
    yield "tiny-gaps", 1 + np.arange(n) * 1e-12, y
    yield "negative-range", -1e6 + rng.normal(size=n) * 1e-3 + y * 5e-4, y


@pytest.mark.parametrize("name,s,y", list(_cases()), ids=[c[0] for c in _cases()])
def test_curves_and_scores_equal_sklearn(name, s, y):
    _check_against_sklearn(s, y)


def test_pixel_metrics_adversarial_maps_equal_sklearn():
    """All-negative images, a one-pixel defect, ties and a constant map, pooled like the pipeline."""
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 16, 16), bool)
    masks[0, 5, 7] = True                      # one-pixel defect
    masks[1, 2:9, 3:6] = True
    masks[2, 10:, 10:] = True                  # images 3..5 all negative
    maps = np.round(rng.random(masks.shape), 2)
    maps[masks] += 0.3
    maps[4] = 0.5                               # a constant image
    labels = masks.reshape(6, -1).any(1)
    scores = image_scores_from_maps(torch.from_numpy(maps)).numpy()
    m = detection_metrics(scores, labels, maps, masks)
    assert set(m) == set(METRIC_KEYS)
    assert abs(m["auroc_p"] - roc_auc_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(m["ap_p"] - average_precision_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(m["f1max_p"] - _sk_f1max(masks.ravel(), maps.ravel())) < TOL
    assert abs(m["auroc_i"] - roc_auc_score(labels, scores)) < TOL
    assert abs(m["ap_i"] - average_precision_score(labels, scores)) < TOL
    assert abs(m["f1max_i"] - _sk_f1max(labels, scores)) < TOL
    assert 0 <= m["aupro"] <= 1
    # torch tensors and 0/1 integers are accepted and give the same numbers
    m2 = detection_metrics(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64)),
                           torch.from_numpy(maps), torch.from_numpy(masks.astype(np.uint8)))
    assert m2 == pytest.approx(m, abs=1e-12)


def test_f1_threshold_is_a_score_that_reaches_the_best_f1():
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2])
    y = np.array([0, 0, 1, 1, 1, 0], bool)
    f, t = f1_max(s, y, return_threshold=True)
    pred = s >= t
    tp = (pred & y).sum()
    assert f == pytest.approx(2 * tp / (pred.sum() + y.sum())) and f == pytest.approx(_sk_f1max(y, s))


def test_grid_f1_never_beats_the_exact_curve():
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.1
    s = np.clip(rng.normal(0.3, 0.2, 5000) + y * 0.2, 0, 1)
    assert f1_max_on_grid(s, y) <= f1_max(s, y) + 1e-9
    assert f1_max_on_grid(s, y) < f1_max(s, y) - 1e-4  # the grid misses the best threshold here


# ------------------------------------------------------------------------------------------- AUPRO


def _row_case():
    """1x6 image: regions A = {0, 1} (size 2) and B = {4}; negatives {2, 3, 5}.

    Sorted scores: 0.9 A -> PRO 1/4; 0.8 neg -> FPR 1/3; 0.7 B -> PRO 3/4; 0.5 A -> PRO 1;
    0.3, 0.1 neg -> FPR 2/3, 1. Up to FPR 0.3 the PRO is 1/4 throughout: AUPRO = 0.25.
    Up to 0.5: (1/3 * 1/4 + (0.5 - 1/3) * 1) / 0.5 = 0.5. Up to 1: 1/12 + 2/3 = 0.75.
    """
    masks = np.array([[[1, 1, 0, 0, 1, 0]]], bool)
    scores = np.array([[[0.9, 0.5, 0.8, 0.3, 0.7, 0.1]]])
    return scores, masks


def test_aupro_hand_computed():
    scores, masks = _row_case()
    assert aupro(scores, masks) == pytest.approx(0.25, abs=1e-12)
    assert aupro(scores, masks, fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)
    assert aupro(scores, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    fpr, pro = pro_curve(scores, masks)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1])


def test_aupro_constant_scores_is_the_diagonal():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    # every pixel tied: the curve jumps from (0, 0) to (1, 1); area to 0.3 = 0.3 * 0.3 / 2
    assert aupro(np.zeros(masks.shape), masks) == pytest.approx(0.15, abs=1e-12)


def test_aupro_regions_are_8_connected():
    """Diagonal neighbours form one region: with 4-connectivity the score would be 1/2, not 1/3."""
    masks = np.zeros((1, 3, 3), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    scores = np.full((1, 3, 3), 0.5)
    scores[0, 0, 0], scores[0, 1, 1], scores[0, 1, 2] = 1.0, 0.0, 0.0
    assert aupro(scores, masks) == pytest.approx(1 / 3, abs=1e-12)


def _aupro_brute(scores, masks, limit=0.3):
    """Threshold by threshold, region by region: an independent (slow) AUPRO."""
    from scipy import ndimage

    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    neg = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        xs.append((pred & neg).sum() / neg.sum())
        ys.append(np.mean([pred[i][r].mean() for i, r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    # trapezoids between consecutive points, the last one cut at the limit
    area = 0.0
    for a, b, ya, yb in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if a >= limit:
            break
        hi = min(b, limit)
        y_hi = ya + (yb - ya) * (hi - a) / (b - a) if b > a else yb
        area += (hi - a) * (ya + y_hi) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), bool)
    for i in range(3):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, 17, 2)
            masks[i, y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
    scores = np.round(rng.random(masks.shape) + masks * rng.uniform(0, 0.8), 2)
    for limit in (0.05, 0.3, 1.0):
        assert aupro(scores, masks, limit) == pytest.approx(_aupro_brute(scores, masks, limit), abs=1e-9)


# ------------------------------------------------------------------------------------------- input errors


def _ok():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 1, 1] = True
    return np.array([0.9, 0.1, 0.2]), np.array([1, 0, 0]), np.random.default_rng(0).random((3, 4, 4)), masks


@pytest.mark.parametrize("arg,value,exc,needle", [
    (0, np.array([0.9, 0.1]), ValueError, "image_scores"),
    (0, np.array([0.9, np.nan, 0.2]), ValueError, "NaN"),
    (0, "scores", TypeError, "image_scores"),
    (1, np.array([1, 0, 2]), ValueError, "image_labels"),
    (1, np.array([0, 0, 0]), ValueError, "no positive"),
    (1, np.array([1, 1, 1]), ValueError, "no negative"),
    (2, np.zeros((3, 4, 5)), ValueError, "pixel_scores"),
    (2, np.zeros((3, 16)), ValueError, "pixel_scores"),
    (3, np.zeros((3, 4, 4), bool), ValueError, "pixel_masks has no positive"),
    (3, np.full((3, 4, 4), 0.5), ValueError, "pixel_masks"),
    (3, None, TypeError, "pixel_masks"),
])
def test_bad_input_names_the_argument(arg, value, exc, needle):
    args = list(_ok())
    args[arg] = value
    with pytest.raises(exc, match=needle):
        detection_metrics(*args)


def test_aupro_limit_is_checked():
    scores, masks = _row_case()
    for bad in (0, -0.1, 1.5, "0.3", True):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(scores, masks, fpr_limit=bad)


def test_image_scores_are_max_of_the_21px_mean_pool():
    maps = torch.zeros(2, 32, 32)
    maps[0, 10:15, 10:15] = 1.0          # 25 pixels fully inside one 21x21 window
    maps[1, 0, 0] = 1.0                  # a corner pixel: zero padding counts in the mean
    s = image_scores_from_maps(maps)
    assert s[0].item() == pytest.approx(25 / 441) and s[1].item() == pytest.approx(1 / 441)
