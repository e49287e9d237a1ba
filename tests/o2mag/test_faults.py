"""Fault injection: damaged files, killed runs, read-only and full folders, broken leases.

For each fault: no traceback, no silent wrong result (a damaged file is never used: what it held is
computed again and the result equals a clean run's), nothing the user had is lost, and the next
run completes. Every run here is the embedded tiny model with two steps.

How faults are made, without root: a *read-only* folder is simulated by replacing the os-level
calls that write (``open`` for writing, ``os.open`` with a write flag, ``mkdir``, ``replace``,
``rename``, ``link``, ``unlink``, ``utime``) with ones that raise ``EROFS`` for paths under the
folder, as the kernel does on a read-only mount (``chmod`` stops nothing when the tests run as
root); a *full* folder is a run in a subprocess with ``RLIMIT_FSIZE`` (every write past the limit
fails with ``EFBIG``, as a full disk fails with ``ENOSPC``); a *killed* run is a subprocess that
sends itself ``SIGKILL`` at a chosen point.
"""
import builtins
import errno
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from o2mag.cli import main
from o2mag.errors import DataWarning
from o2mag.files import DamagedFileError, atomic_write, read_checked, write_checked
from o2mag.pipeline.caches import ResultCache
from o2mag.runs.claims import Holder, fingerprint, process_start
from o2mag.runs.store import complete_samples, read_manifest

FAST = ["--steps", "2", "--ago-steps", "1", "--quiet", "--batch-size", "1"]  # a sample alone in its batch:
# made again, it is the same to the last bit (batch mates change a picture by float rounding)
NUM = 4
GROUP = Path("synthetic_surface") / "scratch"
ROOT = Path(__file__).resolve().parents[2]


def _generate(out, *extra, num=NUM):
    return main(["generate", "--out", str(out), "--num", str(num), *FAST, *extra])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean, complete run of NUM samples: its folder and every sample's image bytes."""
    out = tmp_path_factory.mktemp("clean") / "out"
    assert _generate(out) == 0
    d = out / GROUP
    return out, {i: (d / "image" / f"{i:03d}.png").read_bytes() for i in range(NUM)}


def _copy(clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    return out, out / GROUP


def _no_traceback(err):
    assert "Traceback" not in err, err


def _complete(d, images, num=NUM):
    """Every sample is complete, and each image is the clean run's, byte for byte."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # a damaged manifest line stays (append-only)
        done = complete_samples(d)
    assert [i for i, *_ in done] == list(range(num))
    for i, img, mask, _ in done:
        assert img.read_bytes() == images[i], f"sample {i} differs from a clean run"
    assert not list(d.rglob(".o2mag-*.tmp")), "a temporary file was left behind"


def _damage(path, how):
    data = path.read_bytes()
    if how == "flipped":  # bytes in the middle, as a bad disk or a bad copy would
        b = bytearray(data)
        mid = len(b) // 2
        for k in range(mid, mid + 16):
            b[k] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "unchecked":  # a plain torch file, as an older o2mag wrote it
        path.write_bytes(data.partition(b"\n")[2])


# --------------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("kind", ["inversions", "embeddings"])
@pytest.mark.parametrize("how", ["flipped", "truncated", "empty", "unchecked"])
def test_a_damaged_cache_entry_is_a_miss_recomputed_and_replaced(tmp_path, kind, how):
    value = {"latents": [torch.arange(4096, dtype=torch.float32)], "timesteps": torch.arange(3)}
    fetch = dict(pack=lambda v: v, unpack=lambda r: r)
    ResultCache(kind).fetch("k", str(tmp_path), lambda: value, **fetch)
    path = tmp_path / kind / "k.pt"
    _damage(path, how)
    calls = []
    with pytest.warns(DataWarning, match=str(path)):
        got, computed = ResultCache(kind).fetch("k", str(tmp_path), lambda: calls.append(1) or value, **fetch)
    assert computed and calls == [1] and torch.equal(got["latents"][0], value["latents"][0])
    record = torch.load(io.BytesIO(read_checked(path)))  # replaced by an intact entry
    assert torch.equal(record["latents"][0], value["latents"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert ResultCache(kind).fetch("k", str(tmp_path), lambda: 1 / 0, **fetch)[1] is False


def test_a_record_of_another_shape_is_a_miss(tmp_path):
    cache = ResultCache("embeddings")
    cache.save(str(tmp_path), "k", {"something": "else"})
    with pytest.warns(DataWarning, match="k.pt"):
        got, computed = ResultCache("embeddings").fetch("k", str(tmp_path), lambda: torch.ones(2),
                                                        pack=lambda v: {"embedding": v},
                                                        unpack=lambda r: r["embedding"])
    assert computed and torch.equal(got, torch.ones(2))


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_a_run_over_damaged_caches_warns_recomputes_and_matches_a_clean_run(clean, tmp_path, capsys, how):
    out, d = _copy(clean, tmp_path)
    entries = sorted((out / ".o2mag-cache").glob("*/*.pt"))
    assert {p.parent.name for p in entries} == {"inversions", "embeddings"}
    for p in entries:
        _damage(p, how)
    (d / "image" / "003.png").unlink()  # sample 3 must be made again, from the caches
    assert _generate(out) == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    for p in entries:
        assert f"o2mag: warning: cache file {p} is damaged" in err
        read_checked(p)  # replaced, intact
    _complete(d, clean[1])  # the new sample 3 is the clean run's: nothing damaged was used


def test_a_killed_writer_s_temporary_cache_file_is_removed_once_old(tmp_path):
    folder = tmp_path / "inversions"
    folder.mkdir()
    old, young = folder / ".o2mag-a.pt.0.tmp", folder / ".o2mag-b.pt.1.tmp"
    old.write_bytes(b"half")
    young.write_bytes(b"half")
    os.utime(old, (1_000_000, 1_000_000))
    ResultCache("inversions").save(str(tmp_path), "k", {"v": torch.ones(1)})
    assert not old.exists() and young.exists()  # a young one may be a live writer's


def test_checked_files_refuse_every_damage(tmp_path):
    p = write_checked(tmp_path / "f", b"payload" * 100)
    assert read_checked(p) == b"payload" * 100
    for how in ("flipped", "truncated", "empty", "unchecked"):
        write_checked(p, b"payload" * 100)
        _damage(p, how)
        with pytest.raises(DamagedFileError):
            read_checked(p)


# --------------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_a_damaged_manifest_costs_at_most_a_rerun_of_its_samples(clean, tmp_path, capsys, how):
    out, d = _copy(clean, tmp_path)
    _damage(d / "manifest.jsonl", how)
    assert _generate(out) == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    if how == "flipped":  # a line that cannot be read is said, once per line, in one line each
        assert "o2mag: warning: " in err and "manifest.jsonl: line" in err and "RuntimeWarning" not in err
    _complete(d, clean[1])  # the samples it no longer vouched for are made again, the same


# --------------------------------------------------------------------------------------------- killed runs

_KILLER = textwrap.dedent("""
    import os, signal, sys
    point, args = sys.argv[1], sys.argv[2:]
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(point):  # the file is written, not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)

    os.replace = replace
    if point == "manifest":  # half of sample 1's manifest line is on disk
        from o2mag.runs import store

        real_append = store.OutputStore._append_locked

        def append(self, rec):
            if rec.get("index") == 1 and rec.get("status") == "ok":
                with open(self.manifest_path, "ab") as f:
                    f.write(b'{"index": 1, "status": "o')
                os.kill(os.getpid(), signal.SIGKILL)
            real_append(self, rec)

        store.OutputStore._append_locked = append
    from o2mag.cli import main
    sys.exit(main(args))
""")


@pytest.mark.parametrize("point", [".pt", "001.png", "manifest", "contact_sheet.png"])
def test_a_run_killed_at_any_point_is_finished_by_the_next(clean, tmp_path, capsys, point):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILLER, point, "generate", "--out", str(out), "--num", str(NUM),
                           *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    d = out / GROUP
    before = {i: img.read_bytes() for i, img, *_ in complete_samples(d)} if d.exists() else {}
    assert _generate(out) == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    done = complete_samples(d)
    assert [i for i, *_ in done] == list(range(NUM))
    for i, img, mask, _ in done:
        Image.open(img).load()  # whole files only
        Image.open(mask).load()
        if i in before:
            assert img.read_bytes() == before[i]  # what the killed run finished is kept
    assert not list(d.rglob(".o2mag-*.tmp"))
    for p in (out / ".o2mag-cache").glob("*/*.pt"):
        read_checked(p)
    assert (d / "contact_sheet.png").is_file()  # the sheet follows the folder, also after a kill


def test_a_deleted_contact_sheet_comes_back_on_a_rerun(clean, tmp_path, capsys):
    out, d = _copy(clean, tmp_path)
    (d / "contact_sheet.png").unlink()
    assert _generate(out) == 0
    assert "generating 0" in capsys.readouterr().err
    assert Image.open(d / "contact_sheet.png").size[0] > 128


# --------------------------------------------------------------------------------------------- read-only


def _read_only(monkeypatch, folder):
    """Make writes under ``folder`` fail with EROFS, as on a read-only mount (module docstring)."""
    root = os.path.realpath(folder)

    def under(p):
        if isinstance(p, int):
            return False
        try:
            real = os.path.realpath(os.fspath(p))
        except TypeError:
            return False
        return real == root or real.startswith(root + os.sep)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and under(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            refuse(path)
        return real_mkdir(path, *a, **k)

    def guard(real, n):
        def call(*args, **k):
            for p in args[:n]:
                if under(p):
                    refuse(p)
            return real(*args, **k)
        return call

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name, n in (("rmdir", 1), ("unlink", 1), ("remove", 1), ("utime", 1), ("replace", 2), ("rename", 2),
                    ("link", 2)):
        monkeypatch.setattr(os, name, guard(getattr(os, name), n))


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _one_line_naming(err, path, code, expected=2):
    _no_traceback(err)
    assert code == expected, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("o2mag: error:") and str(path) in last, err


@pytest.mark.parametrize("which", ["out", "cache"])
@pytest.mark.parametrize("when", ["at the start", "during the run"])
def test_a_read_only_folder_is_one_line_and_loses_nothing(clean, tmp_path, capsys, monkeypatch, which, when):
    out, d = _copy(clean, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(out / ".o2mag-cache", cache)
    (d / "image" / "003.png").unlink()  # one sample to make
    for p in cache.glob("inversions/*.pt"):
        p.unlink()  # and inversions to write
    if when == "during the run":  # the early check passes; the folder turns read-only later
        import o2mag.commands.options as options

        monkeypatch.setattr(options, "check_writable", lambda *a, **k: None)
    folder = out if which == "out" else cache
    before = _snapshot(folder)
    _read_only(monkeypatch, folder)
    code = _generate(out, "--cache-dir", str(cache))
    monkeypatch.undo()
    _one_line_naming(capsys.readouterr().err, folder, code)
    assert _snapshot(folder) == before  # nothing the user had was touched
    assert _generate(out, "--cache-dir", str(cache)) == 0  # writable again: the rerun completes
    _complete(d, clean[1])


def test_read_only_out_in_dataset_and_evaluate(tmp_path, capsys, monkeypatch):
    from tests.o2mag.test_dataset import _tree

    root = _tree(tmp_path / "mvtec", {"bottle": {"crack": 3}})
    out = tmp_path / "ro"
    out.mkdir()
    _read_only(monkeypatch, out)
    code = main(["dataset", "--mvtec-root", str(root), "--out", str(out), "--num", "1", *FAST])
    _one_line_naming(capsys.readouterr().err, out, code)
    code = main(["evaluate", "detect", "--out", str(out / "eval"), "--quiet"])
    _one_line_naming(capsys.readouterr().err, out, code)
    assert not list(out.iterdir())


def test_a_bug_that_is_not_about_a_path_is_still_a_traceback(tmp_path, monkeypatch):
    import o2mag.commands.generate as generate

    def fail(*a, **k):
        raise OSError("not about a path")

    monkeypatch.setattr(generate, "run_groups", fail)
    with pytest.raises(OSError, match="not about a path"):
        _generate(tmp_path / "out")


# --------------------------------------------------------------------------------------------- full disk


def _limited(limit, argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "o2mag.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=cap)


@pytest.mark.parametrize("limit, fails", [(2_000, ".pt"), (20_000, ".png"), (40_000, "contact_sheet.png")])
def test_a_full_folder_is_one_line_and_the_rerun_completes(clean, tmp_path, capsys, limit, fails):
    out, d = _copy(clean, tmp_path)
    sizes = sorted(p.stat().st_size for p in out.rglob("*") if p.is_file())
    (d / "image" / "002.png").unlink()
    (d / "image" / "003.png").unlink()
    for p in (out / ".o2mag-cache").glob("*/*.pt"):
        p.unlink()
    kept = {p: p.read_bytes() for p in out.rglob("*.png") if p.is_file()}
    assert min(sizes) < limit < max(sizes)
    proc = _limited(limit, ["generate", "--out", str(out), "--num", str(NUM), *FAST])
    _one_line_naming(proc.stderr, out, proc.returncode)
    assert "File too large" in proc.stderr and fails in proc.stderr.strip().splitlines()[-1]
    for p, data in kept.items():  # files the user had: unchanged or replaced whole (the sheet)
        if p.name != "contact_sheet.png":
            assert p.read_bytes() == data
    for p in out.rglob("*"):  # whatever is under a real name is whole
        if p.suffix == ".png":
            Image.open(p).load()
        elif p.suffix == ".pt":
            read_checked(p)
    assert not list(out.rglob(".o2mag-*.tmp"))
    for line in (d / "manifest.jsonl").read_bytes().splitlines():  # no line cut short
        json.loads(line)
    assert _generate(out) == 0
    _no_traceback(capsys.readouterr().err)
    _complete(d, clean[1])
    assert (d / "contact_sheet.png").is_file()


# --------------------------------------------------------------------------------------------- leases


@pytest.fixture
def sleeper():
    """A live process that is not an o2mag run."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def _lease_record(d, **changes):
    settings = read_manifest(d / "manifest.jsonl")[0]["settings"]
    rec = Holder(run="another-run", settings=settings).record("000001")
    rec.update(changes)
    return json.dumps(rec).encode()


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("state", ["empty", "truncated", "garbage", "no token", "pid reused", "older o2mag's lease "
                                   "held by another program", "dead pid", "other machine, expired"])
def test_a_broken_lease_does_not_hold_a_sample(clean, tmp_path, capsys, sleeper, state):
    out, d = _copy(clean, tmp_path)
    (d / "image" / "001.png").unlink()
    lease = d / ".o2mag" / "000001.lease"
    lease.parent.mkdir(exist_ok=True)
    data = {
        "empty": lambda: b"",
        "truncated": lambda: _lease_record(d)[:40],
        "garbage": lambda: os.urandom(64),
        "no token": lambda: _lease_record(d, token=None),
        "pid reused": lambda: _lease_record(d, pid=sleeper.pid, pid_start="0"),
        "older o2mag's lease held by another program": lambda: json.dumps(
            {k: v for k, v in json.loads(_lease_record(d, pid=sleeper.pid)).items() if k != "pid_start"}).encode(),
        "dead pid": lambda: _lease_record(d, pid=_dead_pid()),
        "other machine, expired": lambda: _lease_record(d, host="elsewhere|boot|ns"),
    }[state]()
    lease.write_bytes(data)
    if state == "other machine, expired":
        os.utime(lease, (1_000_000, 1_000_000))
    assert _generate(out) == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    _complete(d, clean[1])


def test_a_live_lease_of_another_run_is_waited_for_then_taken_over(clean, tmp_path, capsys):
    out, d = _copy(clean, tmp_path)
    (d / "image" / "001.png").unlink()
    (d / ".o2mag").mkdir(exist_ok=True)
    (d / ".o2mag" / "000001.lease").write_bytes(_lease_record(d))  # this pid, written now: live
    assert _generate(out, "--claim-lease", "1") == 0  # not renewed: stale after a second, taken over
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "waiting for 1 sample(s) that another live o2mag run is making" in err and f"pid {os.getpid()}" in err
    _complete(d, clean[1])


def test_a_run_that_ends_with_samples_missing_exits_3_and_says_how_to_finish(clean, tmp_path, capsys,
                                                                              monkeypatch):
    from o2mag.runs.runner import Runner

    out, d = _copy(clean, tmp_path)
    (d / "image" / "001.png").unlink()
    (d / ".o2mag").mkdir(exist_ok=True)
    (d / ".o2mag" / "000001.lease").write_bytes(_lease_record(d))  # live: this pid, written now
    monkeypatch.setattr(Runner, "_wait_for_others", lambda self, order: False)  # as if it came too late
    assert _generate(out) == 3
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "1 of 4 sample(s) still missing" in err and "rerun the same command" in err
    assert f"pid {os.getpid()}" in err and "exit code 3" in err
    monkeypatch.undo()
    (d / ".o2mag" / "000001.lease").unlink()  # that run ended
    assert _generate(out) == 0
    _complete(d, clean[1])


def test_process_start_tells_a_reused_pid(sleeper):
    assert process_start(os.getpid()) is not None
    assert process_start(sleeper.pid) not in (None, process_start(os.getpid()))
    assert process_start(_dead_pid()) is None
    assert fingerprint({"a": 1}) == fingerprint({"a": 1})


# --------------------------------------------------------------------------------------------- file modes


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_every_user_file_follows_the_umask(tmp_path, umask):
    from o2mag.evaluation.report import write_classify_report, write_json

    out = tmp_path / "out"
    assert _generate(out, num=1) == 0
    write_json(tmp_path / "eval" / "results.json", {"a": 1})
    write_json(tmp_path / "eval" / "quality.json", {"a": 1})
    write_classify_report(tmp_path / "eval", {"categories": {}})
    atomic_write(tmp_path / "eval" / "callable.png", lambda f: Image.new("L", (2, 2)).save(f, format="PNG"))
    files = [p for p in list(out.rglob("*")) + list((tmp_path / "eval").iterdir())
             if p.is_file() and ".o2mag" not in p.parent.name and p.suffix != ".lease"]
    names = {p.name for p in files}
    assert {"contact_sheet.png", "manifest.jsonl", "000.png", "results.json", "quality.json", "report.md"} <= names
    assert any(p.suffix == ".pt" for p in files)
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
