"""Where a capture fill's time goes (H100): H16 T4096 D128 bf16, B in 1, 2, 4, per tile config and
emission mode; the whole fill (do_bench median) and its kernels one by one (torch.profiler).

    python benchmarks/profile/profile_capture.py [OUT.json] [--config BM,BN,WARPS,STAGES,PER_TILE ...] [--no-desc]
                                         [--sparse-emit N,N]   (512: per candidate up to 512 a tile, 0: ranked)

Two thresholds: 3e38 (no candidate: dots, exponentials, per-tile reductions, no emission) and the
one that keeps about `capacity` candidates (~4 per 128x64 tile: nearly every tile emits). The
kernel list splits the fill into the salience kernel(s) and the torch glue (buffer zeroing, sorts,
the overflow bookkeeping); the whole-fill time also counts host launch gaps.
"""
import json
import math
import sys

import torch
import triton

import memtrace
from memtrace import capture as capture_mod
from memtrace.capture import SalienceCapture


def kernel_times(fn, reps=5):
    """{kernel name: mean us per call} over `reps` calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            out[ev.key[:60]] = out.get(ev.key[:60], 0.0) + t / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    configs = [None]
    if "--config" in argv:
        configs = [tuple(int(x) for x in c.split(",")) for c in argv[argv.index("--config") + 1:]
                   if not c.startswith("--")]
    emits = [memtrace.config.settings().capture_emit]
    if "--sparse-emit" in argv:
        emits = [int(x) for x in argv[argv.index("--sparse-emit") + 1].split(",")]
    if "--no-desc" in argv:
        capture_mod._USE_DESC = False
    H, T, D, cap_size = 16, 4096, 128, 1 << 17
    rows = []
    for B in (1, 2, 4):
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1.0 / math.sqrt(D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        probe = SalienceCapture(threshold=0.0, capacity=cap_size)
        probe.fill(q, k, v, out, lse, do, None, None, scale=scale)
        thr = float(probe.stats["kept_min_salience"])
        for cfg, emit in [(c, e) for c in configs for e in emits]:
            capture_mod._CONFIG_OVERRIDE = cfg
            memtrace.config.override(capture_emit=emit).__enter__()   # kept for the rest of this script
            for name, t in (("none", 3e38), ("sparse", thr)):
                cap = SalienceCapture(threshold=t, capacity=cap_size)
                fn = (lambda cap=cap: cap.fill(q, k, v, out, lse, do, None, None, scale=scale))
                times = kernel_times(fn)
                total = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                row = {"B": B, "config": str(cfg or capture_mod._config(D, q.device)), "threshold": name,
                       "sparse_emit": emit, "desc": capture_mod._USE_DESC, "fill_ms": total,
                       "candidates": int(cap.stats["num_candidates"]),
                       "kernel_sum_us": round(sum(times.values()), 1),
                       "kernels_us": {k_: round(v_, 1) for k_, v_ in list(times.items())[:8]}}
                rows.append(row)
                print(json.dumps(row), flush=True)
        capture_mod._CONFIG_OVERRIDE = None
    if out_path:
        with open(out_path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
