#!/usr/bin/env bash
# GPU checks of the Triton backend, for a machine with a CUDA GPU (not run on CI).
# Usage, from the repo root:  bash tests/kernels/gpu_check.sh [results.txt]
# Runs the cuda-marked tests (parity over the dims/dtypes/lengths matrix, every config, CUDA graph
# and torch.compile smoke tests), the quick AOT check, and a short timing of SD-sized layers in
# useful TFLOP/s (4·D·H·Σ needed keys / time) against one plain SDPA over Lq x Lb.
set -euo pipefail
unset TRITON_INTERPRET   # the interpreter would run the kernel on the CPU
OUT="${1:-/dev/stdout}"
{
python - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
PY
python -m pytest -q -m cuda tests/kernels
python - <<'PY'
import torch
import torch.nn.functional as F
from o2mag_kernels import tri_source_attention
from o2mag_kernels._validate import validate
from o2mag_kernels.triton_backend import useful_flops

def bench(fn, n=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e-3

torch.manual_seed(0)
print(f"{'L':>5} {'D':>4} {'dtype':>9} {'triton ms':>10} {'TFLOP/s':>8} {'torch ms':>9} {'ref ms':>8} {'SDPA ms':>8}")
for L, D in ((4096, 40), (1024, 80), (256, 160), (64, 160)):
    for dtype in (torch.float16, torch.bfloat16):
        B, H = 4, 8
        dev = "cuda"
        q = torch.randn(B, H, L, D, device=dev, dtype=dtype)
        kf, vf, kb, vb = (torch.randn(1, H, L, D, device=dev, dtype=dtype) for _ in range(4))
        qm = torch.rand(B, L, device=dev) < 0.1
        fm = torch.rand(1, L, device=dev) < 0.05
        args = (q, kf, vf, kb, vb, qm, fm, None)
        p = validate(*args, None, 1 / 0.7, "triton")
        flops = useful_flops(p, qm, fm, None)
        t = bench(lambda: tri_source_attention(*args, fg_gain=1 / 0.7, backend="triton"))
        tt = bench(lambda: tri_source_attention(*args, fg_gain=1 / 0.7, backend="torch"))
        tr = bench(lambda: tri_source_attention(*args, fg_gain=1 / 0.7, backend="reference"), 5)
        ts = bench(lambda: F.scaled_dot_product_attention(q, kb.expand(B, -1, -1, -1), vb.expand(B, -1, -1, -1)))
        print(f"{L:>5} {D:>4} {str(dtype)[6:]:>9} {t*1e3:>10.3f} {flops/t/1e12:>8.1f} {tt*1e3:>9.3f} {tr*1e3:>8.3f} {ts*1e3:>8.3f}")
PY
o2mag-kernels aot-check --quick
} 2>&1 | tee "$OUT"
