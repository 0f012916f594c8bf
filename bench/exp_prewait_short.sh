#!/usr/bin/env bash
# bench/exp_prewait_land.sh cut to a short call (little device time left): main and the landing build once each,
# every gpu_attention test in small mode against the CPU reference, compute-sanitizer memcheck and racecheck
# over the tests that take the prefetch's paged, windowed and long paths (small mode), then as time allows the
# long variant and paged tests at full size, the C examples and a second run of each build. Same prediction
# as bench/exp_prewait_land.sh. Here: as there, cp bench/exp_prewait_short.sh .gpu/run.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/exp-out}
LIMIT=${LIMIT:-170}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
left() { echo $((LIMIT - SECONDS)); }
cap() { local l; l=$(left); echo $((l > $1 ? $1 : (l > 1 ? l : 1))); }
bench() { # build dir, log
  SPARKINFER_CACHE_DIR=/tmp/spk-cache-${1//\//_} timeout "$(cap 60)" "$1/sparkinfer" bench --quick --only attention \
    >"$OUT/$2.log" 2>&1
  echo "rc=$? $2 $SECONDS s"
}
bench .gpu/m main_1
bench .gpu land_1
t=.gpu/tests/gpu_attention
export SPARKINFER_CACHE_DIR=/tmp/spk-cache-.gpu
SPARKINFER_TEST_SMALL=1 timeout "$(cap 60)" $t --include-ignored --test-threads=4 >"$OUT/small.log" 2>&1
echo "small (all 13): rc=$? at $SECONDS s"; grep -hE "^test result|FAILED|panicked" "$OUT/small.log" | head -4
sub="paged_and the_long sliding_windows a_wrong"
for tool in memcheck racecheck; do
  [ "$(left)" -lt 20 ] && { echo "$tool: skipped (time)"; continue; }
  # shellcheck disable=SC2086
  SPARKINFER_TEST_SMALL=1 timeout "$(cap 50)" compute-sanitizer --tool "$tool" --error-exitcode 9 $t \
    --include-ignored --test-threads=1 $sub >"$OUT/$tool.log" 2>&1
  echo "$tool (small: $sub): rc=$? at $SECONDS s"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/$tool.log" | head -3
done
if [ "$(left)" -gt 30 ]; then
  timeout "$(cap 60)" $t --include-ignored --test-threads=2 the_long paged_and >"$OUT/full.log" 2>&1
  echo "full size (the_long, paged_and): rc=$? at $SECONDS s"; grep -hE "^test |^test result" "$OUT/full.log" | head -4
fi
if [ "$(left)" -gt 15 ]; then
  timeout "$(cap 30)" .gpu/tests/c_examples --include-ignored --test-threads=1 >"$OUT/c_examples.log" 2>&1
  echo "c_examples: rc=$?"; grep -E "test result" "$OUT/c_examples.log"
fi
for r in main_2 land_2; do
  [ "$(left)" -gt 25 ] || { echo "$r: skipped (time)"; continue; }
  case $r in main_*) bench .gpu/m "$r" ;; *) bench .gpu "$r" ;; esac
done
grep -hE '^measured copy bandwidth' "$OUT"/main_*.log "$OUT"/land_*.log | sort | uniq -c
rows() { # "shape<TAB>us" of each attention row of a log (the last four fields: us, GB/s, % copy, floor)
  [ -f "$OUT/$1.log" ] || return 0
  awk '$1 == "attention" {k = $2; for (i = 3; i <= NF - 4; i++) k = k " " $i; print k "\t" $(NF - 3)}' "$OUT/$1.log"
}
echo "== attention rows (us): main_1 land_1 main_2 land_2 =="
rows main_1 | cut -f1 | while IFS= read -r key; do
  vals=""
  for f in main_1 land_1 main_2 land_2; do vals="$vals $(rows "$f" | awk -F'\t' -v k="$key" '$1 == k {print $2; exit}')"; done
  printf '%-44s %s\n' "${key:0:44}" "$vals"
done
echo "done at $SECONDS s"
