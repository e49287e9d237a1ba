"""Output tree, manifest, resume and overwrite rules of OutputStore."""

import json
import warnings
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from o2mag.runs import store as S
from o2mag.errors import InputError, SampleExistsError, SettingsConflictError
from o2mag.runs.store import OutputStore, read_manifest

SETTINGS = {"model": "tiny", "prompt": "a scratch", "steps": 10,
            "masks": {"kind": "affine", "scale": [0.7, 1.3]}}


def _img(value, size=(12, 10)):
    return Image.new("RGB", size, (value, value // 2, 255 - value))


def _mask(size=(10, 12), k=3):
    m = np.zeros(size, bool)
    m[1:1 + k, 2:6] = True
    return m


def _lines(store):
    return [json.loads(x) for x in store.manifest_path.read_text().splitlines() if x.strip()]


def _tmp_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_write_layout_files_and_manifest(tmp_path):
    st = OutputStore(tmp_path, "bottle", "scratch", settings=SETTINGS)
    line = st.write(0, _img(10), _mask(), {"seed": 5, "mask_params": {"kind": "affine", "angle": 3.5}})
    assert st.image_path(0) == tmp_path / "bottle" / "scratch" / "image" / "000.png"
    assert st.mask_path(0) == tmp_path / "bottle" / "scratch" / "mask" / "000.png"
    assert np.array_equal(np.asarray(Image.open(st.image_path(0))), np.asarray(_img(10)))
    mask_png = Image.open(st.mask_path(0))
    assert mask_png.mode == "L"
    arr = np.asarray(mask_png)
    assert set(np.unique(arr).tolist()) == {0, 255} and np.array_equal(arr == 255, _mask())
    (rec,) = _lines(st)
    assert rec.pop("check") == S._line_check(rec)  # the line's own check, not part of the record
    assert rec == line
    assert rec["index"] == 0 and rec["status"] == "ok" and rec["seed"] == 5
    assert rec["image"] == "bottle/scratch/image/000.png" and rec["mask"] == "bottle/scratch/mask/000.png"
    assert (tmp_path / rec["image"]).is_file()
    assert rec["mask_params"] == {"kind": "affine", "angle": 3.5}
    assert rec["settings"] == SETTINGS
    assert set(rec["versions"]) >= {"o2mag", "torch", "diffusers"} and rec["versions"]["o2mag"]
    assert datetime.fromisoformat(rec["timestamp"]).tzinfo is not None
    assert _tmp_files(tmp_path) == []


def test_numpy_values_and_arrays_are_accepted(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    arr = np.asarray(_img(40))
    rec = st.write(np.int64(2), arr, _mask().astype(np.uint8),
                   {"seed": np.int64(9), "shift": np.array([1.5, 2])})
    assert rec["seed"] == 9 and rec["shift"] == [1.5, 2.0] and rec["settings"] is None
    assert st.existing_indices() == [2]
    st.write(3, np.asarray(_img(40).convert("L")), Image.fromarray(_mask().astype(np.uint8) * 255))
    assert Image.open(st.image_path(3)).mode == "L"


def test_num_means_samples_in_folder_and_resume_fills_gaps(tmp_path):
    st = OutputStore(tmp_path, "c", "d", settings=SETTINGS)
    assert st.missing_indices(3) == [0, 1, 2]
    for i in (0, 2):
        st.write(i, _img(i), _mask())
    assert st.existing_indices() == [0, 2]
    assert st.missing_indices(3) == [1]
    assert st.missing_indices(1) == []
    again = OutputStore(tmp_path, "c", "d", settings=dict(SETTINGS))  # a rerun with the same settings
    assert again.existing_indices() == [0, 2]
    assert again.missing_indices(5) == [1, 3, 4]
    assert again.extra_indices(2) == [2]
    assert set(again.records()) == {0, 2}


def test_no_overwrite_without_permission(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    before = st.image_path(0).read_bytes()
    with pytest.raises(SampleExistsError, match="sample 0 already exists.*--overwrite"):
        st.write(0, _img(200), _mask())
    with pytest.raises(SampleExistsError):
        OutputStore(tmp_path, "c", "d").write(0, _img(200), _mask())
    assert st.image_path(0).read_bytes() == before
    assert len(_lines(st)) == 1


def test_overwrite_replaces_written_indices_and_keeps_others(tmp_path):
    st = OutputStore(tmp_path, "c", "d", settings=SETTINGS)
    for i in range(3):
        st.write(i, _img(i), _mask())
    old2 = st.image_path(2).read_bytes()
    new = OutputStore(tmp_path, "c", "d", overwrite=True, settings={"model": "other"})
    assert new.missing_indices(2) == [0, 1]
    new.write(0, _img(99), _mask(k=5))
    assert new.missing_indices(2) == [1]
    assert np.array_equal(np.asarray(Image.open(new.image_path(0))), np.asarray(_img(99)))
    assert (np.asarray(Image.open(new.mask_path(0))) == 255).sum() == 20
    assert new.image_path(2).read_bytes() == old2  # not written by this run: untouched
    lines = _lines(new)
    assert [(x["index"], x["status"]) for x in lines][-2:] == [(0, "replacing"), (0, "ok")]
    recs = OutputStore(tmp_path, "c", "d", overwrite=True).records()
    assert recs[0]["settings"] == {"model": "other"} and recs[2]["settings"] == SETTINGS


def test_settings_conflict_refuses_resume(tmp_path):
    OutputStore(tmp_path, "c", "d", settings=SETTINGS).write(0, _img(1), _mask())
    changed = {**SETTINGS, "prompt": "a dent", "masks": {"kind": "perlin", "scale": [0.7, 1.3]}}
    with pytest.raises(SettingsConflictError,
                       match=r"masks.kind: \"affine\" -> \"perlin\".*prompt.*--overwrite"):
        OutputStore(tmp_path, "c", "d", settings=changed)
    with pytest.raises(SettingsConflictError, match=r"steps: 10 -> \(unset\)"):
        OutputStore(tmp_path, "c", "d", settings={k: v for k, v in SETTINGS.items() if k != "steps"})
    # tuples and lists, key order: the same settings
    same = {"steps": 10, "masks": {"scale": (0.7, 1.3), "kind": "affine"}, "prompt": "a scratch",
            "model": "tiny"}
    assert OutputStore(tmp_path, "c", "d", settings=same).existing_indices() == [0]
    assert OutputStore(tmp_path, "c", "d", settings=changed, overwrite=True).existing_indices() == [0]
    # another defect folder is independent
    assert OutputStore(tmp_path, "c", "e", settings=changed).existing_indices() == []


def test_incomplete_samples_count_as_missing_and_are_regenerated(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    # crash after the image of sample 1 was renamed into place, before its mask
    _img(2).save(st.image_path(1))
    # crash after both files of sample 2, before the manifest line
    _img(3).save(st.image_path(2))
    Image.fromarray(_mask().astype(np.uint8) * 255).save(st.mask_path(2))
    # manifest line of sample 3 but its mask was deleted
    st.write(3, _img(4), _mask())
    st.mask_path(3).unlink()
    again = OutputStore(tmp_path, "c", "d")
    assert again.existing_indices() == [0]
    assert again.missing_indices(4) == [1, 2, 3]
    for i in (1, 2, 3):
        again.write(i, _img(50 + i), _mask())  # allowed without overwrite
    assert OutputStore(tmp_path, "c", "d").existing_indices() == [0, 1, 2, 3]
    assert np.array_equal(np.asarray(Image.open(again.image_path(2))), np.asarray(_img(52)))


def test_truncated_manifest_line_is_ignored_and_not_glued(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    st.write(1, _img(2), _mask())
    data = st.manifest_path.read_bytes()
    st.manifest_path.write_bytes(data[:-15])  # crash while appending sample 1's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a crash fragment is expected: no warning
        again = OutputStore(tmp_path, "c", "d")
        assert again.existing_indices() == [0]
        again.write(1, _img(3), _mask())
        assert [r["index"] for r in read_manifest(again.manifest_path)] == [0, 1]
        assert OutputStore(tmp_path, "c", "d").existing_indices() == [0, 1]


def test_malformed_middle_line_warns(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    with open(st.manifest_path, "ab") as f:
        f.write(b"{broken\n{\"index\": \"x\"}\n{\"index\": 1, }\n")
    st.write(1, _img(2), _mask())
    with pytest.warns(RuntimeWarning) as got:
        recs = read_manifest(st.manifest_path)
    assert [r["index"] for r in recs] == [0, 1]
    # line 2 ("{broken") is a crash fragment: skipped silently
    assert [str(w.message).split(": ")[1].split(" ignored")[0] for w in got] == ["line 3", "line 4"]
    assert read_manifest(tmp_path / "none.jsonl") == []


def test_crash_during_replacement_leaves_sample_missing(tmp_path, monkeypatch):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    calls = []
    real = S._atomic_png

    def crash_on_mask(img, dest):
        calls.append(dest.parent.name)
        if dest.parent.name == "mask":
            raise KeyboardInterrupt("power cut")
        real(img, dest)

    monkeypatch.setattr(S, "_atomic_png", crash_on_mask)
    with pytest.raises(KeyboardInterrupt):
        OutputStore(tmp_path, "c", "d", overwrite=True).write(0, _img(200), _mask())
    assert calls == ["image", "mask"]
    monkeypatch.setattr(S, "_atomic_png", real)
    # new image next to the old mask and the old manifest line: must not count as complete
    resumed = OutputStore(tmp_path, "c", "d")
    assert resumed.existing_indices() == [] and resumed.missing_indices(1) == [0]
    resumed.write(0, _img(201), _mask())
    assert resumed.existing_indices() == [0]


def test_failed_write_leaves_no_temp_file_and_no_line(tmp_path, monkeypatch):
    st = OutputStore(tmp_path, "c", "d")
    st.write(0, _img(1), _mask())
    before = st.image_path(0).read_bytes()

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        OutputStore(tmp_path, "c", "d", overwrite=True).write(0, _img(9), _mask())
    with pytest.raises(OSError, match="disk full"):
        st.write(1, _img(9), _mask())
    monkeypatch.undo()
    assert _tmp_files(tmp_path) == []
    assert st.image_path(0).read_bytes() == before
    assert not st.image_path(1).exists()
    assert OutputStore(tmp_path, "c", "d").existing_indices() == []  # 0 is marked "replacing"


def test_stale_temp_files_are_cleaned_others_kept(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    stale = st.image_dir / ".o2mag-000.png.abc.tmp"
    stale.write_bytes(b"half")
    keep = st.image_dir / "notes.tmp"
    keep.write_text("user file")
    OutputStore(tmp_path, "c", "d")
    assert not stale.exists() and keep.exists()


def test_large_indices_get_wider_names(tmp_path):
    st = OutputStore(tmp_path, "c", "d")
    st.write(1234, _img(1), _mask())
    assert st.image_path(1234).name == "1234.png" and st.existing_indices() == [1234]


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", " x", "a\\b"])
def test_bad_category_or_defect_names(tmp_path, name):
    with pytest.raises(InputError, match="category"):
        OutputStore(tmp_path, name, "d")
    with pytest.raises(InputError, match="defect"):
        OutputStore(tmp_path, "c", name)


def test_bad_arguments(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        OutputStore(tmp_path / "file", "c", "d")
    with pytest.raises(TypeError, match="root"):
        OutputStore(None, "c", "d")
    with pytest.raises(TypeError, match="category must be a str"):
        OutputStore(tmp_path, 3, "d")
    (tmp_path / "taken").write_text("a file where the category folder should be")
    with pytest.raises(InputError, match="cannot create output folder"):
        OutputStore(tmp_path, "taken", "d")
    with pytest.raises(TypeError, match="settings"):
        OutputStore(tmp_path, "c", "d", settings=["x"])
    with pytest.raises(TypeError, match="settings must be JSON"):
        OutputStore(tmp_path, "c", "d", settings={"f": object()})
    with pytest.raises(TypeError, match="overwrite"):
        OutputStore(tmp_path, "c", "d", overwrite="yes")
    st = OutputStore(tmp_path, "c", "d")
    with pytest.raises(ValueError, match="record may not set.*'image'"):
        st.write(0, _img(1), _mask(), {"image": "x"})
    with pytest.raises(TypeError, match="record must be JSON"):
        st.write(0, _img(1), _mask(), {"x": float("nan")})
    with pytest.raises(TypeError, match="record must be a dict"):
        st.write(0, _img(1), _mask(), [1])
    with pytest.raises(ValueError, match="mask has shape"):
        st.write(0, _img(1), _mask(size=(12, 10)))
    with pytest.raises(ValueError, match="index"):
        st.write(-1, _img(1), _mask())
    with pytest.raises(TypeError, match="index"):
        st.write(True, _img(1), _mask())
    with pytest.raises(TypeError, match="uint8"):
        st.write(0, np.zeros((10, 12, 3)), _mask())
    with pytest.raises(ValueError, match="image must be"):
        st.write(0, np.zeros((10, 12, 4), np.uint8), _mask())
    with pytest.raises(ValueError, match="num"):
        st.missing_indices(-1)
    with pytest.raises(TypeError, match="num"):
        st.missing_indices(2.0)
    assert st.existing_indices() == [] and not st.manifest_path.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    # a dataset written for a team must be readable the way the user's umask says (not 0600)
    import os
    import stat

    old = os.umask(umask)
    try:
        st = OutputStore(tmp_path, "c", "d", settings=SETTINGS)
        st.write(0, _img(1), _mask())
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (st.image_path(0), st.mask_path(0), st.manifest_path):
        assert stat.S_IMODE(path.stat().st_mode) == want, (path.name, oct(path.stat().st_mode))


def test_a_manifest_line_changed_after_it_was_written_is_not_believed(tmp_path):
    """A changed byte that leaves valid JSON (a digit of the seed) fails the line's check: the line is
    ignored with a warning, so its sample counts as missing; the other lines, and lines an older
    o2mag wrote without a check, are read as they are."""
    st = OutputStore(tmp_path, "bottle", "scratch", settings=SETTINGS)
    for i in range(3):
        st.write(i, _img(10 * i), _mask(), {"seed": 40 + i})
    path = st.manifest_path
    lines = path.read_bytes().splitlines(keepends=True)
    assert lines[1].count(b'"seed": 41') == 1
    lines[1] = lines[1].replace(b'"seed": 41', b'"seed": 47')
    old = json.loads(lines[2])
    del old["check"]
    lines[2] = json.dumps(old, sort_keys=True).encode() + b"\n"  # as o2mag wrote lines before checks
    path.write_bytes(b"".join(lines))
    json.loads(lines[1])  # still valid JSON: only the check can tell
    with pytest.warns(S.DataWarning, match=r"line 2 ignored .*check does not match"):
        recs = read_manifest(path)
    assert [r["index"] for r in recs] == [0, 2] and all("check" not in r for r in recs)
    assert recs[1]["seed"] == 42
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.DataWarning)
        again = OutputStore(tmp_path, "bottle", "scratch", settings=SETTINGS)
        assert again.missing_indices(3) == [1]
        line = again.write(1, _img(10), _mask(), {"seed": 41})  # made again, believed again
    assert "check" not in line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.DataWarning)
        assert [r["seed"] for r in read_manifest(path) if r["index"] == 1] == [41]
