"""``o2mag-kernels aot-check``: GPU kernels compiled for sm_80/sm_90 on a machine without a GPU.

CI runs the FULL check (every config the autotuner may pick x head-dim bucket x dtype, for sm_80 and
sm_90: ~350 compiles, about 4 minutes on 2 cold cores) so that no variant that could be picked on
a GPU is left uncompiled; the pass/fail rules are unit-tested on synthetic results.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from o2mag_kernels import _triton_kernel as K
from o2mag_kernels import aot

ROW = re.compile(
    r"^sm_(?P<arch>\d+)\s+(?P<dtype>fp16|bf16|fp32)\s+(?P<D>\d+)\s+(?P<bm>\d+)\s+(?P<bn>\d+)\s+"
    r"(?P<warps>\d+)\s+(?P<stages>\d+)\s+(?P<regs>\d+)\s+(?P<smem>\d+)\s+(?P<spill>\d+)\s+"
    r"(?P<mma>wgmma|mma|none)\s+(?P<secs>[\d.]+)\s+(?P<status>OK|FAIL.*)$")


@pytest.fixture(scope="module")
def full_report():
    if aot.cuobjdump_path() is None:
        pytest.fail("cuobjdump is missing: it ships with triton (backends/nvidia/bin)")
    env = dict(os.environ, TRITON_INTERPRET="1")  # must work whatever the caller's setting
    proc = subprocess.run([sys.executable, "-m", "o2mag_kernels.aot"], env=env,
                          capture_output=True, text=True, timeout=1500)
    return proc


def test_aot_check_is_green(full_report):
    proc = full_report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ROW.match(line) for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert rows and all(rows), "unparsable table rows:\n" + proc.stdout
    expected = aot.variants([80, 90], quick=False)
    assert len(rows) == len(expected)
    for arch in ("80", "90"):
        for dtype in ("fp16", "bf16", "fp32"):
            got = {int(r["D"]) for r in rows if r["arch"] == arch and r["dtype"] == dtype}
            assert got == set(K.HEAD_DIMS), (arch, dtype, got)
    for r in rows:
        assert r["status"] == "OK", r.group(0)
        assert int(r["spill"]) == 0 and 0 < int(r["regs"]) <= 255
        if r["arch"] == "90" and int(r["bm"]) >= 16 * int(r["warps"]):
            assert r["mma"] == "wgmma", r.group(0)
        if r["arch"] == "80":
            assert r["mma"] == "mma", r.group(0)
    assert re.search(rf"{len(rows)}/{len(rows)} variants OK, 0 failed", proc.stdout)


def test_full_variant_list_covers_everything_the_autotuner_can_pick():
    """aot-check compiles the union of ``prune`` over every head-dim bucket, length, dtype, SM."""
    full = aot.variants([80, 90], quick=False)
    listed = {(v["arch"], v["dtype"], v["head_dim"], tuple(v["config"])) for v in full}
    lengths = [16, 64, 256, 1024, 4096, 16384]
    for arch in (80, 90):
        for dtype, size in (("fp16", 2), ("bf16", 2), ("fp32", 4)):
            for d in K.HEAD_DIMS:
                for lq in lengths:
                    for lk in lengths:
                        for cfg in K.prune(d, lq, lk, size, arch):
                            assert (arch, dtype, d, cfg) in listed


def test_every_dtype_and_head_dim_up_to_256_has_a_config():
    """The contract covers fp16, bf16 and fp32 up to head dim 256; ALLOWED lists only configs the
    full check proves spill-free, so every head dim must keep one on both SM families."""
    for arch in (80, 90):
        for itemsize in (2, 4):
            for d in range(1, K.MAX_HEAD_DIM + 1):
                assert K.allowed_configs(d, itemsize, arch), (arch, itemsize, d)
    # fp32 above 64 is compiled (and run) column-chunked; fp16/bf16 and small fp32 whole-tile
    assert K.chunking(64, 4) == (0, 0) and K.chunking(65, 4)[0] > 0 and K.chunking(256, 2) == (0, 0)


def _fake(**kw):
    r = dict(arch=90, dtype="fp16", head_dim=64, config=[128, 64, 8, 2], ok=True, error="",
             regs=168, stack=0, static_smem=0, dyn_smem=50000, local=0, wgmma=True, mma=False)
    r.update(kw)
    return r


def test_judge_rules():
    assert aot.judge(_fake()) == ""
    assert "spill" in aot.judge(_fake(local=8))
    assert "spill" in aot.judge(_fake(stack=72))
    assert "wgmma" in aot.judge(_fake(wgmma=False, mma=True))
    assert aot.judge(_fake(config=[32, 32, 4, 2], wgmma=False, mma=True)) == ""  # too small for wgmma
    assert "shared memory" in aot.judge(_fake(arch=80, wgmma=False, mma=True, dyn_smem=200000))
    assert "mma" in aot.judge(_fake(arch=80, wgmma=False, mma=False))
    assert "boom" in aot.judge(_fake(ok=False, error="boom"))
    table = aot.format_table([_fake(seconds=1.0), _fake(seconds=1.0, local=4)])
    lines = table.splitlines()[1:]
    assert ROW.match(lines[0])["status"] == "OK" and ROW.match(lines[1])["status"].startswith("FAIL")
