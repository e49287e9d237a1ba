"""The call the diffusers-style pipeline tests make: ``pipe(...)`` on the embedded sample with a
few steps, one AGO step and batches of two targets, every default overridable."""
from __future__ import annotations

STEPS = 3
SIZE = 128  # the tiny model's working size


def call(pipe, sample, masks, **kw):
    """``pipe(reference, ref_mask, normal, masks, prompt=..., anomaly_word=..., **kw)``."""
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("ago_steps", 1)
    kw.setdefault("batch_size", 2)
    return pipe(sample.reference, sample.ref_mask, sample.normal, masks, prompt=sample.prompt,
                anomaly_word=sample.anomaly_word, **kw)
