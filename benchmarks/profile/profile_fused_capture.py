"""Where the fused capture's time goes (H100): memtrace.biased_attention(backend="triton")
forward+backward at H16 T4096 D128 bf16, B 2 and 4, without a capture, with the fused capture
(the dQ kernel's segment bound + the segment rescoring) and with the unfused one; every kernel's
GPU time per call (torch.profiler) and the whole step (do_bench median).

    python benchmarks/profile/profile_fused_capture.py [OUT.json] [--segment-emit N,N]
"""
import json
import math
import os
import sys
import time

import torch
import triton.testing
from profile_capture import kernel_times

import memtrace
from memtrace.capture import SalienceCapture


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    emits = [memtrace.config.settings().capture_segment_emit]
    if "--segment-emit" in argv:
        emits = [int(x) for x in argv[argv.index("--segment-emit") + 1].split(",")]
    H, T, D, capacity = 16, 4096, 128, 1 << 17
    rows = []
    for B in (2, 4):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        scale = 1.0 / math.sqrt(D)
        with torch.no_grad():
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                          scale=scale)[:2]
        probe = SalienceCapture(threshold=0.0, capacity=capacity)
        probe.fill(q.detach(), k.detach(), v.detach(), out, lse, do, None, None, scale=scale)
        thr = float(probe.stats["kept_min_salience"])

        def step(cap):
            def run():
                memtrace.biased_attention(q, k, v, scale=scale, capture=cap, backend="triton").backward(do)
            return run

        variants = [("base", None, None)]
        variants += [(f"fused_emit{e}", "1", e) for e in emits]
        variants += [("unfused", "0", None)]
        for name, fused, emit in variants:
            changes = {"capture_fused": fused} if fused is not None else {}
            if emit is not None:
                changes["capture_segment_emit"] = emit
            with memtrace.config.override(**changes):
                cap = SalienceCapture(threshold=thr, capacity=capacity) if fused is not None else None
                fn = step(cap)
                fn()
                ms = triton.testing.do_bench(fn, grad_to_none=[q, k, v], warmup=10, rep=100, return_mode="median")
                kt = kernel_times(fn)
                # host time of one step (from an idle GPU: enqueue only) and its wall time to the sync
                host, wall = [], []
                for _ in range(10):
                    for t_ in (q, k, v):
                        t_.grad = None
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host.append((t1 - t0) * 1e3)
                    wall.append((time.perf_counter() - t0) * 1e3)
            row = {"B": B, "variant": name, "ms": ms, "kernel_sum_us": sum(kt.values()),
                   "host_enqueue_ms": sorted(host)[5], "synced_wall_ms": sorted(wall)[5],
                   "kernels_us": {k_: round(v_, 1) for k_, v_ in kt.items()}}
            if cap is not None:
                row["num_edges"] = int(cap.num_edges)
            rows.append(row)
            print(f"B{B} {name:14s} step {ms:7.3f} ms, kernels {row['kernel_sum_us']:8.1f} us, host enqueue "
                  f"{row['host_enqueue_ms']:.3f} ms, synced {row['synced_wall_ms']:.3f} ms", flush=True)
            for k_, v_ in list(kt.items())[:14]:
                print(f"    {v_:9.1f} us  {k_}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
