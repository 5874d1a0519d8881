"""One fill of the capture (B H16 T4096 D128 bf16) for Nsight Compute:
    ncu --kernel-name regex:_salience_stream --launch-skip 1 --launch-count 1 \
        python benchmarks/profile/ncu_capture.py [B] [none]
'none': a threshold no edge passes (the cost without emission); default: ~capacity candidates."""
import math
import sys

import torch

from memtrace.capture import SalienceCapture

B, H, T, D = int(sys.argv[1]) if len(sys.argv) > 1 else 2, 16, 4096, 128
torch.manual_seed(0)
q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
scale = 1.0 / math.sqrt(D)
out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
probe = SalienceCapture(threshold=0.0, capacity=1 << 17)
probe.fill(q, k, v, out, lse, do, None, None, scale=scale)
thr = 3e38 if "none" in sys.argv[2:] else float(probe.stats["kept_min_salience"])
cap = SalienceCapture(threshold=thr, capacity=1 << 17)
cap.fill(q, k, v, out, lse, do, None, None, scale=scale)
torch.cuda.synchronize()
