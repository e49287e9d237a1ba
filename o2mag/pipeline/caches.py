"""The pipeline's two result caches: DDIM inversions and AGO embeddings.

Both are expensive (a full inversion; hundreds of UNet forward and backward passes) and depend only
on their inputs, so they are keyed by a hash of everything that changes the result: image content,
prompt, settings, model identity and the scheduler's configuration. Results stay in memory for the
life of the pipeline object and, when a folder is given, are written to
``<folder>/<kind>/<key>.pt`` so that a later run, in another process, reuses them.

Each file is written atomically with a checksum of its content (:func:`o2mag.files.write_checked`)
and verified when read: an entry that is empty, cut short, altered, or unreadable is a *miss* -- a
:class:`~o2mag.errors.DataWarning` names the file, the result is computed again and the file is
replaced (atomically) -- never a result used silently or a crash on every rerun.

Processes that share a folder compute each result once when the cache is given a *lock*
(:data:`CacheLock`): a result missing from memory is looked up on disk, and computed and written,
while the lock for its key is held, so a process that needed the same result meanwhile finds it
on disk when it gets the lock. The multi-process runner supplies a lock made of leases on the
filesystem (:class:`o2mag.runs.runner.CacheLeases`); without one nothing is locked.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import time
import warnings
import zipfile
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import DataWarning
from ..files import TMP_PREFIX, TMP_SUFFIX, DamagedFileError, read_checked, write_checked

__all__ = ["ResultCache", "CacheLock", "content_key", "model_fingerprint", "scheduler_settings"]

CacheLock = Callable[[str, str], ContextManager[None]]
"""``lock(kind, key)``: a context manager held while the result ``key`` of cache ``kind`` is read
from disk or computed and written (see the module docstring)."""


def content_key(*parts: Any) -> str:
    """A stable hash of ``parts`` (arrays by shape and bytes, everything else as sorted JSON)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str(p.shape).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:32]


def model_fingerprint(name: Optional[str], modules) -> str:
    """Model identity for cache keys: its name plus a cheap fingerprint of each module's first and
    last weights (two models saved under one name still get different keys)."""
    fp = []
    for module in modules:
        fp += [type(module).__name__, _weight_sum(module, first=True), _weight_sum(module, first=False)]
    return content_key(name or "unnamed", fp)


def _weight_sum(module, *, first: bool):
    """Sum of the module's first (or last) parameter, read where it lives: under accelerate's
    sequential CPU offload the parameters are meta tensors and the weights sit in each submodule's
    hook (``_hf_hook.weights_map``); the same model gives the same sum either way."""
    subs = list(module.modules())
    for sub in (subs if first else reversed(subs)):
        own = list(sub.named_parameters(recurse=False))
        for pname, p in (own if first else reversed(own)):
            if p.device.type != "meta":
                return float(p.detach().float().sum())
            hook = getattr(sub, "_hf_hook", None)
            for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook chains several
                weights = getattr(h, "weights_map", None)
                if weights is not None and pname in weights:
                    return float(weights[pname].detach().float().sum())
            return f"meta{tuple(p.shape)}"  # weights unreachable: the shape still names the layer
    return None


def scheduler_settings(scheduler) -> Dict[str, Any]:
    """The scheduler config as a cache-key part, without diffusers' private ``_...`` entries
    (``_use_default_values`` comes from a set: its order changes between processes and would make
    every on-disk key new in each run)."""
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


class ResultCache:
    """Results of one kind by content key: in memory, and on disk when a folder is given."""

    def __init__(self, kind: str):
        self.kind = kind
        self._memory: Dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._memory

    def get(self, key: str) -> Any:
        """The in-memory result for ``key`` (None when absent)."""
        return self._memory.get(key)

    def remember(self, key: str, value: Any) -> None:
        self._memory[key] = value

    def clear(self) -> None:
        """Forget the in-memory results (files on disk stay)."""
        self._memory.clear()

    def path(self, folder: Optional[str], key: str) -> Optional[str]:
        return None if not folder else os.path.join(folder, self.kind, f"{key}.pt")

    def load(self, folder: Optional[str], key: str) -> Optional[dict]:
        """The record stored on disk for ``key`` (tensors on the CPU), or None when there is none or
        it is damaged (then a :class:`~o2mag.errors.DataWarning` names the file)."""
        path = self.path(folder, key)
        if not path or not os.path.isfile(path):
            return None
        try:
            record = torch.load(io.BytesIO(read_checked(path)), map_location="cpu")
            if not isinstance(record, dict):
                raise DamagedFileError(f"it holds a {type(record).__name__}, not a record")
        except (DamagedFileError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            self._damaged(path, e)
            return None
        return record

    @staticmethod
    def _damaged(path: str, why: BaseException) -> None:
        warnings.warn(f"cache file {path} is damaged ({why}); computing it again and replacing it",
                      DataWarning, stacklevel=3)

    def fetch(self, key: str, folder: Optional[str], compute: Callable[[], Any], *, pack: Callable[[Any], dict],
              unpack: Callable[[dict], Any], lock: Optional[CacheLock] = None,
              reuse: bool = True) -> Tuple[Any, bool]:
        """``(result, computed)`` for ``key``: from memory, else from ``folder`` (``unpack(record)``),
        else ``compute()``, written to ``folder`` as ``pack(result)``. With ``lock`` and a folder,
        the disk lookup and the computation happen under ``lock(kind, key)``. ``reuse=False``
        computes anew, neither reading nor remembering (it still writes to ``folder``)."""
        if reuse and key in self._memory:
            return self._memory[key], False
        locked = reuse and lock is not None and bool(folder)
        with lock(self.kind, key) if locked else contextlib.nullcontext():
            record = self.load(folder, key) if reuse else None
            if record is not None:
                try:
                    value, computed = unpack(record), False
                except (KeyError, TypeError, ValueError, AttributeError) as e:  # intact, but not this record
                    self._damaged(self.path(folder, key), e)
                    record = None
            if record is None:
                value, computed = compute(), True
                self.save(folder, key, pack(value))
        if reuse:
            self.remember(key, value)
        return value, computed

    def save(self, folder: Optional[str], key: str, record: dict) -> None:
        """Write ``record`` for ``key`` atomically and with a checksum (:func:`o2mag.files.write_checked`),
        so a reader never sees half a file and a damaged one is never used."""
        path = self.path(folder, key)
        if not path:
            return
        buf = io.BytesIO()
        torch.save(record, buf)
        write_checked(path, buf.getbuffer())
        _remove_leftovers(os.path.dirname(path))


def _remove_leftovers(folder: str, max_age: float = 600.0) -> None:
    """Remove the temporary files that killed writers left in a cache folder (those older than
    ``max_age`` seconds: a younger one may be another process's write in progress)."""
    now = time.time()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX) and n.endswith(TMP_SUFFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        try:
            if now - os.stat(path).st_mtime > max_age:
                os.unlink(path)
        except OSError:
            pass
