"""The "cudnn" backend: aten._scaled_dot_product_cudnn_attention(+_backward) for the dense part,
then the standalone sparse correction (CorrectedDenseBackend)."""
from __future__ import annotations

import torch

from .base import CorrectedDenseBackend, cuda_capability, last_dim_contiguous, like, lse_to_bht
from .torch_ops import torch_op_mismatch


class CudnnBackend(CorrectedDenseBackend):
    name = "cudnn"
    _lse_rank = {}   # what the forward op returned (3 or 4 dims), so the backward can feed it back

    def _dense_reasons(self, call):
        reasons = []
        for op in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"):
            bad = torch_op_mismatch(op)
            if bad:
                return [bad]
        if not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available in this torch build")
        elif torch.backends.cudnn.version() is not None and torch.backends.cudnn.version() < 90000:
            reasons.append(f"cuDNN {torch.backends.cudnn.version()} is older than 9.0")
        if cuda_capability(call.device) < (8, 0):
            reasons.append("cuDNN attention needs compute capability 8.0 or newer")
        if call.seq_len_k == 1:
            reasons.append("cuDNN attention does not take seq_len_k == 1")
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            reasons.append("cuDNN attention is not deterministic (torch.use_deterministic_algorithms is on)")
        return reasons

    def dense_forward(self, q, k, v, *, causal, scale):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)
        out, lse = res[0], res[1]
        CudnnBackend._lse_rank[q.device.index] = lse.dim()
        return out, lse_to_bht(lse, q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        B, H, Tq, _ = q.shape
        if CudnnBackend._lse_rank.get(q.device.index, 4) == 4:
            lse = lse.reshape(B, H, Tq, 1)
        # cuDNN's backward wants dO in O's layout
        out = out if out.stride() == q.stride() else like(q, out)
        dout = dout if dout.stride() == out.stride() else like(out, dout)
        # no dropout: the seed/offset are never read (the forward returns 0-d int64 tensors); None
        # passes an undefined tensor for attn_bias and cum_seq_q/k (a defined one means "nested")
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        offset = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, None, None, Tq, k.shape[2], 0.0, causal, scale=scale)
        return dq, dk, dv
