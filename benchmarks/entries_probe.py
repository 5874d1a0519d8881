"""The triton backend's backward entry epilogues, variant against variant, in one process.

    python benchmarks/entries_probe.py OUT.json [--shape B,H,T,D] [--causal 0] [--variants s6,onehot,rows]

At the issue-7 shape (B4 H16 T4096 D128 bf16, random traces): forward+backward of
memtrace.biased_attention(backend="triton") with bias=None, 2048 and 16384 traces per head, for
  s6      the session-6 backward: cancelling-row flags pass and exact-row launches always run
  onehot  those skipped when no row can cancel (non-negative traces), one-hot entry epilogues
  rows    skipped too, per-entry ("rows") epilogues (kernels/attention.py BWD_ENTRIES);
          rows:N[:C] with N software-pipeline stages on their chunk loops (ENTRY_STAGES), C
          entries per chunk (BWD_CHUNK)
plus the interleaved overhead over bias=None (bench_attention.interleaved_overhead) of the last
two, and their accuracy against a float32 SDPA with the dense bias at odd GQA shapes.
"""
import argparse
import datetime
import json

import bench_attention as ba
import torch
import triton

import memtrace as mt
from memtrace.kernels import attention as ka

_FLASH_BWD = ka.flash_bwd


def _always_cancel_work(*args, **kwargs):
    kwargs["may_cancel"] = True
    return _FLASH_BWD(*args, **kwargs)


_STAGES, _CHUNK = ka.ENTRY_STAGES, ka.BWD_CHUNK


def set_variant(name):
    """s6 | onehot | rows[:STAGES[:CHUNK]]"""
    ka.flash_bwd = _always_cancel_work if name == "s6" else _FLASH_BWD
    form, stages, chunk = (name.split(":") + ["", ""])[:3]
    ka.BWD_ENTRIES = "rows" if form == "rows" else "onehot"
    ka.ENTRY_STAGES = int(stages) if stages else _STAGES
    ka.BWD_CHUNK = int(chunk) if chunk else _CHUNK


def check(row, variants):
    """max |err| / max |ref| of out and the three gradients against float32 SDPA with the dense
    bias, per entry form, at odd GQA shapes (lengths not multiples of any block)."""
    for (B, Hq, Hkv, Tq, Tk, D, causal) in [(2, 8, 2, 1000, 1237, 128, False), (2, 4, 2, 300, 517, 64, True)]:
        g = torch.Generator(device="cuda").manual_seed(Tq)
        q = torch.randn(B, Hq, Tq, D, device="cuda", generator=g).bfloat16().requires_grad_(True)
        k, v = (torch.randn(B, Hkv, Tk, D, device="cuda", generator=g).bfloat16().requires_grad_(True)
                for _ in range(2))
        do = torch.randn(B, Hq, Tq, D, device="cuda", generator=g).bfloat16()
        n = 256 * Hq
        bias = mt.TraceBias.from_coo(torch.arange(Hq, device="cuda").repeat_interleave(256),
                                     torch.randint(0, Tq, (n,), device="cuda", generator=g),
                                     torch.randint(0, Tk, (n,), device="cuda", generator=g),
                                     3 * torch.rand(n, device="cuda", generator=g), num_heads=Hq, seq_len_q=Tq,
                                     seq_len_k=Tk)
        dense = torch.zeros(Hq, Tq, Tk, device="cuda")
        dense.index_put_((bias.head, bias.q_idx, bias.k_idx), bias.value.float(), accumulate=True)
        if causal:
            dense.masked_fill_(torch.ones(Tq, Tk, dtype=torch.bool, device="cuda").triu_(Tk - Tq + 1), float("-inf"))
        qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qf, kf.repeat_interleave(Hq // Hkv, 1),
                                                               vf.repeat_interleave(Hq // Hkv, 1), attn_mask=dense[None])
        ref.backward(do.float())
        refs = (ref, qf.grad, kf.grad, vf.grad)
        for name in variants:
            set_variant(name)
            for t in (q, k, v):
                t.grad = None
            out = mt.biased_attention(q, k, v, bias, causal=causal, backend="triton")
            out.backward(do)
            errs = [round(float((a.detach().float() - r).abs().max() / r.abs().max()), 5)
                    for a, r in zip((out, q.grad, k.grad, v.grad), refs)]
            row(check=[B, Hq, Hkv, Tq, Tk, D, causal], variant=name, rel_err_out_dq_dk_dv=errs)


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
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.UTC).isoformat(), "shape": [B, H, Hkv, T, D], "rows": []}

    def row(**kw):
        res["rows"].append(kw)
        print(json.dumps(kw), flush=True)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)

    for causal in (bool(int(c)) for c in args.causal.split(",")):
        biases = {0: None}
        for per_head in (2048, 16384):
            biases[per_head] = ba.make_trace_bias(H, T, per_head, "random", causal, dev)
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
        check(row, [v for v in variants if v != "s6"])
    set_variant("onehot")


if __name__ == "__main__":
    main()
