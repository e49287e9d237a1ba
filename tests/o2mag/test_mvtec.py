"""Picking reference, mask and normal images from an MVTec-AD-like folder."""

import numpy as np
import pytest
from PIL import Image

from o2mag.errors import InputError, MissingInputError
from o2mag.sources.mvtec import mvtec_categories, mvtec_defects, mvtec_inputs


def _png(path, value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), value if mode == "L" else (value,) * 3).save(path)


def _tree(root):
    cat = root / "bottle"
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png")
        _png(cat / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        _png(cat / "test" / "broken_large" / f"{i:03d}.png")
        _png(cat / "ground_truth" / "broken_large" / f"{i:03d}_mask.png", 255, "L")
    _png(cat / "test" / "contamination" / "000.png")
    (root / "carpet" / "test").mkdir(parents=True)
    (root / "license.txt").write_text("x")
    return root


def test_mvtec_inputs_happy_path(tmp_path):
    root = _tree(tmp_path)
    ref, mask, normals = mvtec_inputs(root, "bottle", "broken_large", ref_index=1)
    assert ref == root / "bottle" / "test" / "broken_large" / "001.png"
    assert mask == root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    assert normals == [root / "bottle" / "train" / "good" / f"{i:03d}.png" for i in range(3)]
    assert mvtec_inputs(str(root), "bottle", "broken_large")[0].name == "000.png"
    assert np.asarray(Image.open(mask)).max() == 255


def test_listings(tmp_path):
    root = _tree(tmp_path)
    assert mvtec_categories(root) == ["bottle", "carpet"]
    assert mvtec_defects(root, "bottle") == ["broken_large", "contamination"]


def test_missing_root_category_defect_list_what_exists(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(MissingInputError, match="MVTec root not found"):
        mvtec_inputs(tmp_path / "nope", "bottle", "broken_large")
    with pytest.raises(InputError, match="not a folder"):
        mvtec_inputs(root / "license.txt", "bottle", "broken_large")
    with pytest.raises(MissingInputError, match="'cable' not found.*categories there: bottle, carpet"):
        mvtec_inputs(root, "cable", "broken_large")
    with pytest.raises(MissingInputError,
                       match="'crack' not found.*defects of bottle: broken_large, contamination"):
        mvtec_inputs(root, "bottle", "crack")
    with pytest.raises(InputError, match="'good' has no anomalies"):
        mvtec_inputs(root, "bottle", "good")


def test_missing_ground_truth(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(MissingInputError, match="ground-truth folder not found.*contamination"):
        mvtec_inputs(root, "bottle", "contamination")
    (root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").unlink()
    with pytest.raises(MissingInputError, match="mask for 001.png not found.*001_mask.png"):
        mvtec_inputs(root, "bottle", "broken_large", ref_index=1)


def test_ref_index_range_and_type(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(InputError, match="ref_index 2 is out of range.*2 images"):
        mvtec_inputs(root, "bottle", "broken_large", ref_index=2)
    with pytest.raises(ValueError, match="ref_index"):
        mvtec_inputs(root, "bottle", "broken_large", ref_index=-1)
    with pytest.raises(TypeError, match="ref_index"):
        mvtec_inputs(root, "bottle", "broken_large", ref_index="1")


def test_missing_or_empty_normals_and_tests(tmp_path):
    root = _tree(tmp_path)
    for f in (root / "bottle" / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(InputError, match="no normal images"):
        mvtec_inputs(root, "bottle", "broken_large")
    (root / "bottle" / "train" / "good").rmdir()
    with pytest.raises(MissingInputError, match="normal images folder not found"):
        mvtec_inputs(root, "bottle", "broken_large")
    (root / "carpet" / "test" / "hole").mkdir()
    with pytest.raises(InputError, match="no images in"):
        mvtec_inputs(root, "carpet", "hole")


def test_bad_argument_types(tmp_path):
    root = _tree(tmp_path)
    with pytest.raises(TypeError, match="root"):
        mvtec_inputs(None, "bottle", "broken_large")
    with pytest.raises(TypeError, match="category"):
        mvtec_inputs(root, "", "broken_large")
    with pytest.raises(TypeError, match="defect"):
        mvtec_inputs(root, "bottle", None)
