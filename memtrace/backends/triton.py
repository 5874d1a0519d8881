"""The "triton" backend: our flash forward/backward with the sparse correction fused into their
epilogues (memtrace.kernels.attention); CUDA, or CPU under TRITON_INTERPRET=1.

Key padding masks go to the kernels (a constexpr HAS_MASK variant of each; the unmasked kernels
are unchanged). A tensor alpha is multiplied into the entry values on the device (fold_alpha) and
every call with one may cancel (may_cancel), so nothing is read on the host.
"""
from __future__ import annotations

import torch

from .base import Backend, attention_kernels, dtype_name, fold_alpha, interpreting, may_cancel, scale_dvalues


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

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha, key_padding_mask=None):
        cancel = may_cancel(bias, alpha)
        entry_values, alpha = fold_alpha(entry_values, alpha, bias)
        return attention_kernels()[0].flash_fwd(q, k, v, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                                may_cancel=cancel, key_padding_mask=key_padding_mask)

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 capture_bound=None, key_padding_mask=None):
        cancel = may_cancel(bias, alpha)
        folded, alpha_k = fold_alpha(entry_values, alpha, bias)
        dq, dk, dv, dvalues = attention_kernels()[0].flash_bwd(
            q, k, v, out, lse, dout, bias, folded, causal=causal, scale=scale, alpha=alpha_k,
            need_dvalues=need_dvalues, may_cancel=cancel, capture_bound=capture_bound,
            key_padding_mask=key_padding_mask)
        return dq, dk, dv, scale_dvalues(dvalues, alpha)
