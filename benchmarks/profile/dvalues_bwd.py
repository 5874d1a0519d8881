"""What the bias values' gradient costs the Triton backward (issue 28 point 3: with it, the dQ side
computes the exact row term D = sum_j P' dP instead of rowsum(dO * O') from the rounded output).

    python benchmarks/profile/dvalues_bwd.py [--json OUT.json] [--forms auto,fused-onehot,fused-rows]

B4 H16 T4096 D128 bf16 causal, 4096 random entries per head (65536, one per query row; values in
[0, 1), so no row can cancel), the triton backend. For each backward form (auto: what the density
picks, here the split form, dense dQ/dK/dV + correct_bwd; fused-onehot / fused-rows:
attn_bwd_split=0 with that entry epilogue) the backward alone, torch.autograd.grad over one
forward's graph (do_bench median, L2 flushed), once with the bias values requiring grad and once
without, timed back to back in each of --rounds rounds; prints the median ratio (min, max) of the
two. Needs CUDA; without it (TRITON_INTERPRET=1, --tiny) the same at a tiny fp16 shape, timed
once with perf_counter, as a smoke run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
import _harness  # noqa: E402
from bench_attention import make_trace_bias  # noqa: E402

import memtrace as mt  # noqa: E402
from memtrace import config  # noqa: E402

FORMS = {"auto": {},
         "fused-onehot": {"attn_bwd_split": "0", "attn_bwd_entries": "onehot"},
         "fused-rows": {"attn_bwd_split": "0", "attn_bwd_entries": "rows"}}


def backward_timer(q, k, v, dout, bias, causal, cuda):
    """A callable timing (ms) the backward of one forward: grads of q, k, v (and of the bias values
    when they require grad). The first call compiles and autotunes."""
    out = mt.biased_attention(q, k, v, bias, causal=causal, backend="triton")
    inputs = [q, k, v] + ([bias.value] if bias is not None and bias.value.requires_grad else [])

    def step():
        torch.autograd.grad(out, inputs, dout, retain_graph=True)

    step()
    if cuda:
        return lambda: _harness.median_ms(step, warmup=10, rep=100)

    def once():
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    return once


def path_of(bias):
    """Which backward flash_bwd takes for this bias under the current settings."""
    from memtrace.kernels.attention import config as kcfg

    from memtrace.backends.base import may_cancel
    cancel = may_cancel(bias, 1.0)
    return {"may_cancel": cancel, "split": kcfg.split_backward(bias, cancel, None),
            "entry_form": "rows" if kcfg.entry_form(bias) else "onehot"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    ap.add_argument("--traces", type=int, default=4096, help="entries per head (default 4096: 65536 in all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="B1 H2 T64 D16 fp16 (the CPU smoke run)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not (args.tiny and os.environ.get("TRITON_INTERPRET") == "1"):
        print("dvalues_bwd: no CUDA device (on the CPU: TRITON_INTERPRET=1 and --tiny)")
        return 0
    B, H, T, D, dtype = (1, 2, 64, 16, torch.float16) if args.tiny else (4, 16, 4096, 128, torch.bfloat16)
    traces = min(args.traces, T) if args.tiny else args.traces
    causal = not args.no_causal
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    fixed = make_trace_bias(H, T, traces, "random", causal, dev)
    learned = make_trace_bias(H, T, traces, "random", causal, dev)
    learned.value.requires_grad_(True)
    doc = _harness.header(shape={"B": B, "H": H, "T": T, "D": D, "dtype": str(dtype).replace("torch.", ""),
                                 "causal": causal, "entries": fixed.nnz}, rounds=args.rounds, rows=[])
    print(f"B{B} H{H} T{T} D{D} {doc['shape']['dtype']} causal={causal}, {fixed.nnz} entries; backward ms")
    for form in args.forms.split(","):
        if form not in FORMS:
            raise SystemExit(f"unknown form {form!r} (choose from {', '.join(FORMS)})")
        with config.override(**FORMS[form]):
            row = {"form": form, **path_of(fixed)}
            none = backward_timer(q, k, v, dout, None, causal, cuda)
            without = backward_timer(q, k, v, dout, fixed, causal, cuda)
            with_dval = backward_timer(q, k, v, dout, learned, causal, cuda)
            pairs = []
            for _ in range(args.rounds):
                pairs.append((without(), with_dval()))
            ratios = sorted(b / a for a, b in pairs)
            mid = sorted(pairs, key=lambda p: p[1] / p[0])[len(pairs) // 2]
            row.update(no_bias_ms=round(none(), 4), no_dvalues_ms=round(mid[0], 4), dvalues_ms=round(mid[1], 4),
                       ratio=round(ratios[len(ratios) // 2], 4), ratio_min=round(ratios[0], 4),
                       ratio_max=round(ratios[-1], 4))
        doc["rows"].append(row)
        path = "split" if row["split"] else f"fused {row['entry_form']}"
        print(f"  {form:13s} ({path:12s}) no bias {row['no_bias_ms']:8.3f}  values fixed {row['no_dvalues_ms']:8.3f}  "
              f"values learned {row['dvalues_ms']:8.3f}  ratio {row['ratio']:.3f} "
              f"({row['ratio_min']:.3f} - {row['ratio_max']:.3f})", flush=True)
    if args.json:
        _harness.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
