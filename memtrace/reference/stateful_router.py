"""The stateful mixture-of-memories router (SPEC 14, seed mixture-of-memories.md), one obvious pass:
the oracle of mt.nn.StatefulRouter.

    R(q, u) = alpha q.e_u + beta exp(-lambda (t - t_last(u))) + gamma log(1 + n_act(u))
            [+ balance importance(u) (1 - n_act(u) / max(1, max_i n_act(i)))]      (load balancing)
    selection: top-k of R among the units not dropped (and, hierarchical, inside the chosen domains,
               where R also gets the unit's domain score); weights: softmax of R over the selected.
    state after the call: n_act(u) += times selected, t_last(u) = t where selected.
"""
from __future__ import annotations

import torch


def stateful_scores(x, units, t, t_last, n_act, *, alpha=1.0, beta=0.0, gamma=0.0, decay=0.1, balance=0.0,
                    importance=None):
    """R [N, U] for queries x [N, d] and unit embeddings units [U, d]; t: the step (int), t_last
    int64 [U] (-1: never selected, temporal term 0), n_act [U] float counts."""
    R = alpha * (x @ units.T)
    if beta:
        recency = torch.exp(-decay * (t - t_last).to(x.dtype))
        R = R + beta * torch.where(t_last >= 0, recency, torch.zeros_like(recency))[None, :]
    if gamma:
        R = R + gamma * torch.log1p(n_act)[None, :]
    if balance:
        imp = torch.ones_like(n_act) if importance is None else importance
        R = R + (balance * imp * (1.0 - n_act / n_act.max().clamp_min(1.0)))[None, :]
    return R


def stateful_route(x, units, t, t_last, n_act, k, *, drop=None, domains=None, domain_scores=None, domain_k=1,
                   **score_kw):
    """(weights [N, k], indices [N, k], t_last', n_act'). drop: bool [N, U] units excluded from the
    selection; domains: int [U] the domain of each unit, with domain_scores [N, n_domains]."""
    R = stateful_scores(x, units, t, t_last, n_act, **score_kw)
    key = R
    if domains is not None:
        top_dom = torch.topk(domain_scores, domain_k, dim=-1).indices                    # [N, domain_k]
        allowed = (domains[None, :, None] == top_dom[:, None, :]).any(-1)               # [N, U]
        R = R + domain_scores.gather(1, domains[None, :].expand(x.shape[0], -1))
        key = torch.where(allowed, R, float("-inf"))
    if drop is not None:
        key = torch.where(drop, float("-inf"), key)
    idx = torch.topk(key, k, dim=-1).indices
    weights = torch.softmax(R.gather(1, idx), dim=-1)
    counts = torch.bincount(idx.reshape(-1), minlength=units.shape[0]).to(n_act.dtype)
    return weights, idx, torch.where(counts > 0, torch.as_tensor(t, dtype=t_last.dtype), t_last), n_act + counts


def selection_entropy(indices, num_units):
    """H = -sum p log p of the selection frequencies p over the units (0 log 0 = 0)."""
    p = torch.bincount(indices.reshape(-1), minlength=num_units).double()
    p = p / p.sum().clamp_min(1.0)
    return -(p * torch.log(p.clamp_min(1e-300))).sum()
