"""``o2mag-kernels aot-check``: compile the Triton kernel's variants for sm_80/sm_90 with no GPU.

Variants: every config in ``backends/triton_kernel.py: CONFIGS`` x head-dim bucket, for fp16 and
fp32, per SM (bf16 shares fp16's tiles and operand sizes, so it is spot-checked: one config per bucket);
``--quick`` keeps one config per head dim (fp16) plus one bf16 and two fp32 variants. Each is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; ``cuobjdump
-res-usage`` (bundled with triton) reads registers, static shared memory and spill bytes (local
memory + stack frame) from the cubin; the PTX says whether the dots became ``wgmma`` (sm_90) or
``mma.sync`` (sm_80); the TTGIR gives every dot's operand shapes.

This module only WRITES evidence. Whether a variant passes is the rule that reads it,
:func:`o2mag_kernels.tuning.judge` (a compile error, a dot narrower than 64, too much shared
memory, no tensor-core instructions, or fp16/bf16 spills above ``tuning.SPILL_TOLERANCE``); the
table printed here applies it. A failed variant is simply never run (tuning excludes it); the exit
code is non-zero on what the kernel must never have: a compile error, a narrow dot, or a head dim
and dtype class left with no clean config on an architecture.

``--write-report`` stores the measurements with the kernel's source hash in
``o2mag_kernels/aot_report.json``; :mod:`o2mag_kernels.tuning` derives the configs each GPU family
may run from it, and a test fails when the report belongs to another kernel source.

What this cannot prove: that the compiled code runs correctly on a card. Triton >= 3.6 produced
kernels that passed this check and still faulted on an H100; only ``o2mag-kernels gpu-sweep`` on a
card proves that.

Compiles run in worker subprocesses (``python -m o2mag_kernels.tools.aot --worker``, this module's
only entry point: the command is ``o2mag-kernels aot-check``) with ``TRITON_INTERPRET`` removed
from their environment.
Specialisation compiled: every pointer and stride divisible by 16 (contiguous tensors and
diffusers' (B, L, H·D) views with 16-aligned rows); other specialisations only change
vectorisation, not the tiling.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import tuning
from ..backends import triton_kernel as K

WORKER = "o2mag_kernels.tools.aot"  # ``python -m`` target of the compile subprocesses
DTYPES = ("fp16", "bf16", "fp32")
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# operand shapes of every tensor-core dot in the TTGIR: "(M)x(K)x<type> * (K)x(N)x<type>"
_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) .*? : (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x[^*]*"
                  r"\* (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x")


def min_dot_dim(ttgir: str):
    """Smallest M, N or K of any dot in a TTGIR listing (None when it has no dot)."""
    dims = [min(map(int, m.groups())) for m in _DOT.finditer(ttgir)]
    return min(dims) if dims else None


def variants(archs, quick: bool = False):
    """List of dicts (arch, dtype, head_dim, config) to compile."""
    out = []
    for arch in archs:
        if quick:  # the first config tuning allows per case (from the committed report)
            picks = [("fp16", d, tuning.spill_free(d, "fp16", arch)[0]) for d in K.HEAD_DIMS]
            picks.append(("bf16", 80, tuning.spill_free(80, "bf16", arch)[0]))
            picks.append(("fp32", 64, tuning.spill_free(64, "fp32", arch)[0]))
            picks.append(("fp32", 160, tuning.spill_free(160, "fp32", arch)[0]))  # column-chunked
        else:
            picks = [(dt, d, cfg) for dt in ("fp16", "fp32") for d in K.HEAD_DIMS for cfg in K.CONFIGS]
            picks += [("bf16", d, K.CONFIGS[i % len(K.CONFIGS)]) for i, d in enumerate(K.HEAD_DIMS)]
        for dt, d, cfg in picks:
            out.append({"arch": int(arch), "dtype": dt, "head_dim": d, "config": list(cfg)})
    return out


def cuobjdump_path():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _compile_one(v):
    """Compile one variant in this (non-interpreted) process and measure it."""
    fn = K.tri_source_fwd
    names = fn.arg_names
    bm, bn, warps, stages = v["config"]
    d = v["head_dim"]
    d0, d1 = K.split_head_dim(d)
    dt = v["dtype"]
    # "chunks" [D_CHUNK, K_CHUNK] overrides the fp32 column chunking (for measuring alternatives)
    dc, kc = v.get("chunks") or K.chunking(d, _ITEMSIZE[dt])
    consts = dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=d1, FG_ALL=False, BG_ALL=False,
                  STORE_LSE=False, DOT_FP32=False, PREC=v.get("prec") or K.precision(_ITEMSIZE[dt]),
                  BLOCK_M=bm, BLOCK_N=bn, D_CHUNK=dc, K_CHUNK=kc)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Q", "KF", "VF", "KB", "VB", "O"):
            sig[n] = "*" + dt
        elif n == "LSE":
            sig[n] = "*i32"  # STORE_LSE=False: a dummy pointer, as at run time
        elif n == "BMASK":
            sig[n] = "*u8"
        elif n in ("QPERM", "FIDX", "TILES64", "TILES128", "COUNTS"):
            sig[n] = "*i32"
        elif n.startswith("qk_scale"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    aligned = [i for i, n in enumerate(names)
               if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s"))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    res = dict(v)
    t0 = time.perf_counter()
    try:
        kern = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", v["arch"], 32),
                              options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # report, do not crash the whole check
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}",
                   seconds=time.perf_counter() - t0)
        return res
    res["seconds"] = time.perf_counter() - t0
    ptx = kern.asm["ptx"]
    res["wgmma"] = "wgmma" in ptx
    res["mma"] = "mma.sync" in ptx
    res["dyn_smem"] = int(kern.metadata.shared)
    res["min_dot"] = min_dot_dim(kern.asm["ttgir"])
    tool = cuobjdump_path()
    if tool is None:
        res.update(ok=False, error="cuobjdump not found (neither bundled with triton nor on PATH)")
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kern.asm["cubin"])
        path = f.name
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                              check=False).stdout
    finally:
        os.unlink(path)
    m = _RES.search(text)
    if m is None:
        res.update(ok=False, error=f"could not parse cuobjdump output: {text.strip()[:200]}")
        return res
    res["regs"], res["stack"], res["static_smem"], res["local"] = map(int, m.groups())
    res["ok"], res["error"] = True, ""
    return res


def write_report(results, path: str = tuning.AOT_REPORT) -> None:
    """Store the measurements (and the kernel source hash they belong to) for tuning."""
    keep = ("arch", "dtype", "head_dim", "config", "ok", "error", "regs", "stack", "local",
            "static_smem", "dyn_smem", "min_dot", "wgmma", "mma")
    rows = [{k: r[k] for k in keep if k in r} for r in results]
    with open(path, "w") as f:
        json.dump({"kernel_hash": tuning.kernel_hash(), "triton": triton.__version__,
                   "spill_tolerance": tuning.SPILL_TOLERANCE, "results": rows}, f, indent=0)
        f.write("\n")


def worker_main(argv: List[str]) -> int:
    """Entry of a compile subprocess (``--worker``): JSON list of variants on stdin, one JSON
    result per line. The command line is ``o2mag-kernels aot-check`` (:mod:`.cli`); this module
    never imports the CLI back."""
    if argv != ["--worker"]:
        print(f"python -m {WORKER} runs the compile workers of `o2mag-kernels aot-check` (or "
              f"python -m o2mag_kernels.tools.cli aot-check); usage: python -m {WORKER} --worker",
              file=sys.stderr)
        return 2
    todo = json.load(sys.stdin)
    for v in todo:
        print(json.dumps(_compile_one(v)), flush=True)
    return 0


def compile_all(todo, jobs=None):
    """Compile variants in ``jobs`` worker processes (never under the Triton interpreter)."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences a warning
    chunks = [todo[i::jobs] for i in range(jobs)]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, chunk in enumerate(chunks):
            # files, not pipes: no worker can block on a full pipe while we wait on another
            with open(os.path.join(tmp, f"{i}.in"), "w") as f:
                json.dump(chunk, f)
            fin = open(os.path.join(tmp, f"{i}.in"))
            fout = open(os.path.join(tmp, f"{i}.out"), "w")
            ferr = open(os.path.join(tmp, f"{i}.err"), "w")
            p = subprocess.Popen([sys.executable, "-m", WORKER, "--worker"], env=env,
                                 stdin=fin, stdout=fout, stderr=ferr)
            procs.append((p, chunk, (fin, fout, ferr)))
        results = []
        for i, (p, chunk, files) in enumerate(procs):
            p.wait()
            for f in files:
                f.close()
            with open(os.path.join(tmp, f"{i}.out")) as f:
                got = [json.loads(line) for line in f if line.startswith("{")]
            with open(os.path.join(tmp, f"{i}.err")) as f:
                err = f.read().strip().splitlines()
            done = {(r["arch"], r["dtype"], r["head_dim"], tuple(r["config"])) for r in got}
            for v in chunk:  # a crashed worker must not hide its variants
                if (v["arch"], v["dtype"], v["head_dim"], tuple(v["config"])) not in done:
                    got.append(dict(v, ok=False, error=f"worker exited {p.returncode}: "
                                                       f"{err[-1] if err else ''}"))
            results.extend(got)
    results.sort(key=lambda r: (r["arch"], DTYPES.index(r["dtype"]), r["head_dim"], r["config"]))
    return results


def format_table(results) -> str:
    head = (f"{'arch':>6} {'dtype':>5} {'D':>4} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} "
            f"{'regs':>5} {'smem_B':>7} {'spill_B':>7} {'dot':>4} {'mma':>6} {'secs':>5}  status")
    lines = [head]
    for r in results:
        bm, bn, w, s = r["config"]
        why = tuning.judge(r)
        if r.get("ok"):
            mma = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
            cols = (f"{r['regs']:>5} {r['dyn_smem'] + r['static_smem']:>7} {r['local'] + r['stack']:>7} "
                    f"{r.get('min_dot') or 0:>4} {mma:>6} {r['seconds']:>5.1f}")
        else:
            cols = f"{'-':>5} {'-':>7} {'-':>7} {'-':>4} {'-':>6} {r.get('seconds', 0):>5.1f}"
        lines.append(f"sm_{r['arch']:<3} {r['dtype']:>5} {r['head_dim']:>4} {bm:>4} {bn:>4} {w:>5} "
                     f"{s:>6} {cols}  {'OK' if not why else 'FAIL ' + why}")
    return "\n".join(lines)


def run(args) -> int:
    """CLI entry (``args.arch``: list of SM versions, ``args.quick``). Returns the exit code."""
    archs = list(getattr(args, "arch", None) or [80, 90])
    quick = bool(getattr(args, "quick", False))
    todo = variants(archs, quick)
    tool = cuobjdump_path()
    print(f"aot-check: {len(todo)} variants for {', '.join(f'sm_{a}' for a in archs)}"
          f"{' (quick)' if quick else ''}; cuobjdump: {tool or 'NOT FOUND'}", flush=True)
    t0 = time.perf_counter()
    results = compile_all(todo, getattr(args, "jobs", None))
    print(format_table(results))
    path = getattr(args, "json", None)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    if getattr(args, "write_report", False):
        write_report(results)
        print(f"aot-check: wrote {tuning.AOT_REPORT}")
    bad = [r for r in results if tuning.judge(r)]
    errors = [r for r in bad
              if not r.get("ok") or r.get("min_dot") is None or r["min_dot"] < tuning.MIN_DOT]
    cells = {}
    for r in results:
        key = (r["arch"], "fp32" if r["dtype"] == "fp32" else "half", r["head_dim"])
        cells[key] = cells.get(key, False) or not tuning.judge(r)
    gaps = sorted(k for k, ok in cells.items() if not ok)
    print(f"aot-check: {len(results) - len(bad)}/{len(results)} variants OK, {len(bad)} failed "
          f"({time.perf_counter() - t0:.1f} s)")
    if bad and not errors and not gaps:
        print(f"aot-check: the {len(bad)} failed variants spill or overflow shared memory; tuning "
              "never runs them (every head dim and dtype keeps a clean config)")
    for arch, kind, d in gaps:
        print(f"aot-check: ERROR no clean config for sm_{arch} {kind} head dim {d}")
    for r in errors:
        print(f"aot-check: ERROR {r['arch']} {r['dtype']} D{r['head_dim']} {r['config']}: {tuning.judge(r)}")
    return 1 if errors or gaps or not results else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
