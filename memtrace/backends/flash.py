"""The "flash" backend: PyTorch's FlashAttention-2 op (aten._scaled_dot_product_flash_attention
and its backward) for the dense part, then the standalone sparse correction."""
from __future__ import annotations

import torch

from .base import CorrectedDenseBackend, cuda_capability, last_dim_contiguous, lse_to_bht
from .torch_ops import torch_op_mismatch


class FlashBackend(CorrectedDenseBackend):
    name = "flash"
    max_head_dim = 256

    def _dense_reasons(self, call):
        for op in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"):
            bad = torch_op_mismatch(op)
            if bad:
                return [bad]
        reasons = []
        if not torch.backends.cuda.is_flash_attention_available():
            reasons.append("this torch build has no FlashAttention kernels")
        cap = cuda_capability(call.device)
        if cap < (8, 0):
            reasons.append("FlashAttention needs compute capability 8.0 or newer")
        return reasons

    def dense_forward(self, q, k, v, *, causal, scale):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], lse_to_bht(res[1], q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        # no dropout: rng state unused (shaped as the forward returns it); None = undefined
        # cum_seq_q/k (a defined one selects the varlen kernel)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            last_dim_contiguous(dout), q, k, v, last_dim_contiguous(out), lse, None, None, q.shape[2],
            k.shape[2], 0.0, causal, seed, offset, scale=scale)
        return dq, dk, dv
