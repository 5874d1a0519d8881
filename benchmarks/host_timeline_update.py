"""Where the host spends one trace-memory update (bench_update's workload, 32 x 32 x 2048, 2M
candidates): the mean time from the call's start to each step, over 200 calls queued without a
synchronisation and over 200 calls each started on an idle GPU (queued calls outrun the GPU, so
their launches include waiting for room in the launch queue), and the median GPU time of a call.

    python benchmarks/host_timeline_update.py [OUT.json]

The eager update's GPU time is its kernels' sum plus the time the GPU waits for the host to
launch the first of them; this shows how long that is and where it goes.
"""
import cProfile
import json
import pstats
import sys
import time

import torch

import bench_update as bu
from memtrace.kernels import trace_update as tu

STAMPS = []


class Timed:
    """Stands in for a Triton kernel: records the host time around its launch."""

    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            STAMPS.append((f"{self.name} launch start", time.perf_counter()))
            out = launch(*args, **kwargs)
            STAMPS.append((f"{self.name} launch end", time.perf_counter()))
            return out
        return run


def main():
    L, H, Q, T, C = 32, 32, 2048, 4096, 65536
    mem, cand, tS, tA = bu.make_workload(L, H, Q, T, C)
    ne = torch.full((L,), C, dtype=torch.int32, device="cuda")
    layers = list(range(L))
    inner = tu.trace_update_slabs

    def slabs(*args, **kwargs):
        STAMPS.append(("trace_update_slabs start", time.perf_counter()))
        inner(*args, **kwargs)
        STAMPS.append(("trace_update_slabs end", time.perf_counter()))
    tu.trace_update_slabs = slabs
    for name in ("_match", "_group", "_select"):
        setattr(tu, name, Timed(name, getattr(tu, name)))

    def call():
        mem.update_edges(layers, *cand, num_edges=ne, trace_salience=tS, trace_attn=tA)

    for _ in range(20):
        call()
    torch.cuda.synchronize()
    n = 200

    def stamps(synced):
        """Mean µs from the call's start to each stamp over n calls; synced: each call starts
        on an idle GPU (as a timed eager call sees it), else they queue (they outrun the GPU,
        fill the launch queue and then block inside whichever launch comes)."""
        totals = {}
        for _ in range(n):
            if synced:
                torch.cuda.synchronize()
            STAMPS.clear()
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            for name, t in STAMPS + [("call end", t1)]:
                totals[name] = totals.get(name, 0.0) + (t - t0)
        torch.cuda.synchronize()
        return {name: round(1e6 * v / n, 1) for name, v in totals.items()}

    t_all = time.perf_counter()
    timeline = stamps(synced=False)
    host_per_call = (time.perf_counter() - t_all) / n
    synced = stamps(synced=True)
    # where the host time goes, function by function (cProfile over the same synced calls; the
    # profiler's own overhead inflates Python-heavy lines more than C calls)
    prof = cProfile.Profile()
    for _ in range(n):
        torch.cuda.synchronize()
        prof.enable()
        call()
        prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:14]
    profile = [{"function": f"{fn[0].split('/')[-1]}:{fn[1]}({fn[2]})", "calls_per_update": round(v[1] / n, 1),
                "own_us_per_update": round(1e6 * v[2] / n, 1)} for fn, v in top]
    # one synchronised call: event before the call and GPU time until done
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    gpu = []
    for _ in range(50):
        torch.cuda.synchronize()
        ev[0].record()
        call()
        ev[1].record()
        torch.cuda.synchronize()
        gpu.append(ev[0].elapsed_time(ev[1]))
    gpu.sort()
    res = {"device": torch.cuda.get_device_name(), "host_us_from_call_start": timeline,
           "host_us_from_call_start_synced": synced, "host_profile_synced": profile,
           "host_us_per_call_queued": round(1e6 * host_per_call, 1), "gpu_ms_median_synced": round(gpu[len(gpu) // 2], 4)}
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
