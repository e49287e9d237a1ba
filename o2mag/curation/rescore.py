"""Quality records for folders written before they existed (``o2mag curate --rescore``).

No model is loaded: the baseline is the normal image the manifest names (resized to the sample's
size), not the normal branch's replay, so the VAE's reconstruction error counts as change
(``"baseline": "normal"`` in the record). Reference and normal come from the manifest's settings
(``reference``/``ref_mask`` of ``o2mag generate``, ``references``/``ref_masks`` of ``o2mag
dataset``, or the built-in sample). A relative path there is relative to the directory the
generating command ran in, the line's ``"cwd"`` (:func:`input_path`), never to today's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import InputError
from ..masks import load_image, load_mask, resize_image, resize_mask
from ..sources.sample import embedded_sample
from .decisions import Sample
from ..sample_quality import sample_quality

__all__ = ["rescore_sample", "inputs_of", "input_path", "line_cwd"]


def line_cwd(record: Dict[str, Any]) -> Optional[Path]:
    """The directory the generating command ran in (the line's ``"cwd"``), or None for lines of an
    o2mag that did not record it."""
    cwd = record.get("cwd")
    return Path(cwd) if isinstance(cwd, str) and Path(cwd).is_absolute() else None


def input_path(record: Dict[str, Any], path: str) -> Path:
    """An input path a manifest line names, resolved against the directory the line was written
    from. A relative path in a line without ``"cwd"`` (an older o2mag) could name any file of that
    name: an InputError naming it, rather than a guess from today's directory."""
    p = Path(path)
    if p.is_absolute():
        return p
    cwd = line_cwd(record)
    if cwd is None:
        raise InputError(f"the manifest names the relative path {path!r} but not the directory it is relative to "
                         "(written by an older o2mag); rerun o2mag generate/dataset from the directory it first "
                         "ran in, with the same inputs, so that new lines record it")
    return cwd / p


def inputs_of(record: Dict[str, Any], size: int) -> Tuple[Image.Image, np.ndarray, Image.Image]:
    """(reference, its mask, normal image) of a manifest line, at ``size``; raises InputError
    naming what is missing."""
    settings = record.get("settings") or {}
    ref = record.get("reference") or settings.get("reference")
    normal = record.get("normal") or (settings.get("normals") or [None])[0]
    if ref is None or normal is None:
        raise InputError("the manifest names no reference or normal image")
    if ref == "embedded" or str(normal).startswith("embedded"):
        s = embedded_sample(size)
    if ref == "embedded":
        reference, m_r = s.reference, s.ref_mask
    else:
        mask_path = settings.get("ref_mask")
        refs, masks = settings.get("references") or [], settings.get("ref_masks") or []
        if mask_path is None and ref in refs and len(masks) == len(refs):
            mask_path = masks[refs.index(ref)]
        if mask_path is None:
            raise InputError(f"the manifest names no mask for reference {ref}")
        reference = load_image(input_path(record, ref))
        m_r = load_mask(input_path(record, mask_path), (reference.height, reference.width), resize=False)
    normal_img = s.normal if str(normal).startswith("embedded") else load_image(input_path(record, normal))
    return (resize_image(reference, size), resize_mask(m_r, (size, size)), resize_image(normal_img, size))


def rescore_sample(sample: Sample) -> Optional[Dict[str, Any]]:
    """The quality record of one sample against its normal image (None: image unreadable)."""
    image = Image.open(sample.image).convert("RGB")
    mask = np.asarray(Image.open(sample.mask).convert("L")) > 127
    if image.width != image.height:
        raise InputError(f"{sample.image}: not square ({image.width}x{image.height})")
    reference, m_r, normal = inputs_of(sample.record, image.width)
    return sample_quality(image, normal, mask, reference, m_r, baseline_kind="normal")


def rescore(items: List[Sample]) -> Tuple[Dict[Tuple[str, str], Dict[int, Dict[str, Any]]], List[str]]:
    """Quality records of ``items`` by folder, and one line per sample that could not be scored."""
    out: Dict[Tuple[str, str], Dict[int, Dict[str, Any]]] = {}
    problems = []
    for s in items:
        try:
            q = rescore_sample(s)
        except (InputError, OSError) as e:
            problems.append(f"{s.key}/{s.index:03d}: {e}")
            continue
        out.setdefault((s.category, s.defect), {})[s.index] = q
    return out, problems
