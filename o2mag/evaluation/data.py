"""What evaluation reads: an MVTec-AD category split honestly, and a synthetic tree.

Test split: ``test/good`` plus every ``test/<defect>`` folder without its first third in name
order (``n // 3`` images, the field's convention: those are the images generators may take their
references from). Any test image that a synthetic tree's manifest names as its reference is also
left out, wherever it sits, so a generator's reference never lands in the test set.

Synthetic tree: o2mag's output layout ``<root>/<category>/<defect>/{image,mask}/NNN.png`` with
``manifest.jsonl`` (the last ``ok`` line per index counts, as in :mod:`o2mag.runs.store`); a defect
folder without a manifest (another generator's output) pairs ``image/X`` with ``mask/X`` by
file stem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import InputError, MissingInputError, existing_path
from ..sources.mvtec import mvtec_categories, mvtec_defects, reference_count
from ..curation.decisions import is_rejected
from ..runs.store import MANIFEST_NAME, complete_samples
from ._io import MASK_EXTENSIONS, image_files, load_image, load_mask, resize_image, resize_mask

__all__ = ["TestItem", "CategorySplit", "SyntheticSet", "mvtec_split", "synthetic_samples",
           "synthetic_categories", "load_pairs", "load_images", "to_float"]

MASK_MODES = ("nearest", "bilinear-uint8")


@dataclass
class TestItem:
    image: Path
    mask: Optional[Path]  # None for test/good
    defect: str           # "good" for defect-free images


@dataclass
class CategorySplit:
    category: str
    train_good: List[Path]
    test: List[TestItem]
    references: Dict[str, List[TestItem]]  # the held-back reference third (+ manifest references)
    excluded_by_manifest: List[str] = field(default_factory=list)

    def counts(self) -> dict:
        defects = {}
        for t in self.test:
            defects[t.defect] = defects.get(t.defect, 0) + 1
        return {"train_good": len(self.train_good), "test": defects,
                "references": {d: len(v) for d, v in self.references.items()},
                "excluded_by_manifest": list(self.excluded_by_manifest)}


def _gt_mask(gt_dir: Path, image: Path) -> Path:
    for ext in (image.suffix, *MASK_EXTENSIONS):
        for name in (f"{image.stem}_mask{ext}", f"{image.stem}{ext}"):
            if (gt_dir / name).is_file():
                return gt_dir / name
    raise MissingInputError(f"ground-truth mask for {image} not found: expected {gt_dir / (image.stem + '_mask.png')}")


def mvtec_split(root: str | os.PathLike, category: str, manifest_references: Sequence[str] = ()) -> CategorySplit:
    """Train normals, test items and held-back references of one category (see the module doc)."""
    r = existing_path(root, "MVTec root", folder=True)
    cats = mvtec_categories(r)
    if category not in cats:
        raise MissingInputError(f"category {category!r} not found under {r}; categories there: "
                                f"{', '.join(cats) or 'none'}")
    cat = r / category
    good_train = cat / "train" / "good"
    if not good_train.is_dir() or not image_files(good_train):
        raise InputError(f"no normal training images in {good_train}")
    train = image_files(good_train)
    used = set()
    for ref in manifest_references:
        try:
            used.add(Path(ref).resolve())
        except (OSError, RuntimeError):
            continue
    test: List[TestItem] = []
    references: Dict[str, List[TestItem]] = {}
    excluded: List[str] = []
    good_test = cat / "test" / "good"
    if good_test.is_dir():
        test += [TestItem(p, None, "good") for p in image_files(good_test)]
    for defect in mvtec_defects(r, category):
        files = image_files(cat / "test" / defect)
        gt_dir = cat / "ground_truth" / defect
        k = reference_count(len(files))
        items = [TestItem(p, _gt_mask(gt_dir, p), defect) for p in files]
        references[defect] = items[:k]
        for it in items[k:]:
            if it.image.resolve() in used:
                references[defect].append(it)
                excluded.append(str(it.image))
            else:
                test.append(it)
    if not any(t.defect != "good" for t in test):
        raise InputError(f"{category}: the test split holds no defect image once the reference third is "
                         f"held back (defect folders: {', '.join(mvtec_defects(r, category)) or 'none'})")
    if not any(t.defect == "good" for t in test):
        raise InputError(f"{category}: no defect-free test images in {good_test}")
    return CategorySplit(category, train, test, references, excluded)


@dataclass
class SyntheticSet:
    category: str
    pairs: Dict[str, List[Tuple[Path, Path]]]  # defect -> [(image, mask)]
    references: List[str]                      # reference files named by the manifests
    rejected: Dict[str, int] = field(default_factory=dict)  # defect -> samples left out (review "rejected")

    def total(self) -> int:
        return sum(len(v) for v in self.pairs.values())


def synthetic_categories(root: str | os.PathLike) -> List[str]:
    r = existing_path(root, "synthetic tree", folder=True)
    return sorted(p.name for p in r.iterdir() if p.is_dir() and not p.name.startswith("."))


def _defect_pairs(folder: Path, limit: Optional[int]) -> Tuple[List[Tuple[Path, Path]], List[str], int]:
    refs: List[str] = []
    manifest = folder / MANIFEST_NAME
    pairs: List[Tuple[Path, Path]] = []
    rejected = 0
    if manifest.is_file():
        for _, img, mask, rec in complete_samples(folder):
            if is_rejected(rec):  # a reviewer threw it away (o2mag curate / o2mag review)
                rejected += 1
                continue
            pairs.append((img, mask))
            settings = rec.get("settings") or {}
            ref = settings.get("reference") if isinstance(settings, dict) else None
            ref = rec.get("reference", ref)  # o2mag dataset: each sample names its own reference
            if isinstance(ref, str) and ref not in refs:
                refs.append(ref)
    elif (folder / "image").is_dir() and (folder / "mask").is_dir():
        masks = {p.stem: p for p in image_files(folder / "mask")}
        pairs = [(p, masks[p.stem]) for p in image_files(folder / "image") if p.stem in masks]
    if limit is not None:
        pairs = pairs[:limit]
    return pairs, refs, rejected


def synthetic_samples(root: str | os.PathLike, category: str, max_per_defect: Optional[int] = 500,
                      defects: Optional[Sequence[str]] = None) -> SyntheticSet:
    """Generated (image, mask) pairs of one category, at most ``max_per_defect`` per defect type
    (lowest indices first), without the samples a reviewer rejected (counted in ``rejected``). No
    sample at all is an ``InputError``."""
    r = existing_path(root, "synthetic tree", folder=True)
    cat = r / category
    if not cat.is_dir():
        raise MissingInputError(f"synthetic tree {r} has no folder for category {category!r} "
                                f"(categories there: {', '.join(synthetic_categories(r)) or 'none'})")
    pairs: Dict[str, List[Tuple[Path, Path]]] = {}
    refs: List[str] = []
    left_out: Dict[str, int] = {}
    for d in sorted(p for p in cat.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if defects is not None and d.name not in defects:
            continue
        found, rs, rejected = _defect_pairs(d, max_per_defect)
        if rejected:
            left_out[d.name] = rejected
        if found:
            pairs[d.name] = found
            refs += [x for x in rs if x not in refs]
    if not pairs:
        raise InputError(f"synthetic tree {cat} holds no complete samples (expected <defect>/image/NNN.png, "
                         f"<defect>/mask/NNN.png and {MANIFEST_NAME})")
    return SyntheticSet(category, pairs, refs, left_out)


# ------------------------------------------------------------------------------------------ loading


def _mask_at(path: Path, image_hw: Tuple[int, int], size: int, mode: str) -> np.ndarray:
    try:
        m = load_mask(path, image_hw, resize=False, allow_empty=True)
    except InputError as e:
        raise InputError(f"mask size mismatch or unreadable mask: {e}") from None
    if mode == "nearest":
        return resize_mask(m, (size, size))
    # the papers' masks: bilinear resize of the 0/255 mask, then truncation of value/255 to an
    # integer, so only pixels that stay exactly 255 count as defect (edges are eroded)
    img = Image.fromarray(m.astype(np.uint8) * 255)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img) == 255


def load_images(paths: Sequence[Path], size: int, *, progress: bool = False, desc: str = "images") -> torch.Tensor:
    """RGB images resized to ``size`` x ``size`` as uint8 (N, 3, size, size)."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, disable=not progress, leave=False)):
        out[i] = torch.from_numpy(np.array(resize_image(load_image(p), size))).permute(2, 0, 1)
    return out


def load_pairs(pairs: Sequence[Tuple[Path, Optional[Path]]], size: int, *, mask_mode: str = "nearest",
               progress: bool = False, desc: str = "images") -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 (N, 3, S, S)) and masks (bool (N, S, S)); a ``None`` mask is all normal.

    A mask must have its image's size (else ``InputError`` naming both files): it is resized
    with nearest neighbour (``mask_mode="nearest"``) or the papers' way (``"bilinear-uint8"``).
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    images = torch.empty(len(pairs), 3, size, size, dtype=torch.uint8)
    masks = torch.zeros(len(pairs), size, size, dtype=torch.bool)
    for i, (ip, mp) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        img = load_image(ip)
        images[i] = torch.from_numpy(np.array(resize_image(img, size))).permute(2, 0, 1)
        if mp is not None:
            try:
                masks[i] = torch.from_numpy(_mask_at(mp, (img.height, img.width), size, mask_mode))
            except InputError as e:
                raise InputError(f"{e} (image {ip})") from None
    return images, masks


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 in [0, 1]."""
    return images.float().div_(255)
