#!/usr/bin/env bash
# Everything the kernel owes a GPU, for a machine with a CUDA GPU (never run on CI).
# Usage, from the repo root:  bash tests/kernels/gpu_check.sh [sweep|sweep-fp32|tests|bench|all]
#   sweep       o2mag-kernels gpu-sweep for fp16 and bf16 (each config in its own process) ->
#               o2mag_kernels/sweeps/<card>.json: commit it; it is what lets `auto` pick the kernel
#   sweep-fp32  the same for fp32 -> o2mag_kernels/sweeps/<card>-fp32.json
#   tests       the cuda-marked tests (parity over dims/dtypes/lengths, every allowed config,
#               CUDA graph and torch.compile smoke tests, the torch backend on CUDA)
#   bench       python -m benchmarks --quick (kernel + end-to-end suites) -> benchmarks/results/
#   all         the four in that order (about 15 minutes on an H100; each step fits 10 minutes)
# Each step prints a short summary last; a step's failure does not stop the next one under `all`.
# When $OUT names a folder (a remote runner's result folder), the files written are copied there.
set -uo pipefail
unset TRITON_INTERPRET   # the interpreter would run the kernel on the CPU
step="${1:-all}"
python - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
      f"  torch {torch.__version__}  triton {triton.__version__}")
PY
card=$(python -c "import torch; from o2mag_kernels.sweep import card_slug; print(card_slug(torch.cuda.get_device_name()))")
status=0
run() { echo "== $*"; "$@" || status=1; }
case "$step" in
  sweep|all) run o2mag-kernels gpu-sweep --dtypes fp16 bf16 --jobs 8 --out "o2mag_kernels/sweeps/$card.json" ;;&
  sweep-fp32|all) run o2mag-kernels gpu-sweep --dtypes fp32 --jobs 8 --out "o2mag_kernels/sweeps/$card-fp32.json" ;;&
  tests|all) run python -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/o2mag ;;&
  bench|all) run python -m benchmarks --quick --update-readme ;;
  sweep|sweep-fp32|tests) ;;
  *) echo "unknown step: $step (sweep, sweep-fp32, tests, bench or all)"; exit 2 ;;
esac
python -c "from o2mag_kernels import available_backends as a; print('auto on this GPU:', a()['auto'][1])"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp o2mag_kernels/sweeps/*.json benchmarks/results/*.json benchmarks/results/*.png "$OUT"/ 2>/dev/null || true
  echo "copied results to $OUT"
fi
exit $status
