"""The "triton" backend: our flash forward/backward with the sparse correction fused into their
epilogues (memtrace.kernels.attention); CUDA, or CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import torch

from .base import Backend, attention_kernels, dtype_name, interpreting, may_cancel


class TritonBackend(Backend):
    """Our flash forward/backward with the sparse correction fused into the epilogues."""

    name = "triton"

    def not_supported_reasons(self, call):
        reasons = []
        module, err = attention_kernels()
        if err:
            return [err]
        if call.device.type == "cpu":
            if not interpreting():
                reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
            elif call.dtype == torch.bfloat16:
                reasons.append("the Triton interpreter cannot do a bfloat16 tl.dot (use float16 or float32)")
        elif call.device.type != "cuda":
            reasons.append(f"needs a CUDA device, got {call.device.type}")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {dtype_name(call.dtype)} (float16, bfloat16, float32 only)")
        head_dims = tuple(module.SUPPORTED_HEAD_DIMS)
        if call.head_dim not in head_dims:
            reasons.append(f"head dim {call.head_dim} (supports {head_dims})")
        return reasons

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha):
        return attention_kernels()[0].flash_fwd(q, k, v, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                                may_cancel=may_cancel(bias, alpha))

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 capture_bound=None):
        return attention_kernels()[0].flash_bwd(q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale,
                                alpha=alpha, need_dvalues=need_dvalues, may_cancel=may_cancel(bias, alpha),
                                capture_bound=capture_bound)
