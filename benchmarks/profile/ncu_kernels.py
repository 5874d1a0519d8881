"""One call of each kernel that bounds issue 4 / issue 7, for Nsight Compute:

    ncu --kernel-name regex:'_correct|_select' --launch-skip-before-match 0 \
        python benchmarks/profile/ncu_kernels.py [attention|update|all]

attention: correct_fwd and correct_bwd after cuDNN at B4 H16 T4096 D128 bf16, 2048 and 16384
random traces per head (two calls each: the first compiles, ncu may skip it with --launch-skip);
update: bench_update's workload (32 x 32 x 2048, 2M candidates), two updates.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
import torch

which = sys.argv[1] if len(sys.argv) > 1 else "all"
if which in ("attention", "all"):
    from bench_attention import make_trace_bias
    from memtrace.kernels import attention as correction

    from memtrace.backends.cudnn import CudnnBackend
    B, H, T, D = 4, 16, 4096, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    dense = CudnnBackend()
    out, lse = dense.dense_forward(q, k, v, causal=False, scale=D ** -0.5)
    for per_head in (2048, 16384):
        bias = make_trace_bias(H, T, per_head, "random", False, "cuda")
        vals = bias.entry_values().float()
        for _ in range(2):
            o2, l2 = correction.correct_fwd(q, k, v, out, lse, bias, vals, causal=False, scale=D ** -0.5,
                                            alpha=1.0, inplace=False)
            dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
            correction.correct_bwd(q, k, v, o2, l2, do, bias, vals, dq, dk, dv, causal=False, scale=D ** -0.5,
                                   alpha=1.0, need_dvalues=True)
if which in ("update", "all"):
    import bench_update as bu
    L, Hh, Q, T, C = 32, 32, 2048, 4096, 65536
    mem, cand, tS, tA = bu.make_workload(L, Hh, Q, T, C)
    s0, m0 = mem.strength.clone(), mem.meta.clone()
    ne = torch.full((L,), C, dtype=torch.int32, device="cuda")
    for _ in range(2):
        mem.strength.copy_(s0)
        mem.meta.copy_(m0)
        mem.update_edges(list(range(L)), *cand, num_edges=ne, trace_salience=tS, trace_attn=tA)
torch.cuda.synchronize()
