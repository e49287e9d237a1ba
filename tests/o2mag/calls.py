"""What several o2mag tests do the same way: the diffusers-style call ``pipe(...)`` on the embedded
sample (a few steps, one AGO step, batches of two targets, every default overridable), and a quick
``o2mag generate`` on the embedded default with a fresh copy of its folder per test."""
from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from o2mag.cli import main
from o2mag.pipeline import O2MAGPipelineOutput
from o2mag.runs.store import OutputStore, complete_samples

STEPS = 3
SIZE = 128  # the tiny model's working size


def call(pipe, sample, masks, **kw):
    """``pipe(reference, ref_mask, normal, masks, prompt=..., anomaly_word=..., **kw)``."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("ago_steps", 1)
    kw.setdefault("batch_size", 2)
    return pipe(sample.reference, sample.ref_mask, sample.normal, masks, prompt=sample.prompt,
                anomaly_word=sample.anomaly_word, **kw)


FAST = ["--steps", "2", "--ago-steps", "1", "--quiet"]  # o2mag generate at the least work


def generate_embedded(out, num: int):
    """``o2mag generate --out out --num num`` on the embedded default, quickly; returns ``out``."""
    assert main(["generate", "--out", str(out), "--num", str(num), *FAST]) == 0
    return out


def fresh_copy(folder, dest):
    """A copy of an output folder without its caches, for a test to change; returns ``dest``."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".o2mag-cache"))
    return dest


def check_every_output_type(call_with, masks, size: int) -> dict:
    """``call_with(output_type=...)`` for every output type gives the output object with images and
    masks of the right kind and shape at ``size`` px (latents at size / 8), finite; returns the
    outputs by type."""
    n = len(masks)
    outs = {t: call_with(output_type=t) for t in ("pil", "np", "pt", "latent")}
    assert all(isinstance(o, O2MAGPipelineOutput) for o in outs.values())
    assert all(isinstance(im, Image.Image) and im.size == (size, size) for im in outs["pil"].images)
    assert [np.array_equal(np.asarray(m) > 127, w) for m, w in zip(outs["pil"].masks, masks)] == [True] * n
    assert outs["np"].images.shape == (n, size, size, 3) and outs["np"].masks.shape == (n, size, size, 1)
    assert outs["pt"].images.shape == (n, 3, size, size) and outs["pt"].masks.shape == (n, 1, size, size)
    assert outs["latent"].images.shape == (n, 4, size // 8, size // 8)
    assert np.isfinite(outs["np"].images).all()
    return outs


def replace_sample(out, category: str, defect: str, index: int) -> None:
    """What ``o2mag generate --overwrite`` does to one sample of ``out``: a new image and mask
    under the sample's own settings."""
    settings = complete_samples(out / category / defect)[index][3]["settings"]
    store = OutputStore(out, category, defect, settings=settings, overwrite=True)
    mask = np.zeros((128, 128), bool)
    mask[10:30, 10:30] = True
    try:
        store.write(index, np.full((128, 128, 3), 200, np.uint8), mask, {"seed": [0, index]})
    finally:
        store.close()


def generated_elsewhere(tmp_path, monkeypatch, num: int):
    """``o2mag generate`` run from relative --ref/--ref-mask/--normal in dir A (random 80 px images,
    a square mask), then the current directory moved to dir B, which holds other files of the same
    names (not images); returns (A, B, the output folder)."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    for name, seed in (("ref.png", 1), ("normal.png", 2)):
        Image.fromarray((np.random.RandomState(seed).rand(80, 80, 3) * 255).astype(np.uint8)).save(a / name)
    m = np.zeros((80, 80), np.uint8)
    m[20:40, 30:50] = 255
    Image.fromarray(m).save(a / "mask.png")
    for name in ("ref.png", "mask.png", "normal.png"):
        (b / name).write_bytes(b"not the file generate read")
    monkeypatch.chdir(a)
    assert main(["generate", "--ref", "ref.png", "--ref-mask", "mask.png", "--normal", "normal.png",
                 "--foreground", "all", "--num", str(num), "--out", str(out), *FAST]) == 0
    monkeypatch.chdir(b)
    return a, b, out
