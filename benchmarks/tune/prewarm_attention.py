"""Compile ahead, side by side, what one part of the attention benchmark matrix needs, so that
bench_attention.py spends its time timing (Triton's and Inductor's on-disk caches carry the
compiled kernels from these processes to the benchmark's).

    python benchmarks/tune/prewarm_attention.py kernels D CAUSAL [--heads HQ,HKV] [--dtype bf16]
        memtrace's kernels for head dim D and HQ query / HKV kv heads (default 16,16): every
        backend, with and without a bias, forward and backward, at a small sequence length.
        Autotuning compiles every config; run n processes with MEMTRACE_ATTN_CONFIG_SLICE=k/n
        (k = 0..n-1) to split the configs between them. The head counts matter: Triton compiles
        one binary per integer-argument class (== 1, divisible by 16, other), so a kernel warmed
        with 4 heads is compiled again for 16, and one without GQA again for a group of 4.
    python benchmarks/tune/prewarm_attention.py flex SHAPE CAUSAL [--dtype bf16]
        FlexAttention with a dense-bias score_mod at bench_attention.SHAPES[SHAPE], forward and
        backward (torch.compile with dynamic=False compiles per shape).

Compiling is single-threaded per process; the GPU machine has 16 cores.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
import bench_attention as BA
import torch

import memtrace as mt
from memtrace.backends import registry


def warm_kernels(D, causal, dtype, Hq=16, Hkv=16):
    B, T = 1, 512
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    n = 64 * Hq
    coo = [torch.arange(Hq, device="cuda").repeat_interleave(64), torch.randint(0, T, (n,), device="cuda"),
           torch.randint(0, T, (n,), device="cuda")]
    bias = mt.TraceBias.from_coo(*coo, torch.rand(n, device="cuda"), num_heads=Hq, seq_len_q=T, seq_len_k=T)
    for backend in [b for b in ("triton", "cudnn", "flash") if b in registry.REGISTRY]:
        for b in (None, bias):
            # the Triton backend also with a capture (its dQ kernel's capture variant, the fill)
            for capture in ((None, mt.SalienceCapture(1e-3)) if backend == "triton" else (None,)):
                try:
                    mt.biased_attention(q, k, v, b, causal=causal, backend=backend, capture=capture).sum().backward()
                except Exception as exc:  # an unsupported combination: the benchmark records it
                    print(f"prewarm D={D} causal={causal} {backend}: {type(exc).__name__}: {exc}", flush=True)


def warm_flex(shape, causal, dtype):
    B, Hq, Hkv, T, D = BA.SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    per_head, pattern = BA.TRACES[0]
    bias = BA.make_trace_bias(Hq, T, per_head, pattern, causal, torch.device("cuda"))
    fn = BA.peer_fn("flex_dense_bias", q, k, v, causal, BA.dense_bias_of(bias, T, causal, dtype))
    with torch.no_grad():
        fn()
    fn().sum().backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("kernels", "flex"))
    ap.add_argument("arg", type=int, help="head dim (kernels) or index into bench_attention.SHAPES (flex)")
    ap.add_argument("causal", choices=("0", "1"))
    ap.add_argument("--heads", default="16,16", help="HQ,HKV for `kernels`")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    causal = args.causal == "1"
    if args.what == "kernels":
        Hq, Hkv = (int(x) for x in args.heads.split(","))
        warm_kernels(args.arg, causal, dtype, Hq, Hkv)
    else:
        warm_flex(args.arg, causal, dtype)
    torch.cuda.synchronize()
    print(f"prewarm {args.what} {args.arg} causal={causal}: done", flush=True)


if __name__ == "__main__":
    main()
