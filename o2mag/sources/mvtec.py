"""Pick O2MAG inputs from an MVTec-AD folder (or any folder laid out the same way).

MVTec-AD layout::

    <root>/<category>/train/good/000.png                 normal images
    <root>/<category>/test/<defect>/000.png              anomaly images
    <root>/<category>/ground_truth/<defect>/000_mask.png their masks
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import is_int
from ..errors import InputError, MissingInputError, existing_path
from ..masks.images import MASK_EXTENSIONS, image_files

__all__ = ["mvtec_inputs", "mvtec_categories", "mvtec_defects", "mvtec_test_images", "reference_count"]


def reference_count(n: int) -> int:
    """References taken from a defect folder of ``n`` images: its first third in name order,
    ``n // 3`` (the images the usual MVTec protocol trains on and keeps out of its test set)."""
    return n // 3


def _listing(folder: Path, *, dirs: bool) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() == dirs and not p.name.startswith("."))


def _shown(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


def _root(root: str | os.PathLike) -> Path:
    return existing_path(root, "MVTec root", folder=True)


def mvtec_categories(root: str | os.PathLike) -> list[str]:
    """Category folders under ``root`` that have a ``test`` folder."""
    r = _root(root)
    return [c for c in _listing(r, dirs=True) if (r / c / "test").is_dir()]


def mvtec_defects(root: str | os.PathLike, category: str) -> list[str]:
    """Defect types of a category: folders of ``test/`` except ``good``."""
    cat = _category(_root(root), category)
    return [d for d in _listing(cat / "test", dirs=True) if d != "good"]


def _category(r: Path, category: str) -> Path:
    if not isinstance(category, str) or not category:
        raise TypeError(f"category must be a non-empty str, got {category!r}")
    cat = r / category
    if not (cat / "test").is_dir():
        raise MissingInputError(f"category {category!r} not found under {r} (no {category}/test folder); "
                                f"categories there: {_shown(mvtec_categories(r))}")
    return cat


def mvtec_test_images(root: str | os.PathLike, category: str, defect: str) -> list[Path]:
    """The anomaly images of ``test/<defect>`` in name order (what ``ref_index`` counts in)."""
    folder = _category(_root(root), category) / "test" / defect
    if not folder.is_dir():
        raise MissingInputError(f"defect {defect!r} not found in {folder.parent}")
    return image_files(folder)


def mvtec_inputs(root: str | os.PathLike, category: str, defect: str,
                 ref_index: int = 0) -> tuple[Path, Path, list[Path]]:
    """``(ref_image_path, ref_mask_path, normal_paths)`` for one MVTec category and defect type.

    ``ref_index`` is the position of the reference in the sorted ``test/<defect>`` images (in
    MVTec, position 3 is ``003.png``). Its mask is ``ground_truth/<defect>/<stem>_mask.<ext>``.
    ``normal_paths`` are the sorted ``train/good`` images. Missing parts raise ``InputError``
    (``MissingInputError`` for absent files and folders) listing what does exist.
    """
    r = _root(root)
    cat = _category(r, category)
    if not isinstance(defect, str) or not defect:
        raise TypeError(f"defect must be a non-empty str, got {defect!r}")
    if not is_int(ref_index):
        raise TypeError(f"ref_index must be an int, got {type(ref_index).__name__}")
    if ref_index < 0:
        raise ValueError(f"ref_index must be >= 0, got {ref_index}")
    defects = [d for d in _listing(cat / "test", dirs=True) if d != "good"]
    if defect == "good":
        raise InputError(f"defect 'good' has no anomalies; defects of {category}: {_shown(defects)}")
    test_dir = cat / "test" / defect
    if not test_dir.is_dir():
        raise MissingInputError(f"defect {defect!r} not found in {cat / 'test'}; defects of {category}: "
                                f"{_shown(defects)}")
    tests = image_files(test_dir)
    if not tests:
        raise InputError(f"no images in {test_dir}")
    if ref_index >= len(tests):
        raise InputError(f"ref_index {ref_index} is out of range: {test_dir} holds {len(tests)} images "
                         f"(0..{len(tests) - 1})")
    ref = tests[ref_index]
    gt_dir = cat / "ground_truth" / defect
    if not gt_dir.is_dir():
        raise MissingInputError(f"ground-truth folder not found: {gt_dir} (needed for the reference mask)")
    candidates = [gt_dir / f"{ref.stem}_mask{ext}" for ext in (ref.suffix, *MASK_EXTENSIONS)]
    mask = next((c for c in candidates if c.is_file()), None)
    if mask is None:
        raise MissingInputError(f"ground-truth mask for {ref.name} not found: expected {candidates[0]}")
    good = cat / "train" / "good"
    if not good.is_dir():
        raise MissingInputError(f"normal images folder not found: {good}")
    normals = image_files(good)
    if not normals:
        raise InputError(f"no normal images in {good}")
    return ref, mask, normals
