"""Salience S and mean attention a of SPEC 3, dense.

    P[b,h,i,j]  = biased softmax probabilities of the forward pass
    dP[b,h,i,j] = dO[b,h,i,:] . V[b,h//g,j,:]
    S[h,i,j]    = mean_b P * |dP|          a[h,i,j] = mean_b P
"""
from __future__ import annotations

import torch

from .attention import _expand_kv, probabilities

__all__ = ["capture_from_dense", "salience"]


def salience(q, k, v, dout, bias=None, *, causal=False, scale=None, alpha=1.0):
    """(S, a), each [Hq, Tq, Tk], in the inputs' dtype."""
    probs = probabilities(q, k, bias, causal=causal, scale=scale, alpha=alpha)
    dprobs = torch.matmul(dout, _expand_kv(v, q.shape[1]).transpose(-1, -2))
    return (probs * dprobs.abs()).mean(dim=0), probs.mean(dim=0)


def capture_from_dense(S, a, threshold, bias_head=None, bias_q=None, bias_k=None):
    """What a capture must hold, from dense maps: (a) every edge with S > threshold as
    (head, q_idx, k_idx, S, a) sorted by (head, q, k); (b) S and a at each given bias entry."""
    h, i, j = torch.nonzero(S > threshold, as_tuple=True)
    edges = (h, i, j, S[h, i, j], a[h, i, j])
    scored = None
    if bias_head is not None:
        scored = (S[bias_head, bias_q, bias_k], a[bias_head, bias_q, bias_k])
    return edges, scored
