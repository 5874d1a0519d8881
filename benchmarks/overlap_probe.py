"""Does the sparse correction overlap the dense attention when it runs on a second CUDA stream?

    python benchmarks/overlap_probe.py [OUT.json]

The correction is latency-bound gathers; cuDNN's attention is tensor-core bound. If the block
scheduler can interleave them, the part of the correction that needs only q, k, v (the entry
logits and the weighted V sums) could run beside the dense kernel, leaving a short combine on the
critical path. This measures, at B4 H16 T4096 D128 bf16 (issue 7's shape), the medians of: the
dense kernel alone, the correction kernel alone (on scratch copies), both on two streams, both in
sequence; forward and backward; 2048 and 16384 random entries per head.
"""
import json
import sys

import torch
import triton
from bench_attention import make_trace_bias

import memtrace as mt
from memtrace.attention import CudnnBackend
from memtrace.kernels import correction


def median_ms(fn, reps=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main(argv):
    out_path = argv[0] if argv else None
    B, H, T, D = 4, 16, 4096, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    scale = D ** -0.5
    dense = CudnnBackend()
    out, lse = dense.dense_forward(q, k, v, causal=False, scale=scale)
    main_stream = torch.cuda.current_stream()
    rows = []
    for prio in (-1, 0):
        side = torch.cuda.Stream(priority=prio)
        for per_head in (2048, 16384):
            bias = make_trace_bias(H, T, per_head, "random", False, "cuda")
            vals = bias.entry_values().float()
            out2, lse2 = out.clone(), lse.clone()
            dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))

            def dense_fwd():
                dense.dense_forward(q, k, v, causal=False, scale=scale)

            def corr_fwd():
                correction.correct_fwd(q, k, v, out2, lse2, bias, vals, causal=False, scale=scale, alpha=1.0)

            def dense_bwd():
                dense.dense_backward(q, k, v, out, lse, dout, causal=False, scale=scale)

            def corr_bwd():
                correction.correct_bwd(q, k, v, out, lse, dout, bias, vals, dq, dk, dv, causal=False,
                                       scale=scale, alpha=1.0, need_dvalues=False)

            for phase, d_fn, c_fn in (("fwd", dense_fwd, corr_fwd), ("bwd", dense_bwd, corr_bwd)):
                def both(d_fn=d_fn, c_fn=c_fn):
                    side.wait_stream(main_stream)
                    with torch.cuda.stream(side):
                        c_fn()
                    d_fn()
                    main_stream.wait_stream(side)

                def seq(d_fn=d_fn, c_fn=c_fn):
                    d_fn()
                    c_fn()
                r = {"phase": phase, "traces": per_head, "side_priority": prio,
                     "dense_ms": median_ms(d_fn), "corr_ms": median_ms(c_fn),
                     "both_streams_ms": median_ms(both), "sequential_ms": median_ms(seq)}
                r["hidden_fraction_of_corr"] = round((r["sequential_ms"] - r["both_streams_ms"]) / r["corr_ms"], 3)
                rows.append(r)
                print(json.dumps(r), flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "memtrace": mt.__version__, "shape": [B, H, T, D], "rows": rows}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
