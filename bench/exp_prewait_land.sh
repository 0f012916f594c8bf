#!/usr/bin/env bash
# The decode's first tiles asked of L2 before its PDL wait, landing build (branch prewait-land) against main, on
# the GPU machine, one call. The landing build prefetches, in every CTA of a grid that fits one wave, the tiles
# the CTA copies right after the wait (AHEAD per stream: 3 in the long variant, 1 in the default kernels at
# D >= 128). .gpu/x is the experiment build of branch decode-prewait (cd11b00), whose SPARKINFER_EXP_PRE=N
# prefetches N tiles per stream in every kernel: N = 3 shows whether the default kernels gain from more.
# Here: bash bench/stage.sh on prewait-land; main's sparkinfer and libsparkinfer.so (stripped) into .gpu/m/;
# decode-prewait's sparkinfer into .gpu/x/; cp bench/exp_prewait_land.sh .gpu/run.sh.
# There: bash .gpu/run.sh (carry .gpu). Logs go to $OUT.
#
# Prediction, written before the run (from branch decode-prefetch: the long variant with its first 3 tiles per
# stream prefetched before the wait took Qwen3.5 ctx 32768 from 27.26 to 25.70 us):
# - land against main: Qwen3.5 ctx 32768 token-major and head-major -1.3 to -1.7 us (85% of copy bandwidth
#   met), paged -0.8 to -1.6; every other single-sequence row -0.3 to -1.5 (its first tiles overlap the
#   combine before it); Tq = 4 -0.3 to -1.5; B = 16 and B = 64 within +-2%; the hd512 rows, whose sm_90 code
#   moved from 233 to 223 registers, possibly 0.5-1.0 us less gain than the others.
# - x with 3 tiles: the long-variant rows as land's with 3; the default kernels' rows within +-0.3 us of
#   land's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/exp-out}
LIMIT=${LIMIT:-575}  # the call passes less where less device time is left
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
left() { echo $((LIMIT - SECONDS)); }
cap() { local l; l=$(left); echo $((l > $1 ? $1 : (l > 1 ? l : 1))); }
bench() { # build dir, PRE, log
  SPARKINFER_EXP_PRE=$2 SPARKINFER_CACHE_DIR=/tmp/spk-cache-${1//\//_} timeout "$(cap 100)" "$1/sparkinfer" bench \
    --quick --only attention >"$OUT/$3.log" 2>&1
  echo "rc=$? $3 $SECONDS s"
}
runs=(main_1 land_1 main_2 land_2 x3_1)
run_bench() { # log
  case $1 in main_*) bench .gpu/m 0 "$1" ;; land_*) bench .gpu 0 "$1" ;; x*) n=${1#x}; bench .gpu/x "${n%_*}" "$1" ;; esac
}
for r in main_1 land_1; do run_bench "$r"; done
grep -hE '^measured copy bandwidth' "$OUT"/*.log | sort | uniq -c
t=.gpu/tests/gpu_attention
export SPARKINFER_CACHE_DIR=/tmp/spk-cache-.gpu
g1="model_shapes every_head_dim graph_replays"
g2="paged_and several_new softcap sliding_windows the_long"
g3="a_wrong length_zero out_of_range tensor_maps prefill"
if [ "$(left)" -gt 150 ]; then
  for g in "$g1" "$g2" "$g3"; do
    # shellcheck disable=SC2086
    timeout "$(cap 200)" $t --include-ignored --test-threads=2 $g >"$OUT/full-${g%% *}.log" 2>&1 &
  done
  wait
  grep -hE "^test result|FAILED|panicked" "$OUT"/full-*.log | head -8
  echo "full-size tests done at $SECONDS s"
else
  echo "full-size tests: skipped (time)"
fi
for tool in memcheck racecheck; do
  [ "$(left)" -lt 45 ] && { echo "$tool: skipped (time)"; continue; }
  SPARKINFER_TEST_SMALL=1 timeout "$(cap 80)" compute-sanitizer --tool "$tool" --error-exitcode 9 $t \
    --include-ignored --test-threads=1 >"$OUT/$tool.log" 2>&1
  echo "$tool (gpu_attention, small): rc=$? at $SECONDS s"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/$tool.log" | head -3
done
if [ "$(left)" -gt 25 ]; then
  timeout "$(cap 60)" .gpu/tests/c_examples --include-ignored --test-threads=1 >"$OUT/c_examples.log" 2>&1
  echo "c_examples: rc=$?"; grep -E "test result" "$OUT/c_examples.log"
fi
# The second runs and the experiment count last, as time allows.
for r in main_2 land_2 x3_1; do
  if [ "$(left)" -gt 40 ]; then run_bench "$r"; else echo "$r: skipped (time)"; fi
done
rows() { # "shape<TAB>us" of each attention row of a log (the last four fields: us, GB/s, % copy, floor)
  awk '$1 == "attention" {k = $2; for (i = 3; i <= NF - 4; i++) k = k " " $i; print k "\t" $(NF - 3)}' "$OUT/$1.log"
}
echo "== attention rows (us): ${runs[*]} =="
rows main_1 | cut -f1 | while IFS= read -r key; do
  vals=""
  for f in "${runs[@]}"; do vals="$vals $(rows "$f" | awk -F'\t' -v k="$key" '$1 == k {print $2; exit}')"; done
  printf '%-44s %s\n' "${key:0:44}" "$vals"
done
echo "done at $SECONDS s"
