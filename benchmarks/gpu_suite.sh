#!/usr/bin/env bash
# Everything memtrace does on the GPU machine, in one call of the device tool:
#   install (offline), import check, GPU tests, every benchmark; results land under $OUT.
# Usage: bash benchmarks/gpu_suite.sh [tests|bench|attention|all]   (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memtrace_out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1

python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python - <<'PY' | tee "$OUT/env.json"
import json, datetime, torch, triton, memtrace, memtrace._C
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "memtrace": memtrace.__version__,
                  "date": datetime.date.today().isoformat(), "import_memtrace": "ok"}))
PY

status=0
if [[ $what == tests || $what == all ]]; then
  python -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 || status=1
fi
if [[ $what == bench || $what == all ]]; then
  python benchmarks/bench_routing.py --json "$OUT/routing.json" || status=1
  python benchmarks/bench_update.py --json "$OUT/update.json" || status=1
  python benchmarks/bench_capture.py --json "$OUT/capture.json" || status=1
fi
if [[ $what == attention || $what == all ]]; then
  python benchmarks/bench_attention.py --json "$OUT/attention.json" --markdown "$OUT/attention.md" || status=1
fi
exit $status
