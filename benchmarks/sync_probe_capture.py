"""Find host-device synchronisations and host time in one capturing forward+backward (H100):
torch.cuda.set_sync_debug_mode("error") makes the first synchronising call raise, with its stack, and
cProfile shows where the host spends the step.

    python benchmarks/sync_probe_capture.py [--unfused]
"""
import cProfile
import math
import os
import pstats
import sys

import torch

import memtrace
from memtrace.capture import SalienceCapture


def main(argv):
    if "--unfused" in argv:
        os.environ["MEMTRACE_CAPTURE_FUSED"] = "0"
    B, H, T, D = 2, 16, 4096, 128
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    cap = SalienceCapture(threshold=0.035, capacity=1 << 17)
    scale = 1 / math.sqrt(D)

    def step():
        memtrace.biased_attention(q, k, v, scale=scale, capture=cap, backend="triton").backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    import traceback
    torch.cuda.set_sync_debug_mode("error")       # the first synchronising call raises, with its stack
    try:
        step()
        print("no synchronising call in the step")
    except RuntimeError:
        print("SYNC in the step:")
        traceback.print_exc(limit=-8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("cumulative").print_stats(45)
    stats.sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main(sys.argv[1:])
