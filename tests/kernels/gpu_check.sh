#!/usr/bin/env bash
# Everything the kernel owes a GPU, for a machine with a CUDA GPU (never run on CI).
# Usage, from the repo root:  bash tests/kernels/gpu_check.sh [decide|sweep|sweep-fp32|tests|bench|families|all|lease|o2mag]
#   decide      the one call that decides the kernel work (python -m benchmarks.kernels.decide, at
#               most DECIDE_SECONDS, default 520): plain SDPA's kernel, every candidate at every SD
#               layer (kernel, eager and CUDA-graph time, error), N 1/32, head-dim cost, a grafted
#               UNet call eager and with graphs, AGO per step -> <card>-decide.json, row by row
#   sweep       o2mag-kernels gpu-sweep for fp16 and bf16, and the kernel variants (bg_dense, tma) in
#               fp16 (each config in its own process) -> o2mag_kernels/sweeps/<card>.json: commit it;
#               it is what lets `auto` pick the kernel (a sweep of another kernel source is stale:
#               `o2mag-kernels check` says so, and auto keeps the torch backend until this is rerun)
#   sweep-fp32  the same for fp32 -> o2mag_kernels/sweeps/<card>-fp32.json
#   tests       the cuda-marked tests (parity over dims/dtypes/lengths, every allowed config,
#               CUDA graph and torch.compile smoke tests, the torch backend on CUDA)
#   bench       python -m benchmarks --quick, kernel suite then end-to-end suite, each its own
#               result file, then families -> benchmarks/results/ (or $OUT)
#   families    memory and time per sample for each model family (python -m benchmarks.o2mag.families:
#               SD v1.5 512 px, SD 2.1 768 px, SDXL 1024 px, SD 2 base 512 px; random-weight models of
#               the published shapes, fp16, N = 8 in one batch, 20 steps; families not started
#               within FAMILIES_SECONDS, default 400, are skipped) -> <card>-families.json, row by row
#   all         sweep, sweep-fp32, tests, bench
#   lease       sweep (default variant only), tests, bench without families under one time limit
#               (GPU_CHECK_SECONDS, default 560): each step gets a share and the last one what is
#               left; a step cut short keeps what it wrote (a sweep cut short leaves
#               <card>.json.partial beside the committed file, benchmark rows are printed as they land)
#   o2mag       what the generator owes a GPU (about 6 minutes): the cuda tests of tests/o2mag and
#               tests/evaluation (offloading), `o2mag evaluate detect` on its embedded demo with
#               --amp on, and seconds per sample of `o2mag dataset` vs `o2mag generate`
#               (SD v1.5-shaped random model, fp16, 512 px, 50 steps, AGO 500, batch 8, N 32/64)
#               -> <card>-dataset-vs-generate.json
# GPU_CHECK_SECONDS > 0 bounds any step the same way. Each step prints a short summary last; a
# step's failure does not stop the next. When $OUT names a folder (a remote runner's result
# folder), benchmark results are written there and the sweep files copied there.
set -uo pipefail
unset TRITON_INTERPRET   # the interpreter would run the kernel on the CPU
export PYTHONUNBUFFERED=1
step="${1:-all}"
py=$(command -v python || command -v python3)
limit="${GPU_CHECK_SECONDS:-0}"
[ "$step" = lease ] && [ "$limit" -le 0 ] && limit=560
start=$(date +%s)
"$py" - <<'PY'
import torch, triton
print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
      f"  torch {torch.__version__}  triton {triton.__version__}")
PY
card=$("$py" -c "import torch; from o2mag_kernels.tools.sweep import card_slug; print(card_slug(torch.cuda.get_device_name()))")
results="${OUT:-benchmarks/results}"
status=0

# run SHARE CMD...: at most SHARE seconds (0: the rest) when a time limit is set
run() {
  local share=$1; shift
  if [ "$limit" -gt 0 ]; then
    local left=$(( limit - ($(date +%s) - start) ))
    if [ "$share" -le 0 ] || [ "$share" -gt "$left" ]; then share=$left; fi
    if [ "$share" -lt 20 ]; then echo "== skipped, out of time: $*"; status=1; return; fi
    echo "== $* (at most $share s)"
    timeout "$share" "$@" || { echo "== exit $? from: $*"; status=1; }
  else
    echo "== $*"
    "$@" || status=1
  fi
}
# sweep SHARE NAME VARIANTS DTYPES...: VARIANTS is "all" or a space-separated list of names
sweep() {
  local variants=()
  [ "$3" != all ] && read -r -a variants <<< "--variants $3"
  run "$1" "$py" -m o2mag_kernels.tools.cli gpu-sweep --dtypes "${@:4}" "${variants[@]}" \
    --jobs "${SWEEP_JOBS:-12}" --timeout 150 --out "o2mag_kernels/sweeps/$2.json"
}
tests() { run "$1" "$py" -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/o2mag; }
families() {
  run "$1" "$py" -m benchmarks.o2mag.families --seconds "${FAMILIES_SECONDS:-400}" --no-plot \
    --results-dir "$results"
}
# bench KERNELS E2E [FAMILIES]: the families run only when given a share
bench() {
  run "$1" "$py" -m benchmarks --quick --suite kernels --no-plot --results-dir "$results"
  run "$2" "$py" -m benchmarks --quick --suite e2e --no-plot --results-dir "$results"
  if [ $# -ge 3 ]; then families "$3"; fi
}
o2mag_checks() {
  run "$1" "$py" -m pytest -q -p no:cacheprovider -m cuda tests/o2mag tests/evaluation
  local tmp; tmp=$(mktemp -d)
  run "$2" "$py" -m o2mag evaluate detect --amp on --quiet --out "$tmp/evaluate"
  mkdir -p "$results"
  run "$3" "$py" -m benchmarks.o2mag.dataset_vs_generate --num 32 \
    --out "$results/$card-dataset-vs-generate.json"
  rm -rf "$tmp"
}
case "$step" in
  decide) run 0 "$py" -m benchmarks.kernels.decide --out "$results" ;;
  sweep) sweep 0 "$card" all fp16 bf16 ;;
  sweep-fp32) sweep 0 "$card-fp32" default fp32 ;;
  tests) tests 0 ;;
  bench) bench 0 0 0 ;;
  families) families 0 ;;
  all) sweep 0 "$card" all fp16 bf16; sweep 0 "$card-fp32" default fp32; tests 0; bench 0 0 0 ;;
  lease) sweep 290 "$card" default fp16 bf16; tests 120; bench 100 0 ;;
  o2mag) o2mag_checks 0 0 0 ;;
  *) echo "unknown step: $step (decide, sweep, sweep-fp32, tests, bench, families, all, lease or o2mag)"; exit 2 ;;
esac
"$py" -c "from o2mag_kernels import available_backends as a; print('auto on this GPU:', a()['auto'][1])"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp o2mag_kernels/sweeps/*.json o2mag_kernels/sweeps/*.partial "$OUT"/ 2>/dev/null
  echo "copied the sweep files to $OUT"
fi
echo "gpu_check $step: $(( $(date +%s) - start )) s, status $status"
exit $status
