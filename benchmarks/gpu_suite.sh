#!/usr/bin/env bash
# memtrace on the GPU machine: one call of the device tool (at most 10 minutes) per mode, or a few
# short modes together. Results land under $OUT (default /tmp/memtrace_out).
#
# Usage: OUT=/path bash benchmarks/gpu_suite.sh MODE [MODE...]
#
#   install    always runs first, whatever the modes: python -m pip install -q --no-deps
#              --no-build-isolation -e . with MEMTRACE_CUDA_ARCHS=90 (one nvcc pass, sm_90) and
#              MAX_JOBS=16, then $OUT/env.json (device, versions, date). Alone: install only.
#   tests      tests/gpu/: one pytest process per module, side by side (compiling Triton kernels
#              is single-threaded per process; 16 cores). MEMTRACE_GPU_TESTS="memory_gpu capture_gpu"
#              picks modules (default every tests/gpu/test_*_gpu.py); examples/hf_quickstart.py runs beside them, MEMTRACE_TEST_TIMEOUT the seconds per module (540).
#   attention  compile ahead, side by side (tune/prewarm_attention.py: 6 processes per (head dim,
#              head counts, causal) each autotuning a sixth of the configs, and one FlexAttention
#              process per (shape, causal)), then bench_attention.py, which finds every kernel in
#              the on-disk caches -> attention_<shapes>_<causal>.json / .md.
#              MEMTRACE_BENCH_SHAPES=0,1 (indices into bench_attention.SHAPES) and
#              MEMTRACE_BENCH_CAUSAL=0|1|both pick a part: one shape, both causal settings, is
#              ~9 minutes on an H100. MEMTRACE_BENCH_ONLY=memtrace|peers finishes a part cut short,
#              MEMTRACE_BENCH_REP sets do_bench's window (100 ms). Join the parts with
#              `python benchmarks/bench_attention.py --merge A.json B.json --json attention_h100.json`.
#   update     bench_update.py -> update.json (eager and CUDA-graph update, plain-PyTorch peer)
#   capture    compile ahead the D=128 attention kernels, capture variants included (6 processes),
#              then bench_capture.py --no-sweep -> capture.json
#   routing    bench_routing.py -> routing.json
#   bias       bench_bias.py -> bias.json
#   capture_ab bench_capture on an older tree and on this one, same call (the redesign's check):
#              here, `mkdir -p .ab/before && git archive REV | tar -x -C .ab/before --exclude=benchmarks/results`
#              (.ab/ in .git/info/exclude, named in the device tool's carry); both trees compile ahead
#              side by side, then the two benches run back to back -> capture_before.json, capture_after.json
#   training   compile ahead the D=128 causal attention kernels with 16 query / 8 kv heads (6
#              processes, at most MEMTRACE_TRAINING_PREWARM seconds, default 150), then
#              bench_training.py -> training.json (HF Llama and Mixtral training steps: sdpa, memtrace
#              bias, capture, amortised, the seeds' eager peer, routing share), cut at
#              MEMTRACE_TRAINING_TIMEOUT seconds (default 330; the JSON is rewritten after every row,
#              so a cut run keeps its finished rows). MEMTRACE_TRAINING_ONLY=llama|mixtral runs one
#              model (split the two over two calls if one does not fit), MEMTRACE_TRAINING_STEPS
#              the timed steps per row (10), MEMTRACE_TRAINING_PROFILE=1 adds a torch.profiler table of
#              rows a, b and c to the logs. Run it alone: with install it fills one call.
#   cms        bench_cms.py -> cms.json (CMSMemory's Triton scan against the eager loop, and the
#              StatefulRouter against a linear top-k gate), cut at MEMTRACE_CMS_TIMEOUT s (240)
#   experiment the ablation table (issue 29): `memtrace experiment --plan gpu25 --call K` for each K
#              of MEMTRACE_EXP_CALLS (default "1 2 3"), MEMTRACE_EXP_PARALLEL processes side by side
#              (6), no run started after MEMTRACE_EXP_SECONDS (default 400) from the mode's start;
#              runs whose JSON is already in benchmarks/results/experiments/ are skipped, so the next
#              call resumes (MEMTRACE_EXP_GRACE, default 150: the seconds a call's runs under way
#              get after that deadline before they are killed). MEMTRACE_EXP_CALIBRATE=1 runs call 0 (ms/step alone, the speed-up of
#              processes side by side) first (cut at MEMTRACE_EXP_CALIBRATE_TIMEOUT s, 240), MEMTRACE_EXP_STEPS overrides the plan's steps. The
#              attention kernels take their first config (MEMTRACE_ATTN_TUNE=0: every process would
#              otherwise autotune). -> experiments.tar (the whole results folder; unpack it at the root)
#
# The device tool brings back at most 8 files from $OUT: every log goes into $OUT/logs.tar, so $OUT
# holds env.json, the JSON (and attention's .md) of the modes run, and logs.tar. Copy the JSON of a
# complete run into benchmarks/results/latest/<family>_h100.json and run `python benchmarks/report.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memtrace_out}
LOGS="$OUT/logs"
mkdir -p "$OUT" "$LOGS"
modes=" $* "
want() { [[ $modes == *" $1 "* ]]; }
for m in $modes; do
  case $m in install|tests|attention|update|capture|capture_ab|routing|bias|training|cms|experiment) ;; *) echo "unknown mode: $m" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1
status=0

# ---- install (always) ---------------------------------------------------------------------------
# `python -m pip`: on the GPU machine plain `pip` belongs to another Python.
MEMTRACE_CUDA_ARCHS=90 MAX_JOBS=16 python -m pip install -q --no-deps --no-build-isolation -e . \
  > "$LOGS/install.log" 2>&1 || { tail -30 "$LOGS/install.log"; exit 1; }
python - <<'PY' | tee "$OUT/env.json"
import json, datetime, importlib.util, torch, triton, memtrace
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "memtrace": memtrace.__version__,
                  "extension_built": importlib.util.find_spec("memtrace._C") is not None,
                  "date": datetime.datetime.now().isoformat(timespec="seconds")}))
PY

prewarm() {
  # prewarm KIND ARGS...: 6 background processes, each compiling a sixth of the autotuner's
  # configs (MEMTRACE_ATTN_CONFIG_SLICE=k/6); the caller waits
  local name=$1; shift
  for k in 0 1 2 3 4 5; do
    MEMTRACE_ATTN_CONFIG_SLICE=$k/6 timeout 300 python benchmarks/tune/prewarm_attention.py "$@" \
      > "$LOGS/prewarm_${name}_$k.log" 2>&1 &
  done
}
bench() {
  # bench NAME TIMEOUT ARGS...: a suite, its output in the logs, its last lines here
  local name=$1 limit=$2; shift 2
  timeout "$limit" python "benchmarks/bench_$name.py" "$@" > "$LOGS/bench_$name.log" 2>&1 || status=1
  grep -v -i warn "$LOGS/bench_$name.log" | cut -c1-300 | tail -40
}

# ---- tests --------------------------------------------------------------------------------------
if want tests; then
  pids=()
  all_mods=$(cd tests/gpu && ls test_*_gpu.py | sed 's/^test_//; s/\.py$//' | tr '\n' ' ')
  for mod in ${MEMTRACE_GPU_TESTS:-$all_mods}; do
    MEMTRACE_ATTN_TUNE=${MEMTRACE_ATTN_TUNE:-0} timeout "${MEMTRACE_TEST_TIMEOUT:-540}" \
      python -m pytest "tests/gpu/test_$mod.py" -q -p no:cacheprovider -p no:warnings --durations=5 \
      > "$LOGS/gpu_tests_$mod.log" 2>&1 &
    pids+=($!)
  done
  # the README's quickstart, unchanged, on the GPU
  MEMTRACE_ATTN_TUNE=${MEMTRACE_ATTN_TUNE:-0} timeout "${MEMTRACE_TEST_TIMEOUT:-540}" python examples/hf_quickstart.py \
    > "$LOGS/quickstart_cuda.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for f in "$LOGS"/gpu_tests_*.log; do echo "== $f"; grep -E "passed|failed|error|Error|FAILED" "$f" | tail -8; done
  echo "== quickstart"; tail -5 "$LOGS/quickstart_cuda.log"
fi

# ---- attention ----------------------------------------------------------------------------------
if want attention; then
  shapes=${MEMTRACE_BENCH_SHAPES:-}
  causal=${MEMTRACE_BENCH_CAUSAL:-both}
  idx=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_attention as b; \
    s='$shapes'; print(' '.join(s.split(',')) if s else ' '.join(map(str, range(len(b.SHAPES)))))")
  [[ ${MEMTRACE_BENCH_ONLY:-all} == peers ]] && idx=""   # peers only: nothing of ours to compile
  # (head dim : query heads, kv heads) of the chosen shapes: Triton compiles per integer class
  kinds=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_attention as b; \
    print(' '.join(sorted({f'{b.SHAPES[int(i)][4]}:{b.SHAPES[int(i)][1]},{b.SHAPES[int(i)][2]}' for i in '$idx'.split()})))")
  causals=$causal; [[ $causals == both ]] && causals="0 1"
  for c in $causals; do
    for kd in $kinds; do prewarm "kernels_${kd%%:*}_${kd#*:}_$c" kernels "${kd%%:*}" "$c" --heads "${kd#*:}"; done
    for i in $idx; do
      timeout 300 python benchmarks/tune/prewarm_attention.py flex "$i" "$c" > "$LOGS/prewarm_flex_${i}_$c.log" 2>&1 &
    done
  done
  wait
  for f in "$LOGS"/prewarm_*.log; do [[ -e $f ]] && tail -n 1 "$f"; done
  part=${shapes:-all}_$causal
  part=${part//,/-}
  python benchmarks/bench_attention.py ${shapes:+--shapes "$shapes"} --causal "$causal" \
    --rep "${MEMTRACE_BENCH_REP:-100}" --only "${MEMTRACE_BENCH_ONLY:-all}" \
    --json "$OUT/attention_$part.json" --markdown "$OUT/attention_$part.md" > "$LOGS/bench_attention.log" 2>&1 || status=1
  grep -v -i warn "$LOGS/bench_attention.log" | cut -c1-300 | tail -60
fi

# ---- the other suites ---------------------------------------------------------------------------
if want update; then
  bench update 200 --json "$OUT/update.json"
fi
if want capture; then
  # bench_capture's first triton calls would otherwise autotune from a cold cache
  prewarm capture kernels 128 0 --heads 16,16
  wait
  for f in "$LOGS"/prewarm_capture_*.log; do tail -n 1 "$f"; done
  bench capture 300 --no-sweep --json "$OUT/capture.json"
fi
if want capture_ab; then
  # the older tree's prewarm script sat at benchmarks/ before the redesign, at benchmarks/tune/ after
  old_prewarm=benchmarks/tune/prewarm_attention.py
  [[ -f .ab/before/$old_prewarm ]] || old_prewarm=benchmarks/prewarm_attention.py
  for k in 0 1 2 3 4 5; do
    (cd .ab/before && MEMTRACE_ATTN_CONFIG_SLICE=$k/6 PYTHONPATH=$PWD timeout 240 python "$old_prewarm" \
       kernels 128 0 --heads 16,16 > "$LOGS/prewarm_before_$k.log" 2>&1) &
  done
  prewarm after kernels 128 0 --heads 16,16
  wait
  # PYTHONPATH and the working directory make the older tree's memtrace and kernels the ones imported
  (cd .ab/before && PYTHONPATH=$PWD timeout 200 python benchmarks/bench_capture.py --no-sweep \
     --json "$OUT/capture_before.json" > "$LOGS/bench_capture_before.log" 2>&1) || status=1
  bench capture 200 --no-sweep --json "$OUT/capture_after.json"
  grep -v -i warn "$LOGS/bench_capture_before.log" | cut -c1-300 | tail -20
fi
if want routing; then
  bench routing 300 --json "$OUT/routing.json"
fi
if want bias; then
  bench bias 120 --json "$OUT/bias.json"
fi
if want training; then
  # the models' attention shape (head dim 128, 16 / 8 heads, causal), bias and capture variants;
  # prewarm()'s loop with a shorter limit (its 300 s would leave the benchmark too little of the call)
  for k in 0 1 2 3 4 5; do
    MEMTRACE_ATTN_CONFIG_SLICE=$k/6 timeout "${MEMTRACE_TRAINING_PREWARM:-150}" \
      python benchmarks/tune/prewarm_attention.py kernels 128 1 --heads 16,8 > "$LOGS/prewarm_training_$k.log" 2>&1 &
  done
  wait
  for f in "$LOGS"/prewarm_training_*.log; do tail -n 1 "$f"; done
  bench training "${MEMTRACE_TRAINING_TIMEOUT:-330}" --steps "${MEMTRACE_TRAINING_STEPS:-10}" \
    ${MEMTRACE_TRAINING_ONLY:+--only "$MEMTRACE_TRAINING_ONLY"} ${MEMTRACE_TRAINING_PROFILE:+--profile "$LOGS"} \
    --json "$OUT/training.json"
fi
if want cms; then
  bench cms "${MEMTRACE_CMS_TIMEOUT:-240}" --json "$OUT/cms.json"
fi
if want experiment; then
  export MEMTRACE_ATTN_TUNE=${MEMTRACE_ATTN_TUNE:-0}
  exp_start=$(date +%s)
  exp_budget=${MEMTRACE_EXP_SECONDS:-400}
  par=${MEMTRACE_EXP_PARALLEL:-6}
  if [[ -n ${MEMTRACE_EXP_CALIBRATE:-} ]]; then
    timeout "${MEMTRACE_EXP_CALIBRATE_TIMEOUT:-240}" python -m memtrace experiment --plan gpu25 --call 0 --device cuda --parallel "$par" \
      > "$LOGS/experiment_call0.log" 2>&1 || status=1
    grep -v -i warn "$LOGS/experiment_call0.log" | tail -8
  fi
  for call in ${MEMTRACE_EXP_CALLS:-1 2 3}; do
    left=$(( exp_budget - ($(date +%s) - exp_start) ))
    (( left > 20 )) || break
    # runs under way at the deadline finish: the hard limit leaves them MEMTRACE_EXP_GRACE seconds
    timeout $(( left + ${MEMTRACE_EXP_GRACE:-150} )) python -m memtrace experiment --plan gpu25 --call "$call" --device cuda \
      --parallel "$par" --deadline "$left" ${MEMTRACE_EXP_STEPS:+--steps "$MEMTRACE_EXP_STEPS"} \
      > "$LOGS/experiment_call$call.log" 2>&1 || status=1
    tr '\r' '\n' < "$LOGS/experiment_call$call.log" | grep -v -i warn | tail -6
  done
  tar -cf "$OUT/experiments.tar" -C benchmarks/results experiments
fi

(cd "$OUT" && tar -cf logs.tar logs && rm -rf logs)
exit $status
