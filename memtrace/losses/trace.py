"""Trace utilisation loss (SPEC 9; seeds/semantic-crystallization-plan.md, "Loss Function
Components", 1. Trace Utilization Loss):

    L_trace = -(1 / (L H)) * sum_{l, h} trace_hits(l, h) / total(l, h)

A "hit" is attention mass on a stored trace edge: per (layer, head), the share of the attention
probability that lands on the edges the memory holds. Maximising it (the loss is its negative)
rewards a model that uses its trace memory.

The share comes from `trace_attention_mass`, which never builds a Tq x Tk matrix: the attention
probability of a stored edge (h, i, j) is recovered from the forward pass's log-sum-exp,

    P[b, h, i, j] = exp(scale * q[b, h, i] . k[b, h // g, j] + alpha * M[h, i, j] - lse[b, h, i])

by gathering the E rows of q and k the entries name: O(B * E * D) work and memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _validate as V
from .._validate import HEAD_DIMS

__all__ = ["trace_attention_mass", "trace_utilization_loss", "trace_utilisation_loss"]


def _check_mass_inputs(q, k, lse, bias, key_padding_mask, scale, alpha):
    V.check_tensor("q", q, ndim=4, floating=True)
    V.check_tensor("k", k, ndim=4, floating=True)
    V.check_tensor("lse", lse, ndim=3, floating=True)
    V.check_same_device(q=q, k=k, lse=lse)
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype, got q {q.dtype}, k {k.dtype}")
    B, Hq, Tq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape [{B}, Hkv, Tk, {D}] (q's batch and head dim), got {tuple(k.shape)}")
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (grouped-query attention)")
    if tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"lse must have shape {(B, Hq, Tq)} (q's batch, heads, queries), got {tuple(lse.shape)}")
    if not all(hasattr(bias, a) for a in ("src_entry", "entry_coords", "value", "num_heads")):
        raise TypeError(f"bias must be a memtrace.TraceBias, got {type(bias).__name__}")
    if bias.num_heads != Hq:
        raise ValueError(f"bias must be built for q's {Hq} heads, got num_heads={bias.num_heads}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}; all inputs must be on one device")
    V.check_tensor("bias.value", bias.value, ndim=1, floating=True)
    if bias.value.shape[0] != bias.nnz or bias.value.device != bias.device:
        raise ValueError(f"bias.value must have shape ({bias.nnz},) on {bias.device}, got "
                         f"{tuple(bias.value.shape)} on {bias.value.device}")
    if key_padding_mask is not None:
        V.check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"key_padding_mask must have shape {(B, Tk)} (batch, keys), "
                             f"got {tuple(key_padding_mask.shape)}")
        V.check_same_device(q=q, key_padding_mask=key_padding_mask)
    V.check_float("scale", scale, low=0.0, low_open=True)
    V.check_float("alpha", alpha)


def trace_attention_mass(q, k, lse, bias, *, scale, alpha, causal, key_padding_mask=None,
                         push_down=None) -> torch.Tensor:
    """Per-head share of one layer's attention mass that falls on the bias's (stored) edges.

    q [B, Hq, Tq, D], k [B, Hkv, Tk, D] (Hq % Hkv == 0: query head h reads kv head h // (Hq/Hkv)),
    lse [B, Hq, Tq]: the log-sum-exp of each row's logits in the forward pass these q, k and bias
    went through (-inf for a fully masked row); bias: the memtrace.TraceBias that pass used, its
    values the strengths M; scale, alpha, causal and key_padding_mask ([B, Tk] bool, True =
    attend) as in that pass.

    Returns mass [Hq] in q's dtype (float32 for 16-bit inputs):

        mass[h] = sum_{b, stored (i, j) visible to row i} P[b, h, i, j] / rows[h]

    where rows[h] counts the (b, i) whose lse is finite (rows that attend to anything; each holds
    attention mass 1), at least 1. Duplicate entries of the bias count their edge once (with
    their summed value, as attention does); entries beyond the call's (Tq, Tk), masked by
    `causal` or by the padding mask add nothing.

    Differentiable w.r.t. q, k, lse and bias.value, always with the gradient of the share itself:
    - an lse that requires grad (from a differentiable graph) carries the softmax's push-down of
      every other key through its own gradient;
    - an lse that does not (memtrace.biased_attention's, as FlashAttention's, is a constant) gets
      that push-down added here (push_down=None or True): d lse_i = sum_j P_ij d logit_ij, so the
      q side is P @ k and the k side is P^T (w * q), one extra biased_attention forward and
      backward with v = k, run in this loss's backward.

    push_down=False drops it: the gradient of the stored edges' unnormalised weights only. That
    pushes their logits up without bound. Under AdamW the trace loss then grows q and k until
    attention stops learning: the experiment's copy task stalled this way, on the H100 and on the
    CPU alike. Cost O(B * E * D) for E entries, plus the push-down's attention call; nothing of
    size Tq * Tk.
    """
    _check_mass_inputs(q, k, lse, bias, key_padding_mask, scale, alpha)
    B, Hq, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    finite_rows = torch.isfinite(lse)                                          # [B, Hq, Tq]
    rows = finite_rows.sum(dim=(0, 2)).clamp_min(1).to(dtype)                   # [Hq]
    head, qi, kj = bias.entry_coords()                                          # sorted, int64 [E]
    value = torch.zeros(bias.nnz, dtype=dtype, device=q.device).index_add(
        0, bias.src_entry.long(), bias.value.to(dtype))                         # duplicates summed into leaders
    leader = torch.ones_like(head, dtype=torch.bool)
    if bias.nnz > 1:
        leader[1:] = (head[1:] != head[:-1]) | (qi[1:] != qi[:-1]) | (kj[1:] != kj[:-1])
    valid = leader & (qi < Tq) & (kj < Tk)
    if causal:
        valid = valid & (kj <= qi + (Tk - Tq))
    qi_c, kj_c = qi.clamp(max=Tq - 1), kj.clamp(max=Tk - 1)                      # safe gathers; masked below
    kv_head = head // (Hq // Hkv)
    qe = q[:, head, qi_c, :].to(dtype)                                          # [B, E, D]
    ke = k[:, kv_head, kj_c, :].to(dtype)                                       # [B, E, D]
    lse_e = lse[:, head, qi_c].to(dtype)                                         # [B, E]
    valid_b = valid.unsqueeze(0) & finite_rows[:, head, qi_c]
    if key_padding_mask is not None:
        valid_b = valid_b & key_padding_mask[:, kj_c]
    logit = scale * (qe * ke).sum(-1) + alpha * value - lse_e
    # -inf before exp (not a where after it): masked edges must give 0 and a 0 gradient, never NaN
    p = torch.exp(torch.where(valid_b, logit, torch.full_like(logit, float("-inf"))))
    mass = torch.zeros(Hq, dtype=dtype, device=q.device).index_add(0, head, p.sum(0))
    if push_down is None:
        push_down = not lse.requires_grad
    if push_down and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or value.requires_grad):
        row_mass = torch.zeros(B, Hq * Tq, dtype=dtype, device=q.device).index_add(
            1, head * Tq + qi_c, p.detach()).view(B, Hq, Tq)
        mass = mass + _PushDown.apply(q, k, value, row_mass, p.detach(), head, qi_c, finite_rows, bias,
                                      float(scale), float(alpha), bool(causal), key_padding_mask)
    return mass / rows


class _PushDown(torch.autograd.Function):
    """Zero in value; in the backward, the gradient of -sum_h g_h sum_(b,i) m_bhi lse_bhi (g: the
    upstream gradient of the unnormalised mass, m: the row's mass on stored edges): the softmax's
    push-down that a constant lse leaves out."""

    @staticmethod
    def forward(ctx, q, k, value, row_mass, p, head, qi, finite_rows, bias, scale, alpha, causal, kpm):
        ctx.save_for_backward(q, k, row_mass, p, head, qi, finite_rows)
        ctx.args = (bias, scale, alpha, causal, kpm, value.shape, value.dtype)
        return torch.zeros(q.shape[1], dtype=row_mass.dtype, device=q.device)

    @staticmethod
    def backward(ctx, grad):
        from ..attention import biased_attention
        q, k, row_mass, p, head, qi, finite_rows = ctx.saved_tensors
        bias, scale, alpha, causal, kpm, value_shape, value_dtype = ctx.args
        # grad is d loss / d (unnormalised mass)_h (the division by rows comes after this term), so
        # the upstream of lse_bhi is -grad_h m_bhi
        c = -grad[None, :, None] * row_mass                                        # [B, Hq, Tq]
        c = torch.where(finite_rows, c, torch.zeros_like(c))
        kwargs = {} if kpm is None else {"key_padding_mask": kpm}
        D = q.shape[-1]
        width = next((d for d in HEAD_DIMS if d >= D), None)
        if width is None:
            raise ValueError(f"the trace loss's push-down runs biased_attention, whose head dims are {HEAD_DIMS}; "
                             f"got {D} (pass push_down=False)")
        with torch.enable_grad():
            # zero columns change no q . k: a head dim the kernels lack is padded to the next one
            qd, kd = (F.pad(t.detach(), (0, width - D)) for t in (q, k))
            vk = kd.clone().requires_grad_(True)
            pk = biased_attention(qd, kd, vk, bias, causal=causal, scale=scale, alpha=alpha, **kwargs)   # P @ k
            (ptq,) = torch.autograd.grad(pk, vk, grad_outputs=(c[..., None] * qd.to(c.dtype)).to(pk.dtype))
        pk, ptq = pk[..., :D], ptq[..., :D]
        pk = torch.where(finite_rows[..., None], pk.to(c.dtype), torch.zeros((), dtype=c.dtype, device=c.device))
        dq = (scale * c[..., None] * pk).to(q.dtype) if ctx.needs_input_grad[0] else None
        dk = (scale * ptq.to(c.dtype)).to(k.dtype) if ctx.needs_input_grad[1] else None
        dvalue = None
        if ctx.needs_input_grad[2]:
            # d lse_i / d value_e = alpha * P_i,j_e for the entries of row i (p: zero where not visible)
            dvalue = (alpha * c[:, head, qi] * p).sum(0).to(value_dtype).reshape(value_shape)
        return dq, dk, dvalue, None, None, None, None, None, None, None, None, None, None


def trace_utilization_loss(masses) -> torch.Tensor:
    """-(1/(L H)) * sum over layers l and heads h of masses[l][h]: minus the mean attention share
    on stored traces (SPEC 9 trace utilisation).

    masses: a tensor [L, H] or [H], or a sequence of per-layer [H_l] tensors (as returned by
    `trace_attention_mass`; layers may have different head counts: every (layer, head) weighs
    the same). Returns a 0-d tensor; with no layers or no heads it is 0 (still attached to the
    inputs' graph when they have one).
    """
    if isinstance(masses, torch.Tensor):
        V.check_tensor("masses", masses, floating=True)
        if masses.dim() not in (1, 2):
            raise ValueError(f"masses must be [L, H] or [H], got shape {tuple(masses.shape)}")
        flat = masses.reshape(-1)
    else:
        if isinstance(masses, (str, bytes)) or not hasattr(masses, "__iter__"):
            raise TypeError(f"masses must be a tensor or a sequence of per-layer tensors, got {type(masses).__name__}")
        masses = list(masses)
        if not masses:
            return torch.zeros(())
        for i, m in enumerate(masses):
            V.check_tensor(f"masses[{i}]", m, ndim=1, floating=True)
        V.check_same_device(**{f"masses[{i}]": m for i, m in enumerate(masses)})
        dtype = torch.promote_types(masses[0].dtype, torch.float32)
        for m in masses[1:]:
            dtype = torch.promote_types(dtype, m.dtype)
        flat = torch.cat([m.to(dtype) for m in masses])
    if flat.numel() == 0:
        return flat.sum()
    return -flat.mean()


trace_utilisation_loss = trace_utilization_loss
