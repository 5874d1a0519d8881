"""The trace-memory update rule of SPEC 4, one edge at a time in plain Python (float64).

A layer's state is a dict of 1-D tensors of equal length, one element per stored trace:
    head, q_idx, k_idx (int64), strength (float64), age (int64), hist (int64 bit mask)
sorted by (head, q_idx, k_idx). Candidates are edges with their salience S and mean attention a
(head, q_idx, k_idx, S, a); an edge that is not a candidate has S = a = 0 this step.
"""
from __future__ import annotations

import math

import torch

__all__ = ["empty_state", "steady_state_strength", "trace_update", "trace_update_dense"]

STATE_KEYS = ("head", "q_idx", "k_idx", "strength", "age", "hist")


def empty_state(device=None):
    z = torch.zeros(0, dtype=torch.int64, device=device)
    return {"head": z, "q_idx": z, "k_idx": z, "strength": torch.zeros(0, dtype=torch.float64, device=device),
            "age": z, "hist": z}


def trace_update(state, candidates, *, quota, retention, decay, threshold, prune_eps, attn_eps, window):
    """One update of one layer; returns the new state (the input is not modified).

    candidates: (head, q_idx, k_idx, S, a), 1-D tensors; duplicate edges are not allowed.
    """
    device = state["head"].device
    mask = (1 << window) - 1
    scores = {}
    ch, ci, cj, cS, ca = (t.tolist() for t in candidates)
    for h, i, j, s, a in zip(ch, ci, cj, cS, ca):
        if (h, i, j) in scores:
            raise ValueError(f"duplicate candidate edge {(h, i, j)}")
        scores[(h, i, j)] = (float(s), float(a))

    traces = {}  # (h, i, j) -> [strength, age, hist]
    for h, i, j, m, age, hist in zip(*(state[k].tolist() for k in STATE_KEYS)):
        s, a = scores.get((h, i, j), (0.0, 0.0))
        hist = ((hist << 1) | int(a > attn_eps)) & mask                       # 1. history
        s_eff = s * math.log1p(bin(hist).count("1"))                          # 2. effective salience
        if s_eff > threshold:                                                 # 3. reinforce or decay
            m, age = retention * m + (1.0 - retention) * s_eff, 0
        else:
            m, age = decay * m, age + 1
        traces[(h, i, j)] = [m, age, hist]

    for (h, i, j), (s, a) in scores.items():                                  # 4. insert new edges
        if (h, i, j) in traces:
            continue
        hist = int(a > attn_eps) & mask
        s_eff = s * math.log1p(hist)
        if s_eff > threshold:
            traces[(h, i, j)] = [(1.0 - retention) * s_eff, 0, hist]

    traces = {e: t for e, t in traces.items() if not t[0] < prune_eps}        # 5. prune

    kept = []                                                                 # 6. evict to quota
    heads = sorted({e[0] for e in traces})
    for h in heads:
        mine = [(e, t) for e, t in traces.items() if e[0] == h]
        mine.sort(key=lambda et: (-et[1][0], et[0][1], et[0][2]))  # strongest first; ties: smaller (i, j)
        kept.extend(mine[:quota])
    kept.sort(key=lambda et: et[0])

    out = {
        "head": [e[0] for e, _ in kept], "q_idx": [e[1] for e, _ in kept], "k_idx": [e[2] for e, _ in kept],
        "strength": [t[0] for _, t in kept], "age": [t[1] for _, t in kept], "hist": [t[2] for _, t in kept],
    }
    return {k: torch.tensor(v, dtype=torch.float64 if k == "strength" else torch.int64, device=device)
            for k, v in out.items()}


def trace_update_dense(state, salience, attn, **params):
    """The same rule with every edge of dense [H, Tq, Tk] maps as a candidate."""
    H, Tq, Tk = salience.shape
    h, i, j = torch.meshgrid(torch.arange(H), torch.arange(Tq), torch.arange(Tk), indexing="ij")
    cand = (h.reshape(-1), i.reshape(-1), j.reshape(-1), salience.reshape(-1).double().cpu(),
            attn.reshape(-1).double().cpu())
    cpu_state = {k: v.cpu() for k, v in state.items()}
    new = trace_update(cpu_state, cand, **params)
    return {k: v.to(state["head"].device) for k, v in new.items()}


def steady_state_strength(salience, *, window, steps_reinforced=None):
    """Fixed point of the EMA under constant salience S above threshold with attention above
    attn_eps every step: the history fills to `window` bits, so M* = S * ln(1 + window)
    (seeds' appendix 1.4: M* = E[S_eff])."""
    r = window if steps_reinforced is None else min(window, steps_reinforced)
    return salience * math.log1p(r)
