"""Per-kernel GPU time of one batched trace-memory update (torch.profiler), on bench_update's
workload: 32 layers x 32 heads x quota 2048, 2M candidates, every slab evicting.

    python benchmarks/profile/profile_update.py [OUT.json] [--quick]

bench_update.py times the whole call with CUDA events (launch gaps included); this splits it into
the slab-count, match, group and select kernels and the torch glue (the state restore before each call is
profiled alone and subtracted), and reports the sum of kernel times next to the event time, so a
host-bound call shows as a gap between the two.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
import bench_update as bu
from profile_capture import kernel_times


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    L, H, Q, T, C = (4, 8, 256, 1024, 4096) if "--quick" in argv else (32, 32, 2048, 4096, 65536)
    mem, cand, tS, tA = bu.make_workload(L, H, Q, T, C)
    s0, m0 = mem.strength.clone(), mem.meta.clone()
    ne = torch.full((L,), C, dtype=torch.int32, device="cuda")
    layers = list(range(L))

    def restore():
        mem.strength.copy_(s0)
        mem.meta.copy_(m0)

    def update():
        # each profiled call restores the state first; the restore's own kernels are profiled
        # alone and subtracted
        restore()
        mem.update_edges(layers, *cand, num_edges=ne, trace_salience=tS, trace_attn=tA)

    restore_times = kernel_times(restore)
    times = kernel_times(update)
    for name, us in restore_times.items():
        left = times.get(name, 0.0) - us
        if left > 0.05:
            times[name] = left
        else:
            times.pop(name, None)
    event = bu.time_it(lambda: mem.update_edges(layers, *cand, num_edges=ne, trace_salience=tS, trace_attn=tA),
                       restore, 20)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "workload": {"layers": L, "heads": H, "quota": Q, "max_seq_len": T, "candidates_per_layer": C},
           "kernels_us": {k: round(v, 1) for k, v in times.items()},
           "kernel_sum_us": round(sum(times.values()), 1),
           "event_ms": event["ms"], "host_ms": event["host_ms"]}
    print(json.dumps(doc, indent=1))
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
