"""The triton backward alone, its split form with and without the key-side correction beside the
dense dQ kernel (kernels/attention.py BWD_OVERLAP), against the unbiased backward:

    python benchmarks/bwd_overlap_probe.py [OUT.json] [--traces 2048,16384] [--causal 0]

B4 H16 T4096 D128 bf16, random traces, biases that cannot cancel (so the split form is allowed).
Each variant is timed with CUDA events (median of 20 calls) in every one of 7 rounds, the variants
in turn, so that clock drift hits them alike; the JSON keeps every round. Also timed alone: the
dense dQ and dK/dV kernels' share (an unbiased backward), and correct_bwd's two launches.
"""
import argparse
import statistics

import bench_attention as ba
import torch

from memtrace.kernels import attention as ka
from memtrace.kernels import correction as kc


def event_ms(fn, reps=20):
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in times[3:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="bwd_overlap_probe.json")
    p.add_argument("--traces", default="2048,16384")
    p.add_argument("--causal", default="0")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    B, H, T, D = 4, 16, 4096, 128
    scale = D ** -0.5
    _, row = ba.probe_log(args.out, shape=[B, H, T, D])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    for causal in (bool(int(c)) for c in args.causal.split(",")):
        kw = dict(causal=causal, scale=scale, alpha=1.0)
        for per_head in (int(x) for x in args.traces.split(",")):
            bias = ba.make_trace_bias(H, T, per_head, "random", causal, "cuda")
            ev = bias.entry_values().float()
            assert float(ev.min()) >= -1.0     # cannot cancel: the split form is allowed
            out, lse = ka.flash_fwd(q, k, v, bias, ev, may_cancel=False, **kw)

            def backward(b=bias, split="1", overlap="1"):
                ka.BWD_SPLIT, ka.BWD_OVERLAP = split, overlap
                return ka.flash_bwd(q, k, v, out, lse, do, b, ev if b is not None else None, need_dvalues=True,
                                    may_cancel=False, **kw)
            dq, dk, dv, _ = backward(None)
            delta = (do.float() * out.float()).sum(-1).reshape(B * H, T).contiguous()
            variants = {
                "unbiased": lambda: backward(None),
                "split, one stream": lambda: backward(overlap="0"),
                "split, overlap": lambda: backward(overlap="1"),
                "fused epilogues": lambda: backward(split="0"),
                "correct_bwd kv": lambda: kc.correct_bwd(q, k, v, out, lse, do, bias, ev, None, dk, dv,
                                                         need_dvalues=False, delta=delta, parts="kv", **kw),
                "correct_bwd q": lambda: kc.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv,
                                                        need_dvalues=True, delta=delta, parts="q", **kw),
            }
            rounds = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    rounds[name].append(round(event_ms(fn), 4))
            ka.BWD_SPLIT, ka.BWD_OVERLAP = "auto", "auto"
            med = {name: statistics.median(r) for name, r in rounds.items()}
            base = med["unbiased"]
            for name, r in rounds.items():
                row(causal=causal, traces=per_head, variant=name, ms=round(med[name], 4), rounds=r,
                    over_unbiased=None if name.startswith("correct") or name == "unbiased"
                    else round(med[name] / base - 1, 4))
    for kern in (ka._flash_bwd_dq_kernel, ka._flash_bwd_dkdv_kernel):
        best = getattr(kern, "best_config", None)
        row(kernel=kern.fn.__name__ if hasattr(kern, "fn") else str(kern), best_config=str(best))


if __name__ == "__main__":
    main()
