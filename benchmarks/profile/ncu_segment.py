"""One fused capturing forward+backward per batch size (H16 T4096 D128 bf16, ~131072 edges) for
Nsight Compute on the fused capture's segment kernel (benchmarks/profile/ncu_suite.sh segment):
    MEMTRACE_ATTN_TUNE=0 ncu -k regex:_salience_segment python benchmarks/profile/ncu_segment.py 2 4"""
import math
import sys

import torch

import memtrace
from memtrace.capture import SalienceCapture

H, T, D = 16, 4096, 128
for B in [int(x) for x in sys.argv[1:]] or [2]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(D)
    with torch.no_grad():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    probe = SalienceCapture(threshold=0.0, capacity=1 << 17)
    probe.fill(q.detach(), k.detach(), v.detach(), out, lse, do, None, None, scale=scale)
    cap = SalienceCapture(threshold=float(probe.stats["kept_min_salience"]), capacity=1 << 17)
    memtrace.biased_attention(q, k, v, scale=scale, capture=cap, backend="triton").backward(do)
    torch.cuda.synchronize()
    print(f"B{B}: {int(cap.num_edges)} edges")
