"""What several o2mag tests do the same way: the diffusers-style call ``pipe(...)`` on the embedded
sample (a few steps, one AGO step, batches of two targets, every default overridable), and a quick
``o2mag generate`` on the embedded default with a fresh copy of its folder per test."""
from __future__ import annotations

import shutil

from o2mag.cli import main

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
