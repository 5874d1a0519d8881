"""Benchmark memtrace.biased_attention against its peers, in one process (issue 7, item 7).

Rows, for every shape and causal setting:
  memtrace backends (triton, cudnn, flash, flash_attn when installed, auto), with a TraceBias of
  2048 or 16384 entries per head, random or clustered (a band near the diagonal plus a few sink
  columns), and with bias=None;
  peers: SDPA flash and SDPA cuDNN without bias, FlexAttention with a score_mod reading a dense
  [H, T, T] bias, SDPA efficient and SDPA cuDNN with the dense bias as attn_mask, and eager
  attention (materialised softmax) with the dense bias.
Reports the median time (triton.testing.do_bench), TFLOP/s (4*B*Hq*T^2*D forward, 3.5x for
forward+backward, halved when causal), the ratio of each memtrace row to each peer, and the peak
memory above the inputs, the bias included. A peer that runs out of memory or is not supported is
recorded with its error and skipped.

Padding rows (--padding; instead of the rows above): the triton backend at the same shapes with a
10%-left-padded key_padding_mask against no mask (bias=None and 2048 random traces per head), each
timed alone and their ratio interleaved (fwd_mask_overhead / fwdbwd_mask_overhead in the JSON).

Usage: python benchmarks/bench_attention.py [--quick] [--shapes 0,2] [--causal both|0|1] [--json PATH] [--markdown PATH]
       python benchmarks/bench_attention.py --padding [--quick] [--shapes 0] [--causal 1] [--json PATH]
       python benchmarks/bench_attention.py --merge a.json b.json --json all.json --markdown all.md
Without CUDA it says so and times tiny shapes on the CPU (reference, and the Triton interpreter
when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import _harness
import torch

SHAPES = [  # (B, Hq, Hkv, T, D)
    (4, 16, 16, 4096, 128),
    (2, 16, 16, 8192, 128),
    (4, 16, 16, 4096, 64),
    (1, 32, 8, 16384, 128),
]
QUICK_SHAPES = [(4, 16, 16, 4096, 128)]
TRACES = [(2048, "random"), (2048, "clustered"), (16384, "random"), (16384, "clustered")]
QUICK_TRACES = [(2048, "random"), (16384, "clustered")]
REP_MS = 100   # do_bench's timing window per measurement (--rep)
SHAPE_KEYS = ("B", "Hq", "Hkv", "T", "D", "causal")   # what identifies a row's shape and causal setting
PEERS = ["sdpa_flash", "sdpa_cudnn", "flex_dense_bias", "sdpa_efficient_dense_bias", "sdpa_cudnn_dense_bias",
         "eager_dense_bias"]


# ---- inputs -------------------------------------------------------------------------------------

def make_trace_bias(num_heads, T, per_head, pattern, causal, device, seed=0):
    """A TraceBias with `per_head` entries per head. random: uniform (i, j) (j <= i when causal);
    clustered: 3/4 in a band |i - j| < 128 near the diagonal, 1/4 on 4 sink columns. Values are
    trace strengths in [0, 1)."""
    import memtrace as mt
    g = torch.Generator(device=device).manual_seed(seed)
    n = num_heads * per_head
    head = torch.arange(num_heads, device=device).repeat_interleave(per_head)
    i = torch.randint(0, T, (n,), device=device, generator=g)
    if pattern == "random":
        if causal:
            j = (torch.rand(n, device=device, generator=g) * (i + 1)).long()
        else:
            j = torch.randint(0, T, (n,), device=device, generator=g)
    elif pattern == "clustered":
        band = torch.randint(-127, 128 if not causal else 1, (n,), device=device, generator=g)
        j = (i + band).clamp(0, T - 1)
        sink = torch.rand(n, device=device, generator=g) < 0.25
        j = torch.where(sink, torch.randint(0, 4, (n,), device=device, generator=g), j)
    else:
        raise ValueError(pattern)
    value = torch.rand(n, device=device, generator=g)
    return mt.TraceBias.from_coo(head, i, j, value, num_heads=num_heads, seq_len_q=T, seq_len_k=T)


def dense_bias_of(bias, T, causal, dtype):
    """[1, H, T, T] dense bias for the peers (-inf above the diagonal when causal), built in `dtype`
    directly so no float32 temporary inflates the peers' peak memory."""
    dense = torch.zeros(bias.num_heads, T, T, dtype=dtype, device=bias.device)
    keep = (bias.q_idx < T) & (bias.k_idx < T)
    dense.index_put_((bias.head[keep], bias.q_idx[keep], bias.k_idx[keep]), bias.value[keep].detach().to(dtype),
                     accumulate=True)
    if causal:
        dense.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=dense.device).triu_(1), float("-inf"))
    return dense[None]


def flops(B, Hq, T, D, causal, backward):
    f = 4.0 * B * Hq * T * T * D
    if causal:
        f /= 2
    return f * 3.5 if backward else f


# ---- implementations ----------------------------------------------------------------------------

def _expand(t, Hq):
    return t if t.shape[1] == Hq else t.repeat_interleave(Hq // t.shape[1], dim=1)


def peer_fn(name, q, k, v, causal, dense):
    """A callable computing the peer's attention, or raise if it cannot run."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    Hq = q.shape[1]
    gqa = k.shape[1] != Hq
    if name in ("sdpa_flash", "sdpa_cudnn"):
        kind = SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def fn():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return fn
    if name in ("sdpa_efficient_dense_bias", "sdpa_cudnn_dense_bias"):
        kind = SDPBackend.EFFICIENT_ATTENTION if "efficient" in name else SDPBackend.CUDNN_ATTENTION
        kk, vv = (_expand(k, Hq), _expand(v, Hq)) if gqa else (k, v)

        def fn():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, kk, vv, attn_mask=dense)
        return fn
    if name == "flex_dense_bias":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        table = dense[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx]
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[2], k.shape[2],
                                           device=q.device)
        compiled = torch.compile(flex_attention, dynamic=False)

        def fn():
            return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
        return fn
    if name == "eager_dense_bias":
        kk, vv = _expand(k, Hq), _expand(v, Hq)
        scale = 1.0 / math.sqrt(q.shape[-1])

        def fn():
            s = torch.matmul(q, kk.transpose(-1, -2)) * scale + dense
            p = torch.softmax(s.float(), dim=-1).to(q.dtype)
            return torch.matmul(p, vv)
        return fn
    raise ValueError(name)


def memtrace_fn(backend, q, k, v, causal, bias, key_padding_mask=None):
    import memtrace as mt

    def fn():
        return mt.biased_attention(q, k, v, bias, causal=causal, backend=backend, key_padding_mask=key_padding_mask)
    return fn


def left_padding_mask(B, T, fraction, device):
    """bool [B, T], True = attend: the first round(fraction * T) keys of every row masked."""
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : round(fraction * T)] = False
    return mask


PADDING_FRACTION = 0.1
PADDING_TRACES = (None, 2048)       # bias=None, and 2048 random traces per head


def run_padding(args):
    """--padding: the triton backend with a 10%-left-padded mask vs no mask, same shapes (GPU), or
    a tiny shape on the CPU (reference; the Triton interpreter under TRITON_INTERPRET=1)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype] if cuda else torch.float32
    if cuda:
        shapes = QUICK_SHAPES if args.quick else SHAPES
        if getattr(args, "shapes", None):
            shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    else:
        shapes = [(1, 2, 2, 64, 32)]
    causals = [False, True] if getattr(args, "causal", "both") == "both" else [args.causal == "1"]
    backend = "triton" if cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"
    rows = []
    for (B, Hq, Hkv, T, D) in shapes:
        for causal in causals:
            print(f"B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} causal={causal} padding {PADDING_FRACTION:.0%} left",
                  flush=True)
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            dout = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g)
            mask = left_padding_mask(B, T, PADDING_FRACTION, device)
            common = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "causal": causal,
                      "dtype": args.dtype if cuda else "fp32"}
            f_fwd, f_bwd = flops(B, Hq, T, D, causal, False), flops(B, Hq, T, D, causal, True)
            for per_head in PADDING_TRACES:
                per_head = per_head if cuda or not per_head else 64     # the interpreter: a small bias
                bias = make_trace_bias(Hq, T, per_head, "random", causal, device) if per_head else None
                timers = {}
                for label, m in (("no mask", None), (f"left {PADDING_FRACTION:.0%} padded", mask)):
                    row = dict(common, impl=f"padding[{backend}] {label}", traces=per_head or 0, pattern="random"
                               if per_head else "")
                    try:
                        for backward in (False, True):
                            key = "fwdbwd" if backward else "fwd"
                            make = lambda m=m: memtrace_fn(backend, q, k, v, causal, bias, m)  # noqa: E731
                            if cuda:
                                ms, peak = measure(make, q, k, v, dout, backward=backward, quick=args.quick)
                                row["peak_mib"] = max(row.get("peak_mib", 0.0), peak)
                            else:
                                ms = _cpu_ms(make(), backward, dout)
                            row[f"{key}_ms"] = ms
                            row[f"{key}_tflops"] = (f_bwd if backward else f_fwd) / ms / 1e9
                        timers[label] = m
                    except Exception as exc:
                        row["error"] = error_text(exc)
                    rows.append(row)
                    print(f"  {row['impl']:<36} {per_head or 0:>6} " + (
                        f"fwd {row['fwd_ms']:.3f} ms fwd+bwd {row['fwdbwd_ms']:.3f} ms" if "fwd_ms" in row
                        else row.get("error", "")), flush=True)
                if cuda and len(timers) == 2:     # the mask's cost, no mask and the mask back to back
                    for phase, backward in (("fwd", False), ("fwdbwd", True)):
                        def timer(m, backward=backward):
                            return short_timer(memtrace_fn(backend, q, k, v, causal, bias, m), backward, dout,
                                               (q, k, v))
                        med, lo, hi = interleaved_overhead(timer(None), timer(mask))
                        rows[-1][f"{phase}_mask_overhead"] = med
                        rows[-1][f"{phase}_mask_overhead_range"] = [lo, hi]
                    print(f"    mask vs no mask, interleaved: fwd {rows[-1]['fwd_mask_overhead']:+.1%}, "
                          f"fwd+bwd {rows[-1]['fwdbwd_mask_overhead']:+.1%}", flush=True)
                bias = None
            q = k = v = dout = None
            if cuda:
                torch.cuda.empty_cache()
    return rows


def _cpu_ms(fn, backward, dout, reps=3):
    """Mean ms of fn() (or fn().backward) on the CPU, after a warm-up."""
    fn().backward(dout)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
        if backward:
            out.backward(dout)
    return (time.perf_counter() - t0) / reps * 1e3


def measure(make_fn, q, k, v, dout, *, backward, quick):
    """(median ms, peak MiB above what was allocated before make_fn) of fn() or fn().backward()."""
    with _harness.PeakMemory() as peak:
        fn = make_fn()
        if backward:
            def step():
                fn().backward(dout)
        else:
            def step():
                with torch.no_grad():
                    fn()
        step()  # compile / autotune, and the memory high-water mark
    ms = _harness.median_ms(step, warmup=10 if quick else 25, rep=40 if quick else REP_MS,
                            grad_to_none=[q, k, v] if backward else None)
    return ms, peak.mib


def short_timer(fn, backward, dout, inputs):
    """A callable returning the do_bench median (ms, short window) of fn() or fn().backward(dout):
    one side of interleaved_overhead."""
    def step():
        if backward:
            fn().backward(dout)
        else:
            with torch.no_grad():
                fn()
    return lambda: _harness.median_ms(step, warmup=5, rep=25, grad_to_none=list(inputs) if backward else None)


def interleaved_overhead(time_base, time_biased, rounds=5):
    """(median, min, max) over `rounds` of time_biased() / time_base() - 1, the two timed back to
    back in every round: drift of the clock or the machine between separate measurements (the
    same op moved 5-10% between processes) cancels in each round's ratio."""
    ratios = []
    for _ in range(rounds):
        base = time_base()
        ratios.append(time_biased() / base - 1.0)
    ratios.sort()
    return ratios[len(ratios) // 2], ratios[0], ratios[-1]


OVERHEAD_BACKENDS = ("auto", "triton")
OVERHEAD_TRACES = ((2048, "random"), (16384, "random"))


# ---- the run ------------------------------------------------------------------------------------

def error_text(exc):
    """'Type: first line of the message' for a row that could not run."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def memtrace_backends():
    from memtrace.backends import registry
    return [n for n in ("triton", "cudnn", "flash", "flash_attn") if n in registry.REGISTRY] + ["auto"]


def run_gpu(args):

    import memtrace.attention as A
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if getattr(args, "shapes", None):
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    traces = QUICK_TRACES if args.quick else TRACES
    causals = [False] if args.quick else [False, True]
    if getattr(args, "causal", "both") != "both":
        causals = [args.causal == "1"]
    rows = []
    device = torch.device("cuda")

    def record(row):
        rows.append(row)
        if args.json:  # keep what was measured even if the run is cut short
            _harness.write_json(args.json, {"benchmark": "attention", "env": environment(), "quick": args.quick,
                                            "partial": True, "rows": rows})
        if "fwd_overhead" in row or "fwdbwd_overhead" in row:
            print(f"  {row['impl']:<28} {row['traces']:>6} {row['pattern']:<9} interleaved overhead over bias=None: "
                  + " ".join(f"{ph} {row[ph + '_overhead']:+.1%}" for ph in ("fwd", "fwdbwd")
                             if ph + "_overhead" in row)
                  + "".join(f"; {ph} speed vs SDPA cuDNN without bias {row[ph + '_vs_sdpa_cudnn']:.3f}x"
                            for ph in ("fwd", "fwdbwd") if ph + "_vs_sdpa_cudnn" in row),
                  flush=True)
            return
        fwd = f"{row['fwd_ms']:.3f} ms {row['fwd_tflops']:.0f} TF/s" if row.get("fwd_ms") else "-"
        fb = f"{row['fwdbwd_ms']:.3f} ms {row['fwdbwd_tflops']:.0f} TF/s" if row.get("fwdbwd_ms") else "-"
        err = f"  [{row['error'][:90]}]" if row.get("error") else ""
        print(f"  {row['impl']:<28} {row.get('traces') or '':>6} {row.get('pattern') or '':<9} fwd {fwd:<24} "
              f"fwd+bwd {fb:<24} peak {row.get('peak_mib', 0):8.0f} MiB{err}", flush=True)

    for (B, Hq, Hkv, T, D) in shapes:
        for causal in causals:
            print(f"B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} causal={causal} {args.dtype}", flush=True)
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_(True)
            dout = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g)
            common = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "causal": causal, "dtype": args.dtype}
            f_fwd, f_bwd = flops(B, Hq, T, D, causal, False), flops(B, Hq, T, D, causal, True)

            def bench(impl, make_fn, extra):
                row = dict(common, impl=impl, **extra)
                try:
                    for backward in (False, True):
                        ms, peak = measure(make_fn, q, k, v, dout, backward=backward, quick=args.quick)
                        key = "fwdbwd" if backward else "fwd"
                        row[f"{key}_ms"] = ms
                        row[f"{key}_tflops"] = (f_bwd if backward else f_fwd) / ms / 1e9
                        row["peak_mib"] = max(row.get("peak_mib", 0.0), peak)
                except Exception as exc:  # OOM, unsupported: record and go on
                    row["error"] = error_text(exc)
                    torch.cuda.empty_cache()
                record(row)
                return row

            only = getattr(args, "only", "all")
            # memtrace without bias
            for backend in (memtrace_backends() if only != "peers" else []):
                reasons = A.backend_reasons(q, k, v, None, causal=causal).get(backend) if backend != "auto" else []
                if reasons:
                    record(dict(common, impl=f"memtrace[{backend}] no bias", error="; ".join(reasons)))
                    continue
                bench(f"memtrace[{backend}] no bias",
                      lambda backend=backend: memtrace_fn(backend, q, k, v, causal, None), {})
            # memtrace with trace biases
            for per_head, pattern in (traces if only != "peers" else []):
                for backend in memtrace_backends():
                    def make(backend=backend, per_head=per_head, pattern=pattern):
                        bias = make_trace_bias(Hq, T, per_head, pattern, causal, device)
                        return memtrace_fn(backend, q, k, v, causal, bias)
                    extra = {"traces": per_head, "pattern": pattern}
                    if backend != "auto":
                        probe = make_trace_bias(Hq, T, per_head, pattern, causal, device)
                        reasons = A.backend_reasons(q, k, v, probe, causal=causal)[backend]
                        del probe
                        if reasons:
                            record(dict(common, impl=f"memtrace[{backend}]", error="; ".join(reasons), **extra))
                            continue
                    if backend == "auto":
                        bias = make_trace_bias(Hq, T, per_head, pattern, causal, device)
                        extra["auto_choice"] = A.select_backend(q, k, v, bias, causal=causal)[0]
                        extra["bias_bytes"] = bias.nbytes
                        del bias
                    bench(f"memtrace[{backend}]", make, extra)
            # the overhead targets, measured interleaved (bias=None and the bias alternate)
            for backend in (OVERHEAD_BACKENDS if only != "peers" else ()):
                for per_head, pattern in OVERHEAD_TRACES:
                    row = dict(common, impl=f"overhead[{backend}]", traces=per_head, pattern=pattern)
                    try:
                        bias = make_trace_bias(Hq, T, per_head, pattern, causal, device)
                        for phase, backward in (("fwd", False), ("fwdbwd", True)):
                            def timer(b, backward=backward, backend=backend):
                                return short_timer(memtrace_fn(backend, q, k, v, causal, b), backward, dout, (q, k, v))
                            med, lo, hi = interleaved_overhead(timer(None), timer(bias))
                            row[f"{phase}_overhead"] = med
                            row[f"{phase}_overhead_range"] = [lo, hi]
                            if backend == "auto" and Hq == Hkv:
                                # issue 7's auto target (>= 0.9x / 0.85x SDPA cuDNN without bias),
                                # also back to back: SDPA cuDNN's time over auto's with the bias
                                peer = short_timer(peer_fn("sdpa_cudnn", q, k, v, causal, None), backward, dout,
                                                   (q, k, v))
                                med, lo, hi = interleaved_overhead(timer(bias), peer)
                                row[f"{phase}_vs_sdpa_cudnn"] = 1.0 + med
                                row[f"{phase}_vs_sdpa_cudnn_range"] = [1.0 + lo, 1.0 + hi]
                        del bias
                    except Exception as exc:
                        row["error"] = error_text(exc)
                    record(row)
            # peers: the dense bias is built inside make_fn so its memory counts in the peak
            probe_bias = make_trace_bias(Hq, T, traces[0][0], traces[0][1], causal, device)
            for peer in (PEERS if only != "memtrace" else []):
                if peer == "flex_dense_bias" and Hq * T * T >= 2**31:
                    # the compiled score_mod indexes the [H, T, T] table with 32-bit offsets: at
                    # B1 H32 T16384 (2^33 elements) it read out of bounds (illegal memory access,
                    # torch 2.11), which poisons the CUDA context for every later row
                    record(dict(common, impl=peer, traces=traces[0][0], pattern=traces[0][1],
                                error="skipped: a dense [H, T, T] bias of >= 2^31 elements overflows the "
                                      "compiled score_mod's 32-bit indexing (illegal memory access here)"))
                    continue
                if peer in ("sdpa_flash", "sdpa_cudnn"):
                    bench(peer, lambda peer=peer: peer_fn(peer, q, k, v, causal, None), {})
                else:
                    total = torch.cuda.get_device_properties(0).total_memory
                    if peer == "eager_dense_bias" and B * Hq * T * T * 6 > 0.6 * total:
                        record(dict(common, impl=peer, error="skipped: the materialised scores would not fit"))
                        continue
                    bench(peer, lambda peer=peer: peer_fn(peer, q, k, v, causal,
                                                          dense_bias_of(probe_bias, T, causal, dtype)),
                          {"traces": traces[0][0], "pattern": traces[0][1]})
            probe_bias = q = k = v = dout = None   # free them before the next shape's inputs
            torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """For every memtrace row: its TFLOP/s over each peer's of the same shape and causal setting,
    and its time over bias=None of the same backend."""
    def key(r):
        return tuple(r[n] for n in SHAPE_KEYS)
    peers = {}
    nobias = {}
    for r in rows:
        if r["impl"] in PEERS and not r.get("error"):
            peers.setdefault(key(r), {})[r["impl"]] = r
        if r["impl"].endswith(" no bias") and not r.get("error"):
            nobias[(key(r), r["impl"].split(" ")[0])] = r
    for r in rows:
        if not r["impl"].startswith("memtrace") or r.get("error"):
            continue
        ratios = {}
        for pname, p in peers.get(key(r), {}).items():
            for phase in ("fwd", "fwdbwd"):
                if p.get(f"{phase}_tflops") and r.get(f"{phase}_tflops"):
                    ratios[f"{phase}_vs_{pname}"] = r[f"{phase}_tflops"] / p[f"{phase}_tflops"]
        r["ratios"] = ratios
        base = nobias.get((key(r), r["impl"]))
        if base:
            r["overhead_vs_no_bias"] = {phase: r[f"{phase}_ms"] / base[f"{phase}_ms"] - 1.0
                                        for phase in ("fwd", "fwdbwd")
                                        if r.get(f"{phase}_ms") and base.get(f"{phase}_ms")}


def environment():
    env = _harness.header(python=sys.version.split()[0])
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def markdown(rows, env):
    """A table per shape and causal setting: time, TFLOP/s, ratios to cuDNN (no bias) and Flex +
    dense bias, overhead over bias=None, peak memory."""
    out = [(f"## Attention ({env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
           f"cuDNN {env.get('cudnn')}, {env.get('date')})"), "",
           ("TFLOP/s: 4*B*Hq*T^2*D forward, 3.5x for forward+backward, halved when causal. Ratios are TFLOP/s "
           "over the peer's in the same run. Peak: memory above the inputs, bias included."), ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["B"], r["Hq"], r["Hkv"], r["T"], r["D"], r["causal"], r["dtype"]), []).append(r)
    for (B, Hq, Hkv, T, D, causal, dtype), rs in groups.items():
        out.append(f"### B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} {'causal' if causal else 'non-causal'} {dtype}")
        out.append("")
        out.append("| impl | traces/head | pattern | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | "
                   "fwd vs cuDNN | f+b vs cuDNN | fwd vs Flex+bias | f+b vs Flex+bias | over bias=None f / f+b | "
                   "peak MiB |")
        out.append("|" + "---|" * 13)
        interleaved = [r for r in rs if r["impl"].startswith("overhead[")]
        for r in rs:
            if r in interleaved:
                continue
            if r.get("error"):
                out.append(f"| {r['impl']} | {r.get('traces', '')} | {r.get('pattern', '')} | "
                           f"{r['error'][:80].replace('|', '/')} |" + " |" * 9)
                continue
            ra = r.get("ratios", {})
            ov = r.get("overhead_vs_no_bias", {})

            def f(x, fmt="{:.2f}"):
                return fmt.format(x) if x is not None else "-"
            impl = r["impl"] + (f" -> {r['auto_choice']}" if r.get("auto_choice") else "")
            out.append(
                f"| {impl} | {r.get('traces', '')} | {r.get('pattern', '')} | {f(r.get('fwd_ms'), '{:.3f}')} | "
                f"{f(r.get('fwd_tflops'), '{:.0f}')} | {f(r.get('fwdbwd_ms'), '{:.3f}')} | "
                f"{f(r.get('fwdbwd_tflops'), '{:.0f}')} | {f(ra.get('fwd_vs_sdpa_cudnn'))} | "
                f"{f(ra.get('fwdbwd_vs_sdpa_cudnn'))} | {f(ra.get('fwd_vs_flex_dense_bias'))} | "
                f"{f(ra.get('fwdbwd_vs_flex_dense_bias'))} | "
                f"{f(ov.get('fwd'), '{:+.1%}')} / {f(ov.get('fwdbwd'), '{:+.1%}')} | "
                f"{f(r.get('peak_mib'), '{:.0f}')} |")
        out.append("")
        if interleaved:
            out.append("Overhead over bias=None of the same backend, the two timed back to back in each of 5 rounds "
                       "(median, range):")
            out.append("")
            out.append("| backend | traces/head | pattern | fwd | fwd+bwd "
                       "| speed vs SDPA cuDNN without bias, fwd / f+b |")
            out.append("|---|---|---|---|---|---|")
            for r in interleaved:
                cells = []
                for ph in ("fwd", "fwdbwd"):
                    if ph + "_overhead" in r:
                        lo, hi = r[ph + "_overhead_range"]
                        cells.append(f"{r[ph + '_overhead']:+.1%} ({lo:+.1%} .. {hi:+.1%})")
                    else:
                        cells.append(r.get("error", "-")[:60].replace("|", "/"))
                vs = " / ".join(f"{r[ph + '_vs_sdpa_cudnn']:.3f}x" for ph in ("fwd", "fwdbwd")
                                if ph + "_vs_sdpa_cudnn" in r) or "-"
                out.append(f"| {r['impl'][9:-1]} | {r['traces']} | {r['pattern']} | {cells[0]} | {cells[1]} | {vs} |")
            out.append("")
    return "\n".join(out) + "\n"


def run_cpu(args):
    """No CUDA: tiny shapes timed on the CPU (reference; Triton interpreter under TRITON_INTERPRET=1)."""
    import memtrace as mt
    import memtrace.attention as A
    print("No CUDA device: timing tiny shapes on the CPU (reference math"
          + (", Triton interpreter" if mt.config.triton_interpreter() else
             "; set TRITON_INTERPRET=1 to include the Triton interpreter") + "). These are not GPU numbers.")
    rows = []
    shapes = [(1, 2, 2, 64, 32)] if args.quick else [(1, 2, 2, 64, 32), (2, 4, 2, 128, 64)]
    for (B, Hq, Hkv, T, D) in shapes:
        for causal in (False, True):
            q = torch.randn(B, Hq, T, D, requires_grad=True)
            k = torch.randn(B, Hkv, T, D, requires_grad=True)
            v = torch.randn(B, Hkv, T, D, requires_grad=True)
            bias = make_trace_bias(Hq, T, 64, "clustered", causal, torch.device("cpu"))
            for backend in ("reference", "triton"):
                row = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, "causal": causal, "dtype": "fp32",
                       "impl": f"memtrace[{backend}]",
                           "traces": 64, "pattern": "clustered"}
                reasons = A.backend_reasons(q, k, v, bias, causal=causal)[backend]
                if reasons:
                    row["error"] = "; ".join(reasons)
                else:
                    out = mt.biased_attention(q, k, v, bias, causal=causal, backend=backend)  # warm-up
                    out.backward(torch.ones_like(out))
                    for backward in (False, True):
                        reps = 3
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            out = mt.biased_attention(q, k, v, bias, causal=causal, backend=backend)
                            if backward:
                                out.backward(torch.ones_like(out))
                        ms = (time.perf_counter() - t0) / reps * 1e3
                        row["fwdbwd_ms" if backward else "fwd_ms"] = ms
                rows.append(row)
                print(f"  B={B} Hq={Hq} T={T} D={D} causal={causal} {row['impl']:<20} "
                      + (f"fwd {row['fwd_ms']:.1f} ms  fwd+bwd {row['fwdbwd_ms']:.1f} ms" if "fwd_ms" in row
                         else f"skipped: {row['error']}"), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, two trace settings, short timing")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the environment as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write a markdown table (for BENCHMARKS.md)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated indices into SHAPES (split the matrix over several GPU calls)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench timing window in ms per measurement")
    parser.add_argument("--causal", choices=("both", "0", "1"), default="both")
    parser.add_argument("--only", choices=("all", "memtrace", "peers"), default="all",
                        help="measure only memtrace's rows or only the peers' (to finish a part cut short)")
    parser.add_argument("--padding", action="store_true",
                        help="only the padding rows: triton with a 10%%-left-padded key_padding_mask vs no mask")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no run: join the rows of earlier (split) runs, recompute ratios, write --json/--markdown")
    args = parser.parse_args(argv)
    global REP_MS
    REP_MS = args.rep
    if args.merge:
        docs = []
        for path in args.merge:
            with open(path) as fh:
                docs.append(json.load(fh))
        rows = [r for d in docs for r in d["rows"]]
        add_ratios(rows)
        result = {"benchmark": "attention", "env": docs[0]["env"], "quick": False, "rows": rows,
                  "merged_from": [d["env"].get("date") for d in docs],
                  # which run each shape's rows come from (their env: device, versions, date)
                  "parts": [{"file": os.path.basename(path), "env": d["env"],
                             "shapes": sorted({tuple(r[n] for n in SHAPE_KEYS) for r in d["rows"]})}
                            for path, d in zip(args.merge, docs)]}
        if args.json:
            _harness.write_json(args.json, result)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(markdown(rows, docs[0]["env"]))
        return result
    env = environment()
    if args.padding:
        rows = run_padding(args)
    else:
        rows = run_gpu(args) if torch.cuda.is_available() else run_cpu(args)
    result = {"benchmark": "attention", "env": env, "quick": args.quick, "rows": rows}
    if args.json:
        _harness.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(rows, env) if torch.cuda.is_available() else
                     "CPU timings only (no CUDA device); see the JSON.\n")
        print(f"wrote {args.markdown}")
    return result


if __name__ == "__main__":
    main()
