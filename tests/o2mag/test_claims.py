"""Leases on the filesystem (o2mag.runs.claims) and the store's claims: exclusive, recoverable, and
never taken from a live holder."""
import errno
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from o2mag.runs.claims import Holder, Leases, create_exclusive
from o2mag.errors import ClaimLostError, ConcurrentRunError
from o2mag.runs.store import OutputStore, read_manifest


def _leases(tmp_path, run="r1", lease=60.0, **kw):
    return Leases(tmp_path / "leases", Holder(run=run, **kw), lease,
                  on_conflict=lambda rec: ConcurrentRunError(f"conflict with {rec.get('run')}"))


def test_create_exclusive_once_and_content_complete(tmp_path):
    p = tmp_path / "x.lease"
    assert create_exclusive(p, b'{"a": 1}')
    assert not create_exclusive(p, b'{"a": 2}')
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.lease"]  # the temporary file is gone


def test_create_exclusive_without_hard_links_and_after_a_lost_reply(tmp_path, monkeypatch):
    real_link = os.link

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    assert create_exclusive(tmp_path / "a.lease", b"1")  # O_EXCL fallback
    assert not create_exclusive(tmp_path / "a.lease", b"2")
    assert (tmp_path / "a.lease").read_bytes() == b"1"

    def lost_reply(src, dst):  # NFS: the link is made, but the call reports an error
        real_link(src, dst)
        raise OSError(errno.EIO, "reply lost")

    monkeypatch.setattr(os, "link", lost_reply)
    assert create_exclusive(tmp_path / "b.lease", b"3")
    monkeypatch.setattr(os, "link", real_link)
    assert not create_exclusive(tmp_path / "b.lease", b"4")


def test_one_holder_at_a_time_release_and_reacquire(tmp_path):
    a, b = _leases(tmp_path, run="r1"), _leases(tmp_path, run="r1")
    assert a.try_acquire("000001") and a.holds("000001")
    assert not b.try_acquire("000001")  # live, same run: cooperate, do not take it
    assert set(b.live()) == {"000001"}
    a.release("000001")
    assert not a.holds("000001") and b.try_acquire("000001")
    b.release_all()
    assert list((tmp_path / "leases").iterdir()) == []


def test_dead_process_on_this_machine_is_stale_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    dead_pid = int(proc.stdout)
    ghost = Holder(run="old", pid=dead_pid)
    (tmp_path / "leases").mkdir()
    create_exclusive(tmp_path / "leases" / "000003.lease", json.dumps(ghost.record("000003")).encode())
    b = _leases(tmp_path, run="new")
    assert b.live() == {}
    assert b.try_acquire("000003") and b.holds("000003")


def test_other_machine_lease_expires_by_age_on_the_filesystem_clock(tmp_path):
    other = Holder(run="r1", host="elsewhere|boot|pid:[1]", pid=1)
    d = tmp_path / "leases"
    d.mkdir()
    path = d / "000007.lease"
    create_exclusive(path, json.dumps(other.record("000007")).encode())
    b = _leases(tmp_path, run="r1", lease=30.0)
    assert not b.try_acquire("000007") and "000007" in b.live()  # renewed recently: alive
    old = time.time() - 31
    os.utime(path, (old, old))
    assert b.live() == {} and b.try_acquire("000007")


def test_breaking_a_stale_lease_never_removes_a_fresh_one(tmp_path):
    b = _leases(tmp_path)
    b._ensure()
    path = tmp_path / "leases" / "x.lease"
    fresh = Holder(run="r1")
    create_exclusive(path, json.dumps(fresh.record("x")).encode())
    b._break(path, token="the-stale-token-seen-earlier")  # someone replaced it meanwhile
    assert json.loads(path.read_text())["token"] == fresh.token


def test_heartbeat_renews_and_notices_a_takeover(tmp_path):
    a = _leases(tmp_path, lease=0.3)
    assert a.try_acquire("000001")
    path = tmp_path / "leases" / "000001.lease"
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.5)
    assert time.time() - path.stat().st_mtime < 5  # renewed by the background thread
    assert a.holds("000001")
    path.unlink()  # taken over (another process broke it)
    create_exclusive(path, json.dumps(Holder(run="r2").record("000001")).encode())
    time.sleep(0.4)
    assert not a.holds("000001")
    a.release("000001")
    assert path.exists()  # not ours: release leaves it alone


def test_runs_that_may_not_share_a_folder_conflict(tmp_path):
    mine = Holder(run="a", settings={"steps": 2})
    assert mine.compatible(Holder(run="b", settings={"steps": 2}).record("x"))
    assert not mine.compatible(Holder(run="b", settings={"steps": 3}).record("x"))
    assert not mine.compatible(Holder(run="b", settings={"steps": 2}, overwrite=True).record("x"))
    assert mine.compatible(Holder(run="a", settings={"steps": 9}, overwrite=True).record("x"))  # same run
    b = _leases(tmp_path, run="b")
    b.holder.settings = {"steps": 3}
    assert b.try_acquire("000001")
    a = Leases(tmp_path / "leases", mine, 60, on_conflict=lambda r: ConcurrentRunError("other settings"))
    with pytest.raises(ConcurrentRunError):
        a.try_acquire("000001")
    with pytest.raises(ConcurrentRunError):
        a.check_live()
    b.release_all()


# ------------------------------------------------------------------------------- the store's claims
def _img():
    return np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=bool)


def _claimer(root, run, seed, q):
    rng = np.random.default_rng(seed)
    st = OutputStore(root, "c", "d", settings={"k": 1}, run=run, rank=seed)
    got = []
    order = rng.permutation(40).tolist()
    for k in range(0, 40, 5):
        st.refresh()
        for i in st.claim(order[k:k + 5]):
            got.append(i)
            st.write(i, *_img(), {"by": seed})
    st.close()
    q.put(got)


def test_concurrent_processes_never_make_a_sample_twice(tmp_path):
    """Four processes (two runs) race for the same 40 samples in random order: each is made once."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(tmp_path), "run-a" if s < 2 else "run-b", s, q))
             for s in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    made = sorted(i for r in results for i in r)
    assert made == list(range(40))  # all made, none twice
    lines = read_manifest(tmp_path / "c" / "d" / "manifest.jsonl")
    assert sorted(r["index"] for r in lines) == list(range(40))  # whole lines, none lost or doubled
    assert not list((tmp_path / "c" / "d" / ".o2mag").glob("*.lease"))


def test_store_claims_skip_done_and_live_and_overwrite_is_per_run(tmp_path):
    a = OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r")
    b = OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r", rank=1)
    assert a.claim([0, 1]) == [0, 1]
    assert b.claim([0, 1, 2]) == [2] and b.claimed_by_others() == {0, 1}
    a.write(0, *_img())
    assert not a.holds(0)  # released once written
    b.refresh()
    assert b.done(0) and b.claim([0]) == []
    a.close()
    b.close()
    # overwrite: "done" means written by this run, whichever process wrote it
    c = OutputStore(tmp_path, "c", "d", settings={"k": 1}, overwrite=True, run="o1")
    d = OutputStore(tmp_path, "c", "d", settings={"k": 1}, overwrite=True, run="o1", rank=1)
    assert c.missing_indices(1) == [0]  # complete, but not by this run
    c.write(0, *_img())
    d.refresh()
    assert d.missing_indices(1) == []
    assert read_manifest(c.manifest_path)[-1]["run"] == "o1"


def test_refresh_reads_other_writers_lines_and_a_last_line_without_newline(tmp_path):
    a = OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r")
    b = OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r", rank=1)
    a.write(0, *_img())
    assert b.existing_indices() == []
    b.refresh()
    assert b.existing_indices() == [0]
    p = a.manifest_path
    p.write_bytes(p.read_bytes().rstrip(b"\n"))  # edited by hand: the last line lost its newline
    assert OutputStore(tmp_path, "c", "d", settings={"k": 1}).existing_indices() == [0]
    a.write(1, *_img())  # the next line still goes on a line of its own
    b.refresh()
    assert b.existing_indices() == [0, 1] and len(p.read_text().splitlines()) == 2
    other = OutputStore(tmp_path, "c", "d", settings={"k": 2}, overwrite=True, run="x")
    other.write(2, *_img())
    with pytest.raises(ConcurrentRunError, match="with other settings"):
        b.refresh()  # another setup appeared while b was running
    for st in (a, b, other):
        st.close()


def test_a_lost_claim_is_not_written(tmp_path):
    st = OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r")
    assert st.claim([3]) == [3]
    path = st.dir / ".o2mag" / "000003.lease"
    path.unlink()
    create_exclusive(path, json.dumps(Holder(run="r", settings={"k": 1}).record("x")).encode())
    with pytest.raises(ClaimLostError):
        st.write(3, *_img())
    assert not st.image_path(3).exists() and read_manifest(st.manifest_path) == []


def test_other_settings_while_another_run_writes_are_refused(tmp_path):
    live = OutputStore(tmp_path, "c", "d", settings={"steps": 3}, run="first")
    assert live.claim([0]) == [0]
    other = OutputStore(tmp_path, "c", "d", settings={"steps": 2}, run="second")
    with pytest.raises(ConcurrentRunError, match=r"another o2mag run is writing .*steps: 3 -> 2"):
        other.check_others()
    live.close()
    other.check_others()  # gone: nothing to refuse


def test_temp_files_of_a_live_writer_survive_a_second_store(tmp_path):
    a = OutputStore(tmp_path, "c", "d", run="r")
    a.claim([0])
    tmp = a.image_dir / ".o2mag-000.png.abc.tmp"
    tmp.write_bytes(b"being written")
    OutputStore(tmp_path, "c", "d", run="r")
    assert tmp.exists()  # another writer is active: a fresh temporary file is theirs
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    OutputStore(tmp_path, "c", "d", run="r")
    assert not tmp.exists()  # an hour old: a crash leftover
    a.close()
