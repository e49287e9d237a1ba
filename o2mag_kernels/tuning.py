"""Which tile configs of the fused kernel may run on a GPU, and whether ``auto`` may pick it.

Two kinds of evidence, kept apart because they prove different things:

* **compiles cleanly** (``aot_report.json``, written by ``o2mag-kernels aot-check
  --write-report``): every config compiled for sm_80 and sm_90 without a GPU, with its registers,
  spills, shared memory and dot widths. fp16/bf16 configs that fail the check (spills above the
  tolerance, too much shared memory, a narrow dot: :func:`judge`, kept here so that the tool only
  writes evidence and the runtime owns what it means) are never run; fp32 (3xTF32) spills at
  every tile, so it keeps the two configs that spill least. It cannot see a miscompiled kernel that
  faults or computes wrong values on a card (Triton >= 3.6 had such faults on Hopper).
* **ran correctly on a card** (sweeps): ``o2mag-kernels gpu-sweep`` runs every compiled-clean
  config x head dim x dtype x mask kind in its own process on a GPU against the float64 reference
  and writes ``o2mag_kernels/sweeps/<card>.json``. A sweep counts only for the kernel source it
  ran on (its ``kernel_hash``): any change to the kernel makes it stale.

The configs allowed on a GPU family (sm_8x, sm_9x, ...) are the compiled-clean ones that passed
every case in the committed sweeps of that family (fastest first); a family never swept gets those
that passed in every sweep of every family; with no valid sweep at all, the compiled-clean ones --
unproven, so ``auto`` does not pick the kernel there (``O2MAG_TRITON=on`` opts in, ``off`` never
picks it).
"""
from __future__ import annotations

import ast
import functools
import glob
import hashlib
import inspect
import json
import math
import os
from typing import Dict, List, Optional, Tuple

from .backends import triton_kernel as K

SWEEP_DIR = os.path.join(os.path.dirname(__file__), "sweeps")
AOT_REPORT = os.path.join(os.path.dirname(__file__), "aot_report.json")
Config = Tuple[int, int, int, int]
FP32_KEEP = 2  # fp32 spills everywhere: keep the configs that spill least


def family(arch: int) -> int:
    """SM family of an architecture number (86 -> 80, 90 -> 90, 100 -> 100)."""
    return 10 * (arch // 10)


def _aot_family(arch: int) -> int:
    """The AOT-checked family whose register budget applies (sm_80 for 8.x, sm_90 above)."""
    return 90 if arch >= 90 else 80


# ------------------------------------------------------------- the rule that reads the AOT report
# (``o2mag-kernels aot-check`` measures and writes; this decides what the measurements mean)

# Max dynamic shared memory per block (bytes) by SM version.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
MIN_DOT = K.MIN_DOT  # narrower dots miscompile on Hopper with Triton >= 3.6; the kernel pads to it
SPILL_TOLERANCE = 128  # bytes per thread of stack/local a fp16/bf16 variant may use (a few registers)


def spill_bytes(r: dict) -> int:
    """Local memory plus stack frame per thread of one measured variant."""
    return int(r.get("local", 0)) + int(r.get("stack", 0))


def judge(r: dict) -> str:
    """Empty string when a measured variant (a row of the AOT report) is green, else why it fails.

    It fails on: a compile error, a dot narrower than ``MIN_DOT`` in any dimension (the Hopper
    miscompile class the kernel is built to avoid), shared memory above the architecture's
    per-block limit, more registers than the register file holds, (sm_90, warpgroup-sized tiles)
    no ``wgmma``, (sm_8x) no ``mma.sync``, (the ``tma`` variant on sm_90) no TMA copy
    (``cp.async.bulk``) in the PTX, or -- for fp16/bf16, the fast path -- spills above
    ``SPILL_TOLERANCE`` bytes. fp32 (3xTF32 dots: operands split into hi/lo halves) spills at every
    64-wide tile; its spills are reported, not failed, and ``auto`` sends fp32 to the torch backend.
    The load counts (``ld_global_b16``, ``cp_async``) are reported, not judged: a test holds the
    configs this rule allows to no 2-byte element loads at diffusers' strides.
    """
    if not r.get("ok"):
        return r.get("error") or "compile failed"
    bm, _, warps, _ = r["config"]
    if r.get("min_dot") is None or r["min_dot"] < MIN_DOT:
        return f"a dot is {r.get('min_dot')} wide (< {MIN_DOT}: the Hopper miscompile class)"
    limit = SMEM_LIMIT.get(r["arch"])
    smem = r["dyn_smem"] + r["static_smem"]
    if limit is not None and smem > limit:
        return f"shared memory {smem} B > {limit} B limit of sm_{r['arch']}"
    if r["regs"] * 32 * warps > 65536:
        return f"{r['regs']} registers x {32 * warps} threads exceed the register file"
    if r["arch"] >= 90 and bm >= 16 * warps and not r["wgmma"]:
        return "no wgmma in sm_90 PTX for a warpgroup-sized tile"
    if r["arch"] < 90 and not r["mma"]:
        return "no mma.sync in PTX"
    if "tma" in r.get("variant", "default").split("+") and r["arch"] >= 90 \
            and not r.get("cp_async_bulk"):
        return "a tma build without a TMA copy (cp.async.bulk) in its PTX"
    if r["dtype"] != "fp32" and spill_bytes(r) > SPILL_TOLERANCE:
        return f"spills: {r['local']} local bytes, {r['stack']} stack bytes (> {SPILL_TOLERANCE})"
    return ""


def _read_report(path: str) -> dict:
    """The AOT report, or ``RuntimeError`` when it is missing or belongs to another kernel."""
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: run `o2mag-kernels aot-check --write-report`")
    with open(path) as f:
        report = json.load(f)
    if report.get("kernel_hash") != kernel_hash():
        raise RuntimeError(f"{os.path.basename(path)} was written for another kernel source: rerun "
                           "`o2mag-kernels aot-check --write-report`")
    return report


def aot_status(path: str = AOT_REPORT) -> str:
    """'' when the AOT report belongs to this kernel, else why not (the tables then allow every
    config: nothing was checked). Cached per kernel hash: the report is read once per process."""
    return _aot_status(path, kernel_hash())


@functools.lru_cache(maxsize=None)
def _aot_status(path: str, _kernel_hash: str) -> str:
    try:
        _read_report(path)
    except RuntimeError as exc:
        return str(exc)
    return ""


@functools.lru_cache(maxsize=None)
def aot_table(path: str = AOT_REPORT) -> Dict[Tuple[int, str, int, str], Tuple[Config, ...]]:
    """(AOT family, dtype class, head-dim bucket, variant name) -> configs that compile cleanly,
    in CONFIGS order (every config, unchecked, when the report is missing or stale: see
    :func:`aot_status`). A config is clean for a variant only when every stride specialisation
    compiled for it is (``"contiguous"`` and ``"diffusers"`` for the default variant): the
    autotuner does not know which strides a call will bring, and a build at diffusers' strides that
    spills or overflows shared memory must not run on such inputs."""
    try:
        report = _read_report(path)
    except RuntimeError:
        return {(f, kind, d, v.name): tuple(K.CONFIGS) for f in (80, 90)
                for kind in ("half", "fp32") for d in K.HEAD_DIMS for v in K.VARIANTS}
    order = {c: i for i, c in enumerate(K.CONFIGS)}
    rows: Dict[Tuple[int, str, int, str, Config], list] = {}
    for r in report["results"]:
        cfg = tuple(r["config"])
        if cfg not in order or r["dtype"] == "bf16":
            continue  # bf16 runs fp16's tiles (spot-checked only)
        kind = K.dtype_class(4 if r["dtype"] == "fp32" else 2)
        key = (r["arch"], kind, r["head_dim"], r.get("variant", "default"), cfg)
        rows.setdefault(key, []).append((judge(r), spill_bytes(r)))
    table: Dict[Tuple[int, str, int, str], list] = {}
    for (*cell, cfg), got in rows.items():
        clean = not any(why for why, _ in got)
        table.setdefault(tuple(cell), []).append((clean, max(b for _, b in got), cfg))
    out = {}
    for key, cfgs in table.items():
        if key[1] == "fp32":  # reported, not failed, on spills: keep the least-spilling ones
            clean = sorted((b, order[c], c) for ok, b, c in cfgs if ok)[:FP32_KEEP]
            out[key] = tuple(sorted((c for _, _, c in clean), key=order.get))
        else:
            out[key] = tuple(sorted((c for ok, _, c in cfgs if ok), key=order.get))
    return out


DTYPES = ("fp16", "bf16", "fp32")


def dtype_name(dtype) -> str:
    """'fp16' / 'bf16' / 'fp32' for a torch dtype or such a name."""
    name = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return name


def spill_free(head_dim: int, dtype, arch: int, variant: str = "default") -> List[Config]:
    """Configs (in CONFIGS order) that compile cleanly for this head dim, dtype and SM, for the
    kernel variant named ``variant`` (``KernelVariant.name``; the autotuner's is "default")."""
    kind = "fp32" if dtype_name(dtype) == "fp32" else "half"
    key = (_aot_family(arch), kind, K.head_dim_bucket(head_dim), variant)
    return list(aot_table().get(key, ()))


@functools.lru_cache(maxsize=None)
def kernel_hash() -> str:
    """Hash of the kernel's Triton source (every ``@triton.jit`` function of
    ``backends/triton_kernel.py``, read from the file, so the interpreter and a GPU agree) and of
    its config list."""

    source = inspect.getsource(K)
    h = hashlib.sha256()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            h.update(ast.get_source_segment(source, node).encode())
    for c in K.CONFIGS:
        h.update(repr(c).encode())
    return h.hexdigest()[:16]


def sweep_is_valid(sweep: dict, current: Optional[str] = None) -> bool:
    """A sweep proves something only for this kernel's source, and only when run on a GPU."""
    return sweep.get("kernel_hash") == (current or kernel_hash()) and not sweep.get("interpreted")


@functools.lru_cache(maxsize=None)
def load_sweeps(directory: str = SWEEP_DIR) -> Tuple[dict, ...]:
    """Every committed sweep file, each a dict with ``valid`` (its kernel hash is this kernel's)."""
    out = []
    current = kernel_hash()
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            data = json.load(f)
        data["path"] = path
        data["valid"] = sweep_is_valid(data, current)
        out.append(data)
    return tuple(out)


def _passed(sweep: dict) -> Dict[Tuple[str, int], Dict[Config, float]]:
    """(dtype, head-dim bucket) the sweep covered -> {config that passed every case there: its
    median time in ms on the timed case (inf when not timed)}."""
    ok: Dict[Tuple[str, int, Config], bool] = {}
    ms: Dict[Tuple[str, int, Config], float] = {}
    for r in sweep.get("results", []):
        if "config" not in r:  # a baseline row (the torch backend's time): see _timed
            continue
        key = (r["dtype"], K.head_dim_bucket(int(r["head_dim"])), tuple(r["config"]))
        ok[key] = ok.get(key, True) and r.get("status") == "ok"
        if "ms" in r:
            ms[key] = max(ms.get(key, 0.0), float(r["ms"]))
    table: Dict[Tuple[str, int], Dict[Config, float]] = {}
    for (dt, d, cfg), good in ok.items():
        table.setdefault((dt, d), {})
        if good:
            table[(dt, d)][cfg] = ms.get((dt, d, cfg), float("inf"))
    return table


def _near_tokens(rows: List[dict], tokens: Optional[int]) -> List[dict]:
    """The rows timed at the token count nearest ``tokens`` (log scale; all rows when None)."""
    if tokens is None or not rows:
        return rows
    have = {int(r.get("tokens", 0)) for r in rows}
    near = min(have, key=lambda n: (abs(math.log2(max(n, 1)) - math.log2(max(tokens, 1))), -n))
    return [r for r in rows if int(r.get("tokens", 0)) == near]


def _timed_rows(sweep: dict, dtype: str, head_dim: int, tokens: Optional[int]) -> List[dict]:
    """The sweep's timing rows for ``dtype`` at the swept head dim nearest ``head_dim`` in its
    bucket (40 and 64 share a bucket but are timed on different SD layers: their times must not
    be mixed), then at the token count nearest ``tokens``."""
    bucket = K.head_dim_bucket(head_dim)
    rows = [r for r in sweep.get("results", []) if r["dtype"] == dtype and "ms" in r
            and r.get("status") == "ok" and K.head_dim_bucket(int(r["head_dim"])) == bucket]
    if not rows:
        return []
    near = min({int(r["head_dim"]) for r in rows}, key=lambda d: (abs(d - head_dim), d))
    return _near_tokens([r for r in rows if int(r["head_dim"]) == near], tokens)


def torch_strategy_of(row: dict) -> str:
    """The torch strategy a baseline row timed (rows written before strategies were recorded
    timed the CUDA default of their day, ``stitch``)."""
    return str(row.get("strategy", "stitch"))


def _timed(sweep: dict, dtype: str, head_dim: int,
           tokens: Optional[int] = None) -> Tuple[Dict[Config, float], Dict[str, float]]:
    """({config: median ms}, {torch strategy: median ms}) on the sweep's timed layer nearest
    (``head_dim``, ``tokens``) (see :func:`_timed_rows`)."""
    rows = _timed_rows(sweep, dtype, head_dim, tokens)
    ours = {tuple(r["config"]): float(r["ms"]) for r in rows if "config" in r}
    strategies = {torch_strategy_of(r): float(r["ms"]) for r in rows if r.get("baseline") == "torch"}
    return ours, strategies


def timed_best(sweep: dict, dtype: str, head_dim: int, tokens: Optional[int] = None
               ) -> Tuple[Optional[Config], Optional[float], Optional[float]]:
    """(fastest config that passed every case in the bucket, its ms, the fastest torch
    strategy's ms) on the sweep's timed layer nearest (``head_dim``, ``tokens``) (see
    :func:`_timed`); None where not timed."""
    ours, strategies = _timed(sweep, dtype, head_dim, tokens)
    good = _passed(sweep).get((dtype, K.head_dim_bucket(head_dim)), {})
    ours = {c: t for c, t in ours.items() if c in good}
    best = min(ours, key=ours.get) if ours else None
    return best, (ours[best] if best else None), (min(strategies.values()) if strategies else None)


def torch_timings(capability: Tuple[int, int], dtype="fp16", head_dim: int = 40,
                  tokens: Optional[int] = None, sweeps=None) -> Dict[str, float]:
    """{torch strategy: ms} measured on this GPU family at the swept layer nearest (``head_dim``,
    ``tokens``), slowest of the family's sweeps per strategy. Every sweep of the family counts,
    stale kernel or not: the torch backend does not depend on the kernel's source."""
    arch = 10 * capability[0] + capability[1]
    sweeps = load_sweeps() if sweeps is None else sweeps
    out: Dict[str, float] = {}
    for s in sweeps:
        if s.get("interpreted") or "capability" not in s:
            continue
        if family(10 * s["capability"][0] + s["capability"][1]) != family(arch):
            continue
        for strategy, ms in _timed(s, dtype_name(dtype), head_dim, tokens)[1].items():
            out[strategy] = max(out.get(strategy, 0.0), ms)
    return out


def torch_strategy(capability: Tuple[int, int], dtype="fp16", head_dim: int = 40,
                   tokens: Optional[int] = None, sweeps=None) -> Tuple[Optional[str], str]:
    """(the torch strategy that measured fastest on this GPU family at that layer, why), or
    (None, why) when no sweep timed one there (the device's default strategy then runs)."""
    times = torch_timings(capability, dtype, head_dim, tokens, sweeps)
    if not times:
        return None, "no committed sweep timed the torch strategies here"
    best = min(times, key=times.get)
    others = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(times.items()) if k != best)
    return best, f"{best} {times[best]:.3f} ms" + (f" (vs {others})" if others else "")


def _family_sweeps(arch: int, sweeps=None):
    sweeps = load_sweeps() if sweeps is None else sweeps
    valid = [s for s in sweeps if s["valid"]]
    mine = [s for s in valid if family(10 * s["capability"][0] + s["capability"][1]) == family(arch)]
    return mine, valid


def proven(head_dim: int, dtype, arch: int, sweeps=None) -> Optional[List[Config]]:
    """Configs hardware-proven for this head dim and dtype on ``arch``'s family (see the module
    docstring), fastest first by the sweeps' timings; None when no valid sweep covers them."""
    mine, valid = _family_sweeps(arch, sweeps)
    key = (dtype_name(dtype), K.head_dim_bucket(head_dim))
    use = [s for s in (mine or valid) if key in _passed(s)]
    if not use:
        return None
    ok = set(spill_free(head_dim, dtype, arch))
    speed: Dict[Config, float] = {}
    for s in use:
        got = _passed(s)[key]
        ok &= set(got)
        near, _ = _timed(s, key[0], head_dim)
        for c in got:
            speed[c] = max(speed.get(c, 0.0), near.get(c, got[c]))
    order = {c: i for i, c in enumerate(K.CONFIGS)}
    return sorted(ok, key=lambda c: (speed.get(c, float("inf")), order[c]))


def allowed_configs(head_dim: int, dtype="fp16", arch: int = 90, sweeps=None) -> List[Config]:
    """The configs the autotuner may pick: proven ones when a valid sweep covers this head dim
    and dtype, else the compiled-clean ones (unproven)."""
    p = proven(head_dim, dtype, arch, sweeps)
    return spill_free(head_dim, dtype, arch) if p is None else p


def trusted(capability: Tuple[int, int], dtype="fp16", head_dim: Optional[int] = None,
            sweeps=None, tokens: Optional[int] = None) -> Tuple[bool, str]:
    """Whether ``auto`` may pick the kernel for ``dtype`` on a GPU of this capability, and why
    (not). A committed sweep of this family must cover the dtype; with ``head_dim`` given, a
    config must also have passed every case in its bucket (never overridden: nothing could run)
    and the best of them must have measured faster than every torch strategy timed on the sweep's
    layer nearest (``head_dim``, ``tokens``) (a sweep cut short before timing it proves no speed).
    ``O2MAG_TRITON=on`` waives the coverage and speed conditions, ``off`` refuses."""
    setting = os.environ.get("O2MAG_TRITON", "auto").lower()
    if setting == "off":
        return False, "O2MAG_TRITON=off"
    arch = 10 * capability[0] + capability[1]
    name = dtype_name(dtype)
    mine, _ = _family_sweeps(arch, sweeps)
    covering = [s for s in mine if any(r["dtype"] == name for r in s.get("results", []))]
    fam = f"sm_{family(arch) // 10}x"
    p = proven(head_dim, dtype, arch, sweeps) if head_dim is not None and covering else None
    if p == []:
        return False, (f"no config passed the committed hardware sweep of {fam} for head dim "
                       f"{head_dim} ({name})")
    if setting == "on":
        return True, f"O2MAG_TRITON=on ({name} on {fam})"
    if not covering:
        return False, (f"no committed hardware sweep of this kernel covers {name} on {fam} "
                       "(run `o2mag-kernels gpu-sweep`, or set O2MAG_TRITON=on to use it anyway)")
    if head_dim is None:
        return True, f"{name} proven on {fam} by {len(covering)} committed sweep(s)"
    if p is None:
        return False, f"the committed sweeps of {fam} did not reach head dim {head_dim} ({name})"
    where_tokens = "" if tokens is None else f", {tokens} tokens"
    ratios = []
    for s in covering:
        _, best, torch_ms = timed_best(s, name, head_dim, tokens)
        where = os.path.basename(s.get("path", "a sweep"))
        if torch_ms is None or best is None:
            return False, (f"{where} did not time the kernel and the torch backend at head dim "
                           f"{head_dim}{where_tokens} ({name}) on {fam}")
        if best >= torch_ms:
            return False, (f"the torch backend measured faster on {fam} for head dim "
                           f"{head_dim}{where_tokens} ({name}): {torch_ms:.3f} ms against the "
                           f"kernel's {best:.3f} ms in {where}")
        ratios.append(torch_ms / best)
    return True, (f"head dim {head_dim}{where_tokens} {name} proven on {fam}; "
                  f"{min(ratios):.2f}x the torch backend's speed on the sweep's SD layer")


def timing_table(capability: Tuple[int, int], dtype="fp16", sweeps=None
                 ) -> List[Tuple[int, int, Dict[str, float], str]]:
    """Every (head dim, tokens) layer the family's sweeps timed: (head dim, tokens, {candidate:
    ms}, what ``auto`` picks there) -- the table ``o2mag-kernels check`` prints. Candidates are
    ``triton`` (the best proven config, from sweeps of the current kernel only) and
    ``torch:<strategy>``."""
    arch = 10 * capability[0] + capability[1]
    sweeps = load_sweeps() if sweeps is None else sweeps
    name = dtype_name(dtype)
    layers = sorted({(int(r["head_dim"]), int(r.get("tokens", 0)))
                     for s in sweeps if not s.get("interpreted") and "capability" in s
                     and family(10 * s["capability"][0] + s["capability"][1]) == family(arch)
                     for r in s.get("results", []) if "ms" in r and r["dtype"] == name})
    table = []
    for d, n in layers:
        cells = {f"torch:{k}": v for k, v in torch_timings(capability, name, d, n, sweeps).items()}
        mine, _ = _family_sweeps(arch, sweeps)
        kernel = [timed_best(s, name, d, n)[1] for s in mine]
        if kernel and all(t is not None for t in kernel):
            cells["triton"] = max(kernel)
        ok, _ = trusted(capability, name, d, sweeps, tokens=n)
        strategy, _ = torch_strategy(capability, name, d, n, sweeps)
        pick = "triton" if ok else f"torch:{strategy or 'default'}"
        table.append((d, n, cells, pick))
    return table


def describe(capability: Tuple[int, int]) -> str:
    ok, why = trusted(capability, "fp16")
    stale = aot_status()
    return (("auto picks it: " if ok else "auto does not pick it: ") + why
            + (f"; configs unchecked: {stale}" if stale else ""))


TOP_K = 3  # with sweep timings, the autotuner times only this many of the fastest configs


def prune(head_dim: int, lq: int, lk: int, dtype="fp16", arch: int = 90,
          sweeps=None) -> List[Config]:
    """The configs worth timing for one call: allowed for the head dim/dtype/SM, no tile much
    larger than the problem (``lq``/``lk`` are bucketed lengths), and -- when a sweep timed them
    -- the TOP_K fastest (fewer first-call compiles)."""
    fits = allowed_configs(head_dim, dtype, arch, sweeps)
    if not fits:
        raise RuntimeError(f"no config of the Triton kernel passed the committed hardware sweep "
                           f"for head dim {head_dim} ({dtype_name(dtype)}) on sm_{arch}: use "
                           "backend='torch' (backend='auto' already does)")
    out = [c for c in fits if c[0] <= max(64, lq) and c[1] <= max(64, lk)] or fits[-1:]
    if proven(head_dim, dtype, arch, sweeps) is not None:
        out = out[:TOP_K]
    return out
