"""The pipeline's result caches and their lock: a result missing from memory is read from disk, or
computed and written, while the lock for its key is held, so processes that share a cache folder
compute each AGO embedding and inversion once (the runner's lock is a lease per result)."""
import contextlib
import threading
import time

import numpy as np
import torch

from o2mag.pipeline.caches import ResultCache
from o2mag.runs.claims import Holder, Leases
from o2mag.runs.runner import CacheLeases


class RecordingLock:
    def __init__(self):
        self.taken = []

    @contextlib.contextmanager
    def __call__(self, kind, key):
        self.taken.append((kind, key))
        yield


def _fetch(cache, folder, compute, lock=None, reuse=True):
    return cache.fetch("k", folder, compute, pack=lambda v: {"v": v}, unpack=lambda r: r["v"] + 0, lock=lock,
                       reuse=reuse)


def test_fetch_reads_memory_then_disk_then_computes_under_the_lock(tmp_path):
    calls, lock = [], RecordingLock()

    def compute():
        calls.append(1)
        return torch.tensor([1.0])

    cache = ResultCache("embeddings")
    value, computed = _fetch(cache, str(tmp_path), compute, lock)
    assert computed and calls == [1] and lock.taken == [("embeddings", "k")]
    assert (tmp_path / "embeddings" / "k.pt").is_file()
    assert _fetch(cache, str(tmp_path), compute, lock) == (value, False)  # memory: no lock, no work
    assert lock.taken == [("embeddings", "k")]
    other = ResultCache("embeddings")  # another process, same folder: read from disk under the lock
    value2, computed2 = _fetch(other, str(tmp_path), compute, lock)
    assert not computed2 and torch.equal(value2, value) and calls == [1] and len(lock.taken) == 2
    # no folder: nothing to share, so nothing is locked; reuse=False computes anew and remembers nothing
    _fetch(ResultCache("inversions"), None, compute, lock)
    assert len(lock.taken) == 2
    fresh = ResultCache("inversions")
    assert _fetch(fresh, None, compute, lock, reuse=False)[1] and "k" not in fresh and len(lock.taken) == 2


def test_a_second_holder_waits_for_the_first_and_reads_its_result(tmp_path):
    folder, locks = str(tmp_path / "cache"), tmp_path / "cache" / "locks"
    shown = []
    a = CacheLeases(Leases(locks, Holder(run="a")), shown.append)
    b = CacheLeases(Leases(locks, Holder(run="b")), shown.append)
    started, calls = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.5)
        calls.append("a")
        return torch.tensor([7.0])

    first = threading.Thread(target=lambda: _fetch(ResultCache("inversions"), folder, slow, a))
    first.start()
    started.wait(5)
    value, computed = _fetch(ResultCache("inversions"), folder, lambda: calls.append("b") or torch.tensor([0.0]), b)
    first.join()
    assert calls == ["a"] and not computed and value.item() == 7.0
    assert "inversion" in shown and "waiting for another process's inversion" in shown and None in shown
    assert not list(locks.glob("*.lease"))  # both released


def test_the_pipeline_takes_the_lock_only_for_what_it_must_compute(pipe, tmp_path):
    lock = RecordingLock()
    pipe.clear_caches()
    pipe.cache_dir, pipe.cache_lock = str(tmp_path), lock
    try:
        image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
        pipe.optimize_embedding(image, "a photo of a scratch", steps=1, seed=0)
        pipe.invert(image, 2, cache_to_disk=True)
        pipe.invert(image, 2)  # in memory now: no lock
        pipe.invert(image, 3)  # no disk for this one: nothing to share, no lock
        assert [k for k, _ in lock.taken] == ["embeddings", "inversions"]
        assert all(len(key) == 32 for _, key in lock.taken)
    finally:
        pipe.cache_dir, pipe.cache_lock = None, None
        pipe.clear_caches()


def test_a_run_lends_the_pipeline_its_lock_and_takes_it_back(pipe, tmp_path):
    from o2mag.masks import affine_masks
    from o2mag.pipeline.settings import GenerationSettings
    from o2mag.runs.processes import ProcessState
    from o2mag.runs.runner import Group, Reference, RunOptions, run_groups
    from o2mag.sources.sample import embedded_sample

    s = embedded_sample(128)
    seen = []
    real = pipe.invert

    def spy(*a, **k):
        seen.append(pipe.cache_lock)
        return real(*a, **k)

    group = Group(category="c", defect="d", num=2, ref_names=["r"], normal_names=["n"], prompt=s.prompt,
                  word=s.anomaly_word, settings={"k": 1},
                  load=lambda: ([Reference("r", s.reference, s.ref_mask)], [s.normal]))
    opts = RunOptions(settings=GenerationSettings(num_inference_steps=2, ago_steps=1, batch_size=2,
                                                  cache_inversions_to_disk=True),
                      make_masks=lambda ref_mask, normal, idx: affine_masks(ref_mask, idx, seed=0))
    pipe.clear_caches()
    pipe.cache_dir = str(tmp_path / "cache")
    pipe.invert = spy
    try:
        report = run_groups(pipe, tmp_path / "out", [group], opts, ProcessState(), progress=False)
    finally:
        del pipe.invert
        pipe.cache_dir = None
        pipe.clear_caches()
    assert report.made == 2 and report.groups[0].complete == 2
    assert seen and all(isinstance(lock, CacheLeases) for lock in seen)  # the run's leases, while it ran
    assert pipe.cache_lock is None  # and not after
    assert not list((tmp_path / "cache" / "locks").glob("*.lease"))
    assert len(list((tmp_path / "cache" / "inversions").glob("*.pt"))) == 2
