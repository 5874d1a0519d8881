"""Does Triton 3.6's Hopper warp specialization speed up a dense attention forward? (issue 7)

    python benchmarks/ws_probe.py OUT.json [--shape B,H,T,D] [--compile-only]
    python benchmarks/ws_probe.py --check

`--check`: memtrace's triton forward, whose non-causal calls take the warp-specialized kernel
(kernels/attention.py WS), against float32 SDPA (dense bias) at GQA / odd-Tq / D64 / fp16
shapes, with and without a bias, twice each (bitwise equal: a race would show), one shape at a
time with its wall time printed (a hang shows as the last line).

The sweep: kernels/attention.py's dense, non-causal _flash_fwd_ws_kernel (K/V loop
`tl.range(..., warp_specialize=WS)` over device-made tensor descriptors) over tiles, warps and
stages with WS on and off, against memtrace's triton forward (bias=None) and SDPA cuDNN in the
same process. (ws_sweep_h100_session10.json was measured with this script's earlier copy of that
loop, which stored out by TMA; the library kernel stores it by pointer.) Medians of
triton.testing.do_bench, checked against SDPA.
`--compile-only` compiles every config for sm_90 on a CPU machine and reports whether the
TTGIR holds a warp_specialize op (no GPU needed).
"""
import argparse
import json
import math
import sys
import time

import torch
import triton

CONFIGS = [(bm, bn, w, s, ws) for ws in (True, False) for bm in (128, 256) for bn in (64, 128)
           for w in (4, 8) for s in (2, 3) if not (bm == 256 and w == 4 and not ws)]


def launch(q, k, v, cfg):
    """kernels/attention.py's _flash_fwd_ws_kernel (bias-free, non-causal) under one config."""
    from memtrace.kernels import attention as ka
    bm, bn, w, s, ws = cfg
    B, H, T, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B * H * T, device=q.device, dtype=torch.float32)
    scale2 = 1.0 / math.sqrt(D) * 1.4426950408889634
    ka._ensure_allocator()
    ka._flash_fwd_ws_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, out, lse, out.stride(0), out.stride(1), out.stride(2), B, H, H, 1, T, T, scale2,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=w, num_stages=s)
    return out


def compile_only(D=128):
    from memtrace.kernels import attention as ka
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32",
           **{n: "i32" for n in ("stride_ob", "stride_oh", "stride_om", "B", "Hq", "Hkv", "GROUP", "Tq", "Tk")},
           "qk_scale2": "fp32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "WS": "constexpr"}
    for cfg in CONFIGS:
        bm, bn, w, s, ws = cfg
        consts = {"HEAD_DIM": D, "BLOCK_M": bm, "BLOCK_N": bn, "WS": ws}
        t0 = time.perf_counter()
        try:
            kern = triton.compile(ASTSource(ka._flash_fwd_ws_kernel, sig, consts), target=target,
                                  options={"num_warps": w, "num_stages": s})
            ttgir = kern.asm["ttgir"]
            print(f"{cfg}: ok {time.perf_counter() - t0:.1f}s ws_op={'ttg.warp_specialize' in ttgir} "
                  f"smem={kern.metadata.shared} warps_total={kern.metadata.num_warps}", flush=True)
        except Exception as exc:    # report and go on: the sweep wants every config's fate
            print(f"{cfg}: FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)


def check():
    import memtrace as mt
    cases = [(4, 16, 16, 4096, 4096, 128, torch.bfloat16), (2, 8, 2, 1000, 1280, 128, torch.bfloat16),
             (2, 4, 4, 4096, 4096, 64, torch.float16), (1, 32, 8, 16384, 16384, 128, torch.bfloat16)]
    worst = 0.0
    for B, Hq, Hkv, Tq, Tk, D, dt in cases:
        t0 = time.perf_counter()
        g = torch.Generator(device="cuda").manual_seed(Tq + D)
        q = torch.randn(B, Hq, Tq, D, device="cuda", generator=g, dtype=dt)
        k, v = (torch.randn(B, Hkv, Tk, D, device="cuda", generator=g, dtype=dt) for _ in range(2))
        n = 256 * Hq
        bias = mt.TraceBias.from_coo(torch.arange(Hq, device="cuda").repeat_interleave(256),
                                     torch.randint(0, Tq, (n,), device="cuda", generator=g),
                                     torch.randint(0, Tk, (n,), device="cuda", generator=g),
                                     2 * torch.rand(n, device="cuda", generator=g), num_heads=Hq,
                                     seq_len_q=Tq, seq_len_k=Tk)
        for b in (None, bias):
            outs = [mt.biased_attention(q, k, v, b, backend="triton") for _ in range(2)]
            torch.cuda.synchronize()
            dense = None
            if b is not None:
                dense = torch.zeros(Hq, Tq, Tk, device="cuda")
                dense.index_put_((b.head, b.q_idx, b.k_idx), b.value.float(), accumulate=True)
                dense = dense[None]
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float().repeat_interleave(Hq // Hkv, 1), v.float().repeat_interleave(Hq // Hkv, 1),
                attn_mask=dense)
            err = float((outs[0].float() - ref).abs().max() / ref.abs().max())
            same = bool(torch.equal(outs[0], outs[1]))
            worst = max(worst, err)
            print(json.dumps({"case": [B, Hq, Hkv, Tq, Tk, D, str(dt)], "bias": b is not None, "rel_err": round(err, 5),
                              "repeat_bitwise_equal": same, "s": round(time.perf_counter() - t0, 1)}), flush=True)
            if not same or not err < 2e-2:
                return 1
            if (B, Hq, Tq, D) == (4, 16, 4096, 128):   # the shape of record: time it too
                from triton.testing import do_bench
                ms = do_bench(lambda b=b: mt.biased_attention(q, k, v, b, backend="triton"), warmup=25, rep=200)
                print(json.dumps({"bias": b is not None, "ms": round(ms, 4),
                                  "tflops": round(4 * B * Hq * Tq * Tk * D / ms * 1e-9, 1)}), flush=True)
    print("check ok, worst", worst)
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?")
    p.add_argument("--shape", default="4,16,4096,128")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.check:
        return check()
    B, H, T, D = (int(x) for x in args.shape.split(","))
    if args.compile_only:
        compile_only(D)
        return
    from triton.testing import do_bench

    import memtrace as mt
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * B * H * T * T * D
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    rows = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "shape": [B, H, T, D], "results": []}

    def record(name, fn, **extra):
        ms = do_bench(fn, warmup=50, rep=300)
        row = dict(impl=name, ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1), **extra)
        rows["results"].append(row)
        print(json.dumps(row), flush=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        record("sdpa_cudnn", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    record("memtrace_triton", lambda: mt.biased_attention(q, k, v, None, backend="triton"))
    for cfg in CONFIGS:
        try:
            out = launch(q, k, v, cfg)
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
        except Exception as exc:    # a config that does not compile or launch is a result too
            row = dict(impl="probe", cfg=list(cfg), error=f"{type(exc).__name__}: {str(exc)[:200]}")
            rows["results"].append(row)
            print(json.dumps(row), flush=True)
            continue
        record("probe", lambda cfg=cfg: launch(q, k, v, cfg), cfg=list(cfg), max_err=err)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
