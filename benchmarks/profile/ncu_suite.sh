#!/usr/bin/env bash
# Nsight Compute on the kernels that bound issues 4 and 7 (benchmarks/profile/ncu_kernels.py), one device call:
#   bash benchmarks/profile/ncu_suite.sh [attention|update|all|segment]   (segment: the fused capture's segment kernel)
# Writes $OUT/ncu_details.csv (every section per launch), $OUT/ncu_summary.txt (key metrics) and the
# top stalled SASS lines of the first correct_fwd and the first select launch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memtrace_out}
mkdir -p "$OUT"
ln -sfn ../kernels memtrace/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cd benchmarks/profile
rep=/tmp/kern
if [[ ${1:-all} == segment ]]; then
  # the fused capture's segment kernel at B2 and B4 (ncu_segment.py)
  MEMTRACE_ATTN_TUNE=0 timeout 500 ncu --clock-control none --set full --import-source no \
    -k 'regex:_salience_segment' -f -o $rep python ncu_segment.py 2 4 > "$OUT/ncu_run.log" 2>&1
else
  timeout 500 ncu --clock-control none --set full --import-source no -k 'regex:_correct_fwd|_correct_bwd|_select_kernel' \
    -f -o $rep python ncu_kernels.py "${1:-all}" > "$OUT/ncu_run.log" 2>&1
fi
tail -5 "$OUT/ncu_run.log"
ncu -i $rep.ncu-rep --page details --csv > "$OUT/ncu_details.csv" 2>/dev/null
python - "$OUT/ncu_details.csv" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys, collections
want = ["Duration", "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy", "Memory Throughput",
        "DRAM Throughput", "Compute (SM) Throughput", "L2 Hit Rate", "Warp Cycles Per Issued Instruction",
        "Block Limit Registers", "Block Limit Shared Mem", "Dynamic Shared Memory Per Block", "Grid Size", "Block Size",
        "L1/TEX Cache Throughput", "L2 Cache Throughput", "L1/TEX Hit Rate", "Issue Slots Busy",
        "Executed Ipc Active", "Local Memory Spilling Requests"]
rows = collections.OrderedDict()
for r in csv.DictReader(open(sys.argv[1])):
    key = (r["ID"], r["Kernel Name"][:40])
    if r["Metric Name"] in want:
        rows.setdefault(key, {})[r["Metric Name"]] = f'{r["Metric Value"]} {r["Metric Unit"]}'
for (i, name), m in rows.items():
    print(i, name)
    print("   " + "; ".join(f"{k}: {m[k]}" for k in want if k in m))
PY
if [[ ${1:-all} == segment ]]; then
  for n in 1 2; do
    ncu -i $rep.ncu-rep -k regex:_salience_segment --launch-skip $((n - 1)) --launch-count 1 --page source \
      --print-source sass --csv > /tmp/sass_seg_$n.csv 2>/dev/null
    echo "== segment launch $n"; python ncu_top_sass.py /tmp/sass_seg_$n.csv 25 2>&1 | tee "$OUT/sass_segment_$n.txt" | head -28
  done
  exit 0
fi
for k in _correct_fwd _select_kernel _correct_bwd_q _correct_bwd_k; do
  ncu -i $rep.ncu-rep -k "regex:$k" --launch-count 1 --page source --print-source sass --csv > /tmp/sass_$k.csv 2>/dev/null
  echo "== $k"; python ncu_top_sass.py /tmp/sass_$k.csv 25 2>&1 | tee "$OUT/sass_$k.txt" | head -28
done
