"""The kernel suite: every backend and every baseline on SD-shaped grafting layers, in one run."""
from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from o2mag_kernels import available_backends, tri_source_attention

from ..measure import median_seconds, peak_memory_mib
from .cases import FG_GAIN, Case, flex_status, make_inputs, runner, useful_flops

# SD v1.5 at 512 px: (tokens, head dim) of its self-attention resolutions; SD 2.x uses head dim 64.
SD15_LAYERS = ((4096, 40), (1024, 80), (256, 160), (64, 160))
SD2_LAYERS = ((4096, 64), (1024, 64), (256, 64), (64, 64))
DENSITIES = (0.01, 0.05, 0.2, 0.5)
TARGETS = (1, 8)
# Dense score matrices of the reference take 4·N·H·L² bytes each (fp32); skip it above this.
REFERENCE_MEMORY_LIMIT = 6 * 2**30


def cases(device: torch.device, quick: bool):
    """The case list: a handful on ``--quick`` (CPU minutes), the full matrix otherwise."""
    if quick:
        return [
            Case(4096, 8, 40, 0.05, 1, "fp32"),
            Case(1024, 8, 80, 0.01, 1, "fp32"),
            Case(1024, 8, 80, 0.2, 1, "fp32"),
            Case(256, 8, 160, 0.05, 8, "fp32"),
        ] if device.type == "cpu" else [
            Case(4096, 8, 40, 0.05, 1, "fp16"),
            Case(4096, 8, 40, 0.05, 8, "fp16"),
            Case(1024, 8, 80, 0.05, 8, "bf16"),
            Case(256, 8, 160, 0.05, 8, "fp16"),
        ]
    dtypes = ("fp32", "bf16") if device.type == "cpu" else ("fp16", "bf16")
    out = []
    for (tokens, dim), density, n, dtype in itertools.product(
            SD15_LAYERS + SD2_LAYERS, DENSITIES, TARGETS, dtypes):
        out.append(Case(tokens, 8, dim, density, n, dtype))
    return out


def methods(device: torch.device):
    """Backends usable on this device plus the baselines, with reasons for what is left out."""
    skipped = {}
    usable = ["torch"]
    ok, why = available_backends()["triton"]
    if ok and device.type == "cuda":
        usable.append("triton")
    else:
        skipped["triton"] = why if not ok else "CPU: the Triton kernel runs only in the interpreter here"
    ok, why = flex_status(device)
    base = ["reference", "sdpa_stitch", "sdpa_plain"]
    if ok:
        base.append("flex")
    else:
        skipped["flex"] = why
    return usable + base, skipped


def _reference_output(inputs):
    """float64 reference, one target row at a time so the dense scores stay small."""
    q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm = inputs
    rows = []
    for b in range(q.shape[0]):
        args = [t.double() for t in (q[b:b + 1], k_fg, v_fg, k_bg, v_bg)]
        rows.append(tri_source_attention(*args, qm[b:b + 1], fgm, bgm[b:b + 1],
                                         fg_gain=FG_GAIN, backend="reference"))
    return torch.cat(rows)


def _tolerance(dtype: str) -> float:
    return {"fp32": 2e-4, "fp16": 2e-2, "bf16": 6e-2}[dtype]


def run_case(case: Case, device, method_list, *, repeats: int, check: bool = True):
    inputs = make_inputs(case, device)
    flops = useful_flops(case, inputs)
    expected = _reference_output(inputs) if check else None
    results = {}
    for method in method_list:
        dense_bytes = 4 * case.targets * case.heads * case.tokens ** 2
        if method == "reference" and dense_bytes * 4 > REFERENCE_MEMORY_LIMIT:
            results[method] = {"skipped": f"dense scores need {dense_bytes * 4 / 2**30:.1f} GiB"}
            continue
        try:
            fn = runner(method, inputs)
            out = fn()
        except Exception as exc:  # a baseline that does not run here is reported, not fatal
            results[method] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            continue
        row = {}
        if expected is not None and method != "sdpa_plain":
            err = (out.double() - expected).abs().max().item()
            row["max_err"] = err
            row["ok"] = bool(err <= _tolerance(case.dtype) and torch.isfinite(out).all())
        del out
        row["median_ms"] = median_seconds(fn, device, repeats=repeats) * 1e3
        row["useful_tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        row["peak_mem_mib"] = peak_memory_mib(fn, device)
        results[method] = row
    _add_ratios(results)
    return {"case": case.as_dict(), "useful_flops": flops, "results": results}


def _add_ratios(results):
    """Speedups of each method over each baseline (>1 means faster than the baseline)."""
    for row in results.values():
        if "median_ms" not in row:
            continue
        for base in ("reference", "sdpa_stitch", "flex", "sdpa_plain"):
            other = results.get(base, {})
            if "median_ms" in other:
                row[f"speedup_vs_{base}"] = other["median_ms"] / row["median_ms"]


def run_kernel_suite(device: torch.device, *, quick: bool, repeats: int = 5):
    method_list, skipped = methods(device)
    case_list = cases(device, quick)
    records = []
    for case in tqdm(case_list, desc="kernel suite", unit="case"):
        records.append(run_case(case, device, method_list, repeats=repeats))
    return {"methods": method_list, "skipped_methods": skipped, "cases": records}
