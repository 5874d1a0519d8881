"""Biased attention, written the obvious dense way (SPEC 2).

    logits[b, h, i, j] = scale * q[b, h, i] . k[b, h // (Hq/Hkv), j] + alpha * bias[h, i, j]
    causal: key j is masked when j > i + (Tk - Tq)  (bottom-right aligned)
    key_padding_mask [B, Tk] bool (True = attend): key j of batch b is masked where it is False
    out = softmax(logits) @ v ; a fully masked row gives out = 0 and lse = -inf

Computes in the inputs' dtype: pass float64 tensors for the oracle. Differentiable w.r.t. q, k,
v and the dense bias through plain autograd.
"""
from __future__ import annotations

import math

import torch

__all__ = ["attention", "attention_with_lse", "causal_mask", "dense_bias"]


def dense_bias(head, q_idx, k_idx, value, num_heads, seq_len_q, seq_len_k, dtype=torch.float64):
    """[H, Tq, Tk] bias from COO entries; duplicates add; entries outside (Tq, Tk) are dropped."""
    keep = (q_idx < seq_len_q) & (k_idx < seq_len_k)
    flat = (head[keep] * seq_len_q + q_idx[keep]) * seq_len_k + k_idx[keep]
    out = torch.zeros(num_heads * seq_len_q * seq_len_k, dtype=dtype, device=value.device)
    out = out.index_add(0, flat, value[keep].to(dtype))
    return out.view(num_heads, seq_len_q, seq_len_k)


def causal_mask(seq_len_q, seq_len_k, device=None):
    """[Tq, Tk] bool, True where key j is visible to query i (j <= i + Tk - Tq)."""
    i = torch.arange(seq_len_q, device=device)[:, None]
    j = torch.arange(seq_len_k, device=device)[None, :]
    return j <= i + (seq_len_k - seq_len_q)


def _expand_kv(t, num_q_heads):
    """[B, Hkv, T, D] -> [B, Hq, T, D]: each kv head serves Hq/Hkv consecutive query heads."""
    return t.repeat_interleave(num_q_heads // t.shape[1], dim=1)


def logits_of(q, k, bias=None, *, causal=False, scale=None, alpha=1.0, key_padding_mask=None):
    """Masked logits [B, Hq, Tq, Tk] (masked entries are -inf, whatever the bias there).
    alpha: a float or a 0-d tensor."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    logits = scale * torch.matmul(q, _expand_kv(k, Hq).transpose(-1, -2))
    if bias is not None:
        logits = logits + alpha * bias[:, :Tq, :Tk].to(logits.dtype)
    if causal:
        logits = logits.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    return logits


def attention_with_lse(q, k, v, bias=None, *, causal=False, scale=None, alpha=1.0, key_padding_mask=None):
    """(out [B, Hq, Tq, D], lse [B, Hq, Tq]) of biased attention; bias is dense [Hq, >=Tq, >=Tk]."""
    logits = logits_of(q, k, bias, causal=causal, scale=scale, alpha=alpha, key_padding_mask=key_padding_mask)
    lse = torch.logsumexp(logits, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    probs = torch.where(finite[..., None], probs, torch.zeros_like(probs))
    out = torch.matmul(probs, _expand_kv(v, q.shape[1]))
    return out, lse


def attention(q, k, v, bias=None, *, causal=False, scale=None, alpha=1.0, key_padding_mask=None):
    """Biased attention output [B, Hq, Tq, D]."""
    return attention_with_lse(q, k, v, bias, causal=causal, scale=scale, alpha=alpha,
                              key_padding_mask=key_padding_mask)[0]


def probabilities(q, k, bias=None, *, causal=False, scale=None, alpha=1.0, key_padding_mask=None):
    """Softmax probabilities [B, Hq, Tq, Tk] (0 on masked edges and fully masked rows)."""
    logits = logits_of(q, k, bias, causal=causal, scale=scale, alpha=alpha, key_padding_mask=key_padding_mask)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    return torch.where(torch.isfinite(lse), probs, torch.zeros_like(probs))
