"""The auxiliary losses of memtrace.losses (SPEC 9), written the dense, obvious way in float64.

Oracles for the parity and gradient tests: every input is cast to float64, attention is
materialised as [B, H, Tq, Tk], motif token sets are found token by token.
"""
from __future__ import annotations

import math

import torch

from .attention import _expand_kv, causal_mask, dense_bias

__all__ = ["crystal_stability_loss", "ewc_penalty", "load_balance_loss", "motif_entropy", "trace_attention_mass",
           "trace_utilization_loss"]

_F64 = torch.float64


def trace_attention_mass(q, k, lse, bias, *, scale, alpha, causal, key_padding_mask=None):
    """[Hq] float64: per head, sum over b and stored visible (i, j) of P[b, h, i, j], divided by
    the number of (b, i) rows with a finite lse (at least 1). P = exp(logit - lse) from the dense
    logits; lse=None computes it from the same logits (the mass is then a true softmax share)."""
    q, k = q.to(_F64), k.to(_F64)
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    M = dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value, Hq, bias.seq_len_q, bias.seq_len_k)[:, :Tq, :Tk]
    ones = torch.ones(bias.head.shape[0], dtype=_F64, device=q.device)
    stored = dense_bias(bias.head, bias.q_idx, bias.k_idx, ones, Hq, bias.seq_len_q, bias.seq_len_k)[:, :Tq, :Tk] > 0
    logits = scale * q @ _expand_kv(k, Hq).transpose(-1, -2) + alpha * M
    visible = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & causal_mask(Tq, Tk, q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    logits = torch.where(visible, logits, torch.full_like(logits, -math.inf))
    lse = torch.logsumexp(logits, dim=-1) if lse is None else lse.to(_F64)
    finite = torch.isfinite(lse)
    keep = visible & finite[..., None] & stored
    p = torch.exp(torch.where(keep, logits - lse[..., None], torch.full_like(logits, -math.inf)))
    rows = finite.sum(dim=(0, 2)).clamp_min(1).to(_F64)
    return p.sum(dim=(0, 2, 3)) / rows


def trace_utilization_loss(masses):
    """-(mean of every (layer, head) mass), float64; 0 for none. masses: [L, H], [H] or a list of [H_l]."""
    if isinstance(masses, torch.Tensor):
        flat = masses.reshape(-1).to(_F64)
    else:
        flat = torch.cat([m.reshape(-1).to(_F64) for m in masses]) if len(masses) else torch.zeros(0, dtype=_F64)
    return -flat.sum() / max(flat.numel(), 1)


def _entropy(p):
    return -sum(p[c] * torch.log(p[c]) for c in range(p.shape[0]) if p[c] > 0) if bool((p > 0).any()) \
        else p.sum() * 0.0


def motif_entropy(router_probs, motif, paths=None):
    """H(pi) of memtrace.losses.crystal for one motif, float64 0-d: for t = 0..K-1, the tokens
    routed at layer s+t whose top-1 path matched the motif at layers s..s+t-1, their mean router
    distribution at layer s+t, its entropy; summed over t."""
    probs = [p.to(_F64) for p in router_probs]
    N = probs[0].shape[0]
    if paths is None:
        paths = torch.stack([p.argmax(-1) for p in probs], dim=1)
    s, experts = motif.start_layer, tuple(motif.experts)
    total = probs[0].sum() * 0.0
    for t in range(len(experts)):
        tokens = [n for n in range(N)
                  if int(paths[n, s + t]) >= 0 and all(int(paths[n, s + u]) == experts[u] for u in range(t))]
        if tokens:
            total = total + _entropy(probs[s + t][tokens].mean(0))
    return total


def crystal_stability_loss(router_probs, motifs, *, min_utility=0.05, paths=None):
    """(1/N) sum over the N motifs of motif_entropy * [utility > min_utility], float64."""
    motifs = list(motifs)
    total = torch.stack([p.to(_F64) for p in router_probs]).sum() * 0.0
    for m in motifs:
        if m.utility > min_utility:
            total = total + motif_entropy(router_probs, m, paths)
    return total / max(len(motifs), 1)


def load_balance_loss(router_logits, *, top_k=1, mask=None, from_logits=True):
    """Mean over layers of E * sum_e f_e P_e, float64; f from each token's top_k experts (as a share
    of all N * top_k choices), P the mean router probability; masked-out tokens are dropped."""
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    total = torch.zeros((), dtype=_F64)
    for x in layers:
        E = x.shape[-1]
        x = x.reshape(-1, E).to(_F64)
        if mask is not None:
            x = x[mask.reshape(-1)]
        total = total.to(x.device)
        N = x.shape[0]
        if N == 0:
            total = total + x.sum() * 0.0
            continue
        probs = torch.softmax(x, dim=-1) if from_logits else x
        f = torch.zeros(E, dtype=_F64, device=x.device)
        for n in range(N):
            for e in torch.argsort(x[n].detach(), descending=True, stable=True)[:top_k].tolist():
                f[e] += 1.0 / (N * top_k)
        total = total + E * (f * probs.mean(0)).sum()
    return total / max(len(layers), 1)


def ewc_penalty(params, anchor, fisher, weight):
    """sum over names of weight/2 * fisher * (param - anchor)^2, float64; dicts keyed by name."""
    total = torch.zeros((), dtype=_F64)
    for name, p in params.items():
        d = p.to(_F64) - anchor[name].to(_F64)
        total = total.to(p.device) + (fisher[name].to(_F64) * d * d).sum()
    return 0.5 * weight * total
