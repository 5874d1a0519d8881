"""The Continuous Memory System (SPEC 13, seed cms-memory-update-rule.md sections 2-4), written
as the obvious per-step PyTorch loop: the oracle of mt.nn.CMSMemory and of kernels/cms.py.

Per level l (fastest first) the state is M [B, N, d_l], K [B, N, d_k] and the usage u [B, N];
one step t reads with the state after step t-1, then writes:

    alpha = softmax(K q / sqrt(d_k))              c_l = alpha^T M                 (read)
    w     = softmax(K k / sqrt(d_k))   (content)  | one_hot(argmin u)  (lru)
          | h * content + (1 - h) * lru           (hybrid)                        (write address)
    M     = (1 - d) M + g w v^T        K = (1 - d) K + g w k^T
    u     = (1 - d) u + alpha + g w    (bookkeeping only: not differentiated)

Run it in float64 for parity; it works in any float dtype (CMSMemory's backend="torch" path is
the same math written with its own modules).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MODES = ("content", "lru", "hybrid")


def cms_write_weights(K, u, k, addressing="content", hybrid_weight=0.5):
    """Write addressing w [B, N] from the keys K [B, N, dk] before the write, the usage u [B, N]
    and the write key k [B, dk] (seed 4.4; argmin ties go to the lowest slot)."""
    if addressing not in MODES:
        raise ValueError(f"addressing must be one of {MODES}, got {addressing!r}")
    content = lru = None
    if addressing != "lru":
        content = torch.softmax(torch.einsum("bnk,bk->bn", K, k) / math.sqrt(K.shape[-1]), dim=-1)
    if addressing != "content":
        lru = F.one_hot(torch.argmin(u, dim=-1), u.shape[-1]).to(K.dtype)
    if addressing == "content":
        return content
    if addressing == "lru":
        return lru
    return hybrid_weight * content + (1.0 - hybrid_weight) * lru


def cms_step(M, K, u, q, k, v, g, decay, addressing="content", hybrid_weight=0.5):
    """One read + write of one level: returns (c [B, d], M, K, u) after the step."""
    alpha = torch.softmax(torch.einsum("bnk,bk->bn", K, q) / math.sqrt(K.shape[-1]), dim=-1)
    c = torch.einsum("bn,bnd->bd", alpha, M)
    w = cms_write_weights(K, u, k, addressing, hybrid_weight)
    a = 1.0 - decay
    gw = g[:, None] * w
    M = a * M + gw[:, :, None] * v[:, None, :]
    K = a * K + gw[:, :, None] * k[:, None, :]
    u = a * u + (alpha + gw).detach()
    return c, M, K, u


def cms_scan(q, k, v, g, M, K, u, decay, addressing="content", hybrid_weight=0.5):
    """T steps of one level: q, k [B, T, dk], v [B, T, d], g [B, T] -> (c [B, T, d], M, K, u)."""
    cs = []
    for t in range(q.shape[1]):
        c, M, K, u = cms_step(M, K, u, q[:, t], k[:, t], v[:, t], g[:, t], decay, addressing, hybrid_weight)
        cs.append(c)
    return torch.stack(cs, 1), M, K, u


def cms_initial_state(params, levels, batch, d_fast, *, dtype=None, device=None):
    """(memory, keys, usage, fast): M = 0, K = the learned initial keys, u = 0, fast state 0."""
    K0 = [params[f"init_keys.{i}"] for i in range(len(levels))]
    dtype = dtype or K0[0].dtype
    device = device or K0[0].device
    mem = tuple(torch.zeros(batch, n, d, dtype=dtype, device=device) for n, d, _ in levels)
    keys = tuple(k.to(dtype).expand(batch, -1, -1) for k in K0)
    usage = tuple(torch.zeros(batch, n, dtype=dtype, device=device) for n, _, _ in levels)
    return mem, keys, usage, torch.zeros(batch, d_fast, dtype=dtype, device=device)


def cms(x, params, levels, *, addressing="content", hybrid_weight=0.5, state=None, fast_state=None):
    """The whole module (seed 3-4) from a parameter dict named as CMSMemory's named_parameters():
    x [B, T, d_model] -> (context [B, T, d_c], (memory, keys, usage, fast)). fast_state [B, T, d_fast]
    is the seed's s_t (default: x); the query at t sees s_{t-1} (the state's `fast` at t = 0)."""
    p = params
    B, T, _ = x.shape
    s = x if fast_state is None else fast_state
    if state is None:
        state = cms_initial_state(p, levels, B, s.shape[-1], dtype=x.dtype, device=x.device)
    mem, keys, usage, fast = state
    s_prev = torch.cat([fast[:, None], s[:, :-1]], 1)
    q = F.linear(torch.cat([s_prev, x], -1), p["query.weight"], p["query.bias"])
    ctx, out_state = [], ([], [], [])
    for i, (_, _, decay) in enumerate(levels):
        inp = torch.cat([s, x], -1) if i == 0 else torch.cat([s, ctx[-1], x], -1)
        z = torch.tanh(F.linear(inp, p[f"events.{i}.weight"], p[f"events.{i}.bias"]))
        g = torch.sigmoid(F.linear(z, p[f"gates.{i}.weight"], p[f"gates.{i}.bias"]))[..., 0]
        v = F.linear(z, p[f"values.{i}.weight"])
        k = F.linear(z, p[f"keys.{i}.weight"])
        c, M, K, u = cms_scan(q, k, v, g, mem[i], keys[i], usage[i], decay, addressing, hybrid_weight)
        ctx.append(c)
        for lst, val in zip(out_state, (M, K, u)):
            lst.append(val)
    beta = torch.softmax(F.linear(torch.cat(ctx, -1), p["mix.weight"], p["mix.bias"]), -1)
    out = sum(beta[..., i:i + 1] * F.linear(c, p[f"projs.{i}.weight"]) for i, c in enumerate(ctx))
    return out, (tuple(out_state[0]), tuple(out_state[1]), tuple(out_state[2]), s[:, -1])


def cms_norm_bound(M0_norm, v_max, slots, decay):
    """Seed Theorem 1: ||M_t||_F <= max(||M_0||_F, V_max sqrt(N) / d) while ||v|| <= V_max, g <= 1."""
    return max(float(M0_norm), float(v_max) * math.sqrt(slots) / float(decay))
