"""Where the trace bias's cost goes in biased attention (issue 7's overhead targets), kernel by
kernel (torch.profiler), on the issue's shape B4 H16 T4096 D128 bf16, non-causal.

    python benchmarks/profile/profile_attention.py [OUT.json] [--quick] [--backends cudnn,triton]

For the cudnn and triton backends, bias=None and TraceBias of 2048 / 16384 random entries per
head, forward and forward+backward: the GPU time of every kernel, their sum, and the bytes the
correction has to gather (k_j and v_j for every entry and batch element), so the overhead over
bias=None can be read against a memory floor.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the suites
from bench_attention import make_trace_bias
from profile_capture import kernel_times

import memtrace as mt


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    B, H, T, D = (1, 4, 1024, 64) if "--quick" in argv else (4, 16, 4096, 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    rows = []
    backends = ("cudnn", "triton")
    if "--backends" in argv:
        backends = tuple(argv[argv.index("--backends") + 1].split(","))
    for backend in backends:
        for per_head in (0, 2048, 16384):
            bias = make_trace_bias(H, T, per_head, "random", False, "cuda") if per_head else None
            for phase in ("fwd", "fwdbwd"):
                def step(bias=bias, phase=phase, backend=backend):
                    if phase == "fwd":
                        with torch.no_grad():
                            mt.biased_attention(q, k, v, bias, backend=backend)
                    else:
                        q.grad = k.grad = v.grad = None
                        mt.biased_attention(q, k, v, bias, backend=backend).backward(dout)
                times = kernel_times(step, reps=10)
                # gradient zeroing and the like are not attention: keep them listed, out of the sum
                attention = {n: t for n, t in times.items() if "elementwise" not in n and "Memset" not in n
                             and "fill" not in n.lower()}
                passes = 1 if phase == "fwd" else 3      # forward, then the backward's dQ and dK/dV passes
                gather_mib = B * H * per_head * 2 * D * q.element_size() * passes / 2**20
                rows.append({"backend": backend, "traces": per_head, "phase": phase, "kernels_us": times,
                             "attention_sum_us": round(sum(attention.values()), 1),
                             "entry_gather_mib": round(gather_mib, 1)})
                top = ", ".join(f"{n[:38]} {t:.0f}" for n, t in times.items())
                print(f"{backend:7s} {per_head:6d} {phase:7s} sum {rows[-1]['attention_sum_us']:8.1f} us  "
                      f"gathers {gather_mib:6.0f} MiB  {top}", flush=True)
    base = {(r["backend"], r["phase"]): r["attention_sum_us"] for r in rows if r["traces"] == 0}
    for r in rows:
        r["overhead_over_none"] = round(r["attention_sum_us"] / base[(r["backend"], r["phase"])] - 1, 4)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "shape": {"B": B, "H": H, "T": T, "D": D, "dtype": "bf16", "causal": False}, "rows": rows}
    if out_path:
        with open(out_path, "w") as fh:
            json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("profile_attention: no CUDA device")
        sys.exit(0)
    main(sys.argv[1:])
