"""CMS memory (issue 26, SPEC 13): CMSMemory forward+backward with the Triton scan
(kernels/cms.py) against the eager PyTorch loop of the same math (backend="torch"), in one process.

Workload (default): B 32, T 1024, d_model 256, d_key 64, levels (64, 64, 0.1), (256, 128, 0.05),
(1024, 256, 0.01) (the seed's suggested sizes), content addressing, fp32. --quick: B 4, T 128.
Without CUDA it runs tiny sizes on the CPU (the Triton kernels under TRITON_INTERPRET=1, set here
before import) to check that the script works; those times mean nothing.

Reported per backend: median ms of forward+backward (and forward alone), peak memory (CUDA), the
scans' FLOPs and HBM bytes from kernels/cms.py's scan_counts (the bytes-moved bound of the module
docstring) as TFLOP/s and GB/s against the H100 SXM's peaks (67 TFLOP/s fp32 non-tensor, 3.35 TB/s),
the time the bound allows (bytes / 3.35 TB/s) and the measured / bound ratio, and the speedup over
the eager loop (issue 26 asks >= 20x and within 2x of the bound).

StatefulRouter (SPEC 14) as an MoE gate: 16384 tokens, d_model 1024, bf16, 8 / 16 / 32 / 64 units,
top-2, forward with its state update (alpha, beta, gamma all on), against a plain linear top-k gate
(x @ W^T, top-k, softmax over the selected) in the same process; issue 26 asks <= 1.1x.

Usage: python benchmarks/bench_cms.py [--quick] [--batch B] [--steps T] [--modes content,lru]
       [--no-eager] [--no-router] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
from memtrace.kernels.cms import scan_counts  # noqa: E402
from memtrace.kernels.router import route_counts  # noqa: E402

import memtrace as mt  # noqa: E402

H100_FP32_TFLOPS = 67.0
H100_HBM_TBS = 3.35
SEED_LEVELS = [(64, 64, 0.1), (256, 128, 0.05), (1024, 256, 0.01)]
TINY_LEVELS = [(4, 8, 0.1), (8, 8, 0.05)]


def _time_ms(fn, cuda, reps=3):
    if cuda:
        return _harness.median_ms(fn, warmup=2, rep=reps * 100)
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def run_case(backend, mode, B, T, levels, d_model, d_key, device):
    torch.manual_seed(0)
    m = mt.nn.CMSMemory(d_model, levels, d_key, mode, backend=backend).to(device)
    x = torch.randn(B, T, d_model, device=device, requires_grad=True)

    def fwd():
        with torch.no_grad():
            m(x)

    def fwd_bwd():
        out, _ = m(x)
        out.sum().backward()

    cuda = device == "cuda"
    row = {"backend": backend, "mode": mode, "fwd_ms": _time_ms(fwd, cuda), "fwd_bwd_ms": _time_ms(fwd_bwd, cuda)}
    if cuda:
        with _harness.PeakMemory() as pm:
            fwd_bwd()
        row["peak_mib"] = pm.mib
    return row


def router_rows(device, tokens, d_model, dtype, units_list=(8, 16, 32, 64), k=2):
    """Stateful router against a linear top-k gate, per unit count: median ms of a forward (the
    router's includes its state update), the ratio, and the fused route's HBM bound (kernels/router.py:
    x read once, indices and weights written)."""
    rows = []
    cuda = device == "cuda"
    for units in units_list:
        torch.manual_seed(0)
        x = torch.randn(tokens, d_model, device=device, dtype=dtype)
        router = mt.nn.StatefulRouter(d_model, units, k, alpha=1.0, beta=0.5, gamma=0.1, device=device, dtype=dtype)
        weight = router.units.detach().clone()

        def linear_gate():
            logits = x @ weight.T
            idx = torch.topk(logits, k, dim=-1).indices
            return torch.softmax(logits.gather(1, idx), dim=-1), idx

        def stateful():
            with torch.no_grad():
                return router(x)

        gate_ms, router_ms = _time_ms(linear_gate, cuda), _time_ms(stateful, cuda)
        bound_ms = route_counts(tokens, d_model, units, k, x.element_size())["bytes"] / (H100_HBM_TBS * 1e12) * 1e3
        rows.append({"units": units, "k": k, "tokens": tokens, "d_model": d_model, "linear_gate_ms": gate_ms,
                     "stateful_ms": router_ms, "ratio": router_ms / gate_ms, "route_bound_ms": bound_ms,
                     "over_bound": router_ms / bound_ms})
        print(f"router units={units}: linear top-{k} gate {gate_ms:.4f} ms, stateful {router_ms:.4f} ms, "
              f"ratio {router_ms / gate_ms:.2f}x, HBM bound {bound_ms:.4f} ms")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B 4, T 128")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--modes", default="content", help="comma-separated addressing modes")
    p.add_argument("--no-eager", action="store_true", help="skip the eager PyTorch loop (slow at full size)")
    p.add_argument("--no-router", action="store_true", help="skip the StatefulRouter rows")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        B, T = (4, 128) if args.quick else (32, 1024)
        levels, d_model, d_key = SEED_LEVELS, 256, 64
    else:
        B, T, levels, d_model, d_key = 2, 6, TINY_LEVELS, 8, 4
        print("no CUDA: tiny sizes on the CPU (Triton interpreter); the times mean nothing")
    B, T = args.batch or B, args.steps or T
    counts = [scan_counts(B, T, n, d, d_key) for n, d, _ in levels]
    flops = sum(c["flops_fwd"] + c["flops_bwd"] for c in counts)
    nbytes = sum(c["bytes_fwd"] + c["bytes_bwd"] for c in counts)
    bound_ms = nbytes / (H100_HBM_TBS * 1e12) * 1e3
    rows = []
    for mode in args.modes.split(","):
        for backend in ("triton",) + (() if args.no_eager else ("torch",)):
            row = run_case(backend, mode, B, T, levels, d_model, d_key, device)
            if backend == "triton":
                s = row["fwd_bwd_ms"] / 1e3
                row.update(scan_tflops=flops / s / 1e12, scan_gbs=nbytes / s / 1e9, bound_ms=bound_ms,
                           over_bound=row["fwd_bwd_ms"] / bound_ms,
                           tflops_of_peak=flops / s / 1e12 / H100_FP32_TFLOPS,
                           gbs_of_peak=nbytes / s / 1e12 / H100_HBM_TBS)
            rows.append(row)
            print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        eager = [r for r in rows if r["mode"] == mode and r["backend"] == "torch"]
        tri = [r for r in rows if r["mode"] == mode and r["backend"] == "triton"]
        if eager and tri:
            tri[0]["speedup_over_eager_fwd_bwd"] = eager[0]["fwd_bwd_ms"] / tri[0]["fwd_bwd_ms"]
            print(f"  {mode}: speedup over the eager loop {eager[0]['fwd_bwd_ms'] / tri[0]['fwd_bwd_ms']:.2f}x "
                  f"(forward+backward)")
    router = []
    if not args.no_router:
        router = (router_rows(device, 16384, 1024, torch.bfloat16) if cuda
                  else router_rows(device, 64, 16, torch.float32, units_list=(8,)))
    doc = _harness.header(workload={"B": B, "T": T, "levels": levels, "d_model": d_model, "d_key": d_key},
                          scan_flops=flops, scan_bytes=nbytes, rows=rows, router=router)
    if args.json:
        _harness.write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
