"""The built-in brushed-metal scratch sample."""

import numpy as np
import pytest

from o2mag.masks.images import load_image, load_mask
from o2mag.masks.morphology import label
from o2mag.sources.sample import Sample, brushed_metal, embedded_sample


def _lum(img):
    return np.asarray(img, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def test_sample_is_deterministic():
    a, b = embedded_sample(96), embedded_sample(96)
    assert np.array_equal(np.asarray(a.normal), np.asarray(b.normal))
    assert np.array_equal(np.asarray(a.reference), np.asarray(b.reference))
    assert np.array_equal(a.ref_mask, b.ref_mask)


@pytest.mark.parametrize("size", [64, 256])
def test_sample_shapes_and_fields(size):
    s = embedded_sample(size)
    assert isinstance(s, Sample)
    assert s.normal.mode == s.reference.mode == "RGB"
    assert s.normal.size == s.reference.size == (size, size)
    assert s.ref_mask.dtype == bool and s.ref_mask.shape == (size, size)
    assert 0.003 < s.ref_mask.mean() < 0.1
    assert len(label(s.ref_mask, 8)[1]) == 2  # one scratch
    assert s.anomaly_word in s.prompt.split()
    assert s.category == "synthetic_surface" and s.defect == "scratch"


def test_reference_shows_a_dark_scratch_inside_its_mask_only():
    s = embedded_sample(256)
    ref, normal = _lum(s.reference), _lum(s.normal)
    m = s.ref_mask
    # a dark groove under the mask: a quarter of the mask is darker than 99% of the plate around it
    assert np.percentile(ref[m], 25) < np.percentile(ref[~m], 1)
    assert np.percentile(normal[m], 25) > np.percentile(normal[~m], 1)  # the normal plate: no scratch
    # same kind of surface: similar brightness and grain away from the scratch
    assert abs(ref[~m].mean() - normal.mean()) < 15
    assert 0.5 < ref[~m].std() / normal.std() < 2
    assert not np.array_equal(np.asarray(s.reference), np.asarray(s.normal))


def test_brushed_metal_grain_runs_horizontally():
    lum = _lum(brushed_metal(128, seed=3))
    along = np.abs(np.diff(lum, axis=1)).mean()
    across = np.abs(np.diff(lum, axis=0)).mean()
    assert across > 2 * along


def test_sample_save_round_trip(tmp_path):
    s = embedded_sample(64)
    paths = s.save(tmp_path / "sample")
    assert np.array_equal(load_mask(paths["ref_mask"]), s.ref_mask)
    assert np.array_equal(np.asarray(load_image(paths["reference"])), np.asarray(s.reference))
    assert np.array_equal(np.asarray(load_image(paths["normal"])), np.asarray(s.normal))


def test_sample_bad_size():
    with pytest.raises(ValueError, match="size"):
        embedded_sample(16)
    with pytest.raises(TypeError, match="size"):
        embedded_sample(64.0)
