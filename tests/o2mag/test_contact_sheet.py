"""The contact sheet written beside a defect folder's manifest."""
import numpy as np
import pytest
from PIL import Image

from o2mag.runs.contact_sheet import contact_sheet, write_contact_sheet
from o2mag.runs.store import OutputStore


def _store(tmp_path, n):
    store = OutputStore(tmp_path, "cat", "crack", settings={"x": 1})
    for i in range(n):
        img = np.full((40, 40, 3), 30 * i, np.uint8)
        mask = np.zeros((40, 40), bool)
        mask[10:20, 10 + i:20 + i] = True
        store.write(i, img, mask)
    return store


def test_sheet_shows_every_sample_with_a_red_mask_outline(tmp_path):
    store = _store(tmp_path, 5)
    path = write_contact_sheet(store.dir, tile=64)
    assert path == store.dir / "contact_sheet.png"
    sheet = np.asarray(Image.open(path).convert("RGB"))
    # 5 samples -> 3 columns x 2 rows of 64 px tiles
    assert sheet.shape[1] == 3 * (64 + 4) + 4 and sheet.shape[0] > 2 * 64
    red = (sheet[..., 0] == 255) & (sheet[..., 1] == 40) & (sheet[..., 2] == 40)
    assert red.any()
    # outline only: the first tile's mask interior (scaled 10..20 -> 16..32) keeps the image colour
    tile0 = sheet[18:18 + 64, 4:4 + 64]
    assert red[18:18 + 64, 4:4 + 64].sum() > 0 and not red[18 + 20:18 + 28, 4 + 20:4 + 28].any()
    assert (tile0[20:28, 20:28] == 0).all()  # sample 0 is black inside its outline


def test_replaced_samples_and_limits(tmp_path):
    store = _store(tmp_path, 3)
    assert contact_sheet(store.dir, max_samples=2, tile=32).size[0] == 2 * (32 + 4) + 4
    (store.dir / "image" / "001.png").unlink()  # incomplete sample: not shown
    assert contact_sheet(store.dir, tile=32).size[0] == 2 * (32 + 4) + 4
    with pytest.raises(ValueError, match="tile"):
        contact_sheet(store.dir, tile=4)


def test_empty_folder_gives_no_sheet(tmp_path):
    store = OutputStore(tmp_path, "cat", "crack")
    assert write_contact_sheet(store.dir) is None and not (store.dir / "contact_sheet.png").exists()


def test_rejected_samples_are_crossed_out_or_left_out(tmp_path):
    store = _store(tmp_path, 5)
    reviewer = OutputStore(tmp_path, "cat", "crack", annotator=True)
    reviewer.annotate({1: {"review": "rejected"}, 2: {"review": "accepted"}})
    reviewer.close()
    sheet = np.asarray(contact_sheet(store.dir, tile=64).convert("RGB")).astype(int)
    tile0, tile1 = sheet[18:18 + 64, 4:4 + 64], sheet[18:18 + 64, 72:72 + 64]
    # sample 1 (value 30) is faded towards grey and crossed by black diagonals; sample 0 is not
    assert (tile1[5:60, 5:60].max(-1) == 0).any() and tile1[28:36, 2:10].min() > 100
    assert (tile0[28:36, 2:10] == 0).all()
    omitted = contact_sheet(store.dir, tile=64, omit_rejected=True)
    assert omitted.size[0] == 2 * (64 + 4) + 4  # 4 samples: 2 columns


def test_an_unreadable_sample_is_a_placeholder_tile_and_one_warning(tmp_path, capsys):
    store = _store(tmp_path, 3)
    img = store.image_path(1)
    img.write_bytes(img.read_bytes()[:60])  # truncated, as by a full disk or a cut copy
    path = write_contact_sheet(store.dir, tile=64)
    assert path is not None and Image.open(path).size[0] == 2 * (64 + 4) + 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(img) in err and "Traceback" not in err
    sheet = np.asarray(Image.open(path).convert("RGB"))
    tile1 = sheet[18:18 + 64, 4 + 68:4 + 68 + 64]
    assert (tile1 == 128).all(-1).mean() > 0.8  # grey
    assert ((tile1[..., 0] == 255) & (tile1[..., 1] == 40)).any()  # with a red X
