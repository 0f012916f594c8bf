#!/usr/bin/env bash
# Runs on the GPU machine: Nsight Compute over one lone launch of every benchmark row of the named
# families (`sparkinfer bench --only`, SPARKINFER_PROFILE), printing per kernel its duration, DRAM
# throughput, achieved occupancy and launch shape; with DETAIL=regex, also the full sections for the first
# kernel whose name matches. Logs go to $OUT.
#   bash bench/profile.sh attention,moe
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparkinfer-out}
mkdir -p "$OUT"
export SPARKINFER_CACHE_DIR=${SPARKINFER_CACHE_DIR:-/tmp/sparkinfer-cache}
families=${1:-attention,moe}
bin=$(pwd)/.gpu/sparkinfer
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size
metrics+=,launch__registers_per_thread,launch__occupancy_limit_shared_mem
# ncu over one lone launch of each row of the families: profile NAME NCU-OPTIONS... writes $OUT/NAME.csv.
profile() {
  local name=$1; shift
  SPARKINFER_PROFILE=1 ncu --profile-from-start off --clock-control none --csv "$@" \
    "$bin" bench --quick --only "$families" >"$OUT/$name.csv" 2>"$OUT/$name.err"
}
profile profile --metrics "$metrics"
python3 - "$OUT/profile.csv" <<'PY'
import csv, sys, collections
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
by = collections.OrderedDict()
for r in csv.DictReader(rows):
    key = (r["ID"], r["Kernel Name"].split("(")[0][:60])
    by.setdefault(key, {})[r["Metric Name"]] = r["Metric Value"]
print(f"{'id':>4} {'kernel':<60} {'us':>8} {'dram%':>6} {'MB':>8} {'occ%':>6} {'grid':>7} {'blk':>4} {'regs':>4}")
for (i, name), m in by.items():
    g = lambda k: m.get(k, "?").replace(",", "")
    try:
        us = float(g("gpu__time_duration.sum")) / 1e3
        mb = float(g("dram__bytes_read.sum")) / 1e6
    except ValueError:
        us, mb = -1, -1
    print(f"{i:>4} {name:<60} {us:>8.2f} {g('dram__throughput.avg.pct_of_peak_sustained_elapsed'):>6} {mb:>8.2f} "
          f"{g('sm__warps_active.avg.pct_of_peak_sustained_active'):>6} {g('launch__grid_size'):>7} "
          f"{g('launch__block_size'):>4} {g('launch__registers_per_thread'):>4}")
PY
if [ -n "${STALLS:-}" ]; then
  # Instructions per warp and the largest stall reasons (cycles per issued instruction) of every kernel.
  profile stalls \
    --metrics "smsp__inst_executed.sum,smsp__warps_launched.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
  python3 - "$OUT/stalls.csv" <<'PY'
import csv, sys, collections
rows = [l for l in open(sys.argv[1]) if l.startswith('"')]
by = collections.OrderedDict()
for r in csv.DictReader(rows):
    key = (r["ID"], r["Kernel Name"].split("(")[0][:44])
    try:
        by.setdefault(key, {})[r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        pass
for (i, name), m in by.items():
    inst = m.get("smsp__inst_executed.sum", 0) / max(1, m.get("smsp__warps_launched.sum", 1))
    st = sorted(((v, k.replace("smsp__average_warps_issue_stalled_", "").replace("_per_issue_active.ratio", ""))
                 for k, v in m.items() if "stalled" in k), reverse=True)[:6]
    print(f"{i:>4} {name:<44} inst/warp {inst:>8.0f}  " + " ".join(f"{k}={v:.1f}" for v, k in st))
PY
fi
if [ -n "${DETAIL:-}" ]; then
  for rx in ${DETAIL//,/ }; do
    SPARKINFER_PROFILE=1 ncu --profile-from-start off --clock-control none --kernel-name "regex:$rx" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section SchedulerStats "$bin" bench --quick --only "$families" >"$OUT/detail-$rx.txt" 2>&1
    sed -n '/Section: GPU Speed/,$p' "$OUT/detail-$rx.txt" | grep -vE "^\s*$|----" | head -120
  done
fi
