"""Host-side cost of one trace-memory update (bench_update's workload, 32 x 32 x 2048, 2M candidates):
    python benchmarks/host_profile_update.py
The eager call's GPU time exceeds its kernels' sum by the time the GPU waits on the host. This
prints the host time per call (100 calls queued without a sync), then cProfile's top entries."""
import cProfile
import pstats
import time

import torch

import bench_update as bu

L, H, Q, T, C = 32, 32, 2048, 4096, 65536
mem, cand, tS, tA = bu.make_workload(L, H, Q, T, C)
ne = torch.full((L,), C, dtype=torch.int32, device="cuda")
layers = list(range(L))


def call():
    mem.update_edges(layers, *cand, num_edges=ne, trace_salience=tS, trace_attn=tA)


for _ in range(10):
    call()
torch.cuda.synchronize()
for n in (1, 10, 100):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{n:4d} calls: host {1e6 * (t1 - t0) / n:7.1f} us/call, until done {1e6 * (t2 - t0) / n:7.1f} us/call")
prof = cProfile.Profile()
prof.enable()
for _ in range(100):
    call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
