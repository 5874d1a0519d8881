"""Compile (and fill Triton's on-disk cache with) every attention kernel one part of the benchmark
matrix needs, at a small sequence length, so that bench_attention spends its time timing.

Usage: python benchmarks/prewarm_attention.py D CAUSAL [dtype]     (run one process per (D, causal)
side by side: compiling is single-threaded per process, the GPU machine has 16 cores).
Autotuning at T=512 compiles every config; the benchmark's own autotune at its T then loads them
from the cache instead of compiling.
"""
import sys

import torch

import memtrace as mt
import memtrace.attention as A


def main():
    D, causal = int(sys.argv[1]), sys.argv[2] == "1"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[sys.argv[3] if len(sys.argv) > 3 else "bf16"]
    B, H, T = 1, 4, 512
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    n = 64 * H
    coo = [torch.arange(H, device="cuda").repeat_interleave(64), torch.randint(0, T, (n,), device="cuda"),
           torch.randint(0, T, (n,), device="cuda")]
    bias = mt.TraceBias.from_coo(*coo, torch.rand(n, device="cuda"), num_heads=H, seq_len_q=T, seq_len_k=T)
    for backend in [b for b in ("triton", "cudnn", "flash") if b in A._REGISTRY]:
        for b in (None, bias):
            try:
                mt.biased_attention(q, k, v, b, causal=causal, backend=backend).sum().backward()
            except Exception as exc:  # an unsupported combination: the benchmark records it
                print(f"prewarm D={D} causal={causal} {backend}: {type(exc).__name__}: {exc}", flush=True)
    torch.cuda.synchronize()
    print(f"prewarm D={D} causal={causal}: done", flush=True)


if __name__ == "__main__":
    main()
