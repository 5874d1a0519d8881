"""The triton backend's backward entry epilogues, variant against variant, in one process.

    python benchmarks/entries_probe.py OUT.json [--shape B,H,T,D] [--causal 0] [--variants s6,onehot,rows]

At the issue-7 shape (B4 H16 T4096 D128 bf16, random traces): forward+backward of
memtrace.biased_attention(backend="triton") with bias=None, 2048 and 16384 traces per head, for
  s6      the session-6 backward: cancelling-row flags pass and exact-row launches always run
  onehot  those skipped when no row can cancel (non-negative traces), one-hot entry epilogues
  rows    skipped too, per-entry ("rows") epilogues (kernels/attention.py BWD_ENTRIES);
          any variant:C with C entries per chunk (BWD_CHUNK; session 7's rows:N:C runs also
          varied the rows loops' compiler pipelining, since fixed at none)
plus the interleaved overhead over bias=None (bench_attention.interleaved_overhead) of the last
two, and their accuracy against a float32 SDPA with the dense bias at odd GQA shapes.
"""
import argparse

import bench_attention as ba
import torch

from memtrace.kernels import attention as ka

_FLASH_BWD = ka.flash_bwd


def _always_cancel_work(*args, **kwargs):
    kwargs["may_cancel"] = True
    return _FLASH_BWD(*args, **kwargs)


_CHUNK = ka.BWD_CHUNK


def set_variant(name):
    """s6 | onehot | rows, each optionally :CHUNK"""
    ka.flash_bwd = _always_cancel_work if name == "s6" else _FLASH_BWD
    form, _, chunk = name.partition(":")
    ka.BWD_ENTRIES = "rows" if form == "rows" else "onehot"
    ka.BWD_CHUNK = int(chunk) if chunk else _CHUNK


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--shape", default="4,16,4096,128", help="B,Hq,T,D")
    p.add_argument("--kv-heads", type=int, default=None, help="Hkv (default Hq)")
    p.add_argument("--causal", default="0")
    p.add_argument("--variants", default="s6,onehot,rows")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-check", action="store_true", help="skip the accuracy check")
    args = p.parse_args()
    B, H, T, D = (int(x) for x in args.shape.split(","))
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    Hkv = args.kv_heads or H
    q, dout = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(True)
    _, row = ba.probe_log(args.out, shape=[B, H, Hkv, T, D])

    for causal in (bool(int(c)) for c in args.causal.split(",")):
        biases = ba.probe_biases(H, T, causal, dev)
        fl = ba.flops(B, H, T, D, causal, True)
        variants = args.variants.split(",")
        for name in variants:
            set_variant(name)
            for per_head, bias in biases.items():
                if per_head == 0 and name != variants[0]:
                    continue        # bias=None runs the same kernels in every variant
                ms, _ = ba.measure(lambda bias=bias: ba.memtrace_fn("triton", q, k, v, causal, bias),
                                   q, k, v, dout, backward=True, quick=False)
                row(variant=name, traces=per_head, causal=causal, ms=round(ms, 4), tflops=round(fl / ms * 1e-9, 1))
            if name == "s6":
                continue
            for per_head in (2048, 16384):
                def timer(bias):
                    return ba.measure(lambda: ba.memtrace_fn("triton", q, k, v, causal, bias), q, k, v, dout,
                                      backward=True, quick=False)[0]
                med, lo, hi = ba.interleaved_overhead(lambda: timer(None), lambda ph=per_head: timer(biases[ph]),
                                                      rounds=args.rounds)
                row(variant=name, traces=per_head, causal=causal,
                    interleaved_overhead=[round(med, 4), round(lo, 4), round(hi, 4)])
    set_variant("onehot")
    ka.TUNE = False     # the accuracy check's odd shapes compile one config per kernel, not all
    if not args.no_check:
        ba.accuracy_vs_dense([v for v in variants if v != "s6"], set_variant, row, per_head=256, value_scale=3.0,
                             cases=((2, 8, 2, 1000, 1237, 128, False), (2, 4, 2, 300, 517, 64, True)))
    set_variant("onehot")


if __name__ == "__main__":
    main()
