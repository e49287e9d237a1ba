"""The kernel suite: every backend and every baseline on SD-shaped grafting layers, in one run."""
from __future__ import annotations


import torch
from tqdm.auto import tqdm

from o2mag_kernels import available_backends, tri_source_attention

from ..measure import median_seconds, peak_memory_mib
from .cases import FG_GAIN, Case, flex_status, make_inputs, runner, useful_flops

# SD v1.5 at 512 px: (tokens, head dim) of its self-attention resolutions; SD 2.x uses head dim 64.
SD15_LAYERS = ((4096, 40), (1024, 80), (256, 160), (64, 160))
SD2_LAYERS = ((4096, 64), (1024, 64))  # SD 2.x at 512 px (64x64, 32x32)
SD21_768_LAYERS = ((9216, 64), (2304, 64))  # SD 2.1 at 768 px (96x96, 48x48)
SDXL_LAYERS = ((4096, 64), (1024, 64))  # SDXL at 1024 px: 64x64 (2 blocks each) and 32x32 (10 each)
FAMILY_LAYERS = tuple(dict.fromkeys(SD2_LAYERS + SD21_768_LAYERS + SDXL_LAYERS))  # head dim 64, no repeats
TARGETS = (1, 8, 32)
# Dense score matrices of the reference take 4·N·H·L² bytes each (fp32); skip it above this.
REFERENCE_MEMORY_LIMIT = 6 * 2**30
# FlexAttention compiles per shape (tens of seconds on a GPU): run it where the targets name it.
FLEX_MIN_TOKENS = 1024


def cases(device: torch.device, quick: bool):
    """The case list. GPU quick (< 5 min): every SD v1.5 layer size x N = 1, 8, 32, and the head-dim-64
    layers of SD 2.x, SD 2.1 at 768 px and SDXL (:data:`FAMILY_LAYERS`) at N = 8, blob 5% masks,
    fp16. GPU full (< 10 min): plus scattered masks, 20% blobs, bf16 and the family layers at N = 1
    and 32. CPU: a handful of fp32 cases, head dim 64 at 1024 and 4096 tokens among them (9216 in
    the full list); the CPU is for the torch backend and the harness."""
    if device.type == "cpu":
        base = [Case(4096, 8, 40, 0.05, 1, "fp32"), Case(1024, 8, 80, 0.05, 1, "fp32"),
                Case(1024, 8, 80, 0.05, 1, "fp32", "scattered"), Case(256, 8, 160, 0.05, 8, "fp32"),
                Case(1024, 8, 64, 0.05, 1, "fp32"), Case(4096, 2, 64, 0.05, 1, "fp32")]  # SD 2.x / SDXL
        if quick:
            return base
        return base + [Case(1024, 8, 80, 0.2, 1, "fp32"), Case(4096, 8, 40, 0.05, 1, "bf16"),
                       Case(64, 8, 160, 0.05, 8, "fp32"), Case(9216, 2, 64, 0.05, 1, "fp32")]
    out = [Case(t, 8, d, 0.05, n, "fp16") for (t, d) in SD15_LAYERS for n in TARGETS]
    out += [Case(t, 8, d, 0.05, 8, "fp16") for (t, d) in FAMILY_LAYERS]  # SD 2.x, SD 2.1 768 px, SDXL
    if quick:
        return out
    out += [Case(t, 8, d, 0.05, n, "fp16", "scattered") for (t, d) in SD15_LAYERS for n in (1, 8)]
    out += [Case(t, 8, d, 0.2, 8, "fp16") for (t, d) in SD15_LAYERS[:2]]
    out += [Case(t, 8, d, 0.05, 8, "bf16") for (t, d) in SD15_LAYERS[:2]]
    out += [Case(t, 8, d, 0.05, n, "fp16") for (t, d) in FAMILY_LAYERS for n in (1, 32)]
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


def reference_output(inputs):
    """float64 reference, one target row at a time so the dense scores stay small."""
    q, k_fg, v_fg, k_bg, v_bg, qm, fgm, bgm = inputs
    rows = []
    for b in range(q.shape[0]):
        args = [t.double() for t in (q[b:b + 1], k_fg, v_fg, k_bg, v_bg)]
        rows.append(tri_source_attention(*args, qm[b:b + 1], fgm, bgm[b:b + 1],
                                         fg_gain=FG_GAIN, backend="reference"))
    return torch.cat(rows)


def tolerance(dtype: str) -> float:
    """Largest max-abs error vs the float64 reference a benchmarked method may show (a sanity
    check of the timed result, not a parity test)."""
    return {"fp32": 2e-4, "fp16": 2e-2, "bf16": 6e-2}[dtype]


def run_case(case: Case, device, method_list, *, repeats: int, check: bool = True):
    from o2mag_kernels import tri_source_mask

    from ..measure import kernel_seconds, stream_seconds

    inputs = make_inputs(case, device)
    flops = useful_flops(case, inputs)
    expected = reference_output(inputs) if check else None
    build = median_seconds(lambda: tri_source_mask(*inputs[5:]), device, repeats=repeats)
    results = {}
    for method in method_list:
        dense_bytes = 4 * case.targets * case.heads * case.tokens ** 2
        if method == "reference" and dense_bytes * 4 > REFERENCE_MEMORY_LIMIT:
            results[method] = {"skipped": f"dense scores need {dense_bytes * 4 / 2**30:.1f} GiB"}
            continue
        if method == "flex" and device.type == "cuda" and case.tokens < FLEX_MIN_TOKENS:
            results[method] = {"skipped": f"compiled only for layers of >= {FLEX_MIN_TOKENS} tokens"}
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
            row["ok"] = bool(err <= tolerance(case.dtype) and torch.isfinite(out).all())
        del out
        row["median_ms"] = median_seconds(fn, device, repeats=repeats) * 1e3
        if device.type == "cuda":
            row["stream_ms"] = stream_seconds(fn, device) * 1e3
            row["kernel_ms"] = kernel_seconds(fn, device) * 1e3
        row["useful_tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        row["peak_mem_mib"] = peak_memory_mib(fn, device)
        results[method] = row
    _add_ratios(results)
    return {"case": case.as_dict(), "useful_flops": flops, "mask_build_ms": build * 1e3,
            "results": results}


def _add_ratios(results):
    """Speedups of each method over each baseline (>1 means faster than the baseline), by the
    synchronised median, and on a GPU also by kernel time and by stream wall time."""
    for row in results.values():
        if "median_ms" not in row:
            continue
        for base in ("reference", "sdpa_stitch", "flex", "sdpa_plain"):
            other = results.get(base, {})
            for key, tag in (("median_ms", ""), ("kernel_ms", "kernel_"), ("stream_ms", "stream_")):
                if key in other and key in row and row[key]:
                    row[f"{tag}speedup_vs_{base}"] = other[key] / row[key]


def run_kernel_suite(device: torch.device, *, quick: bool, repeats: int = 5):
    method_list, skipped = methods(device)
    case_list = cases(device, quick)
    records = []
    for case in tqdm(case_list, desc="kernel suite", unit="case"):
        rec = run_case(case, device, method_list, repeats=repeats)
        records.append(rec)
        # each case's line as it lands, so a run cut short by a time limit still reports it
        times = ", ".join(f"{m} {r['median_ms']:.3f}" + ("" if r.get("ok", True) else " WRONG")
                          for m, r in rec["results"].items() if "median_ms" in r)
        tqdm.write(f"{case.as_dict()}: ms {times}")
    return {"methods": method_list, "skipped_methods": skipped, "cases": records}
