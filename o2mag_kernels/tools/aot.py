"""``o2mag-kernels aot-check``: compile the Triton kernel's variants for sm_80/sm_90 with no GPU.

Variants: every config in ``backends/triton_kernel.py: CONFIGS`` x head-dim bucket, for fp16 and
fp32, per SM (bf16 shares fp16's tiles and operand sizes, so it is spot-checked: one config per
bucket), each at two stride specialisations (below); the other kernel variants
(``triton_kernel.VARIANTS``: ``bg_dense`` on sm_80 and sm_90, ``tma`` on sm_90, whose TMA is a
Hopper unit) in fp16 at every config and head dim with diffusers' strides. ``--quick`` keeps one
config per head dim (fp16, diffusers' strides) plus one bf16 and two fp32 variants (contiguous)
and one variant each of ``bg_dense`` and ``tma``. Each is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; ``cuobjdump -res-usage``
(bundled with triton) reads registers, static shared memory and spill bytes (local memory + stack
frame) from the cubin; the PTX says whether the dots became ``wgmma`` (sm_90) or ``mma.sync``
(sm_80) and how the kernel loads (below); the TTGIR gives every dot's operand shapes.

Stride specialisations (a row's ``strides``). Triton's launcher specialises each integer argument
on its value (a multiple of 16: ``tt.divisibility`` 16; exactly 1: a constant) and each tensor on
its base pointer (16-byte aligned: ``tt.divisibility`` 16), and the alignment analysis derives
vector widths from that, so the same config compiles differently at different strides:

* ``"contiguous"``: every pointer and every stride argument divisible by 16, nothing else
  specialised (what the check compiled before it had stride specialisations; a contiguous
  ``(B, H, L, D)`` tensor gives it whenever D is a multiple of 16);
* ``"diffusers"``: the arguments the backend itself builds (``triton_backend.kernel_args``) for
  diffusers' ``(B, L, H·D)`` projections viewed as ``(B, H, L, D)`` at a Stable Diffusion layer of
  the head dim (:data:`SD_LAYERS`: 8 targets with per-target masks, batch-1 sources, ``H`` heads,
  ``L`` tokens), specialised by the launcher's rule (:func:`launcher_specialisation`), base pointers
  16-byte aligned (the CUDA caching allocator's), and the ``ALIGNED`` constexpr the host decides on
  those tensors (``triton_backend.inputs_aligned``). At head dim 40 the per-head stride is 40: not
  16-divisible, which without the kernel's alignment hints costs every vector load.

Load counts per row, from the PTX (static instruction counts, not executions):

* ``ld_global_b16``: ``ld.global`` instructions that move exactly 2 bytes (no ``.v2/.v4/.v8``
  qualifier and a 16-bit type: ``.b16/.u16/.s16/.f16/.bf16``, whatever cache or ``.nc``
  qualifiers sit between) and load q, K or V -- attributed by the ``.loc`` line info Triton emits
  to the lines of ``_load_rows``, the only place the kernel loads them through pointers. A vector
  load of 2-byte elements (``.v4.b32`` and the like) does not count: it is what the hints are for;
* ``ld_global_b16_tables``: the other 2-byte ``ld.global`` instructions (the partial tiles' byte
  mask is read two keys per 2-byte load in the wgmma column layout; reported, not judged);
* ``cp_async``: asynchronous copies global -> shared, ``cp.async.ca/cg.shared.global`` plus TMA's
  ``cp.async.bulk...`` (commit/wait instructions do not count); ``cp_async_bulk`` the TMA ones.

This module only WRITES evidence. Whether a variant passes is the rule that reads it,
:func:`o2mag_kernels.tuning.judge` (a compile error, a dot narrower than 64, too much shared
memory, no tensor-core instructions, a ``tma`` build without TMA, or fp16/bf16 spills above
``tuning.SPILL_TOLERANCE``); the table printed here applies it. A failed variant is simply never
run (tuning excludes it); the exit code is non-zero on what the kernel must never have: a compile
error, a narrow dot, or a head dim and dtype class left with no clean config on an architecture.

``--write-report`` stores the measurements with the kernel's source hash in
``o2mag_kernels/aot_report.json``; :mod:`o2mag_kernels.tuning` derives the configs each GPU family
may run from it, and a test fails when the report belongs to another kernel source.

What this cannot prove: that the compiled code runs correctly on a card. Triton >= 3.6 produced
kernels that passed this check and still faulted on an H100; only ``o2mag-kernels gpu-sweep`` on a
card proves that.

Compiles run in worker subprocesses (``python -m o2mag_kernels.tools.aot --worker``, this module's
only entry point: the command is ``o2mag-kernels aot-check``) with ``TRITON_INTERPRET`` removed
from their environment.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import tuning
from ..backends import triton_backend as tb
from ..backends import triton_kernel as K
from ..mask import tri_source_mask

WORKER = "o2mag_kernels.tools.aot"  # ``python -m`` target of the compile subprocesses
DTYPES = ("fp16", "bf16", "fp32")
STRIDES = ("contiguous", "diffusers")
_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The Stable Diffusion layer whose (B, L, H·D) views the "diffusers" specialisation compiles at,
# per head-dim bucket: head dim -> (heads H, tokens L). SD 1.x at 512 px: 320/640/1280 channels
# in 8 heads (head dims 40/80/160, 4096/1024/256 tokens); SD 2.x: head dim 64 in 5/10/20 heads
# (320 channels: H=5 at 4096 tokens); head dim 128: Flux's 24 heads at 4096 image tokens (1024 px).
# No SD-family model uses 256: H=8 at 256 tokens stands in (every stride of it is 16-divisible).
SD_LAYERS = {40: (8, 4096), 64: (5, 4096), 80: (8, 1024), 128: (24, 4096), 160: (8, 256),
             256: (8, 256)}
SD_TARGETS = 8
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# operand shapes of every tensor-core dot in the TTGIR: "(M)x(K)x<type> * (K)x(N)x<type>"
_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) .*? : (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x[^*]*"
                  r"\* (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x")
# a global load: its qualifiers (state space, cache hints, vector, type) up to the operands
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)+)\s")
_TWO_BYTE = {"b16", "u16", "s16", "f16", "bf16"}
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared(?:::[a-z]+)?\.global")
_CP_BULK = re.compile(r"\bcp\.async\.bulk\.(?!commit_group|wait_group|wait_all)")
_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]*)"')


def min_dot_dim(ttgir: str):
    """Smallest M, N or K of any dot in a TTGIR listing (None when it has no dot)."""
    dims = [min(map(int, m.groups())) for m in _DOT.finditer(ttgir)]
    return min(dims) if dims else None


def _two_byte(qualifiers: str) -> bool:
    """Whether an ``ld.global`` with these qualifiers (".nc.L1::evict_last.b16") moves 2 bytes."""
    parts = qualifiers.strip(".").split(".")
    return parts[-1] in _TWO_BYTE and not any(p in ("v2", "v4", "v8") for p in parts)


def _element_lines() -> Tuple[str, range]:
    """(file name, line numbers) of ``_load_rows``: where the kernel loads q, K and V."""
    fn = K._load_rows.fn
    lines, start = inspect.getsourcelines(fn)
    return os.path.basename(inspect.getsourcefile(fn)), range(start, start + len(lines))


def load_counts(ptx: str, element_lines=None) -> Dict[str, int]:
    """``ld_global_b16``, ``ld_global_b16_tables``, ``cp_async`` and ``cp_async_bulk`` of a PTX
    listing (module docstring). A 2-byte load counts as an element load when the last ``.loc``
    before it lies in ``element_lines`` ((file name, line numbers); default ``_load_rows``); a
    listing without line info counts every 2-byte load as an element load (the conservative
    reading)."""
    name, lines = element_lines or _element_lines()
    listing = ptx.splitlines()
    files = {m.group(1): os.path.basename(m.group(2)) for m in map(_FILE.match, listing) if m}
    loc = None
    counts = {"ld_global_b16": 0, "ld_global_b16_tables": 0, "cp_async": 0, "cp_async_bulk": 0}
    for line in listing:
        m = _LOC.match(line)
        if m:
            loc = (files.get(m.group(1)), int(m.group(2)))
            continue
        for ld in _LD_GLOBAL.finditer(line):
            if _two_byte(ld.group(1)):
                element = loc is None or (loc[0] == name and loc[1] in lines)
                counts["ld_global_b16" if element else "ld_global_b16_tables"] += 1
        bulk = len(_CP_BULK.findall(line))
        counts["cp_async_bulk"] += bulk
        counts["cp_async"] += bulk + len(_CP_ASYNC.findall(line))
    return counts


def launcher_specialisation(value) -> Tuple[str, object]:
    """How Triton's launcher (3.x) specialises one argument value: ``("constexpr", 1)`` for the
    integer 1, else ``(type, "D")`` when it is divisible by 16 (an integer) or 16-byte aligned (a
    tensor's ``data_ptr``), else ``(type, "")``; floats are never specialised."""
    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else ("u64" if value >= 2 ** 63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    if isinstance(value, torch.Tensor):
        name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.int32: "i32", torch.uint8: "u8"}[value.dtype]
        return "*" + name, "D" if value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"no launcher specialisation for {type(value).__name__}")


def diffusers_launch(dtype: str, head_dim: int, variant: K.KernelVariant) -> Tuple[dict, dict]:
    """(argument values by name, constexprs but the tile) of the backend's launch on diffusers'
    views at the head dim's SD layer (:data:`SD_LAYERS`), built by the backend's own functions on
    meta tensors (shapes and strides only; base pointers read as 16-byte aligned, as the CUDA
    caching allocator gives them)."""
    H, L = SD_LAYERS[K.head_dim_bucket(head_dim)] if head_dim not in SD_LAYERS else SD_LAYERS[head_dim]
    B, D, t = SD_TARGETS, head_dim, _TORCH_DTYPE[dtype]

    def proj(b):  # a (b, L, H·D) projection viewed as (b, H, L, D)
        return torch.empty(b, L, H * D, dtype=t, device="meta").view(b, L, H, D).transpose(1, 2)

    q, k_fg, v_fg, k_bg, v_bg = proj(B), proj(1), proj(1), proj(1), proj(1)
    per_target = torch.zeros(B, L, dtype=torch.bool, device="meta")
    mask = tri_source_mask(per_target, per_target, per_target)
    out = torch.empty(B, H, L, D, dtype=t, device="meta")
    tables = tb.mask_tables(mask)
    args = tb.kernel_args(q, k_fg, v_fg, k_bg, v_bg, out, mask.counts, *tables, D ** -0.5, 1 / 0.7)
    aligned = tb.inputs_aligned((q, k_fg, v_fg, k_bg, v_bg, out))
    meta = dict(tb.kernel_meta(D, t, False, False, False, aligned, variant))
    meta["DOT_FP32"] = False  # the GPU's dot, whatever process compiles it
    names = [n for n in K.tri_source_fwd.arg_names if n not in meta and n not in ("BLOCK_M", "BLOCK_N")]
    return dict(zip(names, args)), meta


def variants(archs, quick: bool = False):
    """List of dicts (arch, dtype, head_dim, config, strides, variant) to compile."""
    out = []
    others = [v for v in K.VARIANTS if v != K.DEFAULT_VARIANT]
    for arch in archs:
        if quick:  # the first config tuning allows per case (from the committed report)
            picks = [("fp16", d, tuning.spill_free(d, "fp16", arch)[0], "diffusers", "default")
                     for d in K.HEAD_DIMS]
            picks.append(("bf16", 80, tuning.spill_free(80, "bf16", arch)[0], "contiguous", "default"))
            picks.append(("fp32", 64, tuning.spill_free(64, "fp32", arch)[0], "contiguous", "default"))
            picks.append(("fp32", 160, tuning.spill_free(160, "fp32", arch)[0], "contiguous",
                          "default"))  # column-chunked
            for var in others:
                if _variant_archs(var, arch):
                    clean = tuning.spill_free(40, "fp16", arch, variant=var.name)
                    picks.append(("fp16", 40, (clean or [K.CONFIGS[0]])[0], "diffusers", var.name))
        else:
            picks = [(dt, d, cfg, st, "default") for st in STRIDES for dt in ("fp16", "fp32")
                     for d in K.HEAD_DIMS for cfg in K.CONFIGS]
            picks += [("bf16", d, K.CONFIGS[i % len(K.CONFIGS)], st, "default") for st in STRIDES
                      for i, d in enumerate(K.HEAD_DIMS)]
            picks += [("fp16", d, cfg, "diffusers", var.name) for var in others
                      if _variant_archs(var, arch) for d in K.HEAD_DIMS for cfg in K.CONFIGS]
        for dt, d, cfg, st, var in picks:
            out.append({"arch": int(arch), "dtype": dt, "head_dim": d, "config": list(cfg),
                        "strides": st, "variant": var})
    return out


def _variant_archs(variant: K.KernelVariant, arch: int) -> bool:
    """Whether the check compiles ``variant`` for ``arch`` (TMA is a Hopper unit: sm_90 up)."""
    return arch >= 90 or not variant.tma


def variant_key(r: dict) -> tuple:
    """(arch, dtype, head dim, config, strides, variant) of a report row or work item."""
    return (r["arch"], r["dtype"], r["head_dim"], tuple(r["config"]), r.get("strides", "contiguous"),
            r.get("variant", "default"))


def cuobjdump_path():
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _signature(v) -> Tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of one work item for ``ASTSource``."""
    fn = K.tri_source_fwd
    names = fn.arg_names
    bm, bn, warps, stages = v["config"]
    d = v["head_dim"]
    dt = v["dtype"]
    variant = K.KernelVariant.named(v.get("variant", "default"))
    if v.get("strides", "contiguous") == "diffusers":
        values, consts = diffusers_launch(dt, d, variant)
        consts.update(BLOCK_M=bm, BLOCK_N=bn)
        if v.get("chunks"):
            consts["D_CHUNK"], consts["K_CHUNK"] = v["chunks"]
        if v.get("prec"):
            consts["PREC"] = v["prec"]
        sig, attrs = {}, {}
        for i, n in enumerate(names):
            if n in consts:
                sig[n] = "constexpr"
                continue
            kind, spec = launcher_specialisation(values[n])
            sig[n] = kind
            if kind == "constexpr":
                consts[n] = spec
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, consts, attrs
    d0, d1 = K.split_head_dim(d)
    # "chunks" [D_CHUNK, K_CHUNK] overrides the fp32 column chunking (for measuring alternatives)
    dc, kc = v.get("chunks") or K.chunking(d, _ITEMSIZE[dt])
    consts = dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=d1, FG_ALL=False, BG_ALL=False,
                  STORE_LSE=False, DOT_FP32=False, PREC=v.get("prec") or K.precision(_ITEMSIZE[dt]),
                  BLOCK_M=bm, BLOCK_N=bn, D_CHUNK=dc, K_CHUNK=kc, ALIGNED=True,
                  BG_DENSE=variant.bg_dense, TMA=variant.tma)
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
    return sig, consts, {(i,): [["tt.divisibility", 16]] for i in aligned}


def _compile_one(v):
    """Compile one variant in this (non-interpreted) process and measure it."""
    res = dict(v)
    res.setdefault("strides", "contiguous")
    res.setdefault("variant", "default")
    _, _, warps, stages = v["config"]
    t0 = time.perf_counter()
    try:
        sig, consts, attrs = _signature(v)
        res["aligned"] = bool(consts["ALIGNED"])
        kern = triton.compile(ASTSource(fn=K.tri_source_fwd, signature=sig, constexprs=consts,
                                        attrs=attrs),
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
    res.update(load_counts(ptx))
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
    keep = ("arch", "dtype", "head_dim", "config", "strides", "variant", "aligned", "ok", "error",
            "regs", "stack", "local", "static_smem", "dyn_smem", "min_dot", "wgmma", "mma",
            "ld_global_b16", "ld_global_b16_tables", "cp_async", "cp_async_bulk")
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
            done = {variant_key(r) for r in got}
            for v in chunk:  # a crashed worker must not hide its variants
                if variant_key(v) not in done:
                    got.append(dict(v, ok=False, error=f"worker exited {p.returncode}: "
                                                       f"{err[-1] if err else ''}"))
            results.extend(got)
    order = {v.name: i for i, v in enumerate(K.VARIANTS)}
    results.sort(key=lambda r: (r["arch"], order.get(r.get("variant", "default"), len(order)),
                                STRIDES.index(r.get("strides", "contiguous")),
                                DTYPES.index(r["dtype"]), r["head_dim"], r["config"]))
    return results


_SHORT = {"contiguous": "contig", "diffusers": "diffus"}


def format_table(results) -> str:
    head = (f"{'arch':>6} {'dtype':>5} {'D':>4} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} "
            f"{'strides':>7} {'variant':>8} {'regs':>5} {'smem_B':>7} {'spill_B':>7} {'dot':>4} "
            f"{'mma':>6} {'b16':>4} {'cpasync':>7} {'secs':>5}  status")
    lines = [head]
    for r in results:
        bm, bn, w, s = r["config"]
        why = tuning.judge(r)
        if r.get("ok"):
            mma = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "none")
            cols = (f"{r['regs']:>5} {r['dyn_smem'] + r['static_smem']:>7} {r['local'] + r['stack']:>7} "
                    f"{r.get('min_dot') or 0:>4} {mma:>6} {r['ld_global_b16']:>4} {r['cp_async']:>7} "
                    f"{r['seconds']:>5.1f}")
        else:
            cols = (f"{'-':>5} {'-':>7} {'-':>7} {'-':>4} {'-':>6} {'-':>4} {'-':>7} "
                    f"{r.get('seconds', 0):>5.1f}")
        lines.append(f"sm_{r['arch']:<3} {r['dtype']:>5} {r['head_dim']:>4} {bm:>4} {bn:>4} {w:>5} "
                     f"{s:>6} {_SHORT[r.get('strides', 'contiguous')]:>7} "
                     f"{r.get('variant', 'default'):>8} {cols}  {'OK' if not why else 'FAIL ' + why}")
    return "\n".join(lines)


def gaps(results) -> List[tuple]:
    """(arch, dtype class, head dim, variant) cells where no config is clean at every stride
    specialisation compiled for it (tuning's rule, :func:`o2mag_kernels.tuning.aot_table`)."""
    clean: Dict[tuple, bool] = {}
    for r in results:
        if r["dtype"] == "bf16":
            continue  # spot-checked: tuning gives bf16 fp16's configs
        kind = "fp32" if r["dtype"] == "fp32" else "half"
        cfg = (r["arch"], kind, r["head_dim"], r.get("variant", "default"), tuple(r["config"]))
        clean[cfg] = clean.get(cfg, True) and not tuning.judge(r)
    cells: Dict[tuple, bool] = {}
    for cfg, ok in clean.items():
        cells[cfg[:4]] = cells.get(cfg[:4], False) or ok
    return sorted(k for k, ok in cells.items() if not ok)


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
    holes = gaps(results)
    default_holes = [h for h in holes if h[3] == "default"]
    print(f"aot-check: {len(results) - len(bad)}/{len(results)} variants OK, {len(bad)} failed "
          f"({time.perf_counter() - t0:.1f} s)")
    if bad and not errors and not default_holes:
        print(f"aot-check: the {len(bad)} failed variants spill or overflow shared memory; tuning "
              "never runs them (every head dim and dtype keeps a clean config)")
    for arch, kind, d, var in holes:
        level = "ERROR" if var == "default" else "note:"
        print(f"aot-check: {level} no clean config for sm_{arch} {kind} head dim {d} ({var} variant)")
    for r in errors:
        print(f"aot-check: ERROR {r['arch']} {r['dtype']} D{r['head_dim']} {r['config']} "
              f"{r.get('strides')} {r.get('variant')}: {tuning.judge(r)}")
    return 1 if errors or default_holes or not results else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
