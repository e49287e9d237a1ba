"""The MVTec-like output tree and its JSON-lines manifest, written so no sample is silently lost.

Layout, for one category and defect::

    <root>/<category>/<defect>/image/000.png   generated image (RGB)
    <root>/<category>/<defect>/mask/000.png    its target mask M_T (L mode, 0 / 255)
    <root>/<category>/<defect>/manifest.jsonl  one JSON object per line

A sample is *complete* when its image, its mask and an ``"ok"`` manifest line are all present.
Files are written to a temporary file in the same folder and renamed into place (``os.replace``),
and the manifest line is appended last (flushed and fsynced), so a crash leaves at worst an
incomplete sample, which counts as missing and is generated again by the next run.

The manifest is append-only: the last line for an index is the one that counts. Replacing a
complete sample first appends a ``"replacing"`` line, so a crash half-way through a replacement
cannot leave an old manifest line describing a new image. Each written sample gets a random id,
``"sample"`` (:func:`sample_id`), that annotations keep and a replacement does not: a judgement
made on what a reader saw is recorded only if the sample is still that one
(:meth:`OutputStore.annotate` with ``expect``).

Every line carries ``"check"``, the CRC-32 of the line's other fields (as sorted JSON): a line
whose bytes were changed and still parse as JSON (a digit of a seed, an index) fails it and is
ignored with a warning, like a line that does not parse, so its sample counts as missing and is
made again. Lines without ``"check"`` (older o2mag) are read as they are.

Several writers may share a defect folder (processes of one multi-GPU run, or independent runs
with the same settings): appends to the manifest hold a short lease on it, and a writer that
generates sample ``i`` first *claims* it (:meth:`OutputStore.claim`), so no sample is made twice.
Claims, the manifest lease and their heartbeats live in ``<defect>/.o2mag/`` (see
:mod:`o2mag.runs.claims`); a run whose settings differ from those of a live writer stops with
:class:`~o2mag.errors.ConcurrentRunError`.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
import warnings
import zlib
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .._version import __version__
from ..checks import is_int
from .claims import DEFAULT_LEASE, Holder, Leases, describe
from ..files import TMP_PREFIX, TMP_SUFFIX, atomic_write, fsync_dir, named_os_error
from ..errors import (ClaimLostError, ConcurrentRunError, DataWarning, InputError, SampleExistsError,
                      SettingsConflictError)
from ..masks import to_mask

__all__ = ["OutputStore", "read_manifest", "package_versions", "sample_id", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.jsonl"
_TMP_PREFIX = TMP_PREFIX  # temporary files of atomic writes (o2mag.files), cleaned after a crash
_TMP_SUFFIX = TMP_SUFFIX
_RESERVED = ("index", "status", "image", "mask", "settings", "versions", "timestamp", "run", "sample")
SAMPLE_KEY = "sample"  # a random id given to each sample when it is written, kept by annotations
COORD_DIR = ".o2mag"  # claims and the manifest lease, inside each defect folder
_TEMP_MAX_AGE = 600.0  # seconds: an older temporary file is a crash leftover even while others write


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str | None], ...]:
    out: list[tuple[str, str | None]] = [("o2mag", __version__)]
    for name in ("torch", "diffusers", "transformers"):
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that decide what an image looks like (recorded per sample)."""
    return dict(_versions())


def _check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a str, got {type(value).__name__}")
    if not value or value in (".", "..") or any(c in value for c in "/\\\0") or value != value.strip():
        raise InputError(f"{kind} must be a plain folder name (no '/', '\\', leading/trailing spaces, "
                         f"'.' or '..'), got {value!r}")
    return value


def _numpy_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _normalise(obj: Any, name: str) -> Any:
    """JSON round trip (tuples become lists, keys sorted), so equal settings compare equal."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False, default=_numpy_default))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be JSON-serialisable (finite numbers, str, list, dict): "
                        f"{exc}") from None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "settings": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _diff(old: Any, new: Any, limit: int = 5) -> str:
    a, b = _flat(old), _flat(new)
    missing = object()
    parts = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            fa = "(unset)" if va is missing else json.dumps(va)
            fb = "(unset)" if vb is missing else json.dumps(vb)
            parts.append(f"{k}: {fa} -> {fb}")
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All well-formed lines of a manifest, in file order ([] when the file does not exist).

    Lines cut short by a crash (they lack the closing ``}``) are skipped silently; any other
    malformed line is skipped with a warning.
    """
    p = Path(path)
    if not p.exists():
        return []
    return _parse_lines(p.read_bytes(), p)


def complete_samples(defect_dir: str | os.PathLike) -> list[tuple[int, Path, Path, dict[str, Any]]]:
    """(index, image path, mask path, manifest line) of the complete samples of an output folder
    ``<root>/<category>/<defect>``, by index, for readers (the last line of an index wins; it
    must be ``"ok"`` with both files present). Paths in the manifest are relative to ``<root>``."""
    folder = Path(defect_dir)
    root = folder.parent.parent
    last = {rec["index"]: rec for rec in read_manifest(folder / MANIFEST_NAME)}
    out = []
    for i in sorted(last):
        rec = last[i]
        if rec.get("status") != "ok" or not isinstance(rec.get("image"), str) \
                or not isinstance(rec.get("mask"), str):
            continue
        img, mask = root / rec["image"], root / rec["mask"]
        if img.is_file() and mask.is_file():
            out.append((i, img, mask, rec))
    return out


def sample_id(rec: dict[str, Any]) -> str | None:
    """The identity of the sample a manifest line describes: the random ``"sample"`` id that
    :meth:`OutputStore.write` gives each written sample (annotations keep it, a replacement gets a
    new one). Lines from before it existed are identified by their ``timestamp`` and ``run``.
    None for a line that describes no complete sample (``"replacing"``)."""
    if rec.get("status") != "ok":
        return None
    if isinstance(rec.get(SAMPLE_KEY), str):
        return rec[SAMPLE_KEY]
    return f"{rec.get('timestamp')}/{rec.get('run') or ''}"


CHECK_KEY = "check"


def _line_check(rec: dict[str, Any]) -> str:
    """The check a manifest line carries: CRC-32 of its other fields as sorted JSON."""
    body = json.dumps({k: v for k, v in rec.items() if k != CHECK_KEY}, sort_keys=True, allow_nan=False)
    return f"crc32:{zlib.crc32(body.encode('utf-8')):08x}"


def _verified(rec: Any) -> dict[str, Any]:
    """``rec`` without its check, or ValueError when it is not a manifest record or fails it."""
    if not isinstance(rec, dict) or isinstance(rec.get("index"), bool) or not isinstance(rec.get("index"), int):
        raise ValueError("not an object with an integer 'index'")
    if CHECK_KEY in rec:
        if rec[CHECK_KEY] != _line_check(rec):
            raise ValueError("its check does not match its content: the line was changed after it was written")
        rec = {k: v for k, v in rec.items() if k != CHECK_KEY}
    return rec


def _parse_lines(data: bytes, p: Path, first_line: int = 1) -> list[dict[str, Any]]:
    out = []
    for no, raw in enumerate(data.split(b"\n"), first_line):
        if not raw.strip():
            continue
        if not raw.rstrip().endswith(b"}"):  # a crash cut this line short: no data in it
            continue
        try:
            rec = _verified(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            warnings.warn(f"{p}: line {no} ignored ({exc})", DataWarning, stacklevel=2)
            continue
        out.append(rec)
    return out


def _last_line(raw: bytes) -> dict[str, Any] | None:
    """A manifest's last line when it lacks its newline: the record if it is one, else None
    (silently: it may be a line another writer is still appending)."""
    if not raw.rstrip().endswith(b"}"):
        return None
    try:
        return _verified(json.loads(raw.decode("utf-8")))
    except (ValueError, UnicodeDecodeError):
        return None


def _atomic_png(img: Image.Image, dest: Path) -> None:
    atomic_write(dest, lambda f: img.save(f, format="PNG"))


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image must be a PIL image, (H, W) or (H, W, 3) uint8 array, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


class OutputStore:
    """Write generated samples into ``<root>/<category>/<defect>/`` and resume interrupted runs.

    ``settings``: a JSON-serialisable dict of everything that changes the pictures (model,
    prompt, steps, guidance, mask kind and its parameters, base seed, ...), not ``--num``, the
    output folder or the batch size. It is stored in every manifest line. Without ``overwrite``,
    a folder whose complete samples were made with other settings raises
    ``SettingsConflictError`` at construction, so a resumed run never mixes two setups; identical
    settings resume.

    ``overwrite=True``: every index this run writes is replaced (its files and, by a new line,
    its manifest entry), whatever was there. Nothing is deleted: samples at indices this run
    does not write (e.g. ``--num 5`` over a folder of 10) stay on disk with their old manifest
    lines; remove them by hand if unwanted. The manifest keeps the full history.

    Leftover temporary files of a crashed run (``.o2mag-*.tmp`` in this folder) are removed
    (while other writers are active, only those older than ten minutes). ``annotator=True``: a
    store opened only to :meth:`annotate` samples (review decisions, quality records); it leaves
    temporary files alone (a writer may hold no claim while it renames its files into place) and
    shares the folder with any run, since it never writes a sample.

    Several writers: ``run`` names the run this store writes for (the processes of one launch share
    it; it is recorded as ``"run"`` in each manifest line, and with ``overwrite`` "done" means
    "written by this run"), ``rank`` the process. :meth:`claim` / :meth:`release` take samples;
    :meth:`refresh` reads what other writers appended. ``lease``: seconds after which a claim of a
    process that stopped renewing it (killed on another machine) may be taken over.
    """

    def __init__(self, root: str | os.PathLike, category: str, defect: str, overwrite: bool = False,
                 settings: dict[str, Any] | None = None, *, run: str | None = None, rank: int = 0,
                 lease: float = DEFAULT_LEASE, annotator: bool = False):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a str or os.PathLike, got {type(root).__name__}")
        if not isinstance(overwrite, (bool, np.bool_)):
            raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}")
        if settings is not None and not isinstance(settings, dict):
            raise TypeError(f"settings must be a dict or None, got {type(settings).__name__}")
        self.root = Path(root)
        self.category = _check_name("category", category)
        self.defect = _check_name("defect", defect)
        self.overwrite = bool(overwrite)
        self.settings = None if settings is None else _normalise(settings, "settings")
        self.dir = self.root / self.category / self.defect
        self.image_dir = self.dir / "image"
        self.mask_dir = self.dir / "mask"
        self.manifest_path = self.dir / MANIFEST_NAME
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"output root is not a folder: {self.root}")
        try:
            for d in (self.image_dir, self.mask_dir):
                d.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise InputError(f"cannot create output folder {self.dir}: {exc}") from None
        self.run = run
        self.holder = Holder(run=run or uuid.uuid4().hex[:12], rank=int(rank), settings=self.settings,
                             overwrite=self.overwrite, annotator=bool(annotator))
        self.leases = Leases(self.dir / COORD_DIR, self.holder, lease, on_conflict=self._conflict)
        if not annotator:  # a store that only annotates leaves writers' files alone
            self._remove_stale_temp_files()
        self._last: dict[int, dict[str, Any]] = {}
        self._written: set[int] = set()
        self._offset = 0
        self._line_no = 1
        self.refresh(check=False)
        if self.settings is not None and not self.overwrite:
            self._check_settings()

    # -- paths -------------------------------------------------------------------------------

    @staticmethod
    def file_name(index: int) -> str:
        """``NNN.png``: three digits at least, more from index 1000 on."""
        return f"{index:03d}.png"

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.file_name(index)

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / self.file_name(index)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # -- state -------------------------------------------------------------------------------

    def _remove_stale_temp_files(self) -> None:
        busy = bool(self.leases.live())  # another writer may be renaming its files into place
        now = self.leases.fs_now() if busy else 0.0
        for d in (self.dir, self.image_dir, self.mask_dir):
            for f in d.iterdir():
                if f.name.startswith(_TMP_PREFIX) and f.name.endswith(_TMP_SUFFIX) and f.is_file():
                    try:
                        if not busy or now - f.stat().st_mtime > _TEMP_MAX_AGE:
                            f.unlink()
                    except FileNotFoundError:
                        pass

    def refresh(self, check: bool = True) -> None:
        """Read the manifest lines appended since the last read (by this or any other writer).

        With ``check`` (and settings, no overwrite), a new complete sample made with other
        settings raises :class:`~o2mag.errors.ConcurrentRunError`."""
        try:
            with open(self.manifest_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        chunk = data[: end + 1]
        recs = _parse_lines(chunk, self.manifest_path, self._line_no)
        tail = _last_line(data[end + 1:])  # a last line without its newline (edited by hand): read again
        # at the next refresh, as its newline may still come
        for rec in recs + ([tail] if tail else []):
            i = rec["index"]
            self._last[i] = rec
            if self.run is not None and rec.get("run") == self.run and rec.get("status") == "ok":
                self._written.add(i)  # another process of this run made it (overwrite: done)
            if check and self.settings is not None and not self.overwrite and rec.get("status") == "ok" \
                    and rec.get("settings") != self.settings:
                raise ConcurrentRunError(
                    f"another run wrote sample {i} to {self.dir} with other settings "
                    f"({_diff(rec.get('settings'), self.settings)}) while this one was running; "
                    "stopping so that two setups do not mix")
        self._offset += len(chunk)
        self._line_no += chunk.count(b"\n")

    def is_complete(self, index: int) -> bool:
        """Sample ``index`` is on disk whole: image file, mask file and an ``ok`` manifest line
        (as of the last :meth:`refresh`)."""
        rec = self._last.get(index)
        return (rec is not None and rec.get("status") == "ok"
                and self.image_path(index).is_file() and self.mask_path(index).is_file())

    def existing_indices(self) -> list[int]:
        """Indices of complete samples: image file, mask file and an ``ok`` manifest line."""
        return sorted(i for i in self._last if self.is_complete(i))

    def records(self) -> dict[int, dict[str, Any]]:
        """The manifest line of every complete sample, by index."""
        return {i: self._last[i] for i in self.existing_indices()}

    def missing_indices(self, num: int) -> list[int]:
        """Indices in ``0..num-1`` this run still has to generate so the folder holds ``num`` samples.

        Without overwrite: those not complete on disk (so a rerun only fills gaps). With
        overwrite: all of them, except those this store already wrote.
        """
        if not is_int(num):
            raise TypeError(f"num must be an int, got {type(num).__name__}")
        if num < 0:
            raise ValueError(f"num must be >= 0, got {num}")
        return [i for i in range(int(num)) if not self.done(i)]

    def done(self, index: int) -> bool:
        """Nothing left to do for ``index``: complete on disk (resume) or written by this run or
        store (overwrite). Reflects the last :meth:`refresh`."""
        if self.overwrite:
            return index in self._written and self.is_complete(index)
        return self.is_complete(index)

    def extra_indices(self, num: int) -> list[int]:
        """Complete samples at indices ``>= num`` (kept on disk, never deleted)."""
        return [i for i in self.existing_indices() if i >= num]

    def _check_settings(self) -> None:
        conflicts = [(i, rec) for i, rec in self.records().items() if rec.get("settings") != self.settings]
        if not conflicts:
            return
        first_index, first = conflicts[0]
        raise SettingsConflictError(
            f"{self.dir} already holds {len(conflicts)} sample(s) made with other settings "
            f"(sample {first_index}: {_diff(first.get('settings'), self.settings)}); "
            "resuming would mix two setups. Rerun with --overwrite to replace them, "
            "or choose another output folder.")

    # -- writing -----------------------------------------------------------------------------

    # -- claims ------------------------------------------------------------------------------

    def _conflict(self, other: dict[str, Any]) -> ConcurrentRunError:
        who = describe(other)
        if other.get("overwrite") or self.overwrite:
            why = "it overwrites samples" if other.get("overwrite") else "this run overwrites samples"
        else:
            why = f"its settings differ: {_diff(other.get('settings'), self.settings)}"
        return ConcurrentRunError(
            f"another o2mag run is writing {self.dir} ({who}) and {why}; two runs may share a folder only "
            "with the same settings and without --overwrite. Wait for it to finish, or choose another "
            "output folder")

    @staticmethod
    def _claim_name(index: int) -> str:
        return f"{index:06d}"

    def check_others(self) -> None:
        """Raise :class:`~o2mag.errors.ConcurrentRunError` if a live writer of this folder belongs to
        a run that may not share it (other settings, or either overwriting)."""
        self.leases.check_live()

    def claimed_by_others(self) -> set[int]:
        """Indices claimed right now by live writers other than this store (checks them too)."""
        out = set()
        for name, rec in self.leases.check_live().items():
            if name.isdigit() and rec.get("token") != self.holder.token:
                out.add(int(name))
        return out

    def claim(self, indices) -> list[int]:
        """Claim each index not done and not claimed by another live writer; returns those now held
        (in order). Call :meth:`refresh` first to see other writers' finished samples."""
        got = []
        for i in indices:
            i = int(i)
            if self.done(i):
                continue
            if self.leases.try_acquire(self._claim_name(i)):
                got.append(i)
        if got:
            self.refresh()  # a sample finished between our look and our claim is not made again
            for i in [i for i in got if self.done(i)]:
                self.release(i)
                got.remove(i)
        return got

    def holds(self, index: int) -> bool:
        return self.leases.holds(self._claim_name(index))

    def release(self, index: int) -> None:
        self.leases.release(self._claim_name(index))

    def close(self) -> None:
        """Release every claim and lease this store holds (a run that stops early calls it)."""
        self.leases.release_all()

    def _append(self, rec: dict[str, Any]) -> None:
        self.leases.acquire("manifest")
        try:
            self._append_locked(rec)
        finally:
            self.leases.release("manifest")

    def _append_locked(self, rec: dict[str, Any]) -> None:
        rec = {k: v for k, v in rec.items() if k != CHECK_KEY}
        rec[CHECK_KEY] = _line_check(rec)
        line = json.dumps(rec, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"
        new = not self.manifest_path.exists()
        try:
            with open(self.manifest_path, "ab") as f:
                start = f.tell()
                if start > 0:
                    with open(self.manifest_path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":  # a crash cut the last line short: keep ours separate
                            line = b"\n" + line
                try:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError:  # a full disk: take back what part of the line got in
                    f.truncate(start)
                    raise
        except OSError as e:
            raise named_os_error(e, self.manifest_path) from None
        if new:
            fsync_dir(self.dir)

    def annotate(self, changes: dict[int, dict[str, Any]],
                 expect: dict[int, str | None] | None = None) -> dict[int, dict[str, Any]]:
        """Add facts to complete samples' manifest lines (review decisions, quality records):
        ``{index: {key: value}}``; a value of ``None`` removes the key. Returns the new line of
        each sample changed; samples not complete (missing, or being replaced) are left out.

        ``expect``: ``{index: id}``, the :func:`sample_id` of the sample the caller judged (one for
        every index of ``changes``). An index whose sample is now another one (a ``generate
        --overwrite`` replaced it since the caller read it) is left out too, so a judgement never
        lands on a picture nobody saw. Without ``expect`` the change goes to whatever sample is there.

        Each change is a new line: a copy of the sample's last ``"ok"`` line with the keys
        changed, appended under the manifest lease after reading what other writers appended, so
        it is safe beside a running ``generate`` (a sample it replaces afterwards gets its own new
        line, without the change). The store's own keys (index, status, image, ...) may not change.
        """
        if not isinstance(changes, dict):
            raise TypeError(f"changes must be a dict {{index: {{key: value}}}}, got {type(changes).__name__}")
        for i, c in changes.items():
            if not is_int(i) or not isinstance(c, dict):
                raise TypeError(f"changes must map int indices to dicts, got {i!r}: {type(c).__name__}")
            clash = sorted(set(c) & set(_RESERVED))
            if clash:
                raise ValueError(f"changes may not set {clash}: the store fills these in")
        if expect is not None:
            if not isinstance(expect, dict):
                raise TypeError(f"expect must be a dict {{index: sample id}} or None, got {type(expect).__name__}")
            lacking = sorted(set(changes) - set(expect))
            if lacking:
                raise ValueError(f"expect lacks the sample id of index(es) {lacking}")
        out: dict[int, dict[str, Any]] = {}
        if not changes:
            return out
        self.leases.acquire("manifest")
        try:
            self.refresh(check=False)
            for i in sorted(changes):
                if not self.is_complete(int(i)):
                    continue
                if expect is not None and sample_id(self._last[int(i)]) != expect[i]:
                    continue  # another sample than the one judged
                line = dict(self._last[int(i)])
                for k, v in _normalise(changes[i], "changes").items():
                    if v is None:
                        line.pop(k, None)
                    else:
                        line[k] = v
                self._append_locked(line)
                self._last[int(i)] = out[int(i)] = line
            self.refresh(check=False)  # step over our own lines
        finally:
            self.leases.release("manifest")
        return out

    def write(self, index: int, image: Any, mask: Any,
              record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write sample ``index`` (image, mask) and its manifest line; returns that line.

        ``record``: the sample's own facts, e.g. ``{"seed": 7, "mask_params": {...}}``; it must be
        JSON-serialisable and may not use the keys the store fills in (index, status, image,
        mask, settings, versions, timestamp, run, sample). Raises ``SampleExistsError`` when the
        sample is already complete and the store was not opened with ``overwrite=True``.
        """
        if not is_int(index):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        img = _as_image(image)
        m = to_mask(mask, "mask")
        if m.shape != (img.height, img.width):
            raise ValueError(f"mask has shape {m.shape} but the image is {img.height}x{img.width} (HxW)")
        record = {} if record is None else record
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict or None, got {type(record).__name__}")
        clash = sorted(set(record) & set(_RESERVED))
        if clash:
            raise ValueError(f"record may not set {clash}: the store fills these in")
        line = _normalise(record, "record")
        line.update({
            "index": index, "status": "ok",
            "image": self._rel(self.image_path(index)), "mask": self._rel(self.mask_path(index)),
            "settings": self.settings, "versions": package_versions(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            SAMPLE_KEY: uuid.uuid4().hex[:16],
        })
        claimed = self._claim_name(index) in self.leases.held()
        if claimed and not self.holds(index):
            self.release(index)
            raise ClaimLostError(f"sample {index} in {self.dir}: this process's claim was taken over (it did "
                                 f"not renew it for {self.leases.lease:.0f} s); not writing it")
        if self.run is not None:
            line["run"] = self.run
        if self.is_complete(index) and not self.overwrite:
            raise SampleExistsError(f"sample {index} already exists in {self.dir} "
                                    f"({self.file_name(index)}); use overwrite (--overwrite) to replace it")
        if self._last.get(index, {}).get("status") == "ok":
            marker = {"index": index, "status": "replacing",
                      "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            self._append(marker)
            self._last[index] = marker
        _atomic_png(img, self.image_path(index))
        _atomic_png(Image.fromarray(m.astype(np.uint8) * 255), self.mask_path(index))
        self._append(line)
        self._last[index] = line
        self._written.add(index)
        if claimed:
            self.release(index)
        return line
