"""Where the select kernel's time goes (bench_update's workload, 32 x 32 x 2048, 2M candidates):
GPU time of the select kernel as is, without its final sort, and stopped after the radix select
(the last two give wrong results: timing only).   python benchmarks/select_probe.py"""
import torch

import bench_update as bu
from memtrace.kernels import trace_update as tu
from profile_capture import kernel_times

L, H, Q, T, C = 32, 32, 2048, 4096, 65536
mem, cand, tS, tA = bu.make_workload(L, H, Q, T, C)
s0, m0 = mem.strength.clone(), mem.meta.clone()
ne = torch.full((L,), C, dtype=torch.int32, device="cuda")


def update():
    mem.strength.copy_(s0)
    mem.meta.copy_(m0)
    mem.update_edges(list(range(L)), *cand, num_edges=ne, trace_salience=tS, trace_attn=tA)


update()
n = (mem.strength >= 0).sum().item()
pos = (mem.meta >> mem.pos_shift) & mem.pos_mask
new_kept = ((pos % 2 == 1) & (mem.strength >= 0)).sum().item()
print(f"kept after one update: {n} of {L * H * Q}; new traces among them: {new_kept} ({new_kept / (L * H):.0f} per slab)")
for variant in (0, 1, 2):
    tu.SELECT_VARIANT = variant
    times = kernel_times(update, reps=10)
    print(variant, {k[:30]: round(v, 1) for k, v in times.items() if "select" in k or "match" in k or "group" in k})
tu.SELECT_VARIANT = 0
