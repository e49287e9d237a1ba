"""Benchmark runner: ``python -m benchmarks [--quick] [--suite kernels|e2e|all]``.

Prints a table, writes ``benchmarks/results/<device>[-quick].json`` (with torch/triton versions) and
PNG plots beside it, and with ``--update-readme`` regenerates the README's performance section.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

from .measure import environment, slug
from .report import e2e_table, header, kernel_table, plot, readme_section, update_readme

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few representative cases (a few minutes on a CPU)")
    parser.add_argument("--suite", choices=("kernels", "e2e", "all"), default="all",
                        help="which suite to run (default: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per kernel measurement (the e2e suite times one run each)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where the JSON and PNG files go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--update-readme", action="store_true",
                        help="regenerate README.md's performance section from the results folder")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")

    result = {"environment": environment(device), "mode": "quick" if args.quick else "full",
              "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    print(header(result))
    if args.suite in ("kernels", "all"):
        from .kernels.suite import run_kernel_suite

        result["kernels"] = run_kernel_suite(device, quick=args.quick, repeats=args.repeats)
        print("\n" + kernel_table(result))
        for name, why in result["kernels"]["skipped_methods"].items():
            print(f"  (not run: {name}: {why})")
    if args.suite in ("e2e", "all"):
        from .o2mag.e2e import run_e2e_suite

        result["e2e"] = run_e2e_suite(device, quick=args.quick)
        print("\n" + e2e_table(result))

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = slug(result["environment"]["device"]) + ("-quick" if args.quick else "")
    if args.suite != "all":
        stem += f"-{args.suite}"
    path = args.results_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {path}")
    if not args.no_plot:
        try:
            for png in plot(result, path.with_suffix("")):
                print(f"plot:    {png}")
        except ImportError:
            print("plot:    skipped (matplotlib is not installed: pip install -e '.[bench]')")
    if args.update_readme:
        changed = update_readme(ROOT / "README.md", readme_section(args.results_dir, ROOT))
        print("README.md performance section " + ("updated" if changed else "already current"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
