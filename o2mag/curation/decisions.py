"""Review decisions kept in the manifests of an output tree ``<out>/<category>/<defect>/``.

A sample's ``review`` is ``"accepted"``, ``"rejected"`` or absent (unreviewed); it lives in its
manifest line, written through :meth:`o2mag.runs.store.OutputStore.annotate` (a new line under the
manifest lease), so decisions are safe beside a running ``o2mag generate`` and survive restarts.
``status`` stays the store's own write state. Readers (evaluation, contact sheets, the dataset
summary) ask :func:`is_rejected` and :func:`review_counts`.

A decision names the sample it judges by :attr:`Sample.id` (the store's
:func:`~o2mag.runs.store.sample_id`): when the sample at that index was replaced since it was read,
the decision is not recorded (:func:`decide` leaves it out of its answer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import InputError
from ..runs.store import MANIFEST_NAME, OutputStore, complete_samples, sample_id

__all__ = ["REVIEWS", "Sample", "defect_folders", "samples", "decide", "is_rejected", "review_counts",
           "reject_below", "keep_top", "check_review"]

REVIEWS = ("accepted", "rejected")


@dataclass
class Sample:
    """One complete sample of an output tree, as curation sees it."""

    category: str
    defect: str
    index: int
    image: Path
    mask: Path
    record: Dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.category}/{self.defect}"

    @property
    def score(self) -> Optional[float]:
        q = self.record.get("quality")
        s = q.get("score") if isinstance(q, dict) else None
        return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None

    @property
    def id(self) -> Optional[str]:
        """The identity of this very sample (a replacement at the same index has another)."""
        return sample_id(self.record)

    @property
    def review(self) -> Optional[str]:
        r = self.record.get("review")
        return r if r in REVIEWS else None


def check_review(value: Any) -> Optional[str]:
    """A review value as given by a user or a client: "accepted", "rejected" or None."""
    if value is None or (isinstance(value, str) and value in REVIEWS):
        return value
    raise InputError(f"review must be 'accepted', 'rejected' or null, got {value!r}")


def defect_folders(out: str | os.PathLike) -> List[Tuple[str, str, Path]]:
    """(category, defect, folder) of every ``<out>/<category>/<defect>/`` holding a manifest."""
    root = Path(out)
    if not root.is_dir():
        raise InputError(f"output folder not found: {root}")
    found = []
    for manifest in sorted(root.glob(f"*/*/{MANIFEST_NAME}")):
        folder = manifest.parent
        if not folder.name.startswith(".") and not folder.parent.name.startswith("."):
            found.append((folder.parent.name, folder.name, folder))
    return found


def samples(out: str | os.PathLike, category: Optional[str] = None, defect: Optional[str] = None) -> List[Sample]:
    """Every complete sample under ``out`` (optionally of one category and/or defect type), in
    folder and index order."""
    res = []
    for cat, dfc, folder in defect_folders(out):
        if (category is None or cat == category) and (defect is None or dfc == defect):
            res.extend(Sample(cat, dfc, i, img, mask, rec) for i, img, mask, rec in complete_samples(folder))
    return res


def is_rejected(record: Dict[str, Any]) -> bool:
    """A manifest line whose sample a reviewer rejected."""
    return record.get("review") == "rejected"


def review_counts(defect_dir: str | os.PathLike) -> Dict[str, int]:
    """``{"accepted", "rejected", "unreviewed"}`` counts of a defect folder's complete samples."""
    counts = {"accepted": 0, "rejected": 0, "unreviewed": 0}
    for _, _, _, rec in complete_samples(defect_dir):
        r = rec.get("review")
        counts[r if r in REVIEWS else "unreviewed"] += 1
    return counts


def decide(out: str | os.PathLike, category: str, defect: str, reviews: Dict[int, Optional[str]],
           expect: Optional[Dict[int, Optional[str]]] = None) -> Dict[int, Dict[str, Any]]:
    """Record ``{index: "accepted" | "rejected" | None}`` for one defect folder; returns the new
    manifest line of each sample changed (samples not complete are left out). ``expect``:
    ``{index: Sample.id}`` of the samples judged; one replaced since is left out too."""
    changes = {int(i): {"review": check_review(v)} for i, v in reviews.items()}
    if expect is not None:
        expect = {int(i): v for i, v in expect.items()}
    folder = Path(out) / category / defect
    if not (folder / MANIFEST_NAME).is_file():
        raise InputError(f"no generated samples in {folder} (no {MANIFEST_NAME})")
    store = OutputStore(out, category, defect, annotator=True)
    try:
        return store.annotate(changes, expect)
    finally:
        store.close()


def _by_folder(items: Iterable[Sample]) -> Dict[Tuple[str, str], List[Sample]]:
    groups: Dict[Tuple[str, str], List[Sample]] = {}
    for s in items:
        groups.setdefault((s.category, s.defect), []).append(s)
    return groups


def reject_below(items: Iterable[Sample], threshold: float) -> Dict[Tuple[str, str], Dict[int, str]]:
    """Decisions rejecting every scored sample whose score is below ``threshold`` (others untouched)."""
    return {k: {s.index: "rejected" for s in v if s.score is not None and s.score < threshold}
            for k, v in _by_folder(items).items()}


def keep_top(items: Iterable[Sample], k: int,
             earlier: Optional[Dict[Tuple[str, str], Dict[int, Optional[str]]]] = None
             ) -> Dict[Tuple[str, str], Dict[int, str]]:
    """Per defect type, decisions keeping the ``k`` best scored samples, never overturning one:
    a sample already accepted or rejected (in its manifest line, or by ``earlier``, the decisions
    of the same command made before, e.g. :func:`reject_below`'s) keeps its review and accepted
    ones count toward ``k``; the best of the other scored samples are accepted until ``k`` are
    accepted, and the rest of them rejected (ties broken by index, lower first)."""
    earlier = earlier or {}
    out = {}
    for key, v in _by_folder(items).items():
        before = earlier.get(key, {})
        review = {s.index: before.get(s.index, s.review) for s in v}
        room = max(0, k - sum(1 for r in review.values() if r == "accepted"))
        open_ = sorted((s for s in v if s.score is not None and review[s.index] is None),
                       key=lambda s: (-s.score, s.index))
        out[key] = {s.index: ("accepted" if rank < room else "rejected") for rank, s in enumerate(open_)}
    return out
