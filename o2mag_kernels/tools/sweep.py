"""``o2mag-kernels gpu-sweep``: every kernel config the autotuner may pick, run on the GPU at hand.

Each (dtype, head dim, config) runs in its own worker process -- a kernel fault (an illegal
memory access) poisons the CUDA context of the process it happens in, so one process per config
keeps every other result clean. A worker runs the config on a set of cases (blob, scattered,
empty and full masks, odd and SD-sized lengths, per-target and shared masks, diffusers-strided
inputs) with the outputs poisoned with NaN first, and compares each with the float64 reference
under the package's parity rule (:mod:`o2mag_kernels.tools.parity`); it also times the config on the
SD-sized blob case. A crash, a timeout, a non-finite or unwritten element, or an error above the
bound marks the config failed for that dtype class and head-dim bucket.

The result file (``o2mag_kernels/sweeps/<card>.json`` by default) records the card, versions, the
kernel's source hash and every (config, case) result; committed, it is what
:mod:`o2mag_kernels.tuning` allows on that GPU family (and what lets ``auto`` pick the kernel).
``--interpret`` runs the same machinery on CPU under ``TRITON_INTERPRET=1`` with tiny cases (for
tests of this command; the file it writes proves nothing about a GPU and is refused by tuning).

Kernel variants (``triton_kernel.VARIANTS``: ``bg_dense``, ``tma``) are swept too, in fp16 (bf16
runs the same tiles) at the configs whose build of that variant compiled clean
(``tuning.spill_free(..., variant=name)``), through the same cases and the same timed layer. Their
rows go to the file's ``variant_results``, not ``results``: the autotuner and ``auto`` run the
default variant, and :mod:`o2mag_kernels.tuning` reads ``results`` only; a GPU "decide" script
compares the two lists (same case names, same timed layer) to choose a default.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Tuple

import torch
import triton
import triton.testing

from .. import tuning
from ..backends import triton_backend as tb
from ..backends.triton_kernel import DEFAULT_VARIANT, VARIANTS, KernelVariant
from ..backends.reference import reference_attention
from ..backends.torch_backend import torch_attention
from ..mask import tri_source_mask
from ..validation import as_mask, validate
from .parity import bound, max_abs_err
from .synthetic import mask_set

WORKER = "o2mag_kernels.tools.sweep"  # ``python -m`` target of the worker processes

DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (40, 64, 80, 128, 160, 256)
# (name, mask kind, targets, tokens, shared masks): cases a config must pass
CASES = (
    ("blob-4096", "blob", 2, 4096, False),
    ("scattered-1024", "scattered", 2, 1024, False),
    ("empty-1024", "empty", 2, 1024, True),
    ("full-1024", "full", 2, 1024, True),
    ("blob-odd-77", "blob", 3, 77, False),
    ("blob-256-shared", "blob", 4, 256, True),
)
INTERPRET_CASES = (
    ("blob-130", "blob", 2, 130, False),
    ("scattered-77", "scattered", 2, 77, False),
    ("empty-64", "empty", 1, 64, True),
    ("full-64", "full", 1, 64, True),
)
HEADS = 2
# The timed case per head dim: the SD-family layer of that width (tokens at 512 px), 8 targets x
# 8 heads, 5% blob masks. Every config is timed on it, and so is the torch backend (a "baseline"
# item), so ``auto`` picks the kernel only where it measured faster on the card.
TIMED_TOKENS = {40: 4096, 64: 1024, 80: 1024, 128: 1024, 160: 256, 256: 256}
TIMED_TARGETS = TIMED_HEADS = 8
TIMED_CASE = "timed-sd"


def _torch_dtype(name: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _inputs(kind, B, L, D, dtype, shared, device, seed, heads=HEADS):
    """Diffusers-like inputs: (B, L, H*D) projections viewed as (B, H, L, D); one reference and
    one normal source (batch 1) serving B targets; masks from :mod:`o2mag_kernels.tools.synthetic`."""
    g = torch.Generator().manual_seed(seed)

    def proj(b):
        x = torch.randn(b, L, heads * D, generator=g, dtype=torch.float64)
        return x.to(device=device, dtype=dtype).view(b, L, heads, D).transpose(1, 2)

    q = proj(B)
    k_fg, v_fg, k_bg, v_bg = (proj(1) for _ in range(4))
    qm, fm, bm = mask_set(kind, 1 if shared else B, L, density=0.05 if L >= 1024 else 0.2,
                          seed=seed, device=device)
    return (q, k_fg, v_fg, k_bg, v_bg), (qm, fm, bm)


def run_item(item: dict, interpret: bool = False):
    """Run one (dtype, head_dim, config[, variant]) on every case; yields one result dict per
    case."""
    device = "cpu" if interpret else "cuda"
    dtype = _torch_dtype(item["dtype"])
    D = int(item["head_dim"])
    config = tuple(item["config"])
    variant = KernelVariant.named(item.get("variant", "default"))
    cases = INTERPRET_CASES if interpret else CASES
    for name, kind, B, L, shared in cases:
        res = {"case": name, "status": "running"}
        print(json.dumps(dict(res, started=True)), flush=True)  # a crash names the case it hit
        t0 = time.perf_counter()
        tensors, masks = _inputs(kind, B, L, D, dtype, shared, device, seed=D + L)
        args = (*tensors, *masks)
        problem = validate(*args, None, 1 / 0.7, "triton")
        mask = tri_source_mask(*masks)
        tb.POISON_OUTPUT = True
        with torch.no_grad():
            out, lse = tb.run_op(problem, *tensors, mask, store_lse=True, config=config,
                                 variant=variant)
        if not interpret:
            torch.cuda.synchronize()
        wide = tuple(t.double() for t in tensors)
        wide_problem = validate(*wide, *masks, None, 1 / 0.7, "reference")
        exact = reference_attention(wide_problem, *wide, as_mask(wide_problem, *masks))
        err = max_abs_err(out, exact)
        limit = bound(problem, args, exact, dtype, fp32_atol=1e-4)
        finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
        res.update(status="ok" if finite and err <= limit else "wrong", max_err=err, bound=limit,
                   finite=finite, seconds=round(time.perf_counter() - t0, 3))
        yield res


def time_group(item: dict):
    """Time, on the head dim's SD layer with a mask built once as the grafting layer does, every
    config in ``item["configs"]`` (of ``item["variant"]``) and, for the default variant, the torch
    backend; yields one row each (median ms). Runs while no other sweep work uses the GPU (the
    sweep's serial phase)."""
    D = int(item["head_dim"])
    variant = KernelVariant.named(item.get("variant", "default"))
    L = TIMED_TOKENS.get(D, 1024)
    shape = {"case": TIMED_CASE, "tokens": L, "targets": TIMED_TARGETS, "heads": TIMED_HEADS}
    tensors, masks = _inputs("blob", TIMED_TARGETS, L, D, _torch_dtype(item["dtype"]), False,
                             "cuda", seed=D + 1, heads=TIMED_HEADS)
    mask = tri_source_mask(*masks)
    problem = validate(*tensors, mask, None, None, None, 1 / 0.7, "torch")
    tb.POISON_OUTPUT = False
    runs = [({"config": list(c)}, lambda c=tuple(c): tb.run_op(problem, *tensors, mask,
                                                               store_lse=False, config=c,
                                                               variant=variant))
            for c in item["configs"]]
    if variant == DEFAULT_VARIANT:
        mask.host()  # the torch backend's one host read, at build time as AttentionGraft.prepare does
        runs.append(({"baseline": "torch"}, lambda: torch_attention(problem, *tensors, mask)))
    for what, fn in runs:
        print(json.dumps(dict(shape, **what, started=True)), flush=True)  # a crash names it
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
        yield dict(shape, **what, status="ok", ms=ms)


def worker_main(argv: List[str]) -> int:
    """Entry of a worker process (``--worker [--interpret]``): one item as JSON on stdin, one JSON
    line per result. The command line is ``o2mag-kernels gpu-sweep`` (:mod:`.cli`); this module
    never imports the CLI back."""
    if not argv or argv[0] != "--worker" or not set(argv[1:]) <= {"--interpret"}:
        print(f"python -m {WORKER} runs the workers of `o2mag-kernels gpu-sweep` (or python -m "
              f"o2mag_kernels.tools.cli gpu-sweep); usage: python -m {WORKER} --worker "
              "[--interpret]", file=sys.stderr)
        return 2
    interpret = "--interpret" in argv
    item = json.load(sys.stdin)
    results = time_group(item) if "configs" in item else run_item(item, interpret)
    for res in results:
        print(json.dumps(res), flush=True)
    return 0


def items(dtypes, head_dims, arch: int, quick: bool = False, interpret: bool = False,
          variants=None):
    """The correctness work list: every spill-free config per (dtype, head dim) bucket of the
    default variant, then of each other variant in ``variants`` (names; None: all) in fp16 where
    it can run on ``arch`` (``quick``: two configs each, for a smoke run)."""
    names = [v.name for v in VARIANTS] if variants is None else list(variants)
    unknown = set(names) - {v.name for v in VARIANTS}
    if unknown:
        raise ValueError(f"unknown kernel variant(s) {sorted(unknown)}: the kernel has "
                         f"{[v.name for v in VARIANTS]}")
    out = []
    for var in [v for v in VARIANTS if v.name in names]:
        for dt in dtypes:
            if var != DEFAULT_VARIANT and (dt != "fp16" or (var.tma and arch < 90)):
                continue
            for d in head_dims:
                cfgs = tuning.spill_free(d, dt, arch, variant=var.name)
                if quick:
                    cfgs = cfgs[:1] + cfgs[-1:] if len(cfgs) > 1 else cfgs
                out += [{"dtype": dt, "head_dim": d, "config": list(c), "variant": var.name}
                        for c in cfgs]
    return out


def run_one(item, interpret: bool, timeout: float):
    """One worker process for one item; returns its case results (a crash or timeout included)."""
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", WORKER, "--worker"] + (["--interpret"] if interpret else [])
    with tempfile.TemporaryFile("w+") as err:
        try:
            proc = subprocess.run(cmd, input=json.dumps(item), stdout=subprocess.PIPE, stderr=err,
                                  text=True, env=env, timeout=timeout)
            out, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code = "timeout"
        err.seek(0)
        tail = [ln for ln in err.read().strip().splitlines() if ln.strip()][-3:]
    results, current = [], None
    for line in out.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        if r.pop("started", False):
            current = r  # what was running: a crash is recorded against it
            continue
        results.append(r)
        current = None
    base = {k: v for k, v in item.items() if k != "configs"}
    if code != 0:
        why = "timed out" if code == "timeout" else f"worker exited with {code}"
        results.append(dict(current or {"case": "(startup)"}, status="crash",
                            error=f"{why}: {' | '.join(tail)[-400:]}"))
    return [dict(base, **r) for r in results]


def _item_key(r: dict) -> tuple:
    """(variant, dtype, head dim, config) of a work item or a result row."""
    return (r.get("variant", "default"), r["dtype"], r["head_dim"], tuple(r["config"]))


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(args) -> int:
    """``o2mag-kernels gpu-sweep``; returns the exit code (0: every config passed every case).

    Long on purpose: the two phases (parallel correctness, serial
    timing) share the result list and the ``.partial`` writer, kept as closures over them so the
    file on disk always holds exactly what has been measured."""
    interpret = bool(getattr(args, "interpret", False))
    if not interpret and not torch.cuda.is_available():
        print("gpu-sweep: no CUDA device here (use --interpret to exercise the command on CPU)",
              file=sys.stderr)
        return 2
    if interpret:
        cap, name = (0, 0), "triton-interpreter"
    else:
        cap, name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    arch = 90 if interpret else 10 * cap[0] + cap[1]
    todo = items(args.dtypes, args.head_dims, arch, args.quick, interpret,
                 getattr(args, "variants", None))
    out_path = args.out or os.path.join(tuning.SWEEP_DIR, card_slug(name) + ".json")
    jobs = max(1, args.jobs)
    print(f"gpu-sweep on {name} (sm_{arch}): {len(todo)} (dtype, head dim, config, variant) items x "
          f"{len(INTERPRET_CASES if interpret else CASES)} cases, {jobs} processes at a time",
          flush=True)
    t0 = time.perf_counter()
    results = []  # the default variant's rows: what tuning reads
    variant_results = []  # the other variants' rows: for a decide script, never read by tuning
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    partial = out_path + ".partial"

    def write(complete: bool):
        """Rewritten after every item (atomically) as ``<out>.partial``, renamed to ``<out>`` once
        complete: a sweep cut short by a time limit keeps what it measured without replacing the
        committed file (:mod:`o2mag_kernels.tuning` reads only ``*.json``)."""
        payload = {
            "device": name, "capability": list(cap), "interpreted": interpret,
            "torch": torch.__version__, "triton": triton.__version__,
            "kernel_hash": tuning.kernel_hash(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete, "items": len(todo),
            "cases": [c[0] for c in INTERPRET_CASES] if interpret else
                     [c[0] for c in CASES] + [TIMED_CASE],
            "results": results,
            "variants": [v.name for v in VARIANTS if v != DEFAULT_VARIANT],
            "variant_results": variant_results,
        }
        tmp = partial + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, out_path if complete else partial)
        if complete and os.path.exists(partial):
            os.remove(partial)

    def file_rows(got):
        """The default variant's rows to ``results``, the others' to ``variant_results``."""
        for r in got:
            (results if r.get("variant", "default") == "default" else variant_results).append(r)

    def report(got):
        bad = [r for r in got if r["status"] != "ok"]
        it = got[0] if got else {}
        what = "timing" if any(r.get("case") == TIMED_CASE for r in got) else tuple(it.get("config", ()))
        var = it.get("variant", "default")
        print(f"  {it.get('dtype')} D{it.get('head_dim')} {'' if var == 'default' else var + ' '}{what}: "
              + ("ok" if not bad else f"FAIL {bad[0]['case']} {tuple(bad[0].get('config', ())) or ''}: "
                 f"{bad[0]['status']} {bad[0].get('error') or bad[0].get('max_err')}")
              + "".join(f" {tuple(r['config']) if 'config' in r else r.get('baseline')} "
                        f"{r['ms']:.3f} ms," for r in got if "ms" in r), flush=True)

    # phase 1, in parallel: correctness, one process per config (results as they complete)
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, it, interpret, args.timeout) for it in todo]
        for fut in as_completed(futures):
            got = fut.result()
            file_rows(got)
            write(complete=False)
            report(got)
    # phase 2, one process at a time and nothing else on the GPU: per (variant, dtype, head dim),
    # time every config that passed (and, for the default variant, the torch backend) on the head
    # dim's SD layer; the default variant first
    if not interpret:
        passed: Dict[Tuple[int, str, str, int], List[list]] = {}
        rank = {v.name: i for i, v in enumerate(VARIANTS)}
        bad = {_item_key(r) for r in results + variant_results if r["status"] != "ok"}
        for it in todo:
            if _item_key(it) not in bad:
                var = it.get("variant", "default")
                passed.setdefault((rank[var], var, it["dtype"], it["head_dim"]), []).append(it["config"])
        for (_, var, dt, d), cfgs in sorted(passed.items()):
            got = run_one({"dtype": dt, "head_dim": d, "configs": cfgs, "variant": var}, False,
                          args.timeout)
            file_rows(got)
            write(complete=False)
            report(got)
    write(complete=True)
    failed = sorted({(r.get("variant", "default"), r["dtype"], r["head_dim"],
                      str(tuple(r["config"])) if "config" in r else r.get("baseline", "?"))
                     for r in results + variant_results if r["status"] != "ok"})
    print(f"gpu-sweep: {len(todo) - len(failed)}/{len(todo)} configs passed every case "
          f"({time.perf_counter() - t0:.0f} s); wrote {out_path}")
    for f_ in failed:
        print(f"  failed: {f_}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
