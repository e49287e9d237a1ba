"""``o2mag-kernels aot-check``: GPU kernels compiled for sm_80/sm_90 on a machine without a GPU.

CI runs the quick check and compares it with the committed full report (``aot_report.json``); the
pass/fail rules and the report's freshness are tested in ``test_tuning.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from o2mag_kernels import tuning
from o2mag_kernels.tools import aot

ROW = re.compile(
    r"^sm_(?P<arch>\d+)\s+(?P<dtype>fp16|bf16|fp32)\s+(?P<D>\d+)\s+(?P<bm>\d+)\s+(?P<bn>\d+)\s+"
    r"(?P<warps>\d+)\s+(?P<stages>\d+)\s+(?P<regs>\d+)\s+(?P<smem>\d+)\s+(?P<spill>\d+)\s+"
    r"(?P<dot>\d+)\s+(?P<mma>wgmma|mma|none)\s+(?P<secs>[\d.]+)\s+(?P<status>OK|FAIL.*)$")


@pytest.fixture(scope="module")
def quick_report():
    if aot.cuobjdump_path() is None:
        pytest.fail("cuobjdump is missing: it ships with triton (backends/nvidia/bin)")
    env = dict(os.environ, TRITON_INTERPRET="1")  # must work whatever the caller's setting
    proc = subprocess.run([sys.executable, "-m", "o2mag_kernels.tools.cli", "aot-check", "--quick",
                           "--jobs", "2"],
                          env=env, capture_output=True, text=True, timeout=1500)
    return proc


def test_quick_aot_check_is_green_and_matches_the_committed_report(quick_report):
    """CI compiles one variant per head dim and dtype class for sm_80 and sm_90 (the full check,
    ~200 compiles, is a maintainer command whose measurements are committed as aot_report.json);
    what it measures must equal the committed report's numbers for the same variants."""
    proc = quick_report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ROW.match(line) for line in proc.stdout.splitlines() if line.startswith("sm_")]
    assert rows and all(rows), "unparsable table rows:\n" + proc.stdout
    assert len(rows) == len(aot.variants([80, 90], quick=True))
    with open(tuning.AOT_REPORT) as f:
        report = {(r["arch"], r["dtype"], r["head_dim"], tuple(r["config"])): r
                  for r in json.load(f)["results"]}
    for r in rows:
        key = (int(r["arch"]), r["dtype"], int(r["D"]),
               (int(r["bm"]), int(r["bn"]), int(r["warps"]), int(r["stages"])))
        assert r["status"] == "OK", r.group(0)
        assert int(r["dot"]) >= 64, r.group(0)
        if r["arch"] == "90" and int(r["bm"]) >= 16 * int(r["warps"]):
            assert r["mma"] == "wgmma", r.group(0)
        if r["arch"] == "80":
            assert r["mma"] == "mma", r.group(0)
        # bf16 runs fp16's tiles with same-sized operands: the same resources as the fp16 entry
        committed = report.get(key) or report[(key[0], "fp16", *key[2:])]
        assert int(r["regs"]) == committed["regs"], (key, r["regs"], committed["regs"])
        assert int(r["spill"]) == committed["stack"] + committed["local"], key
    assert re.search(rf"{len(rows)}/{len(rows)} variants OK, 0 failed", proc.stdout)
