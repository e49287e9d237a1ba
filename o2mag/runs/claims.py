"""Leases on the filesystem: how several writers of one output folder stay out of each other's way.

A *lease* is a small JSON file that says who holds something (a sample index being generated, the
manifest while a line is appended, the preparation of one image's AGO embedding and inversion):
host, process id, run id, process rank and a fingerprint of the run's settings. It is created
exclusively and atomically with ``link(2)`` from a complete temporary file -- the way to create a
file exclusively that also works on NFS, where a lost reply can make ``link`` report an error
although it succeeded (the link count of the temporary file then says the truth); ``O_EXCL`` is
the fallback where hard links are not supported.

A holder renews its leases by touching them from a background thread (every ``lease / 6``
seconds) and checks that each file still carries its token. A lease is *stale*, and may be broken
by anyone, when its process is gone (same machine: its pid no longer exists, or now belongs to
another process -- the process's start time, recorded in the lease, differs; a lease without one,
from an older o2mag, is held by a process that is not an o2mag run), when it was not renewed for
``lease`` seconds (any machine), or when it is not a complete lease at all (empty, cut short, no
token: a crash while it was written; the ``O_EXCL`` fallback writes the content after creating the
file, and a holder displaced in that instant finds out before it writes, as below). Ages are measured against the filesystem's own clock (the
modification time of a file this process has just touched in the same folder), so machines
whose clocks disagree can share a folder. A process that lost a lease (it stalled for longer than
the lease) notices before it writes and does not write.

Everything lives in the folder given to :class:`Leases` (``<out>/<category>/<defect>/.o2mag/`` for
an output folder); nothing here is needed to read the output.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Optional

__all__ = ["DEFAULT_LEASE", "Holder", "Leases", "host_id", "fingerprint", "create_exclusive"]

DEFAULT_LEASE = 120.0
_SUFFIX = ".lease"
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()[:64]
    except OSError:
        return ""


def host_id() -> str:
    """This machine and pid namespace: hostname, boot id and the pid namespace (containers on one
    host share a hostname only if configured so; their pids are still told apart)."""
    ns = ""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return f"{socket.gethostname()}|{_read_text('/proc/sys/kernel/random/boot_id')}|{ns}"


def fingerprint(obj: Any) -> str:
    """Short stable hash of JSON-able settings (equal settings, equal fingerprint)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (clock ticks since boot, from ``/proc/<pid>/stat``), or None
    where that cannot be read (no ``/proc``, the process is gone). A pid reused by a new process
    gets a new start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[19].decode("ascii")  # field 22, starttime
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _runs_o2mag(pid: int) -> bool:
    """Whether process ``pid`` looks like an o2mag run (its command line names o2mag); True where
    that cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"o2mag" in f.read()
    except OSError:
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it.

    The content is complete before the name appears (a reader never sees half a lease). Not
    fsynced: a lease that a machine crash leaves empty is stale.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno in _NO_LINK:  # no hard links here (some FUSE/SMB mounts): O_EXCL instead
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            try:  # NFS: the link may have happened although the reply was lost
                return os.stat(tmp).st_nlink == 2
            except OSError:
                return False
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


@dataclass
class Holder:
    """Who takes leases: one per process and run. ``run`` is shared by the processes of one launch;
    ``settings`` (JSON-able) decide which other runs may share a folder (equal settings, neither
    overwriting)."""

    run: str
    rank: int = 0
    settings: Any = None
    overwrite: bool = False
    annotator: bool = False  # only appends manifest lines about existing samples: shares with any run
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=host_id)
    pid: int = field(default_factory=os.getpid)
    pid_start: Optional[str] = field(default_factory=lambda: process_start(os.getpid()))
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def record(self, what: str) -> Dict[str, Any]:
        return {"what": what, "token": self.token, "run": self.run, "rank": self.rank, "host": self.host,
                "pid": self.pid, "pid_start": self.pid_start, "started": self.started,
                "overwrite": self.overwrite, "fingerprint": fingerprint(self.settings),
                "settings": self.settings, **({"annotator": True} if self.annotator else {})}

    def compatible(self, other: Dict[str, Any]) -> bool:
        """May a process holding ``other`` work in the same folder as this one at the same time?"""
        if other.get("run") == self.run or self.annotator or other.get("annotator"):
            return True
        if self.overwrite or other.get("overwrite"):
            return False
        return other.get("fingerprint") == fingerprint(self.settings)


def describe(info: Dict[str, Any]) -> str:
    """'host h, pid p, rank r, started t' for messages (hostname only)."""
    host = str(info.get("host", "?")).split("|")[0]
    return (f"host {host}, pid {info.get('pid', '?')}, rank {info.get('rank', '?')}, "
            f"started {info.get('started', '?')}")


class _Heartbeat:
    """One daemon thread per process that renews every held lease and notes the ones lost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Dict[str, tuple] = {}  # path -> (token, interval, Leases weakref, last renewal)
        self._thread: Optional[threading.Thread] = None
        self._wake = threading.Event()

    def add(self, path: str, token: str, interval: float, owner: "Leases") -> None:
        with self._lock:
            self._held[path] = (token, interval, weakref.ref(owner), time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="o2mag-lease-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()  # a shorter interval than the one it sleeps on

    def remove(self, path: str) -> None:
        with self._lock:
            self._held.pop(path, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                items = list(self._held.items())
            if not items:
                with self._lock:
                    if not self._held:
                        self._thread = None
                        return
            now = time.monotonic()
            wait = 1.0
            for path, (token, interval, ref, last) in items:
                if now - last < interval:
                    wait = min(wait, interval - (now - last))
                    continue
                owner = ref()
                ok = _token_of(path) == token
                if ok:
                    try:
                        os.utime(path, None)
                    except OSError:
                        ok = False
                with self._lock:
                    if path in self._held:
                        self._held[path] = (token, interval, ref, time.monotonic())
                if not ok and owner is not None:
                    owner._lost.add(path)
                wait = min(wait, interval)
            self._wake.wait(max(0.05, wait))
            self._wake.clear()


_HEARTBEAT = _Heartbeat()


def _read(path: str):
    """(record or {}, mtime) of a lease file, None when it does not exist. Opening the file makes
    NFS revalidate its attributes, so the mtime is the server's current one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        rec = json.loads(data.decode("utf-8"))
        if not isinstance(rec, dict):
            rec = {}
    except (ValueError, UnicodeDecodeError):
        rec = {}  # cut short, or an O_EXCL lease being written: not a lease (stale)
    return rec, mtime


def _token_of(path: str) -> Optional[str]:
    r = _read(path)
    return None if r is None else r[0].get("token")


class Leases:
    """The leases of one ``holder`` in one ``folder`` (created when needed).

    ``try_acquire(name)`` -> True (now held), False (held by a compatible live process); an
    incompatible live holder raises ``on_conflict(record)``'s exception. ``release``, ``holds``
    (still ours, checked on the file), ``live()`` (name -> record of every lease not stale).
    """

    def __init__(self, folder: str | os.PathLike, holder: Holder, lease: float = DEFAULT_LEASE,
                 on_conflict: Optional[Callable[[Dict[str, Any]], BaseException]] = None):
        if not (isinstance(lease, (int, float)) and lease > 0):
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self.folder = Path(folder)
        self.holder = holder
        self.lease = float(lease)
        self.on_conflict = on_conflict
        self._held: Dict[str, str] = {}  # name -> path
        self._lost: set = set()

    # -- helpers -------------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.folder / (name + _SUFFIX)

    def _ensure(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def fs_now(self) -> float:
        """The filesystem's current time: the mtime of a file this process just touched here."""
        self._ensure()
        clock = self.folder / f".clock-{self.holder.token}"
        try:
            with open(clock, "wb") as f:
                f.write(b"0")  # the server stamps the write with its clock; closing flushes it
            return os.stat(clock).st_mtime
        except OSError:
            return time.time()
        finally:
            try:
                os.unlink(clock)
            except OSError:
                pass

    def stale(self, rec: Dict[str, Any], mtime: float, now: Optional[float] = None) -> bool:
        """Not a complete lease (empty, cut short, no token), its process is gone or is another
        process now (same machine), or it was not renewed for ``lease`` seconds (module docstring)."""
        if not isinstance(rec.get("token"), str):
            return True
        pid = rec.get("pid")
        if rec.get("host") == self.holder.host and isinstance(pid, int) and pid != self.holder.pid:
            if not _pid_alive(pid):
                return True
            if "pid_start" not in rec:  # written by an older o2mag: judge the process by its name
                if not _runs_o2mag(pid):
                    return True
            elif rec["pid_start"] is not None:
                start = process_start(pid)
                if start is not None and start != rec["pid_start"]:  # the pid was reused
                    return True
        now = self.fs_now() if now is None else now
        return now - mtime > self.lease

    def _break(self, path: Path, token: Optional[str]) -> None:
        """Remove a stale lease, taking care not to remove a fresh one put there meanwhile."""
        grave = path.with_name(f".{path.name}.broken-{uuid.uuid4().hex}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return
        except OSError:
            return
        moved = _read(str(grave))
        if moved is not None and moved[0].get("token") != token:  # raced: a new lease; put it back
            try:
                os.link(grave, path)
            except OSError:
                pass  # yet another one is there: the displaced holder finds out before it writes
        try:
            os.unlink(grave)
        except OSError:
            pass

    # -- the API -------------------------------------------------------------------------------
    def try_acquire(self, name: str) -> bool:
        self._ensure()
        path = self._path(name)
        if name in self._held and self.holds(name):
            return True
        rec = self.holder.record(name)
        data = json.dumps(rec, sort_keys=True, default=str).encode("utf-8")
        for _ in range(3):
            if create_exclusive(path, data):
                self._held[name] = str(path)
                self._lost.discard(str(path))
                _HEARTBEAT.add(str(path), self.holder.token, max(0.05, self.lease / 6), self)
                return True
            found = _read(str(path))
            if found is None:
                continue  # released meanwhile: try again
            other, mtime = found
            if other.get("token") == self.holder.token:  # a lost reply, yet ours
                self._held[name] = str(path)
                _HEARTBEAT.add(str(path), self.holder.token, max(0.05, self.lease / 6), self)
                return True
            if self.stale(other, mtime):
                self._break(path, other.get("token"))
                continue
            self.check(other)
            return False
        return False

    def acquire(self, name: str, poll: float = 0.05, on_wait: Optional[Callable[[], None]] = None) -> None:
        """Wait until the lease is ours (a holder that dies is outlived by the lease)."""
        delay = poll
        while not self.try_acquire(name):
            if on_wait is not None:
                on_wait()
            time.sleep(delay)
            delay = min(delay * 1.5, max(poll, 2.0))

    def check(self, other: Dict[str, Any]) -> None:
        """Raise when a live lease of another run forbids sharing the folder."""
        if other and not self.holder.compatible(other) and self.on_conflict is not None:
            raise self.on_conflict(other)

    def holds(self, name: str) -> bool:
        path = self._held.get(name)
        if path is None or path in self._lost:
            return False
        return _token_of(path) == self.holder.token

    def release(self, name: str) -> None:
        path = self._held.pop(name, None)
        if path is None:
            return
        _HEARTBEAT.remove(path)
        self._lost.discard(path)
        if _token_of(path) == self.holder.token:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)

    def held(self) -> list:
        return list(self._held)

    def live(self) -> Dict[str, Dict[str, Any]]:
        """Every lease in the folder that is not stale, by name (this holder's included)."""
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(_SUFFIX) and not n.startswith(".")]
        except FileNotFoundError:
            return {}
        out: Dict[str, Dict[str, Any]] = {}
        now = None
        for n in names:
            found = _read(str(self.folder / n))
            if found is None:
                continue
            rec, mtime = found
            if rec.get("token") != self.holder.token:
                if now is None:
                    now = self.fs_now()
                if self.stale(rec, mtime, now):
                    continue
            out[n[: -len(_SUFFIX)]] = rec
        return out

    def check_live(self) -> Dict[str, Dict[str, Any]]:
        """``live()``, raising on the first lease of an incompatible run."""
        found = self.live()
        for rec in found.values():
            self.check(rec)
        return found
