"""``o2mag-kernels``: quick health report of the op on this machine, and the ahead-of-time GPU check.

``o2mag-kernels check``      parity of every usable backend against the float64 reference, and a
                             short timing against one plain SDPA call, on this machine.
``o2mag-kernels aot-check``  compile every Triton variant for sm_80/sm_90 without a GPU and report
                             registers, shared memory, spills and dot widths (non-zero exit on a
                             failure, spill or dot narrower than 64).
``o2mag-kernels gpu-sweep``  run every config the autotuner may pick on this GPU, each in its own
                             process, against the float64 reference; writes the table that decides
                             which configs (and whether the kernel at all) run on this GPU family.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

# ``check`` calls the public op as the package exports it, looked up when the command runs: it
# exercises exactly what a user calls (and a test may swap it there)
import o2mag_kernels

from ..backends import interpreter_enabled, load_triton
from ..validation import validate
from .parity import bound, max_abs_err

Case = Tuple[torch.Tensor, ...]  # (q, k_fg, v_fg, k_bg, v_bg, query_mask, fg_key_mask, bg_key_mask)


def _case(B: int, H: int, L: int, D: int, density: float, dtype: torch.dtype,
          device: torch.device, seed: int = 0) -> Case:
    """Seeded random arguments of one call: batch-1 sources, ``density`` masks, bg = not query."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rnd(B, H, L, D)
    k_fg, v_fg, k_bg, v_bg = (rnd(1, H, L, D) for _ in range(4))
    qm = (torch.rand(B, L, generator=g) < density).to(device)
    fm = (torch.rand(1, L, generator=g) < density).to(device)
    return q, k_fg, v_fg, k_bg, v_bg, qm, fm, ~qm


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` synchronised calls after one warm-up call."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _usable_backends(device: torch.device) -> List[str]:
    """Print the availability report; the fast backends that can run on ``device``."""
    status = o2mag_kernels.available_backends()
    for name, (ok, why) in status.items():
        print(f"  {name:9s} {'yes' if ok else 'no ':3s}  {why}")
    usable = [b for b in ("torch", "triton") if status[b][0]]
    if device.type == "cpu" and "triton" in usable and not interpreter_enabled():
        usable.remove("triton")
    return usable


def _parity(device: torch.device, usable: Sequence[str]) -> int:
    """Each usable backend in fp32 and fp16 against the float64 reference, under the tests' bound;
    prints a line each and returns the number of failures."""
    op = o2mag_kernels.tri_source_attention
    failures = 0
    print("\nparity vs float64 reference (B=2, H=2, L=77, D=40, 30% masks, fg_gain=1.4), bound as "
          "in the tests:")
    case64 = _case(2, 2, 77, 40, 0.3, torch.float64, device)
    ref = op(*case64, fg_gain=1.4, backend="reference")
    for backend in usable:
        for dtype in (torch.float32, torch.float16):
            args_lp = [t.to(dtype) if t.is_floating_point() else t for t in case64]
            out = op(*args_lp, fg_gain=1.4, backend=backend)
            err = max_abs_err(out, ref)
            tol = bound(validate(*args_lp, None, 1.4, "reference"), args_lp, ref, dtype, fp32_atol=1e-4)
            ok = err <= tol and torch.isfinite(out).all().item()
            failures += not ok
            print(f"  {backend:7s} {str(dtype):14s} max|err| = {err:.2e} (bound {tol:.1e})  "
                  f"{'ok' if ok else 'FAIL'}")
    return failures


def _timing(device: torch.device, usable: Sequence[str], L: int, repeats: int) -> None:
    """Median time of the reference and each usable backend (a prebuilt mask) against one plain
    SDPA call over the same keys."""
    op = o2mag_kernels.tri_source_attention
    print(f"\ntiming (B=1, H=8, L={L}, D=40, float32, 5% masks, prebuilt TriSourceMask; median of "
          f"{repeats}):")
    case = _case(1, 8, L, 40, 0.05, torch.float32, device)
    q, _, _, k_bg, v_bg = case[:5]
    mask = o2mag_kernels.tri_source_mask(*case[5:])
    sdpa = _median_time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_bg, v_bg),
                        repeats)
    print(f"  {'plain SDPA':22s} {sdpa * 1e3:9.2f} ms   1.00x")
    rows = [("reference", "reference")] + [(b, b) for b in usable
                                           if not (b == "triton" and device.type == "cpu")]
    for label, backend in rows:
        t = _median_time(lambda: op(*case[:5], mask, backend=backend), repeats)
        print(f"  {label:22s} {t * 1e3:9.2f} ms   {t / sdpa:.2f}x of SDPA")


def _compile_report() -> str:
    """'' when the committed AOT report belongs to this kernel, else why not. tuning describes the
    Triton kernel and imports triton, an optional dependency: it is imported only once the one
    guard (:func:`~o2mag_kernels.backends.load_triton`) has imported triton."""
    module, why = load_triton()
    if module is None:
        return why
    from .. import tuning  # deferred: needs triton (optional), see the docstring

    return tuning.aot_status()


SWEEP_COMMAND = "bash tests/kernels/gpu_check.sh sweep"


def _sweep_report() -> List[str]:
    """One line per committed hardware sweep: whether it belongs to this kernel source (a stale
    one proves nothing: ``auto`` keeps the torch backend on that GPU family until the sweep is
    rerun on a card) -- imported behind the same guard as :func:`_compile_report`."""
    module, why = load_triton()
    if module is None:
        return [f"hardware sweeps: not read ({why})"]
    from .. import tuning  # deferred: needs triton (optional), see _compile_report

    lines = []
    for sweep in tuning.load_sweeps():
        name = os.path.basename(sweep["path"])
        if sweep["valid"]:
            lines.append(f"hardware sweep {name}: current (kernel {tuning.kernel_hash()})")
        else:
            lines.append(
                f"hardware sweep {name}: STALE -- swept kernel {sweep.get('kernel_hash')}, this is "
                f"kernel {tuning.kernel_hash()}; auto keeps the torch backend on {sweep['device']}'s "
                f"GPU family until it is rerun on such a card: {SWEEP_COMMAND} (then commit "
                f"o2mag_kernels/sweeps/{name})")
    return lines or [f"hardware sweeps: none committed; run {SWEEP_COMMAND} on a card"]


def _auto_table(device: torch.device) -> None:
    """What ``auto`` runs on each GPU family the committed sweeps timed: per (head dim, tokens)
    layer, each candidate's measured ms (fp16) and the pick (this GPU's family first)."""
    module, why = load_triton()
    if module is None:
        print(f"\nauto's choices: none measured ({why})")
        return
    from .. import tuning  # deferred: needs triton (optional), see _compile_report

    families = {}
    for s in tuning.load_sweeps():
        if not s.get("interpreted") and "capability" in s:
            families.setdefault(tuning.family(10 * s["capability"][0] + s["capability"][1]),
                                (tuple(s["capability"]), s.get("device", "?")))
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        families = {tuning.family(10 * cap[0] + cap[1]): (cap, torch.cuda.get_device_name(device)),
                    **families}
    if not families:
        print("\nauto's choices: no committed hardware sweep (auto runs the torch backend's "
              "default strategy on CUDA)")
        return
    for fam, (cap, name) in families.items():
        table = tuning.timing_table(cap, "fp16")
        print(f"\nauto's choices on sm_{fam // 10}x (fp16, committed sweeps, e.g. {name}):")
        if not table:
            print("  nothing timed: the torch backend's default strategy runs")
        for d, n, cells, pick in table:
            times = "  ".join(f"{k} {v:.3f}" for k, v in sorted(cells.items()))
            print(f"  head dim {d:3d}, {n:5d} tokens: {times} ms  -> {pick}")


def check(args: argparse.Namespace) -> int:
    """``o2mag-kernels check``: availability, parity and timing on this machine; exit code 1 when a
    parity check fails."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"o2mag-kernels check on {device} (torch {torch.__version__})")
    usable = _usable_backends(device)
    failures = _parity(device, usable)
    _timing(device, usable, args.length, args.repeats)
    stale = _compile_report()
    print(f"\ncompile report: {'current' if not stale else stale}")
    for line in _sweep_report():
        print(line)
    _auto_table(device)
    print("\nall parity checks passed" if not failures else f"\n{failures} parity check(s) FAILED")
    return 1 if failures else 0


def aot_check(args: argparse.Namespace) -> int:
    """``o2mag-kernels aot-check`` (:mod:`.aot`). The tool compiles with triton, which the op and
    ``check`` do without, so it is imported when the subcommand runs, not with the command."""
    from . import aot  # deferred: needs triton (optional), see the docstring

    return aot.run(args)


def gpu_sweep(args: argparse.Namespace) -> int:
    """``o2mag-kernels gpu-sweep`` (:mod:`.sweep`); imported when it runs, as for ``aot-check``."""
    from . import sweep  # deferred: needs triton (optional), see aot_check

    return sweep.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of the ``o2mag-kernels`` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="o2mag-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="parity and speed report of the op on this machine")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--length", type=int, default=1024, help="tokens for the timing (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.set_defaults(func=check)
    p = sub.add_parser("aot-check", help="compile Triton kernels for sm_80/sm_90 without a GPU")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90], help="SM versions (default 80 90)")
    p.add_argument("--quick", action="store_true", help="only one config per head dim")
    p.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    p.add_argument("--json", help="also write every variant's measurements to this JSON file")
    p.add_argument("--write-report", action="store_true",
                   help="store the measurements as o2mag_kernels/aot_report.json (the table tuning "
                        "derives each GPU family's configs from)")
    p.set_defaults(func=aot_check)
    p = sub.add_parser("gpu-sweep", help="run every kernel config on this GPU against the float64 "
                                         "reference, one process per config; writes the JSON "
                                         "table tuning reads")
    p.add_argument("--out", help="result file (default: o2mag_kernels/sweeps/<card>.json)")
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"],
                   choices=["fp16", "bf16", "fp32"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[40, 64, 80, 128, 160, 256])
    p.add_argument("--jobs", type=int, default=4, help="worker processes at a time (default 4)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per config (default 300)")
    p.add_argument("--quick", action="store_true", help="two configs per head dim (smoke run)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="kernel variants to sweep: default, bg_dense, tma (default: all; the "
                        "variants other than default run in fp16, into the file's variant_results)")
    p.add_argument("--interpret", action="store_true",
                   help="run on CPU under TRITON_INTERPRET=1 with tiny cases (tests the command; "
                        "proves nothing about a GPU, and tuning ignores its file)")
    p.set_defaults(func=gpu_sweep)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
