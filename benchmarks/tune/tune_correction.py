"""Block / chunk / warps / register-cap sweep of the standalone correction kernels (issue 7's
shape B4 H16 T4096 D128 bf16, non-causal, random traces), after cuDNN's forward:

    python benchmarks/tune/tune_correction.py [OUT.json] [--fwd 64/32/4,64/32/4/168,...] [--bwd 16/16/2,...]
                                         [--traces 2048,16384]   (traces per head, T = 4096)

A config is BLOCK_M/CHUNK/num_warps[/maxnreg][/sN]; sN (forward only) runs the entry loop as the
plain loop Triton pipelines over N stages (STAGES=N), without it the hand-carried loop; a leading
w (e.g. w64/16/4/168) runs the window form (programs own windows of BLOCK_M entries; in the
backward the query-side launch only, ww both launches);
a trailing /r runs the grid in reverse (last (b, h) first), /f forward. "after_dense_us" is the
time of cuDNN's forward followed by the correction, less cuDNN's forward alone. Each forward config's output is
compared with the
first one's (a kernel that spills wrongly or drops a chunk shows up as a difference), and the
empty launch of the cancelling-row recompute (may_cancel=True on biases that cannot cancel) is
timed separately. Times are do_bench medians in microseconds.
"""
import json
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
from bench_attention import make_trace_bias
from memtrace.kernels import attention as kc

from memtrace.backends.cudnn import CudnnBackend

FWD = "64/32/4,64/32/4/168,64/16/4,64/16/4/128,32/32/4,32/32/4/128,32/16/4,32/16/4/128,64/32/8,128/32/8"
BWD = "16/16/2,16/16/4,32/16/4,16/32/4"


def us(fn):
    return 1000 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def after_dense_us(dense_fn, corr_fn, iters=60):
    """Median over iterations of the GPU time of corr_fn(*dense_fn()) alone, timed by events
    around it right after the dense pass (so its launch waits in the queue behind the dense
    kernel, and it meets the L2 state that pass left)."""
    times = []
    for it in range(iters + 5):
        o, l = dense_fn()
        e1, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e1.record()
        corr_fn(o, l)
        e2.record()
        if it >= 5:
            times.append((e1, e2))
    torch.cuda.synchronize()
    return 1000 * statistics.median(a.elapsed_time(b) for a, b in times)


def main(argv):
    import memtrace.config
    memtrace.config.settings()      # the MEMTRACE_* knobs reach the kernels before the first launch
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    fwd_cfgs = (argv[argv.index("--fwd") + 1] if "--fwd" in argv else FWD).split(",")
    bwd_cfgs = (argv[argv.index("--bwd") + 1] if "--bwd" in argv else BWD).split(",")
    bwd_cfgs = [] if bwd_cfgs == ["none"] else bwd_cfgs
    densities = [int(x) for x in (argv[argv.index("--traces") + 1] if "--traces" in argv else "2048,16384").split(",")]
    B, H, T, D = 4, 16, 4096, 128
    scale = D ** -0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    dense = CudnnBackend()
    out0, lse0 = dense.dense_forward(q, k, v, causal=False, scale=scale)
    rows = [{"what": "cudnn fwd", "us": us(lambda: dense.dense_forward(q, k, v, causal=False, scale=scale))}]
    print(rows[-1], flush=True)
    for per_head in densities:
        bias = make_trace_bias(H, T, per_head, "random", False, "cuda")
        ev = bias.entry_values().float()
        ref = None
        for cfg in fwd_cfgs:
            parts = cfg.split("/")
            reverse = {"r": True, "f": False}.get(parts[-1])
            parts = parts[:-1] if reverse is not None else parts
            stages = int(parts.pop()[1:]) if parts[-1].startswith("s") else 0
            form = "window" if parts[0].startswith("w") else "rows"
            bm, ch, w, *mr = (int(x.lstrip("w")) for x in parts)
            opts = {"block_m": bm, "chunk": ch, "num_warps": w, "maxnreg": mr[0] if mr else None, "stages": stages,
                    "form": form, "reverse": reverse}
            o1, l1 = kc.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=False, scale=scale, alpha=1.0,
                                    inplace=False, may_cancel=False, **opts)
            if ref is None:
                ref = (o1.float(), l1)
            diff = max((o1.float() - ref[0]).abs().max().item(), (l1 - ref[1]).abs().max().item())
            o, l = out0.clone(), lse0.clone()
            t = us(lambda: kc.correct_fwd(q, k, v, o, l, bias, ev, causal=False, scale=scale, alpha=1.0,
                                          may_cancel=False, **opts))
            # after the dense pass, as the backends run it: what the dense pass left in L2 counts
            t_pair = after_dense_us(
                lambda: dense.dense_forward(q, k, v, causal=False, scale=scale),
                lambda o2, l2: kc.correct_fwd(q, k, v, o2, l2, bias, ev, causal=False, scale=scale, alpha=1.0,
                                              may_cancel=False, **opts))
            rows.append({"what": "correct_fwd", "traces": per_head, "cfg": cfg, "us": round(t, 1),
                         "after_dense_us": round(t_pair, 1), "max_diff_vs_first": diff})
            print(rows[-1], flush=True)
        o, l = out0.clone(), lse0.clone()
        t_with = us(lambda: kc.correct_fwd(q, k, v, o, l, bias, ev, causal=False, scale=scale, alpha=1.0))
        rows.append({"what": "correct_fwd default with may_cancel=True (recompute launch, nothing flagged)",
                     "traces": per_head, "us": round(t_with, 1)})
        print(rows[-1], flush=True)
        o1, l1 = kc.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=False, scale=scale, alpha=1.0, inplace=False)
        ref_b = None
        for cfg in bwd_cfgs:
            # wW/...: the query-side launch by windows of W entries (q_warps = the warps given), the
            # key side by blocks; wwW/...: both sides by windows; otherwise both by blocks
            window = 2 if cfg.startswith("ww") else int(cfg.startswith("w"))
            bm, ch, w, *mr = (int(x) for x in cfg.lstrip("w").split("/"))
            opts = {"chunk": ch, "maxnreg": mr[0] if mr else None, "kv_form": "window" if window == 2 else "rows"}
            if window:
                opts.update(q_form="window", q_window=bm, q_warps=w, kv_window=bm)
            else:
                opts.update(q_form="rows", block_m=bm, block_n=bm, num_warps=w)
            dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
            got = kc.correct_bwd(q, k, v, o1, l1, do, bias, ev, dq, dk, dv, causal=False, scale=scale, alpha=1.0,
                                 need_dvalues=True, **opts)
            got = [x.float().clone() for x in got]
            ref_b = ref_b or got
            diff = max((a - r).abs().max().item() for a, r in zip(got, ref_b))
            t = us(lambda: kc.correct_bwd(q, k, v, o1, l1, do, bias, ev, dq, dk, dv, causal=False, scale=scale,
                                          alpha=1.0, need_dvalues=True, **opts))
            rows.append({"what": "correct_bwd", "traces": per_head, "cfg": cfg, "us": round(t, 1),
                         "max_diff_vs_first": diff})
            print(rows[-1], flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": [B, H, T, D], "rows": rows}
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
