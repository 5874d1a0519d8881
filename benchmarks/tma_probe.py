"""A switch of the Triton attention kernels, each setting in one process: TMA descriptors in the
dense loops (--knob TMA), the warp-specialized dense forward (--knob WS) or the backward's / the
forward's split form, an unbiased pass + correct_bwd / correct_fwd (--knob BWD_SPLIT / FWD_SPLIT), or
the split backward's key-side correction beside the dense dQ kernel (--knob BWD_OVERLAP).

    python benchmarks/tma_probe.py OUT.json [--knob TMA|WS|BWD_SPLIT|FWD_SPLIT|BWD_OVERLAP]
                                   [--passes fwd,fwd+bwd] [--causal 0,1] [--shape B,H,T,D]
                                   [--set BWD_SPLIT=1,...] [--no-peers]

--set fixes other switches for the whole run; --no-peers skips FlexAttention.

For the issue-7 shape (B4 H16 T4096 D128 bf16 by default): memtrace's triton backend forward and
forward+backward with bias=None, 2048 and 16384 random traces per head, with the switch
(kernels/attention.py TMA or WS) off ("0"), forced ("1", TMA only) and left to its default
("auto"), against FlexAttention with and without a dense bias score_mod in the same process. Medians of triton.testing.do_bench; the biased/unbiased
overheads are interleaved (bench_attention.interleaved_overhead).
"""
import argparse

import bench_attention as ba
import torch
from memtrace.kernels import attention as ka


# the settings of each switch, and an accuracy case of its own (WS needs Tk % 128 == 0)
KNOBS = {"TMA": ("0", "1", "auto"), "WS": ("0", "auto"), "BWD_SPLIT": ("0", "1"), "FWD_SPLIT": ("0", "1"),
         "BWD_OVERLAP": ("0", "1")}
CHECK_CASES = {"TMA": (), "WS": ((2, 8, 2, 1000, 1280, 128, False),), "BWD_SPLIT": (), "FWD_SPLIT": (),
               "BWD_OVERLAP": ()}


def check(row, knob):
    """The switch's settings against a float32 SDPA with the dense bias, at odd GQA shapes."""
    def apply(value):
        setattr(ka, knob, value)
    cases = ((2, 8, 2, 1000, 1237, 128, False), (2, 4, 2, 300, 517, 128, True)) + CHECK_CASES[knob]
    ba.accuracy_vs_dense(KNOBS[knob], apply, row, cases=cases)
    setattr(ka, knob, "auto")


def set_fixed(spec):
    """--set NAME=VALUE,...: module switches of kernels/attention.py held for the whole run."""
    fixed = dict(item.split("=", 1) for item in spec.split(",") if item) if spec else {}
    for name, value in fixed.items():
        if name not in KNOBS:
            raise SystemExit(f"--set: unknown switch {name!r} (one of {sorted(KNOBS)})")
        setattr(ka, name, value)
    return fixed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--causal", default="0,1")
    p.add_argument("--shape", default="4,16,4096,128")
    p.add_argument("--knob", default="TMA", choices=sorted(KNOBS))
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--set", default="", help="NAME=VALUE,... switches held fixed")
    p.add_argument("--no-peers", action="store_true")
    args = p.parse_args()
    fixed = set_fixed(args.set)
    knob, settings = args.knob, KNOBS[args.knob]
    B, H, T, D = (int(x) for x in args.shape.split(","))
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    _, row = ba.probe_log(args.out, shape=[B, H, T, D], knob=knob, fixed=fixed)

    for causal in (bool(int(c)) for c in args.causal.split(",")):
        biases = ba.probe_biases(H, T, causal, dev)
        for backward in (name == "fwd+bwd" for name in args.passes.split(",")):
            fl = ba.flops(B, H, T, D, causal, backward)
            times = {}
            for tma in settings:
                setattr(ka, knob, tma)
                for per_head, bias in biases.items():
                    ms, _ = ba.measure(lambda bias=bias: ba.memtrace_fn("triton", q, k, v, causal, bias),
                                       q, k, v, dout, backward=backward, quick=False)
                    times[(tma, per_head)] = ms
                    row(impl="triton", setting=tma, traces=per_head, causal=causal, backward=backward, ms=round(ms, 4),
                        tflops=round(fl / ms * 1e-9, 1))
                for per_head in (2048, 16384):
                    def timer(bias, backward=backward):
                        return ba.measure(lambda: ba.memtrace_fn("triton", q, k, v, causal, bias), q, k, v, dout,
                                          backward=backward, quick=True)[0]
                    med, lo, hi = ba.interleaved_overhead(lambda: timer(None), lambda ph=per_head: timer(biases[ph]))
                    row(impl="triton", setting=tma, traces=per_head, causal=causal, backward=backward,
                        interleaved_overhead=[round(med, 4), round(lo, 4), round(hi, 4)])
            setattr(ka, knob, "auto")
            for name, per_head in () if args.no_peers else (("flex", 0), ("flex_dense_bias", 2048)):
                dense = ba.dense_bias_of(biases[2048], T, causal, q.dtype) if per_head else None
                try:
                    if per_head:
                        def make(causal=causal, dense=dense):
                            return ba.peer_fn("flex_dense_bias", q, k, v, causal, dense)
                    else:
                        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                        compiled = torch.compile(flex_attention, dynamic=False)
                        bm = (create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device=dev)
                              if causal else None)

                        def make(compiled=compiled, bm=bm):
                            return lambda: compiled(q, k, v, block_mask=bm)
                    ms, _ = ba.measure(make, q, k, v, dout, backward=backward, quick=False)
                except Exception as exc:  # noqa: BLE001 - keep measuring
                    row(impl=name, causal=causal, backward=backward, error=repr(exc)[:300])
                    continue
                row(impl=name, causal=causal, backward=backward, ms=round(ms, 4), tflops=round(fl / ms * 1e-9, 1),
                    triton_2048_over_peer={t: round(ms / times[(t, 2048)], 3) for t in settings}
                    if per_head else {t: round(ms / times[(t, 0)], 3) for t in settings})
    ka.TUNE = False     # the accuracy check's odd shapes compile one config per kernel, not all
    check(row, knob)


if __name__ == "__main__":
    main()
