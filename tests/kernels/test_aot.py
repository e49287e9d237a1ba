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
    r"(?P<warps>\d+)\s+(?P<stages>\d+)\s+(?P<strides>contig|diffus)\s+(?P<variant>[\w+]+)\s+"
    r"(?P<regs>\d+)\s+(?P<smem>\d+)\s+(?P<spill>\d+)\s+(?P<dot>\d+)\s+(?P<mma>wgmma|mma|none)\s+"
    r"(?P<b16>\d+)\s+(?P<cpasync>\d+)\s+(?P<secs>[\d.]+)\s+(?P<status>OK|FAIL.*)$")
STRIDES = {"contig": "contiguous", "diffus": "diffusers"}


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
        report = {aot.variant_key(r): r for r in json.load(f)["results"]}
    kinds = set()
    for r in rows:
        key = (int(r["arch"]), r["dtype"], int(r["D"]),
               (int(r["bm"]), int(r["bn"]), int(r["warps"]), int(r["stages"])),
               STRIDES[r["strides"]], r["variant"])
        kinds.add(key[4:])
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
        assert int(r["b16"]) == committed["ld_global_b16"], key
        assert int(r["cpasync"]) == committed["cp_async"], key
        if r["dtype"] != "fp32" and r["strides"] == "diffus":  # the hints at diffusers' strides
            assert int(r["b16"]) == 0 and int(r["cpasync"]) > 0, r.group(0)
    assert {("diffusers", "default"), ("contiguous", "default"), ("diffusers", "bg_dense"),
            ("diffusers", "tma")} <= kinds
    assert re.search(rf"{len(rows)}/{len(rows)} variants OK, 0 failed", proc.stdout)


# a PTX excerpt: line info (.loc file line col) before each instruction, as Triton emits it
_PTX = """
\t.loc\t1 {row} 20
\t@%p1 ld.global.b16 {{ %rs1 }}, [ %rd1 + 0 ];
\tld.global.nc.b16 {{ %rs2 }}, [ %rd2 + 0 ];
\t@%p2 ld.global.L1::evict_last.u16 {{ %rs3 }}, [ %rd3 + 0 ];
\tld.global.v2.b16 {{ %rs4, %rs5 }}, [ %rd4 + 0 ];
\t@%p3 ld.global.v4.b32 {{ %r1, %r2, %r3, %r4 }}, [ %rd5 + 0 ];
\tld.global.b8 {{ %rs6 }}, [ %rd6 + 0 ];
\tcp.async.cg.shared.global [ %r5 + 0 ], [ %rd7 + 0 ], 0x10, %r6;
\tcp.async.ca.shared.global [ %r7 + 0 ], [ %rd8 + 0 ], 0x4, %r8;
\tcp.async.commit_group;
\tcp.async.wait_group 0x1;
\t.loc\t1 {other} 29
\t@%p4 ld.global.b16 {{ %rs7 }}, [ %rd9 + 0 ];
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd10, {{%r10, %r11}}], [%r12];
\tcp.async.bulk.commit_group;
\tcp.async.bulk.wait_group.read 0;
\t.file\t1 "/somewhere/o2mag_kernels/backends/triton_kernel.py"
\t.file\t2 "/somewhere/triton/language/standard.py"
"""


def test_load_counts_read_the_ptx_spellings():
    """2-byte global loads (b16/u16, with or without .nc or cache hints; not vectors, not bytes)
    from ``_load_rows``' lines are element loads, those elsewhere table loads; cp.async copies and
    TMA bulk copies count, their commit and wait instructions do not."""
    name, lines = aot._element_lines()
    assert name == "triton_kernel.py" and len(lines) > 3
    ptx = _PTX.format(row=lines[3], other=lines[0] - 5)
    assert aot.load_counts(ptx) == {"ld_global_b16": 3, "ld_global_b16_tables": 1,
                                    "cp_async": 3, "cp_async_bulk": 1}
    other_file = ptx.replace('.file\t1 "/somewhere/o2mag_kernels/backends/triton_kernel.py"',
                             '.file\t1 "/somewhere/other.py"')
    assert aot.load_counts(other_file)["ld_global_b16"] == 0
    no_line_info = "\n".join(ln for ln in ptx.splitlines() if ".loc" not in ln)
    assert aot.load_counts(no_line_info)["ld_global_b16"] == 4  # unattributed: counted


def test_launcher_specialisation_is_tritons():
    """The "diffusers" rows are compiled as Triton's launcher specialises the backend's actual
    arguments: 1 becomes a constant, multiples of 16 (0 included) and 16-byte aligned pointers get
    tt.divisibility 16, floats nothing; checked against triton's own rule where it is importable."""
    import torch

    ints = (1, 0, 16, 40, 80, 320, 6, 7, 2 ** 31 + 16, -16)
    assert [aot.launcher_specialisation(v) for v in ints] == [
        ("constexpr", 1), ("i32", "D"), ("i32", "D"), ("i32", ""), ("i32", "D"), ("i32", "D"),
        ("i32", ""), ("i32", ""), ("i64", "D"), ("i32", "D")]
    assert aot.launcher_specialisation(0.5) == ("fp32", "")
    t = torch.zeros(8, dtype=torch.float16)
    assert aot.launcher_specialisation(t) == ("*fp16", "D")
    assert aot.launcher_specialisation(t[1:]) == ("*fp16", "")
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # another triton: the rule above is the documented one
        return
    for v in ints:
        assert tuple(native_specialize_impl(BaseBackend, v, False, True, True)) == \
            aot.launcher_specialisation(v), v


def test_diffusers_specialisation_of_the_sd_layers():
    """At SD 1.5's head dim 40 (8 heads, 4096 tokens) the per-head stride is 40: not marked
    16-divisible, while the row stride 320 is; the host decides ALIGNED (every stride a multiple
    of 8). Head dim 64 (SD 2.x, 5 heads): per-head 64, rows 320, all 16-divisible."""
    from o2mag_kernels.backends import triton_kernel as K

    values, meta = aot.diffusers_launch("fp16", 40, K.DEFAULT_VARIANT)
    spec = {n: aot.launcher_specialisation(v) for n, v in values.items()}
    assert values["sq_h"] == 40 and spec["sq_h"] == ("i32", "") and spec["skb_h"] == ("i32", "")
    assert values["sq_l"] == 320 and spec["sq_l"] == ("i32", "D")
    assert values["so_l"] == 40 and spec["so_l"] == ("i32", "")  # the contiguous output
    assert spec["Q"] == ("*fp16", "D") and values["H"] == 8 and values["Lq"] == 4096
    assert values["sc_b"] == 6 and meta["ALIGNED"] is True and meta["DOT_FP32"] is False
    values, meta = aot.diffusers_launch("bf16", 64, K.KernelVariant(tma=True))
    assert values["sq_h"] == 64 and values["sq_l"] == 320 and meta["TMA"] is True
