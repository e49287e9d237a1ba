"""Several processes, one output folder: torchrun (gloo on the CPU), a killed process, independent runs.

The one-process references run in this process (1 thread, as the tiny model always runs on a
CPU); the others are real processes, so these tests cost a few model loads each."""
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from o2mag.cli import main
from o2mag.runs.plan import Batch, available, chunk_size, claim_batch, plan_batches, rotation, segments
from o2mag.runs.store import read_manifest

FAST = ["--steps", "2", "--ago-steps", "1", "--quiet"]
_VARYING = ("timestamp", "run", "sample")  # what two runs of the same job may differ in


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "o2mag", "--", *args]


def _one_process(argv, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # main() then runs the tiny model on 1 thread
    assert main(argv) == 0


def _ok_lines(manifest):
    return [r for r in read_manifest(manifest) if r["status"] == "ok"]


def _same_samples(d1, d2, indices):
    for i in indices:
        for sub in ("image", "mask"):
            a, b = (d / sub / f"{i:03d}.png" for d in (d1, d2))
            assert a.read_bytes() == b.read_bytes(), f"{sub} {i} differs"
    last1 = {r["index"]: r for r in _ok_lines(d1 / "manifest.jsonl")}
    last2 = {r["index"]: r for r in _ok_lines(d2 / "manifest.jsonl")}
    for i in indices:
        strip = lambda r: {k: v for k, v in r.items() if k not in _VARYING}  # noqa: E731
        assert strip(last1[i]) == strip(last2[i]), i


# ------------------------------------------------------------------------------------ the plan
def test_plan_keeps_one_process_batches_and_chunks_shrink():
    plan = plan_batches([7, 0, 1, 2, 3, 4, 5, 6], lambda i: (0, i % 2), 3)
    assert plan == [Batch((0, 0), (0, 2, 4)), Batch((0, 0), (6,)),
                    Batch((0, 1), (1, 3, 5)), Batch((0, 1), (7,))]
    assert [chunk_size(n, 4) for n in (0, 1, 8, 9, 100)] == [0, 1, 1, 2, 13]
    assert chunk_size(10, 1) == 5  # a lone process leaves half for a run that joins later
    assert rotation(5, 0, 2) == [0, 1, 2, 3, 4] and rotation(5, 1, 2) == [2, 3, 4, 0, 1]
    assert rotation(3, 7, 8)[0] == 2 and rotation(0, 0, 1) == []
    b = [Batch((0, 0), (0, 1)), Batch((0, 0), (2,)), Batch((0, 0), (4, 5)), Batch((0, 0), (6, 7))]
    assert segments(b, 2) == [b[:2], b[2:]]  # a short batch ends a run: re-chunking keeps batches


def test_a_batch_partly_held_by_another_writer_is_not_available():
    plan = [Batch((0, 0), (0, 1)), Batch((0, 0), (2, 3)), Batch((0, 0), (4, 5))]
    done = {2}.__contains__
    # 1 is held (another process is claiming batch 0,1 right now); 2 is finished
    assert available(plan, {1}, done) == [(plan[1], (3,)), (plan[2], (4, 5))]


def test_a_batch_is_claimed_whole_or_not_at_all(tmp_path):
    from o2mag.runs.store import OutputStore

    a, b = (OutputStore(tmp_path, "c", "d", settings={"k": 1}, run="r", rank=r) for r in (0, 1))
    try:
        assert a.claim([1]) == [1]  # a racing process got the batch's second sample first
        assert claim_batch(b, [0, 1]) == [] and not b.holds(0)  # b leaves the whole batch
        assert claim_batch(b, [2, 3]) == [2, 3]
        a.write(1, np.zeros((8, 8, 3), np.uint8), np.eye(8, dtype=bool))
        assert claim_batch(b, [0, 1]) == [0]  # a finished sample is not a conflict
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------- several processes
def test_torchrun_two_processes_make_the_files_of_one(tmp_path, monkeypatch, capsys):
    args = ["generate", "--num", "7", "--batch-size", "2", *FAST]
    _one_process([*args, "--out", str(tmp_path / "one")], monkeypatch)
    work = re.search(r"UNet calls \d+, rows \d+; inversions \d+, AGO runs \d+",
                     capsys.readouterr().err).group()
    proc = subprocess.run(_torchrun([*args, "--out", str(tmp_path / "two")]), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"wrote 7 samples to \S+ by 2 processes \((\d+) \+ (\d+)\)", proc.stderr)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, proc.stderr[-2000:]  # both worked
    assert work in proc.stderr  # the same UNet batches in all, and one AGO and inversion per image
    d1, d2 = (tmp_path / n / "synthetic_surface" / "scratch" for n in ("one", "two"))
    idx = [r["index"] for r in _ok_lines(d2 / "manifest.jsonl")]
    assert sorted(idx) == list(range(7))  # each sample once
    assert len({r["run"] for r in _ok_lines(d2 / "manifest.jsonl")}) == 1  # one run of two processes
    _same_samples(d1, d2, range(7))
    assert not list((d2 / ".o2mag").glob("*.lease"))


def _noise(rng):
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8))


def _mvtec(root, categories=(("bottle", ("crack", "dent")), ("carpet", ("hole",))), n_test=4):
    rng = np.random.RandomState(0)
    for cat, defects in categories:
        for d in defects:
            for sub in (f"{cat}/test/{d}", f"{cat}/ground_truth/{d}"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n_test):
                _noise(rng).save(root / f"{cat}/test/{d}/{i:03d}.png")
                m = np.zeros((64, 64), np.uint8)
                m[10 + 5 * i:30 + 5 * i, 20:40] = 255
                Image.fromarray(m).save(root / f"{cat}/ground_truth/{d}/{i:03d}_mask.png")
        (root / f"{cat}/test/good").mkdir(parents=True, exist_ok=True)
        (root / f"{cat}/train/good").mkdir(parents=True, exist_ok=True)
        for i in range(2):
            _noise(rng).save(root / f"{cat}/train/good/{i:03d}.png")
    return root


def test_kill_one_process_then_resume_with_one(tmp_path, monkeypatch):
    root = _mvtec(tmp_path / "mvtec")
    args = ["dataset", "--mvtec-root", str(root), "--num", "8", "--batch-size", "1", "--foreground", "all",
            "--steps", "3", "--ago-steps", "1", "--quiet"]
    out = tmp_path / "out"
    proc = subprocess.Popen(_torchrun([*args, "--out", str(out)]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    victim, deadline = None, time.time() + 240
    try:
        while victim is None and time.time() < deadline and proc.poll() is None:
            done = sum(len(_ok_lines(m)) for m in out.glob("*/*/manifest.jsonl"))
            for lease in out.glob("*/*/.o2mag/0*.lease"):
                try:
                    rec = json.loads(lease.read_text())
                except (OSError, ValueError):
                    continue
                if rec.get("rank") == 1 and done >= 2:
                    victim = rec["pid"]
            time.sleep(0.05)
        assert victim is not None, "rank 1 never held a claim mid-run"
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)  # torchrun stops the other process and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    groups = ["bottle/crack", "bottle/dent", "carpet/hole"]
    done = {g: len(_ok_lines(out / g / "manifest.jsonl")) for g in groups}
    assert sum(done.values()) < 24, "the run finished before the kill: nothing to resume"
    assert list(out.glob("*/*/.o2mag/0*.lease")), "the killed processes left no claims to recover"

    _one_process([*args, "--out", str(out)], monkeypatch)  # resume with ONE process
    _one_process([*args, "--out", str(tmp_path / "ref")], monkeypatch)  # the one-process reference
    for g in groups:
        counts = collections.Counter(r["index"] for r in _ok_lines(out / g / "manifest.jsonl"))
        assert sorted(counts) == list(range(8)) and set(counts.values()) == {1}, (g, counts)
        _same_samples(tmp_path / "ref" / g, out / g, range(8))
    assert not list(out.glob("*/*/.o2mag/*.lease"))


def test_two_independent_runs_never_make_a_sample_twice(tmp_path):
    cmd = [sys.executable, "-m", "o2mag", "generate", "--out", str(tmp_path), "--num", "10",
           "--batch-size", "1", *FAST]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    d = tmp_path / "synthetic_surface" / "scratch"
    lines = _ok_lines(d / "manifest.jsonl")
    assert sorted(r["index"] for r in lines) == list(range(10))  # every sample exactly once
    made = [int(re.search(r"wrote (\d+) samples", e).group(1)) if "wrote" in e else 0
            for e in errs]
    assert sum(made) == 10, errs
    runs = collections.Counter(r["run"] for r in lines)
    assert sum(runs.values()) == 10 and set(runs.values()) == set(made) - {0}


def test_a_second_run_with_other_settings_stops_at_once(tmp_path, capsys, monkeypatch):
    from o2mag.runs.runner import Runner
    from o2mag.runs.store import OutputStore

    assert main(["generate", "--out", str(tmp_path / "a"), "--num", "1", *FAST]) == 0
    first = tmp_path / "a" / "synthetic_surface" / "scratch" / "manifest.jsonl"
    settings = read_manifest(first)[0]["settings"]
    out = tmp_path / "b"
    d = out / "synthetic_surface" / "scratch"
    live = OutputStore(out, "synthetic_surface", "scratch", settings=settings, run="someone-else")
    assert live.claim([5]) == [5]  # a live run with FAST settings is making sample 5 of folder b
    try:
        t0 = time.perf_counter()
        assert main(["generate", "--out", str(out), "--num", "8", "--steps", "3", "--ago-steps", "1",
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "another o2mag run is writing" in err and "steps: 2 -> 3" in err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("o2mag: error:")
        assert main(["generate", "--out", str(out), "--num", "8", "--overwrite", *FAST]) == 2
        assert "this run overwrites samples" in capsys.readouterr().err
        assert time.perf_counter() - t0 < 60  # at once: before any generation
        assert read_manifest(d / "manifest.jsonl") == []  # nothing was written
        # the same settings cooperate: all but the batch of the live run's sample 5 is made (a batch
        # another writer holds part of is left whole to it); then the run waits for that run, and
        # takes the batch over once its claim goes (here: the other run stops when the wait begins)
        made = []
        real_wait = Runner._wait_for_others

        def wait(self, order):
            made.append(sorted(r["index"] for r in _ok_lines(d / "manifest.jsonl")))
            waiting = real_wait(self, order)
            if waiting:
                live.release(5)
            return waiting

        monkeypatch.setattr(Runner, "_wait_for_others", wait)
        assert main(["generate", "--out", str(out), "--num", "8", "--batch-size", "2", *FAST]) == 0
        assert made[0] == [0, 1, 2, 3, 6, 7]
        assert sorted(r["index"] for r in _ok_lines(d / "manifest.jsonl")) == list(range(8))
        err = capsys.readouterr().err
        assert "waiting for 1 sample(s) that another live o2mag run is making" in err and "still missing" not in err
    finally:
        live.close()
