"""masks.morphology on scipy.ndimage against the hand-written versions it replaced.

The oracle below is the previous implementation, kept here (and only here) verbatim: run-length
connected-component labelling with a union-find over runs, hole filling through it, and a
cumulative-sum box blur. The new functions must give the same labels (same numbering), sizes,
largest component and filled masks on random and edge-case masks, and the same blur to float
rounding; the foreground estimate built on them must not change on object images.
"""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from o2mag.masks import foreground, morphology


# ------------------------------------------------------------------- the previous implementation
def old_label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool image: (labels int32 with 0 = background, sizes[label]).

    Works on runs of True pixels per row and a union-find over runs, so the Python loop is over
    runs, not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    sr, sc = np.nonzero(d == 1)
    er, ec = np.nonzero(d == -1)  # ends are exclusive
    n = len(sr)
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, np.zeros(1, dtype=np.int64)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    slack = 1 if connectivity == 8 else 0
    row_start = np.searchsorted(sr, np.arange(h + 1))
    cs, ce = sc.tolist(), ec.tolist()
    for r in range(1, h):
        i, i_end = int(row_start[r - 1]), int(row_start[r])
        j, j_end = i_end, int(row_start[r + 1])
        while i < i_end and j < j_end:
            if cs[i] < ce[j] + slack and cs[j] < ce[i] + slack:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            if ce[i] < ce[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(k) for k in range(n)])
    _, comp = np.unique(roots, return_inverse=True)
    comp = comp.astype(np.int32) + 1
    lengths = ec - sc
    flat_start = sr * w + sc
    offsets = np.repeat(flat_start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    flat = np.arange(int(lengths.sum())) + offsets
    labels.reshape(-1)[flat] = np.repeat(comp, lengths)
    sizes = np.bincount(comp, weights=lengths, minlength=int(comp.max()) + 1).astype(np.int64)
    sizes[0] = 0
    return labels, sizes


def old_largest_component(mask: np.ndarray) -> np.ndarray:
    labels, sizes = old_label(mask, 8)
    if sizes.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == int(np.argmax(sizes))


def old_fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions (4-connected) that do not reach the image border."""
    labels, _ = old_label(~mask, 4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    outside = np.isin(labels, border[border > 0])
    return ~outside


def old_box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur with edge padding (radius 0 = identity)."""
    if radius <= 0:
        return img
    k = 2 * radius + 1
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        p = np.pad(out, pad, mode="edge")
        c = np.cumsum(p, axis=axis)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        out = (hi - lo) / k
    return out


# ---------------------------------------------------------------------------------------- cases
def _edge_cases():
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    yield np.ones((1, 1), bool)
    yield np.zeros((1, 1), bool)
    yield np.eye(6, dtype=bool)  # a diagonal: one component with 8-connectivity, six with 4
    yield np.eye(6, dtype=bool)[::-1]
    yield (np.indices((9, 9)).sum(0) % 2).astype(bool)  # checkerboard
    yield np.array([[1, 0, 1, 1, 0, 1]], bool)  # one row
    yield np.array([[1], [1], [0], [1]], bool)  # one column
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    yield ring  # a hole
    notch = ring.copy()
    notch[5, 2:4] = False
    yield notch  # the hole opens to the outside
    corner = np.zeros((8, 8), bool)
    corner[:3, :3] = True
    corner[0, 0] = False
    yield corner  # background at the border, not a hole
    nested = np.zeros((15, 15), bool)
    nested[1:14, 1:14] = True
    nested[3:12, 3:12] = False
    nested[5:10, 5:10] = True
    nested[7, 7] = False
    yield nested  # a hole holding an island holding a hole


def _random_masks(count=400, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = (int(x) for x in rng.integers(1, 48, 2))
        yield rng.random((h, w)) < rng.uniform(0.05, 0.95)


@pytest.mark.parametrize("source", ["edge", "random"])
def test_components_and_holes_equal_the_previous_implementation(source):
    masks = list(_edge_cases()) if source == "edge" else list(_random_masks())
    for m in masks:
        for conn in (4, 8):
            labels, sizes = morphology.label(m, conn)
            want_labels, want_sizes = old_label(m, conn)
            assert labels.dtype == want_labels.dtype == np.int32 and sizes.dtype == want_sizes.dtype == np.int64
            assert np.array_equal(labels, want_labels) and np.array_equal(sizes, want_sizes), (m, conn)
        assert np.array_equal(morphology.largest_component(m), old_largest_component(m)), m
        filled = morphology.fill_holes(m)
        assert filled.dtype == bool and np.array_equal(filled, old_fill_holes(m)), m


def test_box_blur_equals_the_previous_implementation_to_rounding():
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = (int(x) for x in rng.integers(1, 40, 2))
        img = rng.random((h, w)) * 255
        for radius in (1, 2, 3, 7, 40):  # 40: wider than the image, every pixel reads the edges
            got, want = morphology.box_blur(img, radius), old_box_blur(img, radius)
            assert got.dtype == np.float64 and got.shape == img.shape
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    ints = rng.integers(0, 256, (9, 11)).astype(np.uint8)
    np.testing.assert_allclose(morphology.box_blur(ints, 2), old_box_blur(ints, 2), rtol=1e-12, atol=1e-9)
    assert morphology.box_blur(img, 0) is img  # radius 0: the input itself, as before


def _objects(count=120, seed=2):
    rng = np.random.default_rng(seed)
    for k in range(count):
        size = int(rng.integers(16, 129))
        two_tone = k % 3 == 0  # flat colours: blurred values sit exactly on the threshold's levels
        bg = (25, 25, 25) if two_tone else tuple(int(x) for x in rng.integers(0, 256, 3))
        fg = (210, 190, 160) if two_tone else tuple(int(x) for x in rng.integers(0, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        dx, dy = (int(v) for v in rng.integers(4, size // 2 + 4, 2))
        ImageDraw.Draw(img).ellipse((x0, y0, x0 + dx, y0 + dy), fill=fg)
        a = np.asarray(img).astype(float)
        noise = (0, 3, 8)[k % 3]
        yield np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8) if noise else a.astype(np.uint8)


def test_the_foreground_estimate_does_not_change(monkeypatch):
    images = list(_objects())
    new = [foreground.foreground_mask(im, return_reason=True) for im in images]
    monkeypatch.setattr(foreground, "box_blur", old_box_blur)
    monkeypatch.setattr(foreground, "fill_holes", old_fill_holes)
    monkeypatch.setattr(foreground, "largest_component", old_largest_component)
    for im, (mask, reason) in zip(images, new):
        want, want_reason = foreground.foreground_mask(im, return_reason=True)
        assert reason == want_reason and np.array_equal(mask, want)
    assert sum(r.startswith("otsu") for _, r in new) > len(new) // 3  # the estimate, not only fallbacks
