"""Which groups a dataset run makes: every category x defect type of an MVTec-AD root, or the
groups of a JSON job file (``o2mag dataset --mvtec-root`` / ``--job``).

A group (:class:`GroupSpec`) is one output folder ``<out>/<category>/<defect>/`` with ``num``
samples. From an MVTec root its references are the first third of the sorted ``test/<defect>``
images (:func:`o2mag.sources.mvtec.reference_count`), their masks come from
``ground_truth/<defect>/<stem>_mask.*``, and its normals are the first ``num_normals`` images of
``train/good``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from ..checks import is_int
from ..errors import InputError, MissingInputError, existing_path
from ..masks.images import image_files
from .mvtec import mvtec_categories, mvtec_defects, mvtec_inputs, mvtec_test_images, reference_count

__all__ = ["GroupSpec", "mvtec_groups", "job_groups", "DEFAULT_NUM"]

DEFAULT_NUM = 200
_GROUP_KEYS = {"category", "defect", "num", "references", "normals", "prompt", "anomaly_word", "mvtec_root"}
_TOP_KEYS = {"num", "mvtec_root", "groups", "prompt"}


@dataclass
class GroupSpec:
    """One category x defect type to generate: reference (image, mask) paths, normal image paths."""

    category: str
    defect: str
    num: int
    references: List[tuple] = field(default_factory=list)  # [(image path, mask path)]
    normals: List[Path] = field(default_factory=list)
    prompt: Optional[str] = None
    anomaly_word: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.category}/{self.defect}"


def _pick(names: List[str], wanted: Optional[Sequence[str]], what: str, where: str) -> List[str]:
    if not wanted:
        return names
    missing = [w for w in wanted if w not in names]
    if missing:
        raise MissingInputError(f"{what} {', '.join(repr(m) for m in missing)} not found in {where}; there: "
                                f"{', '.join(names) if names else 'nothing'}")
    return [n for n in names if n in wanted]


def _mvtec_group(root: Path, category: str, defect: str, num: int, num_normals: int) -> GroupSpec:
    ref0, mask0, normals = mvtec_inputs(root, category, defect, ref_index=0)  # checks the layout
    test_dir = root / category / "test" / defect
    n = len(mvtec_test_images(root, category, defect))
    count = reference_count(n)
    if count == 0:
        raise InputError(f"{test_dir} holds {n} image(s): its first third (n // 3) is empty, so it has no "
                         "reference to generate from (a defect type needs at least 3 images)")
    refs = [(ref0, mask0)] + [mvtec_inputs(root, category, defect, ref_index=j)[:2] for j in range(1, count)]
    return GroupSpec(category, defect, num, refs, list(normals[:num_normals]))


def mvtec_groups(root: str | os.PathLike, num: int, num_normals: int = 1,
                 categories: Optional[Sequence[str]] = None,
                 defects: Optional[Sequence[str]] = None) -> List[GroupSpec]:
    """Every category x defect type of an MVTec-AD root (optionally only the named ones)."""
    r = Path(root)
    cats = _pick(mvtec_categories(r), categories, "category", str(r))
    out = []
    seen_defects = set()
    for c in cats:
        names = mvtec_defects(r, c)
        chosen = [d for d in names if not defects or d in defects]
        seen_defects.update(chosen)
        out += [_mvtec_group(r, c, d, num, num_normals) for d in chosen]
    if defects:
        unknown = [d for d in defects if d not in seen_defects]
        if unknown:
            raise MissingInputError(f"defect type {', '.join(repr(u) for u in unknown)} not found in any "
                                    f"chosen category of {r}")
    if not out:
        raise InputError(f"no category x defect type to generate under {r}")
    return out


def _expand_images(paths: List[Path], what: str) -> List[Path]:
    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            found = image_files(p)
            if not found:
                raise InputError(f"{what}: folder {p} holds no images")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise MissingInputError(f"{what}: not found: {p}")
    return out


def _resolve(job_file: Path, x, what: str) -> Path:
    """A path of the job file: ``~`` expanded, relative to the file's folder."""
    if not isinstance(x, str) or not x:
        raise InputError(f"job file {job_file}: {what} must be a path string, got {x!r}")
    q = Path(os.path.expanduser(x))
    return q if q.is_absolute() else job_file.parent / q


def _job_group(p: Path, k: int, g, job: dict, default_num: int, num_normals: int) -> GroupSpec:
    """Group ``k`` of job file ``p`` (``g``: its JSON object), checked."""
    where = f"job file {p}, group {k}"
    if not isinstance(g, dict):
        raise InputError(f"{where}: must be an object")
    bad = set(g) - _GROUP_KEYS
    if bad:
        raise InputError(f"{where}: unknown key(s) {sorted(bad)} (allowed: {sorted(_GROUP_KEYS)})")
    for key in ("category", "defect"):
        if not isinstance(g.get(key), str) or not g[key]:
            raise InputError(f"{where}: needs \"{key}\" (a name)")
    n = g.get("num", default_num)
    if not is_int(n) or n < 1:
        raise InputError(f"{where}: \"num\" must be an integer >= 1, got {n!r}")
    root = g.get("mvtec_root", job.get("mvtec_root"))
    if "references" in g:
        refs = g["references"]
        if not isinstance(refs, list) or not refs:
            raise InputError(f"{where}: \"references\" must be a non-empty list of "
                             "{\"image\", \"mask\"}")
        pairs = []
        for r in refs:
            if not isinstance(r, dict) or set(r) != {"image", "mask"}:
                raise InputError(f"{where}: each reference is {{\"image\": path, \"mask\": path}}, "
                                 f"got {r!r}")
            pairs.append((existing_path(_resolve(p, r["image"], "reference image"), "reference image"),
                          existing_path(_resolve(p, r["mask"], "reference mask"), "reference mask")))
        if "normals" in g:
            if not isinstance(g["normals"], list) or not g["normals"]:
                raise InputError(f"{where}: \"normals\" must be a non-empty list of files or folders")
            normals = _expand_images([_resolve(p, x, "normal") for x in g["normals"]], where)
        elif root is not None:
            normals = mvtec_inputs(_resolve(p, root, "mvtec_root"), g["category"], g["defect"])[2]
        else:
            raise InputError(f"{where}: gives references but no \"normals\" (nor an mvtec_root to take "
                             "train/good from)")
        spec = GroupSpec(g["category"], g["defect"], n, pairs, list(normals[:num_normals]))
    else:
        if root is None:
            raise InputError(f"{where}: needs \"references\" (and \"normals\") or an \"mvtec_root\"")
        spec = _mvtec_group(_resolve(p, root, "mvtec_root"), g["category"], g["defect"], n, num_normals)
        if "normals" in g:
            found = _expand_images([_resolve(p, x, "normal") for x in g["normals"]], where)
            spec.normals = found[:num_normals]
    spec.prompt = g.get("prompt", job.get("prompt"))
    spec.anomaly_word = g.get("anomaly_word")
    return spec


def job_groups(path: str | os.PathLike, num: Optional[int] = None, num_normals: int = 1,
               categories: Optional[Sequence[str]] = None,
               defects: Optional[Sequence[str]] = None) -> List[GroupSpec]:
    """Groups of a JSON job file (see ``o2mag dataset --help``); paths are relative to the file.

    How many samples a group gets: its own ``"num"``, else ``num`` (the command line's ``--num``,
    when given), else the file's ``"num"``, else 200."""
    p = existing_path(path, "job file")
    try:
        job = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"job file {p} is not valid JSON: {e}") from None
    if not isinstance(job, dict) or not isinstance(job.get("groups"), list) or not job["groups"]:
        raise InputError(f"job file {p} must be a JSON object with a non-empty \"groups\" list")
    unknown = set(job) - _TOP_KEYS
    if unknown:
        raise InputError(f"job file {p}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    default_num = num if num is not None else job.get("num", DEFAULT_NUM)
    out = [_job_group(p, k, g, job, default_num, num_normals) for k, g in enumerate(job["groups"])]
    keys = [s.key for s in out]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise InputError(f"job file {p}: the same category/defect twice: {', '.join(dup)}")
    if categories:
        _pick(sorted({s.category for s in out}), categories, "category", str(p))
        out = [s for s in out if s.category in categories]
    if defects:
        _pick(sorted({s.defect for s in out}), defects, "defect type", str(p))
        out = [s for s in out if s.defect in defects]
    return out
