#!/usr/bin/env bash
# Everything memtrace does on the GPU machine, in one call of the device tool; results land under $OUT.
# Usage: bash benchmarks/gpu_suite.sh [MODE...]   (default all; several modes run in one call)
#   all        install, GPU tests, every benchmark (far over one 10-minute call: split it into the modes below)
#   capture    capture only: GPU parity, per-kernel profile of both emission modes, bench_capture
#   fused      capture GPU parity beside a compile-ahead of the D=128 attention kernels, then bench_capture
#   fused-bench  compile-ahead, bench_capture and profile_fused_capture (no tests)
#   fused-tests  GPU parity of the fused capture and the attention kernels, eleven processes (~8 minutes)
#   profile    per-kernel GPU time of one trace-memory update and of capture fills
#   tma        the triton backend with a switch off and on (benchmarks/tma_probe.py): TMA descriptors,
#              or the warp-specialized dense forward with MEMTRACE_PROBE_KNOB=WS; causal from
#              MEMTRACE_BENCH_CAUSAL, default 0; MEMTRACE_PROBE_PASSES=fwd times the forward alone;
#              MEMTRACE_PROBE_SET=BWD_SPLIT=1 holds other switches, MEMTRACE_PROBE_NO_PEERS=1 skips Flex
#   attention-profile  per-kernel GPU time of biased attention (cudnn, triton; 0 / 2048 / 16384 traces)
#   update     trace-memory GPU parity, bench_update (eager and CUDA-graph) and its kernel split; with
#              `attention` its tests run while the attention kernels compile
#   check      the short run: GPU parity of memory / capture / attention (MEMTRACE_GPU_TESTS picks the
#              modules beside capture), bench_update with its kernel split, bench_capture
#   attention  the attention matrix; MEMTRACE_BENCH_SHAPES=0,1 MEMTRACE_BENCH_CAUSAL=0 pick a part
#              (one shape, both causal settings: ~9 minutes on an H100 before the parallel compile-ahead)
# MEMTRACE_SUITE_NO_BUILD=1 skips building memtrace._C (runs from the source tree; routing skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memtrace_out}
mkdir -p "$OUT"
modes=" ${*:-all} "
want() { [[ $modes == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1
status=0

if [[ ${MEMTRACE_SUITE_NO_BUILD:-0} == 1 ]]; then
  ln -sfn ../kernels memtrace/kernels   # what the editable install maps, without building the extension
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  # `python -m pip`: on the GPU machine plain `pip` belongs to another Python. sm_90 only: one nvcc pass.
  MEMTRACE_CUDA_ARCHS=${MEMTRACE_CUDA_ARCHS:-90} MAX_JOBS=16 \
    python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
fi
python - <<'PY' | tee "$OUT/env.json"
import json, datetime, importlib.util, torch, triton, memtrace
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__, "memtrace": memtrace.__version__,
                  "extension_built": importlib.util.find_spec("memtrace._C") is not None,
                  "date": datetime.datetime.now().isoformat(timespec="seconds")}))
PY

capture_tests() {
  # tests/gpu/test_capture_gpu.py in three background pytest processes (compiling dominates: one
  # process took > 280 s); the caller waits.
  # (the fused-capture tests compile every backward variant: the fused-tests mode runs them split)
  for sel in "parity" "realistic" "not parity and not realistic and not fused"; do
    timeout 300 python -m pytest tests/gpu/test_capture_gpu.py -q -p no:cacheprovider -p no:warnings -k "$sel" \
      > "$OUT/gpu_tests_capture_${sel// /_}.log" 2>&1 &
  done
}
update_bench() {
  # bench_update (eager and CUDA-graph, the plain-PyTorch peer) and its per-kernel split
  timeout 120 python benchmarks/bench_update.py --json "$OUT/update.json" 2>&1 | tail -14 || status=1
  timeout 90 python benchmarks/profile_update.py "$OUT/profile_update.json" 2>&1 | grep -v -i warn | tail -20 || status=1
}
prewarm_d128() {
  # six background processes compile the D=128 attention kernels (capture variants included), so
  # that a benchmark's first triton calls do not autotune from a cold cache; the caller waits
  PREWARM_LOGS=$(mktemp -d)
  for k in 0 1 2 3 4 5; do
    MEMTRACE_ATTN_CONFIG_SLICE=$k/6 timeout 280 python benchmarks/prewarm_attention.py \
      kernels 128 0 --heads 16,16 > "$PREWARM_LOGS/prewarm_$k.log" 2>&1 &
  done
}
merge_capture_logs() {
  # one file instead of three: the device tool brings back at most 8 files
  for f in "$OUT"/gpu_tests_capture_*.log; do [[ -e $f ]] && { echo "== $f"; cat "$f"; }; done > "$OUT/capture_tests.txt"
  rm -f "$OUT"/gpu_tests_capture_*.log
  grep -E "passed|failed|error" "$OUT/capture_tests.txt" | tail -6
}

if want tests || want all; then
  # One pytest process per module, side by side: the time goes to compiling Triton kernels, which
  # is single-threaded per process (16 cores here). MEMTRACE_GPU_TESTS picks modules (default all).
  pids=()
  for mod in ${MEMTRACE_GPU_TESTS:-attention_gpu attention_kernels_gpu capture_gpu memory_gpu routing_gpu}; do
    MEMTRACE_ATTN_TUNE=${MEMTRACE_ATTN_TUNE:-0} timeout ${MEMTRACE_TEST_TIMEOUT:-540} \
      python -m pytest "tests/gpu/test_$mod.py" -q -p no:cacheprovider -p no:warnings --durations=5 \
      > "$OUT/gpu_tests_$mod.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for f in "$OUT"/gpu_tests_*.log; do echo "== $f"; grep -E "passed|failed|error|Error|FAILED" "$f" | tail -8; done
fi
if want check; then
  # GPU parity of the kernels that changed last (trace memory, capture) side by side, then the
  # issue-4 numbers: bench_update with its kernel split, and bench_capture.
  for mod in ${MEMTRACE_GPU_TESTS-memory_gpu attention_gpu}; do
    MEMTRACE_ATTN_TUNE=0 timeout 300 python -m pytest "tests/gpu/test_$mod.py" -q -p no:cacheprovider -p no:warnings \
      > "$OUT/gpu_tests_$mod.log" 2>&1 &
  done
  capture_tests
  wait || status=1
  merge_capture_logs
  tail -n 3 "$OUT"/gpu_tests_*.log
  update_bench
  timeout 240 python benchmarks/bench_capture.py --no-sweep --json "$OUT/capture.json" 2>&1 | grep -v -i warn | tail -30 \
    || status=1
fi
if want fused; then
  # The fused capture (Triton backward + segment rescoring): capture GPU parity in three processes
  # while six more compile the D=128 attention kernels (capture variants included) ahead of
  # bench_capture, whose first triton calls would otherwise autotune from a cold cache.
  capture_tests
  prewarm_d128
  wait || status=1
  for f in "$PREWARM_LOGS"/prewarm_*.log; do tail -n 1 "$f"; done
  merge_capture_logs
  timeout 300 python benchmarks/bench_capture.py --no-sweep --json "$OUT/capture.json" 2>&1 | grep -v -i warn \
    | tail -60 || status=1
fi
if want fused-bench; then
  # The fused capture's numbers only: compile-ahead of the D=128 attention kernels in six
  # processes, then bench_capture and the per-kernel split (profile_fused_capture.py).
  prewarm_d128
  wait || status=1
  for f in "$PREWARM_LOGS"/prewarm_*.log; do tail -n 1 "$f"; done
  timeout 300 python benchmarks/bench_capture.py --no-sweep --json "$OUT/capture.json" 2>&1 | grep -v -i warn \
    | tail -40 || status=1
  timeout 200 python benchmarks/profile_fused_capture.py "$OUT/profile_fused_capture.json" 2>&1 \
    | grep -v -i warn | cut -c1-300 | tail -30 || status=1
fi
if want fused-tests; then
  # GPU parity of the fused capture and of the attention kernels (both backward entry forms), in
  # eleven pytest processes side by side with the first tuning config (compiling dominates).
  export MEMTRACE_ATTN_TUNE=0
  run_k() { timeout 500 python -m pytest "$1" -q -p no:cacheprovider -p no:warnings -k "$2" > "$OUT/t_$3.log" 2>&1; }
  for s in shape0 shape1; do for d in dtype0 dtype1 dtype2; do
    run_k tests/gpu/test_capture_gpu.py "fused_capture_through_triton and $s and $d" "fused_${s}_$d" &
  done; done
  run_k tests/gpu/test_capture_gpu.py "fused_capture_overflow or auto_runs or fully_masked or fill_glue" fused_rest &
  run_k tests/gpu/test_attention_kernels_gpu.py "fused_fwd_bwd and (dtype0 or dtype1 or dtype2 or dtype3 or dtype4)" attn_a &
  run_k tests/gpu/test_attention_kernels_gpu.py "fused_fwd_bwd and (dtype5 or dtype6 or dtype7 or dtype8 or dtype9)" attn_b &
  MEMTRACE_ATTN_BWD_ENTRIES=rows run_k tests/gpu/test_attention_kernels_gpu.py "fused_fwd_bwd or cancelling" attn_rows &
  run_k tests/gpu/test_attention_kernels_gpu.py "not fused_fwd_bwd" attn_rest &
  wait
  for f in "$OUT"/t_*.log; do echo "== $f"; cat "$f"; done > "$OUT/gpu_tests_fused.txt"
  rm -f "$OUT"/t_*.log
  grep -E "^==|passed|failed|error" "$OUT/gpu_tests_fused.txt"
  unset MEMTRACE_ATTN_TUNE
fi
if want capture; then
  # Capture only: GPU parity (three pytest processes side by side: compiling dominates) while the
  # profiler splits the fill into kernels for both emission modes; then bench_capture with the
  # mode whose fill took the least GPU time at B2 (MEMTRACE_CAPTURE_EMIT; do_bench of the whole
  # fill also counts host launch gaps, which made it pick the slower mode once).
  capture_tests
  timeout 200 python benchmarks/profile_capture.py "$OUT/profile_capture.json" --sparse-emit 512,0 2>&1 \
    | grep -v -i warn | cut -c1-400 || status=1
  wait || status=1
  merge_capture_logs
  emit=$(python -c "import json; r=json.load(open('$OUT/profile_capture.json'))['rows']; \
    b2=[x for x in r if x['B'] == 2 and x['threshold'] == 'sparse']; \
    print(min(b2, key=lambda x: x.get('kernel_sum_us', sum(x['kernels_us'].values())))['sparse_emit'])")
  echo "bench_capture with MEMTRACE_CAPTURE_EMIT=$emit"
  MEMTRACE_CAPTURE_EMIT=$emit timeout 240 python benchmarks/bench_capture.py --no-sweep --json "$OUT/capture.json" \
    2>&1 | grep -v -i warn | tail -40 || status=1
fi
if want profile; then
  # Where the time of the two issue-4 ops goes, kernel by kernel (torch.profiler), ~2 minutes.
  timeout 150 python benchmarks/profile_update.py "$OUT/profile_update.json" 2>&1 | grep -v -i warn | tail -30 || status=1
  timeout 200 python benchmarks/profile_capture.py "$OUT/profile_capture.json" 2>&1 | grep -v -i warn | cut -c1-400 || status=1
fi
if want bench || want all; then
  python benchmarks/bench_routing.py --json "$OUT/routing.json" || status=1
  python benchmarks/bench_update.py --json "$OUT/update.json" || status=1
  python benchmarks/bench_capture.py --json "$OUT/capture.json" || status=1
  python benchmarks/bench_bias.py --json "$OUT/bias.json" || status=1
fi
if want update; then
  # parity first, in the background: compiling is CPU work, so it overlaps the attention compile-ahead
  timeout 300 python -m pytest tests/gpu/test_memory_gpu.py -q -p no:cacheprovider -p no:warnings \
    > "$OUT/gpu_tests_memory_gpu.log" 2>&1 &
fi
if want attention || want all; then
  # MEMTRACE_BENCH_SHAPES / MEMTRACE_BENCH_CAUSAL split the matrix over calls (10 minutes each);
  # join the parts with bench_attention.py --merge.
  # Compile first, side by side (compiling is single-threaded per process; 16 cores here): per
  # (head dim, head counts, causal) 6 processes each autotune a sixth of the configs, and per
  # (shape, causal) one compiles FlexAttention; the benchmark then finds everything in the
  # on-disk caches.
  idx=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_attention as b; \
    s='${MEMTRACE_BENCH_SHAPES:-}'; print(' '.join(s.split(',')) if s else ' '.join(map(str, range(len(b.SHAPES)))))")
  [[ ${MEMTRACE_BENCH_ONLY:-all} == peers ]] && idx=""   # peers only: nothing of ours to compile
  # (head dim, query heads, kv heads) of the chosen shapes: Triton compiles per integer class
  kinds=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_attention as b; \
    print(' '.join(sorted({f'{b.SHAPES[int(i)][4]}:{b.SHAPES[int(i)][1]},{b.SHAPES[int(i)][2]}' for i in '$idx'.split()})))")
  want attention-profile && kinds=$(printf '%s\n' $kinds 128:16,16 | sort -u | tr '\n' ' ')   # profile_attention's shape
  causals=${MEMTRACE_BENCH_CAUSAL:-both}; [[ $causals == both ]] && causals="0 1"
  logs=$(mktemp -d)   # not under $OUT: the device tool brings back at most 8 files
  for c in $causals; do
    for kd in $kinds; do for k in 0 1 2 3 4 5; do
      MEMTRACE_ATTN_CONFIG_SLICE=$k/6 timeout 300 python benchmarks/prewarm_attention.py kernels "${kd%%:*}" "$c" \
        --heads "${kd#*:}" > "$logs/prewarm_kernels_${kd%%:*}_${kd#*:}_${c}_$k.log" 2>&1 &
    done; done
    for i in $idx; do
      timeout 300 python benchmarks/prewarm_attention.py flex "$i" "$c" > "$logs/prewarm_flex_${i}_${c}.log" 2>&1 &
    done
  done
  wait
  for f in "$logs"/prewarm_*.log; do [[ -e $f ]] && tail -n 1 "$f"; done   # none when only the peers run
fi
if want update; then
  wait || status=1   # the parity tests, on a quiet GPU before timing anything
  tail -n 3 "$OUT/gpu_tests_memory_gpu.log"
  update_bench
fi
if want tma; then
  # a switch of the triton backend (TMA descriptors; the warp-specialized forward): off, on, and
  # its default (benchmarks/tma_probe.py); every config of the unspecialized kernels compiled
  # ahead (6 slices), then timed in one process.
  c=${MEMTRACE_BENCH_CAUSAL:-0}
  logs=$(mktemp -d)
  for k in 0 1 2 3 4 5; do
    MEMTRACE_ATTN_WS=0 MEMTRACE_ATTN_CONFIG_SLICE=$k/6 timeout 300 python benchmarks/prewarm_attention.py \
      kernels 128 "$c" --heads 16,16 > "$logs/prewarm_$k.log" 2>&1 &
  done
  timeout 300 python benchmarks/prewarm_attention.py flex 0 "$c" > "$logs/prewarm_flex.log" 2>&1 &
  wait
  for f in "$logs"/prewarm_*.log; do tail -n 1 "$f"; done
  knob=${MEMTRACE_PROBE_KNOB:-TMA}
  (cd benchmarks && timeout 400 python tma_probe.py "$OUT/${knob,,}_probe.json" --knob "$knob" --causal "$c" \
    --passes "${MEMTRACE_PROBE_PASSES:-fwd,fwd+bwd}" ${MEMTRACE_PROBE_SET:+--set "$MEMTRACE_PROBE_SET"} \
    ${MEMTRACE_PROBE_NO_PEERS:+--no-peers} 2>&1 \
    | grep -v -i warn | cut -c1-400) || status=1
fi
if want attention-profile; then
  timeout 150 python benchmarks/profile_attention.py "$OUT/profile_attention.json" 2>&1 | grep -v -i warn | cut -c1-300 \
    || status=1
fi
if want attention || want all; then
  part=${MEMTRACE_BENCH_SHAPES:-all}_${MEMTRACE_BENCH_CAUSAL:-both}
  python benchmarks/bench_attention.py ${MEMTRACE_BENCH_SHAPES:+--shapes $MEMTRACE_BENCH_SHAPES} \
    --causal "${MEMTRACE_BENCH_CAUSAL:-both}" --rep "${MEMTRACE_BENCH_REP:-100}" --only "${MEMTRACE_BENCH_ONLY:-all}" --json "$OUT/attention_${part//,/-}.json" \
    --markdown "$OUT/attention_${part//,/-}.md" || status=1
fi
# The device tool brings back at most 8 files from $OUT: past that, the logs go into one tar so
# the JSON results all come back.
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )); then
  (cd "$OUT" && shopt -s nullglob && logs=(*.log *.txt) && ((${#logs[@]})) && tar -cf logs.tar -- "${logs[@]}" \
    && rm -f -- "${logs[@]}")
fi
exit $status
