"""One GPU call that decides the kernel work: every candidate on every SD layer, in one process.

    python -m benchmarks.kernels.decide [--budget SECONDS] [--out DIR]
    bash tests/kernels/gpu_check.sh decide          # the same, with the card's name on the file

Writes ``<out>/<card>-decide.json`` row by row (a call cut short still returns what it measured).
Everything is fp16, 8 heads, 5% blob masks (the reference defect and affine copies of it), inputs
strided like diffusers' ``(B, L, H*D)`` projections; N = 8 targets unless a row says otherwise.
Sections, most important first, each guarded (an error is recorded and the next section runs) and
skipped when the time budget is spent:

A  the environment, and which kernel plain SDPA runs at each layer (profiler names);
B  every candidate at every SD layer -- plain SDPA (the floor), the torch strategies (stitch,
   augmented, routed), the fused kernel (its default variant, hinted where the host allows it, the
   unhinted build, and each variant the kernel offers), two masked SDPA calls and a select, and
   compiled FlexAttention at the largest layer: kernel time (profiler), eager wall time per call
   in a back-to-back stream, CUDA-graph replay time, and the max error against the float32
   reference on two targets;
C  N = 1 and N = 32 at SD v1.5's 4096-token layer;
D  plain SDPA's time against the query/key head dim (D + 0..32 columns, v padded or not): what the
   augmented strategy's extra columns cost;
E  one grafted UNet call (SD v1.5 shapes, random weights, TriAG + DAE step) against stock, eager
   and with CUDA graphs (``torch.compile(mode="reduce-overhead")``), N = 8 (needs diffusers);
F  AGO: seconds per step eager fp32, fp16 autocast (extrapolated to the paper's 500 steps).

The summary row at the end names, per layer, the fastest exact candidate and its ratio to plain
SDPA: what ``auto`` should pick, for the sweep (``gpu_check.sh sweep``) to confirm.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from o2mag_kernels import tri_source_attention, tri_source_mask
from o2mag_kernels.backends import REGISTRY, load_triton
from o2mag_kernels.backends.torch_backend import STRATEGIES
from o2mag_kernels.validation import as_mask, validate

from .cases import FG_GAIN, Case, flex_prepare, make_inputs, sdpa_plain, sdpa_stitch

# (tokens, head dim): SD v1.5 at 512 px, then SD 2.x / SDXL (head dim 64)
LAYERS = ((4096, 40), (1024, 80), (256, 160), (64, 160), (4096, 64), (1024, 64))


class Recorder:
    """Rows appended to a JSON file after every measurement, with a time budget."""

    def __init__(self, path: str, budget: float):
        self.path, self.budget, self.t0 = path, budget, time.time()
        self.data: Dict = {"env": {}, "rows": [], "errors": [], "done": False}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def row(self, **kw) -> None:
        kw["t"] = round(time.time() - self.t0, 1)
        self.data["rows"].append(kw)
        print(json.dumps(kw, default=str), flush=True)
        self.save()

    def guard(self, name: str, fn: Callable, need: float = 20.0):
        if self.left() < need:
            self.data["errors"].append({"section": name, "error": "skipped: out of time"})
            self.save()
            return None
        try:
            return fn()
        except Exception as exc:  # record and go on: one broken candidate must not end the call
            self.data["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"[:600],
                                        "trace": traceback.format_exc()[-1500:]})
            print("ERROR", name, exc, flush=True)
            self.save()
            return None


# ----------------------------------------------------------------------------------- timing


def kernel_ms(fn: Callable, calls: int = 10):
    """(device ms per call summed over every kernel, [(kernel name, ms)] of the top five)."""
    from torch.profiler import ProfilerActivity, profile  # deferred: only on a GPU

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [(e.key, e.self_device_time_total) for e in prof.key_averages()
              if e.self_device_time_total > 0]
    total = sum(t for _, t in events) / calls / 1e3
    top = sorted(events, key=lambda x: -x[1])[:5]
    return round(total, 4), [(k[:110], round(t / calls / 1e3, 4)) for k, t in top]


def stream_ms(fn: Callable, calls: int = 30, reps: int = 5) -> float:
    """Wall ms per call in a back-to-back stream (host cost shows where it exceeds the GPU's)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return round(sorted(times)[len(times) // 2], 4)


def graph_ms(fn: Callable, calls: int = 30) -> float:
    """ms per replay of ``fn`` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / calls, 4)


# ------------------------------------------------------------------------------- candidates


def _reference(inputs):
    """float32 reference of the first two targets (memory-safe at 4096 tokens)."""
    q, kf, vf, kb, vb, qm, fm, bm = inputs
    return tri_source_attention(q[:2].float(), kf.float(), vf.float(), kb.float(), vb.float(),
                                qm[:2], fm, bm[:2], fg_gain=FG_GAIN, backend="reference")


def candidates(inputs, *, kernel_variants: bool = True) -> Dict[str, Callable]:
    """name -> zero-argument callable, every one on the same inputs with a prebuilt mask."""
    q, kf, vf, kb, vb, qm, fm, bm = inputs
    mask = tri_source_mask(qm, fm, bm)
    mask.host()  # the one host read of a mask's lifetime, as the grafting layer's prepare() does
    problem = validate(q, kf, vf, kb, vb, mask, None, None, None, FG_GAIN, "torch")
    m = as_mask(problem, mask, None, None)
    out: Dict[str, Callable] = {"sdpa_plain": lambda: sdpa_plain(*inputs),
                                "sdpa_stitch": lambda: sdpa_stitch(*inputs)}
    for s in STRATEGIES:
        if s != "masked":
            fn = REGISTRY[f"torch:{s}"]
            out[f"torch:{s}"] = (lambda fn=fn: fn(problem, q, kf, vf, kb, vb, m, return_lse=False))
    module, _ = load_triton()
    if module is not None:
        out["triton"] = lambda: tri_source_attention(q, kf, vf, kb, vb, mask, fg_gain=FG_GAIN,
                                                     backend="triton")
        if kernel_variants:
            kproblem = validate(q, kf, vf, kb, vb, mask, None, None, None, FG_GAIN, "triton")
            out.update(kernel_candidates(module, kproblem, inputs, m))
    return out


def kernel_candidates(module, problem, inputs, mask) -> Dict[str, Callable]:
    """The kernel's variants (``KernelVariant``: the default tile lists, ``bg_dense``, ``tma``)
    and its build without the alignment hints (what ran before them: the host check patched to
    refuse), each through ``run_op`` with the autotuner's pick among the allowed configs."""
    q, kf, vf, kb, vb = inputs[:5]
    out: Dict[str, Callable] = {}
    for name, variant in (("default", None), ("bg_dense", module.KernelVariant(bg_dense=True)),
                          ("tma", module.KernelVariant(tma=True))):
        out[f"triton[{name}]"] = (lambda variant=variant: module.run_op(
            problem, q, kf, vf, kb, vb, mask, store_lse=False, variant=variant)[0])

    def unhinted():
        real = module.inputs_aligned
        module.inputs_aligned = lambda tensors: False
        try:
            return module.run_op(problem, q, kf, vf, kb, vb, mask, store_lse=False)[0]
        finally:
            module.inputs_aligned = real

    out["triton[unhinted]"] = unhinted
    return out


def measure_layer(rec: Recorder, tokens: int, head_dim: int, targets: int = 8,
                  names: Optional[List[str]] = None, graphs: bool = True) -> None:
    case = Case(tokens, 8, head_dim, 0.05, targets, "fp16")
    inputs = make_inputs(case, torch.device("cuda"))
    ref = _reference(inputs)
    cands = candidates(inputs)
    for name, fn in cands.items():
        if names is not None and name not in names:
            continue

        def one(name=name, fn=fn):
            out = fn()
            err = None if name == "sdpa_plain" else float((out[:2].float() - ref).abs().max())
            ms, top = kernel_ms(fn)
            row = dict(sec="B", case=case.name, what=name, kernel_ms=ms, top=top,
                       stream_ms=stream_ms(fn), err=err)
            if graphs:
                row["graph_ms"] = rec.guard(f"graph {name} {case.name}", lambda: graph_ms(fn), 5)
            rec.row(**row)
        rec.guard(f"{name} {case.name}", one)
    if tokens == 4096 and head_dim == 40 and targets == 8:
        def flex():
            fn = flex_prepare(*inputs)
            out = fn()
            err = float((out[:2].float() - ref).abs().max())
            ms, top = kernel_ms(fn)
            rec.row(sec="B", case=case.name, what="flex", kernel_ms=ms, top=top,
                    stream_ms=stream_ms(fn), err=err)
        rec.guard(f"flex {case.name}", flex, need=90)


def head_dim_cost(rec: Recorder) -> None:
    """Plain SDPA at each layer with 0..32 extra q/k columns, v at D or padded to match."""
    for tokens, d in LAYERS:
        for extra in (0, 8, 16, 24, 32):
            dq = d + extra
            q = torch.randn(8, tokens, 8, dq, device="cuda", dtype=torch.float16).transpose(1, 2)
            k = torch.randn(1, tokens, 8, dq, device="cuda", dtype=torch.float16).transpose(1, 2)
            v = torch.randn(1, tokens, 8, d, device="cuda", dtype=torch.float16).transpose(1, 2)
            for pad in ((False, True) if extra else (False,)):
                vv = F.pad(v, (0, extra)) if pad else v

                def one(vv=vv, pad=pad, dq=dq):
                    fn = (lambda: F.scaled_dot_product_attention(
                        q, k.expand(8, -1, -1, -1), vv.expand(8, -1, -1, -1)))
                    ms, top = kernel_ms(fn)
                    rec.row(sec="D", case=f"L{tokens}-D{d}", what=f"sdpa d_qk={dq}",
                            v_padded=pad, kernel_ms=ms, top=top[:2])
                rec.guard(f"sdpa d_qk {tokens} {dq} {pad}", one, need=10)


def summary(rec: Recorder) -> None:
    """Per layer: the fastest candidate with an error within 2x the stitch's (plus 1e-3), its
    kernel and graph ratios to plain SDPA."""
    by_case: Dict[str, List[dict]] = {}
    for r in rec.data["rows"]:
        if r.get("sec") == "B" and r.get("kernel_ms") is not None:
            by_case.setdefault(r["case"], []).append(r)
    out = {}
    for case, rows in by_case.items():
        plain = next((r for r in rows if r["what"] == "sdpa_plain"), None)
        stitch = next((r for r in rows if r["what"] == "torch:stitch"), None)
        limit = 2 * (stitch["err"] if stitch and stitch["err"] is not None else 1e-3) + 1e-3
        exact = [r for r in rows if r["what"] not in ("sdpa_plain", "sdpa_stitch")
                 and r["err"] is not None and r["err"] <= limit]
        if not exact or plain is None:
            continue
        best = min(exact, key=lambda r: r["kernel_ms"])
        out[case] = {"fastest": best["what"], "kernel_ms": best["kernel_ms"],
                     "x_plain_kernel": round(best["kernel_ms"] / plain["kernel_ms"], 3),
                     "x_plain_graph": (round(best["graph_ms"] / plain["graph_ms"], 3)
                                       if best.get("graph_ms") and plain.get("graph_ms") else None),
                     "x_plain_eager": round(best["stream_ms"] / plain["stream_ms"], 3)}
    rec.data["summary"] = out
    rec.save()


def _generator_sections():
    """(unet_rows, ago_rows) of :mod:`benchmarks.o2mag.decide_unet`: they need diffusers, which a
    kernels-only install lacks (then the import error is recorded and A-D stand alone)."""
    from benchmarks.o2mag.decide_unet import ago_rows, unet_rows  # deferred: needs diffusers

    return unet_rows, ago_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=float(os.environ.get("DECIDE_SECONDS", 520)),
                        help="seconds for the whole call (default 520)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results",
                        help="result folder (default $OUT or benchmarks/results)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decide: needs a CUDA GPU")
        return 2
    from o2mag_kernels.tools.sweep import card_slug  # deferred: imports triton

    os.makedirs(args.out, exist_ok=True)
    card = card_slug(torch.cuda.get_device_name())
    rec = Recorder(os.path.join(args.out, f"{card}-decide.json"), args.budget)
    import triton  # deferred: optional, and only on a GPU

    rec.data["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
                       "capability": list(torch.cuda.get_device_capability())}
    rec.save()
    for tokens, d in LAYERS:  # A + B
        rec.guard(f"layer {tokens} {d}", lambda t=tokens, d=d: measure_layer(rec, t, d), need=40)
    for n in (1, 32):  # C
        rec.guard(f"N{n}", lambda n=n: measure_layer(
            rec, 4096, 40, targets=n, names=["sdpa_plain", "torch:stitch", "torch:augmented", "triton"],
            graphs=False), need=30)
    rec.guard("head dim cost", lambda: head_dim_cost(rec), need=30)  # D
    unet_section = rec.guard("import E/F", _generator_sections, need=0)
    if unet_section is not None:
        unet_rows, ago_rows = unet_section
        rec.guard("unet", lambda: unet_rows(rec), need=120)  # E
        rec.guard("ago", lambda: ago_rows(rec), need=40)  # F
    summary(rec)
    rec.data["done"] = True
    rec.save()
    print(json.dumps(rec.data.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
