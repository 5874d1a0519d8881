"""Where the capture kernel's time goes (H100): fill time by batch size and threshold regime.

    python benchmarks/tune_capture.py [OUT.json] [--sparse-emit N,N] [--config BM,BN,WARPS,STAGES,SPLIT ...]

For H16 T4096 D128 bf16 and B in 1, 2, 4: the fill with threshold 3e38 (no candidate: dots,
exponentials, the per-tile reductions, no emission), with the threshold that keeps ~capacity
candidates (about 4 per 128x64 tile: nearly every tile emits), and the time per extra batch
element. Times are triton.testing.do_bench medians.
"""
import json
import math
import sys

import torch
import triton

from memtrace import capture as capture_mod
from memtrace.capture import SalienceCapture


def _filler(cap, q, k, v, out, lse, do, scale):
    return lambda: cap._fill(q, k, v, out, lse, do, None, None, scale=scale)


def main(argv):
    out_path = argv[0] if argv and not argv[0].startswith("--") else None
    configs = [None]
    if "--config" in argv:
        configs = [tuple(int(x) for x in c.split(",")) for c in argv[argv.index("--config") + 1:]]
    emits = [capture_mod._SPARSE_EMIT]
    if "--sparse-emit" in argv:
        emits = [int(x) for x in argv[argv.index("--sparse-emit") + 1].split(",")]
    H, T, D, cap_size = 16, 4096, 128, 1 << 17
    rows = []
    for B in (1, 2, 4):
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        scale = 1.0 / math.sqrt(D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        probe = SalienceCapture(threshold=0.0, capacity=cap_size)
        probe._fill(q, k, v, out, lse, do, None, None, scale=scale)
        thr = float(probe.stats["kept_min_salience"])
        for cfg, emit in [(c, e) for c in configs for e in emits]:
            capture_mod._CONFIG_OVERRIDE = cfg
            capture_mod._SPARSE_EMIT = emit
            row = {"B": B, "config": str(cfg or capture_mod._config(D, q.device)), "sparse_emit": emit}
            for name, t in (("no_candidates", 3e38), ("sparse_candidates", thr)):
                cap = SalienceCapture(threshold=t, capacity=cap_size)
                fn = _filler(cap, q, k, v, out, lse, do, scale)
                fn()
                row[name + "_ms"] = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                row[name + "_candidates"] = int(cap.stats["num_candidates"])
            row["matmul_tflops_no_candidates"] = 4 * B * H * T * T * D / row["no_candidates_ms"] * 1e-9
            rows.append(row)
            print(json.dumps(row), flush=True)
        capture_mod._CONFIG_OVERRIDE = None
    if out_path:
        with open(out_path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
