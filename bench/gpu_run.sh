#!/usr/bin/env bash
# Runs on the GPU machine over the binaries that bench/stage.sh put in .gpu/: every GPU test, the model
# checks, the benchmark, the PyTorch comparison and (the sanitize step) compute-sanitizer. Full logs go to
# $OUT; a short summary prints last.
#   bash bench/gpu_run.sh [tests|check|bench|compare|floor|sanitize]...   (default: tests check bench compare)
# floor: bench/read_floor.py and bench/read_floor.cu, the read-only kernels that a bandwidth-bound row's time is
# judged against.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparkinfer-out}
mkdir -p "$OUT"
export SPARKINFER_CACHE_DIR=${SPARKINFER_CACHE_DIR:-/tmp/sparkinfer-cache}
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests check bench compare)
summary=()

run_step() { # name, command...
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-34s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
.gpu/sparkinfer info

for step in "${steps[@]}"; do
  case $step in
    tests)
      # Tests run one at a time: a capture in global mode makes allocations on other threads fail.
      for t in ${TESTS:-.gpu/tests/*}; do
        run_step "test-$(basename "$t")" "$t" --include-ignored --test-threads=1
        grep -E "^test result|FAILED|panicked" "$OUT/test-$(basename "$t").log" | head -20
      done ;;
    check) run_step check .gpu/sparkinfer check; tail -5 "$OUT/check.log"; grep FAIL "$OUT/check.log" | head -20 ;;
    bench) run_step bench .gpu/sparkinfer bench --json "$OUT/bench.json"; cat "$OUT/bench.log" ;;
    compare) run_step compare python3 bench/compare.py --lib .gpu/libsparkinfer.so; cat "$OUT/compare.log" ;;
    floor)
      run_step read_floor python3 bench/read_floor.py; cat "$OUT/read_floor.log"
      run_step read_floor_cuda bash -c 'nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc -o /tmp/read_floor bench/read_floor.cu &&
        /tmp/read_floor 67.108864 8.388608'
      grep -A 13 "best of\|stored" "$OUT/read_floor_cuda.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        for t in .gpu/tests/gpu_*; do
          SPARKINFER_TEST_SMALL=1 run_step "$tool-$(basename "$t")" compute-sanitizer --tool "$tool" --error-exitcode 9 "$t" --include-ignored --test-threads=1 ${SANITIZE_FILTER:-}
          grep -E "ERROR SUMMARY|^test result" "$OUT/$tool-$(basename "$t").log" | head -5
        done
      done ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "== summary =="
printf '%s\n' "${summary[@]}"
