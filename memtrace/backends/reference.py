"""The "reference" backend: dense PyTorch math (allocates Tq x Tk); the fallback on CPU, and the
only backend whose backward differentiates again (create_graph)."""
from __future__ import annotations

import torch

from .base import Backend


class ReferenceBackend(Backend):
    """Dense PyTorch math in float32 (float64 for float64 inputs); allocates Tq x Tk."""

    name = "reference"

    def not_supported_reasons(self, call):
        return []

    @staticmethod
    def _compute_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def _dense(bias, entry_values, Tq, Tk, dtype):
        """[H, Tq, Tk] of the entries inside (Tq, Tk) (duplicates add)."""
        h, i, j, keep = ReferenceBackend._coords(bias, Tq, Tk)
        flat = torch.where(keep, (h * Tq + i) * Tk + j, torch.zeros_like(h))
        values = torch.where(keep, entry_values.to(dtype), torch.zeros((), dtype=dtype, device=h.device))
        dense = torch.zeros(bias.num_heads * Tq * Tk, dtype=dtype, device=h.device)
        return dense.index_add(0, flat, values).view(bias.num_heads, Tq, Tk)

    @staticmethod
    def _coords(bias, Tq, Tk):
        h, i, j = bias.entry_coords()
        return h, i, j, (i < Tq) & (j < Tk)

    def _probs(self, q, k, bias, entry_values, causal, scale, alpha, key_padding_mask=None):
        """(P [B, Hq, Tq, Tk], lse [B, Hq, Tq]) in the compute dtype; P = 0 on masked edges (causal or
        key padding). alpha: a float or a 0-d tensor (used as a tensor, never read on the host)."""
        from ..reference.attention import logits_of
        dtype = self._compute_dtype(q.dtype)
        dense = None
        if bias is not None and bias.nnz > 0:
            dense = self._dense(bias, entry_values, q.shape[2], k.shape[2], dtype)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(dtype)
        logits = logits_of(q.to(dtype), k.to(dtype), dense, causal=causal, scale=scale, alpha=alpha,
                           key_padding_mask=key_padding_mask)
        lse = torch.logsumexp(logits, dim=-1)
        # only fully masked rows (lse = -inf) become 0; a NaN (a bias value written past the
        # version counter, see base.bias_range) stays NaN, as in the kernels
        masked = lse == float("-inf")
        probs = torch.exp(logits - torch.where(masked, torch.zeros_like(lse), lse)[..., None])
        return torch.where(masked[..., None], torch.zeros_like(probs), probs), lse

    @staticmethod
    def _group_sum(t, kv_heads):
        """[B, Hq, ...] -> [B, Hkv, ...]: sum over the query heads that share a kv head."""
        B, Hq = t.shape[:2]
        return t.reshape(B, kv_heads, Hq // kv_heads, *t.shape[2:]).sum(dim=2)

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha, key_padding_mask=None):
        from ..reference.attention import _expand_kv
        probs, lse = self._probs(q, k, bias, entry_values, causal, scale, alpha, key_padding_mask)
        out = torch.matmul(probs, _expand_kv(v.to(probs.dtype), q.shape[1]))
        return out.to(q.dtype), lse.float()

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 key_padding_mask=None):
        # Written out (not autograd): the custom op runs below the autograd dispatch key.
        #   dP = dO V^T, D = rowsum(dO * O), dS = P (dP - D); dQ = scale dS K, dK = scale dS^T Q,
        #   dV = P^T dO, d value_e = alpha * sum_b dS[b, h_e, i_e, j_e]
        from ..reference.attention import _expand_kv
        dtype = self._compute_dtype(q.dtype)
        Hq, Hkv = q.shape[1], k.shape[1]
        probs, _ = self._probs(q, k, bias, entry_values, causal, scale, alpha, key_padding_mask)
        qc, kc, vc, do = q.to(dtype), _expand_kv(k.to(dtype), Hq), _expand_kv(v.to(dtype), Hq), dout.to(dtype)
        out_c = torch.matmul(probs, vc)
        dprobs = torch.matmul(do, vc.transpose(-1, -2))
        delta = (do * out_c).sum(dim=-1, keepdim=True)
        dlogits = probs * (dprobs - delta)
        dq = scale * torch.matmul(dlogits, kc)
        dk = self._group_sum(scale * torch.matmul(dlogits.transpose(-1, -2), qc), Hkv)
        dv = self._group_sum(torch.matmul(probs.transpose(-1, -2), do), Hkv)
        dvalues = None
        if need_dvalues and entry_values is not None:
            Tq, Tk = q.shape[2], k.shape[2]
            h, i, j, keep = self._coords(bias, Tq, Tk)
            dbias = (alpha.to(dtype) if isinstance(alpha, torch.Tensor) else alpha) * dlogits.sum(dim=0).reshape(-1)
            flat = torch.where(keep, (h * Tq + i) * Tk + j, torch.zeros_like(h))
            dvalues = torch.where(keep, dbias[flat], torch.zeros((), dtype=dtype, device=h.device))
            dvalues = dvalues.to(entry_values.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dvalues
