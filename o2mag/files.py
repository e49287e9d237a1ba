"""Writing the user's files: atomically, with the umask's mode, and (for caches) with a checksum.

Every file o2mag writes for the user (images, masks, contact sheets, caches, reports, manifests of
runs, checkpoints) goes through :func:`atomic_write`: the bytes go to a fresh temporary file in the
destination's folder, are flushed to disk, and the file is renamed over the destination
(``os.replace``), so a reader, a crash or a full disk never leaves half a file under the real name,
and an old file is replaced only by a complete new one. The temporary file is created with mode
``0o666`` and the process umask decides the final permissions, as for any file the user writes
(``tempfile.mkstemp`` would force 0600 and make a shared dataset unreadable to the rest of a team).
Temporary files are named ``.o2mag-<name>.<random>.tmp``; a crash leaves at worst one of those,
which the output store cleans up.

Files that o2mag reads back as its own (the disk caches) are written with :func:`write_checked`: a
one-line header holding the payload's SHA-256 and length, then the payload. :func:`read_checked`
raises :class:`DamagedFileError` for a file that is empty, cut short, altered or not written this
way, so a damaged entry is never used.

An ``OSError`` raised while writing always names the file (``filename``), so the command can print
one line naming the path (exit code 2) instead of a traceback.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

from .errors import InputError

__all__ = ["atomic_write", "write_checked", "read_checked", "check_writable", "DamagedFileError",
           "named_os_error", "fsync_dir", "TMP_PREFIX", "TMP_SUFFIX"]

TMP_PREFIX = ".o2mag-"
TMP_SUFFIX = ".tmp"
_MAGIC = b"O2MAG-CHECKED 1"

Content = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], None]]


class DamagedFileError(ValueError):
    """A checked file is empty, truncated, altered, or was not written by :func:`write_checked`."""


def named_os_error(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its filename when it names none (a failed ``write`` names no file),
    so the command can say which path failed."""
    if exc.filename is not None:
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), str(path))  # the errno picks the subclass
    named.__cause__ = exc
    return named


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(dest: Path) -> tuple:
    """A fresh temporary file beside ``dest``, created with mode 0o666 (the umask applies):
    ``(fd, path)``; ``O_EXCL`` keeps two writers from sharing one name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = dest.parent / f"{TMP_PREFIX}{dest.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue


def atomic_write(path: Union[str, os.PathLike], content: Content, *, fsync: bool = True,
                 make_parents: bool = False) -> Path:
    """Write ``content`` (bytes, or a function that writes to a binary file object) to ``path``
    atomically, with the umask's mode; returns the path.

    ``fsync``: flush the file and its folder to disk (samples and caches; a report may skip it).
    ``make_parents``: create missing folders first. On any error the destination is untouched (an
    old file stays as it was), the temporary file is removed, and an ``OSError`` names ``path``.
    """
    dest = Path(path)
    try:
        if make_parents:
            dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_beside(dest)
    except OSError as e:
        raise named_os_error(e, dest.parent) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise named_os_error(e, dest) from None
        raise
    if fsync:
        fsync_dir(dest.parent)
    return dest


def _header(payload: bytes) -> bytes:
    return _MAGIC + b" sha256=" + hashlib.sha256(payload).hexdigest().encode() + \
        b" size=" + str(len(payload)).encode() + b"\n"


def write_checked(path: Union[str, os.PathLike], payload: bytes, *, make_parents: bool = True) -> Path:
    """Write ``payload`` atomically behind a header with its SHA-256 and length (see the module
    docstring); :func:`read_checked` gives it back only if it is intact."""
    payload = bytes(payload)
    return atomic_write(path, _header(payload) + payload, make_parents=make_parents)


def read_checked(path: Union[str, os.PathLike]) -> bytes:
    """The payload of a file written by :func:`write_checked`; :class:`DamagedFileError` (saying
    what is wrong) when it is empty, cut short, altered or has no header. ``OSError`` when it
    cannot be read at all."""
    data = Path(path).read_bytes()
    if not data:
        raise DamagedFileError("the file is empty")
    head, sep, payload = data.partition(b"\n")
    parts = head.split(b" ")
    if not sep or not head.startswith(_MAGIC + b" ") or len(parts) != 4:
        raise DamagedFileError("it has no o2mag checksum header (damaged, or written by another version)")
    try:
        digest = parts[2].split(b"=", 1)[1].decode("ascii")
        size = int(parts[3].split(b"=", 1)[1])
    except (IndexError, ValueError, UnicodeDecodeError):
        raise DamagedFileError("its checksum header is damaged") from None
    if len(payload) != size:
        raise DamagedFileError(f"it holds {len(payload)} of {size} bytes (cut short or extended)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise DamagedFileError("its content does not match its checksum (the file was altered)")
    return payload


def check_writable(folder: Union[str, os.PathLike], what: str) -> Path:
    """Fail early, with an :class:`~o2mag.errors.InputError` naming ``what`` and the path, when
    files cannot be created in ``folder``. A folder that does not exist yet is not created: its
    nearest existing parent is tried instead (so an input error later leaves nothing behind)."""
    p = Path(folder)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InputError(f"{what} {p}: {probe} is not a folder")
    try:
        fd, tmp = _temp_beside(probe / "write-check")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = e.strerror or os.strerror(e.errno or errno.EIO)
        raise InputError(f"{what} {p}: cannot write in {probe} ({why})") from None
    return p
