"""Crystallisation stability loss (SPEC 9; seeds/semantic-crystallization-plan.md, "Loss Function
Components", 2. Crystallization Stability Loss):

    L_crystal = (1 / N) * sum_{pi held} H(pi) * 1[U(pi) > U_min]

over the N motifs the registry holds, with H(pi) the routing entropy of the seeds' section
"Mathematical Formulation", 2. Semantic Crystallization, "Routing Entropy":

    H(pi) = - sum_l sum_k p(e_l = k | pi_{1:l-1}) log p(e_l = k | pi_{1:l-1})

made differentiable with the routers' current probabilities. For a motif
pi = (s, (e_s, ..., e_{s+K-1})) and t = 0..K-1:

    T_t  = tokens routed at layer s+t whose top-1 experts at layers s..s+t-1 are e_s..e_{s+t-1}
           (T_0: every token routed at layer s)
    p_t  = mean over n in T_t of router_probs[s+t][n]        (the router's distribution there)
    H(pi) = sum_t  -sum_k p_t[k] ln p_t[k]                   (a term with T_t empty is 0)

This is the entropy of the next-expert distribution given the motif's prefix, summed over the
motif's layers, i.e. SPEC 5.3's `entropy(pi)` (the sum of node entropies along the prefixes)
with the trie's counts replaced by the routers' probabilities: with one-hot probabilities it
equals RoutingTree.stats(...)["entropy"] exactly. Minimising it makes the routers agree on the
motif's continuation for the tokens that entered it (the entropy of the mean distribution, not
the mean of per-token entropies, which would only reward confident routers that may still
disagree). Token membership (T_t) is discrete and gets no gradient; p_t does.
"""
from __future__ import annotations

import torch

from .. import _validate as V

__all__ = ["crystal_stability_loss", "motif_entropies"]


def _stack_probs(router_probs, check_values: bool) -> torch.Tensor:
    """router_probs as one [L, N, E] tensor (a 3-D tensor, or a sequence of L [N, E] tensors)."""
    if isinstance(router_probs, torch.Tensor):
        V.check_tensor("router_probs", router_probs, ndim=3, floating=True)
        probs = router_probs
    else:
        if isinstance(router_probs, (str, bytes)) or not hasattr(router_probs, "__iter__"):
            raise TypeError("router_probs must be a [L, N, E] tensor or a sequence of per-layer [N, E] tensors, "
                            f"got {type(router_probs).__name__}")
        layers = list(router_probs)
        if not layers:
            raise ValueError("router_probs must hold at least one layer")
        for i, p in enumerate(layers):
            V.check_tensor(f"router_probs[{i}]", p, ndim=2, floating=True)
            if p.shape != layers[0].shape:
                raise ValueError(f"router_probs[{i}] must have shape {tuple(layers[0].shape)} like router_probs[0] "
                                 f"(the same tokens and experts at every layer), got {tuple(p.shape)}")
            if p.dtype != layers[0].dtype:
                raise TypeError(f"router_probs[{i}] has dtype {p.dtype}, router_probs[0] {layers[0].dtype}")
        V.check_same_device(**{f"router_probs[{i}]": p for i, p in enumerate(layers)})
        probs = torch.stack(layers)
    if probs.shape[0] < 1 or probs.shape[2] < 1:
        raise ValueError(f"router_probs must have >= 1 layer and >= 1 expert, got shape {tuple(probs.shape)}")
    if check_values and probs.numel():
        d = probs.detach()
        if not bool((torch.isfinite(d) & (d >= 0) & (d <= 1)).all()):
            raise ValueError("router_probs must hold probabilities: finite values in [0, 1]")
    return probs


def _check_paths(paths, L: int, N: int, E: int, device) -> torch.Tensor:
    V.check_tensor("paths", paths, ndim=2, integer=True)
    if tuple(paths.shape) != (N, L):
        raise ValueError(f"paths must have shape {(N, L)} (tokens, layers) like router_probs, got {tuple(paths.shape)}")
    if paths.device != device:
        raise ValueError(f"paths is on {paths.device} but router_probs is on {device}")
    V.check_index_range("paths", paths, -1, E)
    return paths.long()


def _check_motifs(motifs, L: int, E: int) -> list:
    if isinstance(motifs, (str, bytes)) or not hasattr(motifs, "__iter__"):
        raise TypeError(f"motifs must be a sequence of memtrace.Motif, got {type(motifs).__name__}")
    motifs = list(motifs)
    for i, m in enumerate(motifs):
        if not all(hasattr(m, a) for a in ("start_layer", "experts", "utility")):
            raise TypeError(f"motifs[{i}] must be a memtrace.Motif (start_layer, experts, utility), "
                            f"got {type(m).__name__}")
        s = V.check_int(f"motifs[{i}].start_layer", m.start_layer, low=0, high=L - 1)
        ex = tuple(m.experts)
        if not ex:
            raise ValueError(f"motifs[{i}].experts must hold at least one expert")
        if s + len(ex) > L:
            raise ValueError(f"motifs[{i}] spans layers {s}..{s + len(ex) - 1}, beyond the {L} layers of router_probs")
        for j, e in enumerate(ex):
            V.check_int(f"motifs[{i}].experts[{j}]", e, low=0, high=E - 1)
        V.check_float(f"motifs[{i}].utility", m.utility)
    return motifs


def _safe_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p ln p over the last dim, 0 ln 0 = 0 with a 0 (not NaN) gradient there."""
    pos = p > 0
    logp = torch.log(torch.where(pos, p, torch.ones_like(p)))
    return -torch.where(pos, p * logp, torch.zeros_like(p)).sum(-1)


def motif_entropies(router_probs, motifs, *, paths=None, check_values: bool = True) -> torch.Tensor:
    """H(pi) of each motif (module docstring), [M] in router_probs' dtype (float32 for 16-bit).

    router_probs: [L, N, E] or a sequence of L [N, E] tensors, row n the router's distribution
    over E experts for token n at that layer (the same N tokens at every layer).
    motifs: sequence of memtrace.Motif (start_layer, experts tuple; any object with those fields).
    paths: optional int [N, L], the top-1 expert of each token per layer, -1 where the layer did
    not route it (padding, or a token a frozen motif carried); default: argmax of router_probs,
    every token routed. check_values: verify that router_probs are finite in [0, 1] (a host sync).
    """
    probs = _stack_probs(router_probs, check_values)
    L, N, E = probs.shape
    motifs = _check_motifs(motifs, L, E)
    paths = probs.detach().argmax(-1).T if paths is None else _check_paths(paths, L, N, E, probs.device)
    dtype = torch.promote_types(probs.dtype, torch.float32)
    M = len(motifs)
    if M == 0:
        return probs.to(dtype).sum() * torch.zeros(0, dtype=dtype, device=probs.device)
    K = max(len(m.experts) for m in motifs)
    dev = probs.device
    # index tables on the host (they come from Python objects), one copy to the device
    start = torch.tensor([m.start_layer for m in motifs])                                 # [M]
    experts = torch.tensor([list(m.experts) + [-2] * (K - len(m.experts)) for m in motifs])  # [M, K], -2 pads
    in_motif = experts >= 0
    layer = (start[:, None] + torch.arange(K)).clamp(max=L - 1)                           # [M, K]
    routed = paths.T[layer.to(dev)]                                                       # [M, K, N]
    follows = routed == experts.to(dev)[..., None]
    prefix = torch.ones_like(follows)
    if K > 1:
        prefix[:, 1:] = torch.cumprod(follows[:, :-1].to(torch.int8), dim=1).bool()
    member = prefix & (routed >= 0) & in_motif.to(dev)[..., None]                         # T_t as [M, K, N]
    count = member.sum(-1)                                                                # [M, K]
    p = probs.to(dtype)
    mean = torch.zeros(M, K, E, dtype=dtype, device=dev)
    for l in range(L):
        mi, ti = torch.nonzero((layer == l) & in_motif, as_tuple=True)
        if mi.numel() == 0:
            continue
        mi, ti = mi.to(dev), ti.to(dev)
        mean = mean.index_put((mi, ti), member[mi, ti].to(dtype) @ p[l])                 # [P, N] @ [N, E]
    mean = mean / count.clamp_min(1).to(dtype)[..., None]
    return _safe_entropy(mean).sum(-1)


def crystal_stability_loss(router_probs, motifs, *, min_utility: float = 0.05, paths=None,
                           check_values: bool = True) -> torch.Tensor:
    """(1/N) sum over the N held motifs of H(pi) * [utility > min_utility] (module docstring).

    Arguments as in `motif_entropies`; each motif's utility is its `utility` field (the registry's
    statistics). Returns a 0-d tensor; 0 when no motif is held (attached to router_probs' graph).
    """
    min_utility = V.check_float("min_utility", min_utility)
    h = motif_entropies(router_probs, motifs, paths=paths, check_values=check_values)
    if h.numel() == 0:
        return h.sum()
    keep = torch.tensor([float(m.utility) > min_utility for m in motifs], device=h.device)
    return torch.where(keep, h, torch.zeros_like(h)).sum() / h.numel()
