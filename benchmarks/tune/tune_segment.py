"""The fused capture's segment kernel alone, per config (ROWS_BLOCK, warps, stages), at H16 T4096 D128
bf16 with ~131072 edges (H100). The Triton backward fills the bound once; every timed launch gets a
fresh copy (the kernel compacts rows into it in place).

    python benchmarks/tune/tune_segment.py [OUT.json] [--configs 128,8,2:64,4,2]
"""
import json
import math
import sys

import torch
from memtrace.kernels import attention as KA
from memtrace.kernels import salience as KS

import memtrace
from memtrace import capture as C
from memtrace.capture import SalienceCapture


def launch(words, cfg, q, k, v, do, lse, glue, B, thr, scale, T, capacity):
    bits, levels = KA.capture_bound_format(B)
    KS.launch_segments(q, k, v, do, lse, words, seg=KA.CAPTURE_SEG, bits=bits, bound_limit=levels * B,
                       threshold=C._kernel_threshold(thr), qk_scale=scale * C.LOG2E, causal_offset=T, bias=None,
                       cnt=glue.cnt, capacity=capacity, out=glue.out, precision="ieee",
                       sparse_emit=memtrace.config.settings().capture_segment_emit, config=cfg)


def main(argv):
    import memtrace.config
    memtrace.config.settings()      # the MEMTRACE_* knobs reach the kernels before the first launch
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    configs = [(128, 8, 2), (128, 8, 1), (64, 4, 2), (64, 4, 1), (64, 8, 2), (128, 4, 2), (32, 4, 2)]
    if "--configs" in argv:
        configs = [tuple(int(x) for x in c.split(",")) for c in argv[argv.index("--configs") + 1].split(":")]
    H, T, D, capacity = 16, 4096, 128, 1 << 17
    dev = "cuda"
    if not torch.cuda.is_available():          # a smoke run in the Triton interpreter
        H, T, D, capacity, dev, configs = 2, 64, 16, 4096, "cpu", [(16, 4, 1)]
    rows = []
    for B in (2, 4):
        torch.manual_seed(0)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        q, k, v, do = (torch.randn(B, H, T, D, device=dev, dtype=dtype) for _ in range(4))
        scale = 1.0 / math.sqrt(D)
        out, lse = KA.flash_fwd(q, k, v, causal=False, scale=scale, alpha=1.0)
        probe = SalienceCapture(threshold=0.0, capacity=capacity)
        probe.fill(q, k, v, out, lse, do, None, None, scale=scale)
        thr = float(probe.stats["kept_min_salience"])
        words = torch.zeros(H, T // KA.CAPTURE_SEG, T, dtype=torch.int32, device=dev)
        KA.flash_bwd(q, k, v, out, lse, do, causal=False, scale=scale, alpha=1.0, need_dvalues=False,
                     capture_bound=KA.CaptureBound(words, C._bound_threshold(thr)))
        passing = float(KA.capture_bound_passing(words, B).float().mean())
        glue = C._fill_glue(q.device, capacity, True)
        args = (q, k, v, do, lse, glue, B, thr, scale, T, capacity)
        for cfg in configs:
            times = []
            for rep in range(12 if dev == "cuda" else 1):
                w = words.clone()
                glue.begin(T, T)
                if dev == "cpu":
                    launch(w, cfg, *args)
                    times.append(0.0)
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(w, cfg, *args)
                end.record()
                torch.cuda.synchronize()
                if rep >= 2:
                    times.append(start.elapsed_time(end) * 1e3)
            n = int(glue.cnt[0])
            times.sort()
            row = {"B": B, "config": list(cfg), "us": times[len(times) // 2], "edges": n, "passing": passing}
            rows.append(row)
            print(row, flush=True)
    if out_path:
        with open(out_path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
