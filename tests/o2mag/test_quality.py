"""The quality record's properties (o2mag.sample_quality) on images the tests draw: an unchanged
target has presence 0, pasting the reference defect gives high presence and likeness, a change
outside the mask raises leakage, and every score lies in [0, 1]."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from o2mag.sample_quality import combine, sample_quality

SIDE = 64


def _texture(rng, side=SIDE, base=(150, 140, 120)):
    """A normal image: a flat colour with fine grain (like brushed metal or fabric)."""
    img = np.asarray(base, np.float32) + rng.normal(0, 6, (side, side, 1)) + rng.normal(0, 2, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _blob(rng, side=SIDE):
    m = np.zeros((side, side), bool)
    y, x = rng.integers(12, side - 20, 2)
    h, w = rng.integers(6, 14, 2)
    m[y:y + h, x:x + w] = True
    return m


def _reference(rng, normal, m_r):
    """The normal image with a dark, rough defect inside ``m_r``."""
    ref = normal.copy()
    dark = np.clip(rng.normal(40, 20, (int(m_r.sum()), 3)), 0, 255)
    ref[m_r] = dark.astype(np.uint8)
    return ref


seeds = st.integers(0, 2 ** 31 - 1)


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_a_target_equal_to_the_replay_has_no_presence_and_no_leakage(seed):
    rng = np.random.default_rng(seed)
    normal = _texture(rng)
    m_r = _blob(rng)
    q = sample_quality(normal, normal, _blob(rng), _reference(rng, normal, m_r), m_r)
    assert q["presence"] == 0.0 and q["leakage"] == 0.0
    assert q["score"] == 0.0  # no change inside M_T: nothing to keep


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_pasting_the_reference_defect_gives_high_presence_and_likeness(seed):
    rng = np.random.default_rng(seed)
    normal = _texture(rng)
    m_r = _blob(rng)
    ref = _reference(rng, normal, m_r)
    pasted = normal.copy()
    pasted[m_r] = ref[m_r]
    q = sample_quality(pasted, normal, m_r, ref, m_r)
    faint = normal.copy()  # the same place, changed by about the texture's own grain
    faint[m_r] = np.clip(normal[m_r].astype(int) + 3, 0, 255).astype(np.uint8)
    q_faint = sample_quality(faint, normal, m_r, ref, m_r)
    assert q["presence"] > 3.0 and q["likeness"] > 0.8
    assert q["presence"] > 5 * q_faint["presence"] and q["likeness"] > q_faint["likeness"]
    assert q["leakage"] == 0.0
    assert q["score"] > 0.8 > q_faint["score"]


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(10, 80))
def test_a_change_outside_the_mask_raises_leakage(seed, shift):
    rng = np.random.default_rng(seed)
    normal = _texture(rng)
    m_r = _blob(rng)
    ref = _reference(rng, normal, m_r)
    pasted = normal.copy()
    pasted[m_r] = ref[m_r]
    leaky = pasted.copy()
    leaky[:, :8] = np.clip(leaky[:, :8].astype(int) + shift, 0, 255).astype(np.uint8)  # a band far from M_R
    leaky[m_r] = ref[m_r]
    clean, dirty = sample_quality(pasted, normal, m_r, ref, m_r), sample_quality(leaky, normal, m_r, ref, m_r)
    assert dirty["leakage"] > clean["leakage"] == 0.0
    assert dirty["score"] < clean["score"]


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(0, 1))
def test_the_score_lies_in_the_unit_interval_and_falls_with_leakage(p, k, l):
    s = combine(p, k, l)
    assert 0.0 <= s <= 1.0
    assert combine(p, k + 1.0, l) <= s


def test_bad_shapes_name_the_argument():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="mask"):
        sample_quality(img, img, np.zeros((8, 8), bool), img, np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="baseline"):
        sample_quality(img, np.zeros((8, 8, 3), np.uint8), np.ones((16, 16), bool), img, np.ones((16, 16), bool))
