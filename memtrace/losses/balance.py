"""MoE load-balance loss, Switch Transformer style (SPEC 9; the seeds' "existing" MoE term,
seeds/semantic-crystallization-plan.md, "Loss Function Components"):

    per layer:  L_l = E * sum_e f_e * P_e
    f_e = share of the routing assignments (each token's top-k experts) that go to expert e
    P_e = mean over tokens of the router probability of e
    L_balance = mean over layers of L_l

f is a count (no gradient); the gradient flows through P and pushes probability away from the
experts that receive more than their share. Perfect balance gives 1 for every k (f_e = P_e = 1/E).
For top-k, f here sums to 1 over experts; Hugging Face's `load_balancing_loss_func` counts each of
the k choices as a whole token (f sums to k), so its value is k times this one.
"""
from __future__ import annotations

import torch

from .. import _validate as V

__all__ = ["load_balance_loss"]


def _layers(router_logits) -> list:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits]
    if isinstance(router_logits, (str, bytes)) or not hasattr(router_logits, "__iter__"):
        raise TypeError("router_logits must be a tensor [..., E] or a sequence of per-layer tensors, "
                        f"got {type(router_logits).__name__}")
    return list(router_logits)


def load_balance_loss(router_logits, *, top_k: int = 1, mask=None, from_logits: bool = True,
                      check_values: bool = True) -> torch.Tensor:
    """Switch-style load balance, averaged over layers (module docstring).

    router_logits: one tensor [..., E] (one layer) or a sequence of per-layer tensors [..., E]
    with the same leading (token) shape, e.g. [N, E] or [B, T, E]; router logits, or
    probabilities when from_logits=False (then the rows are used as given).
    top_k: experts chosen per token (1 <= top_k <= E), by the largest logit / probability.
    mask: optional bool tensor of the leading shape, True for real tokens; padding tokens count
    in neither f nor P. check_values: refuse NaN/Inf (one host sync per layer).
    Returns a 0-d tensor (float32 at least); 0 for no layers or no (unmasked) tokens.
    """
    layers = _layers(router_logits)
    top_k = V.check_int("top_k", top_k, low=1)
    if not layers:
        return torch.zeros(())
    for i, x in enumerate(layers):
        V.check_tensor(f"router_logits[{i}]", x, floating=True)
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"router_logits[{i}] must have shape [..., E] with E >= 1, got {tuple(x.shape)}")
        if x.shape[:-1] != layers[0].shape[:-1]:
            raise ValueError(f"router_logits[{i}] must have the token shape {tuple(layers[0].shape[:-1])} of "
                             f"router_logits[0], got {tuple(x.shape[:-1])}")
        if top_k > x.shape[-1]:
            raise ValueError(f"top_k ({top_k}) must be <= the number of experts ({x.shape[-1]}) of router_logits[{i}]")
        if check_values:
            V.check_finite(f"router_logits[{i}]", x.detach())
            if not from_logits and x.numel() and bool((x.detach() < 0).any()):
                raise ValueError(f"router_logits[{i}] must hold probabilities >= 0 when from_logits=False")
    V.check_same_device(**{f"router_logits[{i}]": x for i, x in enumerate(layers)})
    if mask is not None:
        V.check_tensor("mask", mask, dtypes=(torch.bool,))
        if mask.shape != layers[0].shape[:-1]:
            raise ValueError(f"mask must have the token shape {tuple(layers[0].shape[:-1])}, got {tuple(mask.shape)}")
        V.check_same_device(router_logits=layers[0], mask=mask)
    total = None
    for x in layers:
        dtype = torch.promote_types(x.dtype, torch.float32)
        E = x.shape[-1]
        x = x.reshape(-1, E).to(dtype)
        probs = torch.softmax(x, dim=-1) if from_logits else x
        w = torch.ones(x.shape[0], dtype=dtype, device=x.device) if mask is None else mask.reshape(-1).to(dtype)
        tokens = w.sum().clamp_min(1)
        chosen = torch.zeros_like(x).scatter_(1, x.detach().topk(top_k, dim=-1).indices, 1.0)   # [N, E] 0/1
        f = (chosen * w[:, None]).sum(0) / (tokens * top_k)
        P = (probs * w[:, None]).sum(0) / tokens
        layer_loss = E * (f * P).sum()
        total = layer_loss if total is None else total + layer_loss.to(total.dtype)
    return total / len(layers)
