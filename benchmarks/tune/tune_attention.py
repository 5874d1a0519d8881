"""Tuning / measurement script for kernels/attention/ (H100).

    python benchmarks/tune/tune_attention.py OUT.json [--quick]

Measures, in one process, side by side: our Triton flash forward and forward+backward with no
bias and with 2048 / 16384 random traces per head; PyTorch SDPA (flash, cuDNN) without bias;
FlexAttention (compiled) without bias and with a score_mod reading a dense bias; the standalone
correction after cuDNN's forward (the LSE-returning aten op); TraceBias construction. Times are
triton.testing.do_bench medians; TFLOP/s count 4*B*H*T^2*D (forward, halved when causal) and 3.5x
that for forward+backward.
"""
import datetime
import json
import math
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from memtrace.kernels import attention as ka
from memtrace.kernels import attention as kc
from torch.nn.attention import SDPBackend, sdpa_kernel

from memtrace.bias import TraceBias

RESULTS = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.UTC).isoformat(), "runs": [], "errors": []}


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=30, rep=rep, return_mode="median")


OUT_PATH = "attention_kernels.json"


def dump():
    with open(OUT_PATH, "w") as fh:
        json.dump(RESULTS, fh, indent=1)


def record(name, shape, causal, ms, flops, **extra):
    tflops = flops / ms * 1e-9
    row = dict(name=name, shape=shape, causal=causal, ms=round(ms, 4), tflops=round(tflops, 1), **extra)
    RESULTS["runs"].append(row)
    dump()
    print(f"{name:48s} {shape!s:28s} causal={causal!s:5s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s {extra if extra else ''}",
          flush=True)


def guarded(label, fn):
    try:
        fn()
    except Exception as exc:  # keep measuring the rest
        RESULTS["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
        print(f"!! {label}: {exc}", flush=True)
        traceback.print_exc()


def random_bias(Hq, Tq, Tk, per_head, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    n = Hq * per_head
    h = torch.arange(Hq, device=device).repeat_interleave(per_head)
    i = torch.randint(0, Tq, (n,), device=device, generator=g)
    j = torch.randint(0, Tk, (n,), device=device, generator=g)
    val = torch.rand(n, device=device, generator=g)
    return TraceBias.from_coo(h, i, j, val, num_heads=Hq, seq_len_q=Tq, seq_len_k=Tk), (h, i, j, val)


def run_shape(B, Hq, Hkv, T, D, causal, dtype=torch.bfloat16, peers=True, traces=(2048, 16384)):
    shape = (B, Hq, Hkv, T, D)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype, generator=g)
    scale, alpha = 1.0 / math.sqrt(D), 0.5
    fwd_flops = 4 * B * Hq * T * T * D * (0.5 if causal else 1.0)
    fb_flops = 3.5 * fwd_flops

    # ---- ours
    def ours(per_head):
        bias, _ = (None, None) if per_head == 0 else random_bias(Hq, T, T, per_head)
        ev = None if bias is None else bias.entry_values()
        tag = "none" if per_head == 0 else str(per_head)
        f = lambda: ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
        out, lse = f()
        record(f"triton fwd bias={tag}", shape, causal, bench(f), fwd_flops,
               cfg=str(ka.fwd._flash_fwd_kernel.best_config))
        bw = lambda: ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                  need_dvalues=bias is not None)
        bw()
        t_b = bench(bw)
        record(f"triton bwd bias={tag}", shape, causal, t_b, 2.5 * fwd_flops,
               cfg_dkdv=str(ka.bwd._flash_bwd_dkdv_kernel.best_config),
               cfg_dq=str(ka.bwd._flash_bwd_dq_kernel.best_config))

        def fb():
            o, l = f()
            return ka.flash_bwd(q, k, v, o, l, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                need_dvalues=bias is not None)
        record(f"triton fwd+bwd bias={tag}", shape, causal, bench(fb), fb_flops)
        if bias is not None and per_head == traces[0] and B * Hq * T * T <= 2 ** 31:
            # accuracy against a dense-bias fp32 SDPA (math is too big; use efficient backend in fp32)
            dense = bias.to_dense().to(torch.float32)
            mask = dense * alpha
            if causal:
                mask = mask.masked_fill(torch.ones(T, T, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
            want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(Hq // Hkv, 1),
                                                  v.float().repeat_interleave(Hq // Hkv, 1), attn_mask=mask[None],
                                                  scale=scale)
            err = ((out.float() - want).norm() / want.norm()).item()
            RESULTS["runs"].append({"name": "triton fwd rel err vs fp32 dense", "shape": shape, "causal": causal,
                                    "err": err})
            print(f"   rel err vs fp32 dense-bias SDPA: {err:.2e}", flush=True)
            del dense, mask, want
        return bias

    biases = {}
    for per_head in (0,) + tuple(traces):
        guarded(f"ours {per_head}", lambda: biases.__setitem__(per_head, ours(per_head)))

    if not peers:
        return
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kx, vx = (kg, vg) if Hkv == Hq else (None, None)

    def sdpa_peer(backend, label):
        if kx is None:
            return
        with sdpa_kernel(backend):
            f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            record(f"sdpa {label} fwd", shape, causal, bench(f), fwd_flops)

            def fb():
                o = F.scaled_dot_product_attention(qg, kx, vx, is_causal=causal, scale=scale)
                o.backward(do)
            record(f"sdpa {label} fwd+bwd", shape, causal, bench(fb), fb_flops)
    guarded("sdpa flash", lambda: sdpa_peer(SDPBackend.FLASH_ATTENTION, "flash"))
    guarded("sdpa cudnn", lambda: sdpa_peer(SDPBackend.CUDNN_ATTENTION, "cudnn"))

    def flex_peer():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        bm = None
        if causal:
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T)
        gqa = Hkv != Hq
        f = lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)
        f()
        record("flex fwd no bias", shape, causal, bench(f), fwd_flops)
        bias = biases.get(traces[0])
        dense = bias.to_dense().to(dtype) * alpha

        def score_mod(score, b, h, qi, ki):
            return score + dense[h, qi, ki]
        f2 = lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
        f2()
        record("flex fwd dense bias", shape, causal, bench(f2), fwd_flops)

        def fb():
            o = flex(qg, kg, vg, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
            o.backward(do)
        fb()
        record("flex fwd+bwd dense bias", shape, causal, bench(fb), fb_flops)
    guarded("flex", flex_peer)

    def cudnn_plus_correction():
        if kx is None:
            return
        op = torch.ops.aten._scaled_dot_product_cudnn_attention
        res = op(q, k, v, None, True, 0.0, causal, False, scale=scale)
        out0, lse0 = res[0], res[1]
        if lse0.dim() == 4:
            lse0 = lse0.squeeze(-1)
        f0 = lambda: op(q, k, v, None, True, 0.0, causal, False, scale=scale)
        t_dense = bench(f0)
        record("cudnn op fwd (returns lse)", shape, causal, t_dense, fwd_flops,
               lse_shape=list(lse0.shape), lse_stride=list(lse0.stride()))
        for per_head in traces:
            bias = biases.get(per_head)
            if bias is None:
                continue
            ev = bias.entry_values()
            o, l = out0.clone(), lse0.clone()
            fc = lambda: kc.correct_fwd(q, k, v, o, l, bias, ev, causal=causal, scale=scale, alpha=alpha)
            t_c = bench(fc)
            record(f"correct_fwd alone {per_head}", shape, causal, t_c, fwd_flops)
            record(f"cudnn fwd + correct_fwd {per_head} (sum)", shape, causal, t_dense + t_c, fwd_flops)
            dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
            fbc = lambda: kc.correct_bwd(q, k, v, o, l, do, bias, ev, dq, dk, dv, causal=causal, scale=scale,
                                         alpha=alpha, need_dvalues=True)
            t_cb = bench(fbc)
            record(f"correct_bwd alone {per_head}", shape, causal, t_cb, 2.5 * fwd_flops)
    guarded("cudnn+correction", cudnn_plus_correction)


def bias_build():
    Hq, T, per = 32, 4096, 2048
    g = torch.Generator(device="cuda").manual_seed(1)
    n = Hq * per
    h = torch.arange(Hq, device="cuda").repeat_interleave(per)
    i = torch.randint(0, T, (n,), device="cuda", generator=g)
    j = torch.randint(0, T, (n,), device="cuda", generator=g)
    val = torch.rand(n, device="cuda", generator=g)
    from memtrace import bias as mb
    t_idx = bench(lambda: mb._build_index(h, i, j, Hq, T, T))
    t_coo = bench(lambda: TraceBias.from_coo(h, i, j, val, num_heads=Hq, seq_len_q=T, seq_len_k=T))
    RESULTS["runs"].append({"name": "TraceBias build 32x2048", "build_index_ms": t_idx, "from_coo_ms": t_coo})
    print(f"TraceBias._build_index 32 heads x 2048: {t_idx:.4f} ms; from_coo (with checks): {t_coo:.4f} ms", flush=True)


def sweeps(B=4, H=16, T=4096, D=128, causal=False, per_head=2048):
    """Chunk / block sizes of the epilogues and of the standalone correction."""
    shape = (B, H, H, T, D)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale, alpha = 1.0 / math.sqrt(D), 0.5
    fwd_flops = 4 * B * H * T * T * D
    for ph in (per_head, 8 * per_head):
        bias, _ = random_bias(H, T, T, ph)
        ev = bias.entry_values()
        out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
        for chunk in (16, 32):
            f = lambda: ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                     need_dvalues=True, chunk=chunk)
            f()
            record(f"sweep flash_bwd {ph} chunk={chunk}", shape, causal, bench(f), 2.5 * fwd_flops)
        o, l = out.clone(), lse.clone()
        for bm, ch, w in ((64, 32, 4), (32, 16, 4), (16, 16, 2)):
            f = lambda: kc.correct_fwd(q, k, v, o, l, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                       block_m=bm, chunk=ch, num_warps=w)
            f()
            record(f"sweep correct_fwd {ph} bm={bm} chunk={ch} w={w}", shape, causal, bench(f), fwd_flops)
            dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
            f = lambda: kc.correct_bwd(q, k, v, o, l, do, bias, ev, dq, dk, dv, causal=causal, scale=scale,
                                       alpha=alpha, need_dvalues=True, block_m=bm, block_n=bm, chunk=ch, num_warps=w)
            f()
            record(f"sweep correct_bwd {ph} bm={bm} chunk={ch} w={w}", shape, causal, bench(f), 2.5 * fwd_flops)


def main():
    import memtrace.config
    memtrace.config.settings()      # the MEMTRACE_* knobs reach the kernels before the first launch
    global OUT_PATH
    OUT_PATH = sys.argv[1] if len(sys.argv) > 1 else OUT_PATH
    out_path = OUT_PATH
    quick = "--quick" in sys.argv
    guarded("bias build", bias_build)
    if "--sweeps" in sys.argv:
        guarded("sweeps", sweeps)
    run_shape(4, 16, 16, 4096, 128, causal=False)
    run_shape(4, 16, 16, 4096, 128, causal=True)
    if not quick:
        run_shape(4, 16, 16, 4096, 64, causal=False, peers=False, traces=(2048,))
        run_shape(1, 32, 8, 16384, 128, causal=True, peers=False, traces=(2048,))
    with open(out_path, "w") as fh:
        json.dump(RESULTS, fh, indent=1)
    print("wrote", out_path)


if __name__ == "__main__":
    main()
