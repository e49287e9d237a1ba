"""Target masks (affine copies of M_R, Perlin blobs, folders), foreground estimation, the
morphology helpers beneath them (tests/o2mag/test_morphology.py compares those with the code they
replaced), and image/mask loading."""

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from o2mag.masks import foreground, images, morphology, targets
from o2mag.errors import InputError, MissingInputError

H = W = 128


def _bfs_count(mask, conn):
    """Slow, obviously-correct component count to check the run-based labelling against."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    nbrs = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if conn == 8:
        nbrs += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    count, sizes = 0, []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                count += 1
                stack, n = [(y, x)], 0
                seen[y, x] = True
                while stack:
                    a, b = stack.pop()
                    n += 1
                    for dy, dx in nbrs:
                        u, v = a + dy, b + dx
                        if 0 <= u < h and 0 <= v < w and mask[u, v] and not seen[u, v]:
                            seen[u, v] = True
                            stack.append((u, v))
                sizes.append(n)
    return count, sorted(sizes)


@pytest.mark.parametrize("conn", [4, 8])
def test_label_matches_flood_fill(conn):
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((13, 19)) < rng.uniform(0.2, 0.7)
        labels, sizes = morphology.label(m, conn)
        count, bfs_sizes = _bfs_count(m, conn)
        assert len(sizes) - 1 == count
        assert sorted(sizes[1:].tolist()) == bfs_sizes
        assert ((labels > 0) == m).all()


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((20, 20), bool)
    ring[4:16, 4:16] = True
    ring[7:13, 7:13] = False
    notch = ring.copy()
    notch[10, 4] = notch[10, 5] = notch[10, 6] = False  # opens the hole to the outside
    filled = morphology.fill_holes(ring)
    assert filled[4:16, 4:16].all() and filled.sum() == 144
    assert (morphology.fill_holes(notch) == notch).all()


def _object_image(dark_background=True, size=H, noise=8.0, hole=True):
    bg, fg = ((25, 25, 25), (210, 190, 160)) if dark_background else ((230, 230, 230), (60, 50, 40))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    d.ellipse((30, 24, 100, 104), fill=fg)
    if hole:
        d.ellipse((58, 56, 72, 70), fill=bg)
    truth = np.zeros((size, size), bool)
    tdraw = Image.new("L", (size, size), 0)
    ImageDraw.Draw(tdraw).ellipse((30, 24, 100, 104), fill=255)
    truth = np.asarray(tdraw) > 127
    arr = np.asarray(img).astype(float) + np.random.default_rng(1).normal(0, noise, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), truth


@pytest.mark.parametrize("dark_background", [True, False])
def test_foreground_otsu_finds_object_and_fills_holes(dark_background):
    arr, truth = _object_image(dark_background)
    fg, reason = foreground.foreground_mask(arr, return_reason=True)
    assert reason.startswith("otsu")
    iou = (fg & truth).sum() / (fg | truth).sum()
    assert iou > 0.95
    assert fg[63, 65]  # the hole in the object is filled
    assert not fg[2, 2]
    assert (foreground.foreground_mask(Image.fromarray(arr)) == fg).all()


def test_foreground_fallbacks_to_all_ones():
    rng = np.random.default_rng(2)
    texture = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    fg, reason = foreground.foreground_mask(texture, return_reason=True)
    assert fg.all() and "border" in reason
    fg, reason = foreground.foreground_mask(np.full((32, 32, 3), 90, np.uint8), return_reason=True)
    assert fg.all() and "constant" in reason
    tiny = np.full((100, 100, 3), 20, np.uint8)
    tiny[50:54, 50:54] = 250
    fg, reason = foreground.foreground_mask(tiny, return_reason=True)
    assert fg.all() and "only" in reason
    assert foreground.foreground_mask(_object_image()[0], "all").all()


def test_foreground_bad_arguments():
    arr, _ = _object_image()
    with pytest.raises(ValueError, match="method"):
        foreground.foreground_mask(arr, "kmeans")
    with pytest.raises(TypeError, match="uint8"):
        foreground.foreground_mask(arr.astype(np.float32))
    with pytest.raises(ValueError, match="normal_image"):
        foreground.foreground_mask(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="min_fraction"):
        foreground.foreground_mask(arr, min_fraction=2.0)


def test_resolve_foreground_specs(tmp_path):
    arr, truth = _object_image()
    assert foreground.resolve_foreground(None, arr).all()
    assert foreground.resolve_foreground("all", shape=(5, 6)).shape == (5, 6)
    assert (foreground.resolve_foreground("otsu", arr) == foreground.foreground_mask(arr)).all()
    half = foreground.resolve_foreground("otsu", arr, (64, 64))
    assert half.shape == (64, 64) and (half == foreground.foreground_mask(arr)[::2, ::2]).mean() > 0.97
    Image.fromarray(truth.astype(np.uint8) * 255).resize((64, 64), Image.NEAREST).save(tmp_path / "fg.png")
    from_file = foreground.resolve_foreground(tmp_path / "fg.png", arr)
    assert from_file.shape == truth.shape and (from_file & truth).sum() / (from_file | truth).sum() > 0.9
    assert (foreground.resolve_foreground(truth, arr) == truth).all()
    with pytest.raises(ValueError, match="shape"):
        foreground.resolve_foreground(truth[:10], arr)
    with pytest.raises(InputError, match="empty"):
        foreground.resolve_foreground(np.zeros_like(truth), arr)
    with pytest.raises(ValueError, match="normal_image"):
        foreground.resolve_foreground("otsu")


def _ref_mask():
    """An asymmetric L-shaped defect, so flips and rotations are visible."""
    ref = np.zeros((H, W), bool)
    ref[40:70, 30:36] = True
    ref[64:70, 30:50] = True
    return ref


def _crop(m):
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_affine_masks_deterministic_and_seed_dependent():
    ref = _ref_mask()
    a = targets.affine_masks(ref, 6, seed=11)
    b = targets.affine_masks(ref, 6, seed=11)
    c = targets.affine_masks(ref, 6, seed=12)
    assert all((x.mask == y.mask).all() and x.params == y.params for x, y in zip(a, b))
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(a, c))
    assert len({tuple(m.params["center"]) for m in a}) > 1  # masks differ between indices
    # mask i depends only on (seed, i): resuming with a list of indices gives the same masks
    again = targets.affine_masks(ref, [4, 1], seed=11)
    assert (again[0].mask == a[4].mask).all() and again[1].params == a[1].params
    assert targets.affine_masks(ref, 0, seed=1) == []


def test_affine_masks_params_and_geometry():
    ref = _ref_mask()
    area = ref.sum()
    for tm in targets.affine_masks(ref, 10, seed=3, scale=(0.8, 1.2)):
        p = tm.params
        json.dumps(p)  # manifest-ready
        assert p["kind"] == "affine" and p["seed"] == 3 and p["tries"] >= 1
        assert set(p) >= {"angle", "scale", "flip", "shift", "center", "area"}
        assert tm.mask.dtype == bool and tm.mask.shape == ref.shape
        assert p["area"] == tm.mask.sum() > 0
        assert 0.7 * area * p["scale"] ** 2 < tm.mask.sum() < 1.4 * area * p["scale"] ** 2


def test_affine_pure_translation_and_rotation_are_exact():
    ref = _ref_mask()
    for tm in targets.affine_masks(ref, 4, seed=5, rotation=(0, 0), scale=(1, 1), flip=False):
        assert np.array_equal(_crop(tm.mask), _crop(ref))
        assert tm.params["angle"] == 0 and tm.params["flip"] is False
    for tm in targets.affine_masks(ref, 4, seed=5, rotation=(90, 90), scale=(1, 1), flip=False):
        crop = _crop(tm.mask)
        assert np.array_equal(crop, np.rot90(_crop(ref), 1)) or np.array_equal(crop, np.rot90(_crop(ref), -1))


def test_affine_flip_mirrors_the_defect():
    ref = _ref_mask()
    masks = targets.affine_masks(ref, 16, seed=9, rotation=(0, 0), scale=(1, 1), flip=True)
    flips = {tm.params["flip"] for tm in masks}
    assert flips == {True, False}
    for tm in masks:
        expected = _crop(ref)[:, ::-1] if tm.params["flip"] else _crop(ref)
        assert np.array_equal(_crop(tm.mask), expected)


def test_affine_thin_line_survives_shrinking():
    ref = np.zeros((H, W), bool)
    idx = np.arange(30, 90)
    ref[idx, idx] = True  # one-pixel diagonal scratch
    for tm in targets.affine_masks(ref, 8, seed=1, scale=(0.7, 0.7)):
        _, sizes = morphology.label(tm.mask, 8)
        assert len(sizes) == 2  # one connected piece


def test_affine_masks_stay_inside_foreground_and_off_border():
    arr, _ = _object_image()
    fg = foreground.foreground_mask(arr)
    ref = np.zeros((H, W), bool)
    ref[10:14, 10:30] = True
    frame = morphology.border_frame((H, W), morphology.frame_width((H, W)))
    for tm in targets.affine_masks(ref, 12, foreground=fg, seed=4, min_inside=0.5, max_border_touch=0.0):
        assert not (tm.mask & ~fg).any()
        assert not (tm.mask & frame).any()
        assert tm.params["inside_foreground"] >= 0.5


def test_affine_rejections_raise_clear_errors():
    ref = _ref_mask()
    with pytest.raises(InputError, match="empty"):
        targets.affine_masks(np.zeros((H, W), bool), 1)
    small_fg = np.zeros((H, W), bool)
    small_fg[60:64, 60:64] = True  # far smaller than the defect
    with pytest.raises(InputError, match="no valid placement.*foreground"):
        targets.affine_masks(ref, 1, foreground=small_fg, seed=0, max_tries=20)
    big = np.zeros((H, W), bool)
    big[2:126, 60:64] = True  # as tall as the image: any rotation reaches the border
    with pytest.raises(InputError, match="border"):
        targets.affine_masks(big, 1, seed=0, max_border_touch=0.0, max_tries=20)
    with pytest.raises(InputError, match="foreground is empty"):
        targets.affine_masks(ref, 1, foreground=np.zeros((H, W), bool))


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"rotation": (10, -10)}, ValueError, "rotation"),
    ({"scale": (0, 1)}, ValueError, "scale"),
    ({"scale": 1.0}, TypeError, "scale"),
    ({"min_inside": 1.5}, ValueError, "min_inside"),
    ({"max_border_touch": -0.1}, ValueError, "max_border_touch"),
    ({"max_tries": 0}, ValueError, "max_tries"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"flip": "yes"}, TypeError, "flip"),
    ({"foreground": np.ones((5, 5), bool)}, ValueError, "foreground"),
])
def test_affine_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        targets.affine_masks(_ref_mask(), 1, **kwargs)


def test_affine_bad_counts():
    with pytest.raises(ValueError, match="n"):
        targets.affine_masks(_ref_mask(), -1)
    with pytest.raises(ValueError, match="distinct"):
        targets.affine_masks(_ref_mask(), [1, 1])
    with pytest.raises(TypeError, match="n must be"):
        targets.affine_masks(_ref_mask(), 2.5)
    with pytest.raises(ValueError, match="2-D"):
        targets.affine_masks(np.ones((4, 4, 3), bool), 1)


def test_perlin_noise_is_smooth_bounded_and_seeded():
    a = targets.perlin_noise((64, 80), (3, 4), np.random.default_rng(0), octaves=3)
    b = targets.perlin_noise((64, 80), (3, 4), np.random.default_rng(0), octaves=3)
    c = targets.perlin_noise((64, 80), (3, 4), np.random.default_rng(1), octaves=3)
    assert a.shape == (64, 80) and np.isfinite(a).all()
    assert np.abs(a).max() < 2.0 and a.std() > 0.05
    assert (a == b).all() and not (a == c).all()
    # smooth: neighbouring pixels differ much less than the value range
    assert np.abs(np.diff(a, axis=1)).max() < 0.25 * (a.max() - a.min())
    with pytest.raises(ValueError, match="cells"):
        targets.perlin_noise((8, 8), (0, 2), np.random.default_rng(0))


def test_perlin_masks_area_foreground_and_determinism():
    arr, _ = _object_image()
    fg = foreground.foreground_mask(arr)
    masks = targets.perlin_masks((H, W), 8, foreground=fg, seed=7, area=(0.01, 0.08))
    again = targets.perlin_masks((H, W), [5], foreground=fg, seed=7, area=(0.01, 0.08))
    other = targets.perlin_masks((H, W), 8, foreground=fg, seed=8, area=(0.01, 0.08))
    assert (again[0].mask == masks[5].mask).all()
    assert any(not np.array_equal(x.mask, y.mask) for x, y in zip(masks, other))
    for tm in masks:
        json.dumps(tm.params)
        assert tm.params["kind"] == "perlin" and tm.params["seed"] == 7
        assert 0.01 * H * W <= tm.mask.sum() <= 0.08 * H * W
        assert not (tm.mask & ~fg).any()
        assert len(morphology.label(tm.mask, 8)[1]) == 2  # one blob


def test_perlin_rejections_and_bad_arguments():
    tiny = np.zeros((H, W), bool)
    tiny[60:62, 60:62] = True
    with pytest.raises(InputError, match="foreground has 4 pixels"):
        targets.perlin_masks((H, W), 1, foreground=tiny, area=(0.01, 0.1))
    band = np.zeros((H, W), bool)
    band[:, :3] = True  # only a strip along the border
    with pytest.raises(InputError, match="no valid mask.*border"):
        targets.perlin_masks((H, W), 1, foreground=band, area=(0.001, 0.02), max_border_touch=0.0, max_tries=5)
    with pytest.raises(ValueError, match="area"):
        targets.perlin_masks((H, W), 1, area=(0.2, 0.1))
    with pytest.raises(ValueError, match="area"):
        targets.perlin_masks((H, W), 1, area=(0.1, 1.5))
    with pytest.raises(ValueError, match="cells"):
        targets.perlin_masks((H, W), 1, cells=(1.5, 3))
    with pytest.raises(ValueError, match="shape"):
        targets.perlin_masks((0, W), 1)
    with pytest.raises(ValueError, match="foreground"):
        targets.perlin_masks((H, W), 1, foreground=np.ones((3, 3), bool))


def _save_mask(path, arr):
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_load_mask_binarises_resizes_and_checks_size(tmp_path):
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 5:20] = 128
    m[0, 0] = 127  # at the threshold: background
    _save_mask(tmp_path / "m.png", m)
    got = images.load_mask(tmp_path / "m.png")
    assert got.dtype == bool and got.shape == (20, 30)
    assert got.sum() == 75 and not got[0, 0]
    big = images.load_mask(tmp_path / "m.png", (40, 60))
    assert big.shape == (40, 60) and big.sum() == 4 * 75  # nearest: exact 2x blow-up
    with pytest.raises(InputError, match="m.png is 20x30.*40x60"):
        images.load_mask(tmp_path / "m.png", (40, 60), resize=False)
    assert images.load_mask(tmp_path / "m.png", (20, 30), resize=False).sum() == 75


def test_load_mask_modes(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 2:5] = 255
    Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(m.astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    Image.fromarray(m).convert("1").save(tmp_path / "bw.bmp")
    for name in ("rgb.png", "16bit.png", "bw.bmp"):
        assert images.load_mask(tmp_path / name).sum() == 9, name


def test_load_mask_errors_name_the_file(tmp_path):
    with pytest.raises(MissingInputError, match="nope.png") as err:
        images.load_mask(tmp_path / "nope.png")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read mask .*junk.png"):
        images.load_mask(tmp_path / "junk.png")
    _save_mask(tmp_path / "empty.png", np.zeros((8, 8)))
    with pytest.raises(InputError, match="empty.png is empty"):
        images.load_mask(tmp_path / "empty.png")
    assert not images.load_mask(tmp_path / "empty.png", allow_empty=True).any()
    with pytest.raises(InputError, match="not a file"):
        images.load_mask(tmp_path)
    with pytest.raises(TypeError, match="path"):
        images.load_mask(3)


def test_load_image_converts_and_resizes(tmp_path):
    Image.new("L", (30, 20), 100).save(tmp_path / "grey.png")
    Image.new("RGBA", (30, 20), (1, 2, 3, 4)).save(tmp_path / "rgba.png")
    Image.new("P", (30, 20), 3).save(tmp_path / "pal.gif")
    for name in ("grey.png", "rgba.png", "pal.gif"):
        img = images.load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (30, 20)
    assert images.load_image(tmp_path / "grey.png", 16).size == (16, 16)
    assert images.load_image(tmp_path / "grey.png", (40, 10)).size == (40, 10)
    assert np.asarray(images.load_image(tmp_path / "grey.png"))[0, 0].tolist() == [100, 100, 100]
    with pytest.raises(MissingInputError, match="missing.jpg"):
        images.load_image(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(InputError, match="bad.jpg"):
        images.load_image(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="size"):
        images.load_image(tmp_path / "grey.png", 0)
    with pytest.raises(TypeError, match="size"):
        images.load_image(tmp_path / "grey.png", "big")


def test_folder_masks_sorted_binarised_resized(tmp_path):
    for k, name in enumerate(["b.png", "a.bmp", "c.tif"]):
        m = np.zeros((16, 16), np.uint8)
        m[k:k + 4, 2:6] = 200
        _save_mask(tmp_path / name, m)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    masks = targets.folder_masks(tmp_path, (32, 32))
    assert [p.params["file"].rsplit("/", 1)[-1] for p in masks] == ["a.bmp", "b.png", "c.tif"]
    assert [p.params["index"] for p in masks] == [0, 1, 2]
    assert all(tm.mask.shape == (32, 32) and tm.mask.sum() == 64 for tm in masks)
    assert masks[0].mask[2, 4] and not masks[0].mask[0, 4]  # a.bmp was drawn at row 1
    json.dumps([tm.params for tm in masks])


def test_folder_masks_errors(tmp_path):
    with pytest.raises(MissingInputError, match="mask folder not found"):
        targets.folder_masks(tmp_path / "none", (8, 8))
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        targets.folder_masks(tmp_path / "f", (8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="it is empty"):
        targets.folder_masks(empty, (8, 8))
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.md").write_text("x")
    with pytest.raises(InputError, match="no mask images.*readme.md"):
        targets.folder_masks(other, (8, 8))
    bad = tmp_path / "bad"
    bad.mkdir()
    _save_mask(bad / "000.png", np.full((8, 8), 255))
    (bad / "001.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="001.png"):
        targets.folder_masks(bad, (8, 8))
    blank = tmp_path / "blank"
    blank.mkdir()
    _save_mask(blank / "000.png", np.zeros((8, 8)))
    with pytest.raises(InputError, match="000.png is empty"):
        targets.folder_masks(blank, (8, 8))


def test_to_mask_accepts_common_forms():
    m = np.zeros((4, 5), bool)
    m[1, 2] = True
    for form in (m, m.astype(np.uint8) * 255, m.astype(np.float32), Image.fromarray(m.astype(np.uint8) * 255),
                 m[..., None]):
        assert (images.to_mask(form) == m).all()
    with pytest.raises(ValueError, match="NaN"):
        images.to_mask(np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="dtype"):
        images.to_mask(np.array([["a", "b"]]))


def test_target_masks_dispatches_each_kind(tmp_path):
    ref = _ref_mask()
    a = targets.target_masks("affine", 3, ref_mask=ref, seed=2, scale=(1, 1))
    assert [t.params["kind"] for t in a] == ["affine"] * 3
    assert all((x.mask == y.mask).all() for x, y in zip(a, targets.affine_masks(ref, 3, seed=2, scale=(1, 1))))
    p = targets.target_masks("perlin", [4], ref_mask=ref, seed=2)
    assert p[0].mask.shape == ref.shape and (p[0].mask == targets.perlin_masks(ref.shape, [4], seed=2)[0].mask).all()
    for k in range(2):
        m = np.zeros((16, 16), np.uint8)
        m[k * 8:k * 8 + 4, 2:6] = 255
        _save_mask(tmp_path / f"{k}.png", m)
    f = targets.target_masks("folder", 5, folder=tmp_path, shape=(16, 16))
    assert [t.params["file_index"] for t in f] == [0, 1, 0, 1, 0]
    assert [t.params["index"] for t in f] == [0, 1, 2, 3, 4]
    assert (f[2].mask == f[0].mask).all() and not (f[1].mask == f[0].mask).all()


def test_target_masks_errors():
    with pytest.raises(ValueError, match="kind"):
        targets.target_masks("random", 1, shape=(8, 8))
    with pytest.raises(ValueError, match="ref_mask"):
        targets.target_masks("affine", 1, shape=(8, 8))
    with pytest.raises(ValueError, match="shape"):
        targets.target_masks("perlin", 1)
    with pytest.raises(ValueError, match="folder"):
        targets.target_masks("folder", 1, shape=(8, 8))
    with pytest.raises(TypeError, match="options"):
        targets.target_masks("folder", 1, shape=(8, 8), folder=".", scale=(1, 2))


def test_remaining_argument_errors(tmp_path):
    with pytest.raises(TypeError, match="min_inside must be a number"):
        targets.affine_masks(_ref_mask(), 1, min_inside="high")
    with pytest.raises(TypeError, match="shape must be"):
        targets.perlin_masks(5, 1)
    with pytest.raises(ValueError, match="area must allow"):
        targets.perlin_masks((H, W), 1, area=(0.0, 0.0))
    with pytest.raises(ValueError, match="shape or normal_image"):
        foreground.resolve_foreground(None)
    with pytest.raises(TypeError, match="path"):
        targets.folder_masks(None, (8, 8))


from hypothesis import given, settings, strategies as st  # noqa: E402


def _rect(shape, y0, x0, hh, ww):
    m = np.zeros(shape, bool)
    m[y0:y0 + hh, x0:x0 + ww] = True
    return m


@settings(max_examples=40, deadline=None)
@given(ry=st.integers(0, 40), rx=st.integers(0, 40), rh=st.integers(1, 20), rw=st.integers(1, 20),
       fy=st.integers(0, 30), fx=st.integers(0, 30), fh=st.integers(1, 48), fw=st.integers(1, 48),
       seed=st.integers(0, 2**31), touch=st.sampled_from([0.0, 0.1, 1.0]), inside=st.sampled_from([0.5, 1.0]))
def test_affine_masks_invariants(ry, rx, rh, rw, fy, fx, fh, fw, seed, touch, inside):
    shape = (48, 48)
    ref, fg = _rect(shape, ry, rx, rh, rw), _rect(shape, fy, fx, fh, fw)
    kw = dict(foreground=fg, seed=seed, max_border_touch=touch, min_inside=inside, max_tries=30)
    try:
        masks = targets.affine_masks(ref, 3, **kw)
    except InputError as exc:
        assert "no valid placement" in str(exc) and "tries" in str(exc)
        return
    frame = morphology.border_frame(shape, morphology.frame_width(shape))
    for tm in masks:
        assert tm.mask.any() and not (tm.mask & ~fg).any()
        assert tm.params["border_touch"] <= touch and tm.params["inside_foreground"] >= inside
        if touch == 0.0:
            assert not (tm.mask & frame).any()
    again = targets.affine_masks(ref, 3, **kw)
    assert all((x.mask == y.mask).all() for x, y in zip(masks, again))


@settings(max_examples=25, deadline=None)
@given(fy=st.integers(0, 30), fx=st.integers(0, 30), fh=st.integers(1, 64), fw=st.integers(1, 64),
       seed=st.integers(0, 2**31), lo=st.sampled_from([0.002, 0.01]), hi=st.sampled_from([0.05, 0.2]))
def test_perlin_masks_invariants(fy, fx, fh, fw, seed, lo, hi):
    shape = (64, 64)
    fg = _rect(shape, fy, fx, fh, fw)
    try:
        masks = targets.perlin_masks(shape, 2, foreground=fg, seed=seed, area=(lo, hi), max_tries=20)
    except InputError as exc:
        assert "foreground has" in str(exc) or "no valid mask" in str(exc)
        return
    for tm in masks:
        assert lo * 64 * 64 <= tm.mask.sum() <= hi * 64 * 64
        assert not (tm.mask & ~fg).any()
        assert len(morphology.label(tm.mask, 8)[1]) == 2


def test_resize_mask_and_image_take_height_width_in_their_own_orders():
    m = np.zeros((4, 6), bool)
    m[1, 4] = True
    big = images.resize_mask(m, (8, 12))  # (H, W), nearest: each pixel becomes a 2x2 block
    assert big.shape == (8, 12) and big.sum() == 4 and big[2:4, 8:10].all()
    assert images.resize_mask(m, (4, 6)) is not m and np.array_equal(images.resize_mask(m, (4, 6)), m)
    img = images.resize_image(Image.new("L", (6, 4), 7), (12, 8))  # PIL order (W, H), RGB out
    assert img.size == (12, 8) and img.mode == "RGB"
    with pytest.raises(TypeError, match="image"):
        images.resize_image(np.zeros((4, 4, 3), np.uint8), 8)


def test_o2mag_masks_still_offers_the_public_mask_api():
    # scripts written against earlier releases import from o2mag.masks; it must hand out the very
    # objects of the modules that now hold the code, not copies that could drift
    from o2mag import masks

    for name in masks.__all__:
        obj = getattr(masks, name)
        home = next(m for m in (images, foreground, targets) if name in m.__all__)
        assert obj is getattr(home, name), name


# ------------------------------------------------------------------ one mask rule for every type
# bool is itself; otherwise the values' range is the smallest of 0-1, 0-255 and 0-65535 holding the
# largest value, and a pixel is set above half of it (o2mag.masks.images.to_mask). Before this rule
# a uint8 0/1 mask read as empty while a float 0/1 mask was accepted.

import torch  # noqa: E402

_INT_DTYPES = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_SHAPE_MASK = np.zeros((9, 11), bool)
_SHAPE_MASK[2:5, 3:8] = True
_SHAPE_MASK[7, 0] = True


def _encodings(m):
    """(label, value) pairs that all mean the bool mask ``m`` under the one rule."""
    out = [("bool", m)]
    for dt in _INT_DTYPES:
        for scale in (1, 255, 65535):
            if np.iinfo(dt).max >= scale:
                out.append((f"{np.dtype(dt).name} 0/{scale}", m.astype(dt) * dt(scale)))
    for dt in _FLOAT_DTYPES:
        for scale in (1.0, 255.0):
            out.append((f"{np.dtype(dt).name} 0/{scale:g}", m.astype(dt) * dt(scale)))
    for dt in (torch.bool, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64):
        for scale in (1, 255):
            t = torch.from_numpy(m).to(dt) if dt is torch.bool else torch.from_numpy(m).to(dt) * scale
            out.append((f"{dt} 0/{scale}", t))
            out.append((f"{dt} 0/{scale} (1, H, W)", t[None]))
            out.append((f"{dt} 0/{scale} (1, 1, H, W)", t[None, None]))
    out.append(("uint8 0/255 (H, W, 1)", m[..., None].astype(np.uint8) * 255))
    base = Image.fromarray(m.astype(np.uint8) * 255)
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "F", "CMYK"):
        out.append((f"PIL {mode}", base.convert(mode)))
    out.append(("PIL L 0/1", Image.fromarray(m.astype(np.uint8))))
    out.append(("PIL RGB 0/1", Image.fromarray(np.stack([m.astype(np.uint8)] * 3, -1))))
    out.append(("PIL I;16", Image.fromarray(m.astype(np.uint16) * 65535)))
    out.append(("PIL F 0/1", Image.fromarray(m.astype(np.float32))))
    alpha = np.zeros(m.shape + (4,), np.uint8)
    alpha[..., 3] = m * 255
    out.append(("PIL RGBA drawn as alpha on black", Image.fromarray(alpha, "RGBA")))
    pal = Image.fromarray(m.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255])
    out.append(("PIL P black/white palette", pal))
    return out


@pytest.mark.parametrize("label, value", _encodings(_SHAPE_MASK), ids=lambda v: v if isinstance(v, str) else "")
def test_every_mask_type_means_the_same_mask(label, value):
    got = images.to_mask(value)
    assert got.dtype == bool and got.shape == _SHAPE_MASK.shape
    assert np.array_equal(got, _SHAPE_MASK), label
    assert np.array_equal(images.read_mask(value, "m"), _SHAPE_MASK), label


@pytest.mark.parametrize("mode, ext", [("1", "png"), ("L", "png"), ("L", "jpg"), ("LA", "png"), ("P", "png"),
                                       ("RGB", "png"), ("RGB", "bmp"), ("RGBA", "png"), ("I", "tif"),
                                       ("F", "tif"), ("I;16", "png"), ("L 0/1", "png"), ("CMYK", "tif")])
def test_mask_files_of_every_mode_read_by_the_same_rule(tmp_path, mode, ext):
    big = np.kron(_SHAPE_MASK, np.ones((8, 8), bool))  # blocks, so JPEG's ringing stays below half
    if mode == "I;16":
        im = Image.fromarray(big.astype(np.uint16) * 65535)
    elif mode == "L 0/1":
        im = Image.fromarray(big.astype(np.uint8))
    else:
        im = Image.fromarray(big.astype(np.uint8) * 255).convert(mode)
    path = tmp_path / f"m.{ext}"
    im.save(path)
    with Image.open(path) as opened:
        from_image = images.to_mask(opened)
    assert np.array_equal(images.load_mask(path), big)
    assert np.array_equal(images.read_mask(path, "m"), big)
    assert np.array_equal(images.read_mask(str(path), "m"), big)
    assert np.array_equal(from_image, big)


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=12, max_size=12),
       dtype=st.sampled_from(_INT_DTYPES + _FLOAT_DTYPES), scale=st.sampled_from((1, 255, 65535)),
       low=st.floats(0, 0.49), high=st.floats(0.51, 1))  # clear of the half-way line after rounding
def test_the_rule_holds_for_any_dtype_scale_and_grey_levels(bits, dtype, scale, low, high):
    m = np.array(bits).reshape(3, 4)
    m[0, 0] = True  # the largest value sets the scale: keep one pixel at the top of it
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < scale:
        return
    if np.dtype(dtype) == np.float16 and scale == 65535:
        return  # 65535 is not a float16 value
    values = np.where(m, high, low) * scale
    values[0, 0] = scale
    if np.issubdtype(dtype, np.integer):  # rounding must not cross the half-way line
        values = np.where(m, np.maximum(np.ceil(values), scale // 2 + 1), np.minimum(np.floor(values), scale // 2))
    arr = values.astype(dtype)
    assert np.array_equal(images.to_mask(arr), m)
    assert np.array_equal(images.to_mask(torch.from_numpy(arr.astype(np.float64))), m)


@pytest.mark.parametrize("value", [np.zeros((6, 6), np.uint8), np.zeros((6, 6), bool), np.zeros((6, 6), np.float32),
                                   np.full((6, 6), 100, np.uint8), np.full((6, 6), 0.4), torch.zeros(1, 6, 6),
                                   Image.new("L", (6, 6), 0), Image.new("RGBA", (6, 6), (0, 0, 0, 255))])
def test_an_empty_mask_of_any_type_is_refused_naming_the_argument(value):
    assert not images.to_mask(value).any()  # the conversion itself allows it
    with pytest.raises(InputError, match=r"^target_masks\[3\] is empty"):
        images.read_mask(value, "target_masks[3]")
    assert not images.read_mask(value, "x", allow_empty=True).any()


def test_a_full_reference_mask_and_impossible_values_are_refused():
    with pytest.raises(InputError, match="ref_mask covers the whole image.*inverted"):
        images.read_mask(np.ones((6, 6), np.uint8), "ref_mask", allow_full=False)
    assert images.read_mask(np.ones((6, 6), np.uint8), "foreground").all()  # a foreground may be everything
    for bad, needle in [(np.full((4, 4), -1), "negative"), (np.full((4, 4), 70000), "up to 70000"),
                        (np.full((4, 4), np.nan), "NaN"), (np.full((4, 4), 1e6), r"up to 1e\+06")]:
        with pytest.raises(InputError, match=needle):
            images.read_mask(bad, "m")
    with pytest.raises(InputError, match="vanished when resized"):
        one = np.zeros((64, 64), bool)
        one[31, 33] = True
        images.read_mask(one, "m", shape=(8, 8))


def test_empty_mask_files_name_the_argument_and_the_file(tmp_path):
    Image.new("L", (8, 8), 90).save(tmp_path / "dark.png")
    with pytest.raises(InputError, match=r"^--foreground: mask .*dark.png is empty \(values in 0-255, largest 90"):
        images.read_mask(tmp_path / "dark.png", "--foreground")
