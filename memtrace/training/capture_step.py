"""The manager's captures: one capture step per layer, filled by every backward of that step.

Calibration rule (SPEC 9)
-------------------------
The salience the memory sees is normalised per layer and capture step:

    S_norm[h, i, j] = S[h, i, j] / Z        Z = mean of S over every visible edge (h, i, j)

(visible: not masked by causal or by the key padding mask), so the mean normalised salience of a
step's edges is 1 whatever the loss reduction (sum or mean: a constant factor on dO, hence on S
and Z), the batch size (S and Z are means over the batch) or the sequence length (a mean per
edge, not a total). `salience_threshold` (0.05) is therefore in units of "the mean edge's
salience". The mean attention `a` is not rescaled.

Z costs one extra dense pass over at most `NORM_ROWS` query rows per call (strided rows when Tq is
longer: an unbiased ratio estimate, exact for Tq <= NORM_ROWS), O(B * H * min(Tq, 256) * Tk * D),
chunked so that nothing of size Tq x Tk is held. The capture kernel takes its cut as a Python
float: raw cut = CUT_MARGIN * threshold / ln 2 * Z, a quarter of the smallest normalised salience
a new edge needs to be stored. Where more edges than the capture holds would pass that cut (the
usual case at long sequences: 0.05 of the mean is passed by most edges), the fill would keep only
the `capacity` strongest after two extra overflow passes; the cut is raised instead to the
salience that about CROWD_FILL * capacity edges pass, read off the same sampled rows (a top-k of
their S).

Which cut a capture step uses: the first capture step of a layer computes it from that step
(one host sync per layer) and runs the unfused fill (PASS 0 over every tile). Every later capture
step uses the cut its previous capture step computed (read on the host with the step's memory
update, which syncs anyway; part of the manager's state), which is known before the backward: the
Triton backward fills the fused bound and only the segments that pass are rescored, with no host
sync for the cut. The salience moves slowly between capture steps; where it rose, the fill
overflows (still exact: the strongest `capacity` are kept), where it fell, fewer edges are
listed. Z, and so the normalisation, is always the step's own. Non-capture steps pay none of this.

Micro-batches and checkpointing
-------------------------------
Each `biased_attention` call of a capture step gets its own `CallObserver`; the autograd backward
of a call fills it at most once (a forward recomputed by torch.utils.checkpoint builds an
observer that the backward of the original node never fills, or, with use_reentrant=True, the
first forward ran without grad and only the recomputed one is filled), so nothing is counted
twice. Fills of one layer are summed into its `LayerCapture`, weighted by their batch size:

    S_step = sum_f B_f S_f / sum_f B_f      a_step = likewise      Z_step = likewise
    S_norm = S_step / Z_step

so k micro-batches give the mean over all their samples, as one full batch would. An edge under
the capture cut in some micro-batch counts 0 there (the error is below the cut, a quarter of what
an insertion needs); stored traces are scored exactly in every micro-batch (they are bias entries).
"""
from __future__ import annotations

import math

import torch

from ..capture import DEFAULT_CAPACITY, SalienceCapture

__all__ = ["CROWD_FILL", "CUT_MARGIN", "NORM_ROWS", "CallObserver", "LayerCapture", "call_capacity", "mean_salience",
           "merge_edge_lists"]

NORM_ROWS = 256
CUT_MARGIN = 0.25
CROWD_FILL = 0.75
_CHUNK_ELEMENTS = 1 << 22
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@torch.no_grad()
def mean_salience(q, k, v, lse, dout, bias, alpha, *, causal, scale, key_padding_mask=None, kth=0):
    """(total, count, top) 0-d float tensors: the sum over the sampled rows' visible edges of
    S = mean_b P*|dP|, how many (head, row, key) edges that sum covers (a batch mean), and the
    kth largest sampled S (0 when kth is 0 or more than the sample holds)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    stride = -(-Tq // NORM_ROWS)
    rows = torch.arange(0, Tq, stride, device=dev)
    R = rows.numel()
    alpha = alpha.to(dtype) if isinstance(alpha, torch.Tensor) else float(alpha)
    dense = None
    if bias is not None and bias.nnz > 0:
        keep = (bias.q_idx < Tq) & (bias.k_idx < Tk) & (bias.q_idx % stride == 0)
        h = torch.where(keep, bias.head.long(), 0)
        r = torch.where(keep, bias.q_idx.long() // stride, 0)
        j = torch.where(keep, bias.k_idx.long(), 0)
        val = torch.where(keep, bias.value.detach().to(dtype), torch.zeros((), dtype=dtype, device=dev))
        dense = torch.zeros(Hq, R, Tk, dtype=dtype, device=dev).index_put_((h, r, j), val, accumulate=True)
    kk = k.detach().to(dtype)
    vv = v.detach().to(dtype)
    keys = torch.arange(Tk, device=dev)
    total = torch.zeros((), dtype=dtype, device=dev)
    count = torch.zeros((), dtype=dtype, device=dev)
    tops = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * Tk))
    for r0 in range(0, R, chunk):
        rr = rows[r0:r0 + chunk]
        n = rr.numel()
        qs = q.detach()[:, :, rr].to(dtype).reshape(B, Hkv, g * n, D)
        ds = dout.detach()[:, :, rr].to(dtype).reshape(B, Hkv, g * n, D)
        logits = scale * (qs @ kk.transpose(-1, -2))                       # [B, Hkv, g*n, Tk]
        dP = ds @ vv.transpose(-1, -2)
        logits = logits.reshape(B, Hq, n, Tk)
        dP = dP.reshape(B, Hq, n, Tk)
        if dense is not None:
            logits = logits + alpha * dense[:, r0:r0 + n]
        visible = torch.ones(1, 1, n, Tk, dtype=torch.bool, device=dev)
        if causal:
            visible = visible & (keys.view(1, 1, 1, Tk) <= rr.view(1, 1, n, 1) + (Tk - Tq))
        if key_padding_mask is not None:
            visible = visible & key_padding_mask.view(B, 1, 1, Tk)
        ls = lse.detach()[:, :, rr].to(dtype).unsqueeze(-1)
        visible = visible & torch.isfinite(ls)
        P = torch.exp(torch.where(visible, logits - torch.where(torch.isfinite(ls), ls, 0), float("-inf")))
        sal = (P * dP.abs()).sum(0) / B                                     # [Hq, n, Tk]
        total = total + sal.sum()
        count = count + visible.expand(B, Hq, n, Tk).sum().to(dtype) / B
        if kth > 0:
            flat = sal.reshape(-1)
            tops.append(torch.topk(flat, min(kth, flat.numel()), sorted=False).values)
    top = torch.zeros((), dtype=dtype, device=dev)
    if tops:
        both = torch.cat(tops)
        if both.numel() >= kth:
            top = torch.topk(both, kth, sorted=False).values.min()
    return total, count, top


def _sample_kth(capacity: int, sampled_rows: int, Tq: int) -> int:
    """Which largest sampled S leaves about CROWD_FILL * capacity edges over it in all Tq rows
    (the rows are sampled evenly, so each sampled edge stands for Tq / sampled_rows edges)."""
    return max(1, int(CROWD_FILL * capacity * sampled_rows / Tq))


class LayerCapture:
    """The fills of one layer in one capture step (see the module docstring)."""

    def __init__(self, threshold: float, capacity: int):
        self.threshold = threshold
        self.capacity = capacity
        self.fills = []          # (edges, num_edges, bias_scores, bias, weight, Z, Tq)
        self.next_cut = None     # 0-d float32 on the device: the cut this step's salience suggests

    def add(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, key_padding_mask, extra,
            inner=None, bound=None):
        """One call's fill. inner: the call's SalienceCapture, made before its backward with the
        cut of the layer's last capture step (CallObserver), whose fused bound the Triton backward
        filled (`bound`); None: the cut is decided here, from this call (one host sync)."""
        B, H, Tq, _ = q.shape
        capacity = call_capacity(self.capacity, q, k)
        sampled_rows = -(-Tq // -(-Tq // NORM_ROWS))
        total, count, top = mean_salience(q, k, v, lse, dout, bias, alpha, causal=causal, scale=scale,
                                          key_padding_mask=key_padding_mask,
                                          kth=_sample_kth(capacity, sampled_rows, Tq))
        Z = (total / count.clamp_min(1)).float()
        # More edges over the threshold's cut than the capture holds cost the fill two overflow
        # passes and then keep only the strongest `capacity` anyway: the cut rises to the salience
        # that about CROWD_FILL * capacity edges pass, estimated from the sampled rows.
        floor = (CUT_MARGIN * self.threshold / math.log(2.0)) * Z
        cut_now = torch.where(torch.isfinite(top), torch.maximum(floor, top.float()), floor)
        self.next_cut = cut_now if self.next_cut is None else torch.maximum(self.next_cut, cut_now)
        if inner is None:
            cut = float(cut_now)        # this layer's one sync of the step (the kernel's cut)
            cut = cut if math.isfinite(cut) and cut > 0 else _FLOAT32_MAX
            inner = SalienceCapture(threshold=min(cut, _FLOAT32_MAX), capacity=capacity)
            bound = None
        inner.fill(q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                   bound=bound, **extra)
        self.fills.append((inner.edges, inner.num_edges, inner.bias_scores, bias, B, Z, Tq))

    def weights(self):
        """(W, Zw): the fills' total batch weight (a float) and sum of weight * Z (0-d, > 0): what
        `merged` divides a and S by (the data-parallel exchange weighs ranks by them)."""
        W = float(sum(f[4] for f in self.fills))
        Zw = sum(f[4] * f[5] for f in self.fills)
        return W, torch.where(Zw > 0, Zw, torch.ones_like(Zw))

    def merged(self, max_seq_len: int):
        """(head, q_idx, k_idx, S_norm, a) [C], num_edges 0-d, slot (S_norm, a) or None, bias, Tq."""
        W, Zw = self.weights()
        bias = self.fills[-1][3]
        Tq = self.fills[-1][6]
        slot = None
        if bias is not None:
            S_b = sum(f[4] * f[2][0].float() for f in self.fills)
            a_b = sum(f[4] * f[2][1].float() for f in self.fills)
            slot = (S_b / Zw, a_b / W)
        if len(self.fills) == 1:
            (h, i, j, S, a), n = self.fills[0][0], self.fills[0][1]
            return (h, i, j, S * (W / Zw), a), n.reshape(()), slot, bias, Tq
        lists = [(edges, n) for edges, n, *_ in self.fills]
        weights = [float(f[4]) for f in self.fills]
        (h, i, j, S, a), num = merge_edge_lists(lists, weights, weights, max_seq_len)
        return (h, i, j, (S / Zw.double()).float(), (a / W).float()), num, slot, bias, Tq


def merge_edge_lists(lists, s_weights, a_weights, max_seq_len):
    """One edge list from several: lists[k] = ((h, i, j, S, a) each [C_k], num_edges), each listing
    an edge at most once. Returns ((h, i, j) int32, sum_k s_weights[k] S_k, sum_k a_weights[k] a_k
    (float64; a list without the edge adds 0), each [U]) and U (0-d int32), edges sorted by
    (head, q, k). The sums run in list order and no two terms of one scatter meet, so the result
    is the same bit for bit on every run and device (micro-batches, data-parallel ranks)."""
    L = max_seq_len
    keys, valid = [], []
    for (h, i, j, _, _), n in lists:
        keys.append((h.long() * L + i.long()) * L + j.long())
        valid.append(torch.arange(h.shape[0], device=h.device) < n)
    uniq = torch.unique(torch.cat([k[v] for k, v in zip(keys, valid)]))          # sorted
    S_out = torch.zeros(uniq.shape[0], dtype=torch.float64, device=uniq.device)
    a_out = torch.zeros_like(S_out)
    for ((_, _, _, S, a), _), key, ok, ws, wa in zip(lists, keys, valid, s_weights, a_weights):
        pos = torch.searchsorted(uniq, key[ok])
        S_out.index_put_((pos,), S[ok].double() * ws, accumulate=True)
        a_out.index_put_((pos,), a[ok].double() * wa, accumulate=True)
    merged = ((uniq // (L * L)).int(), ((uniq // L) % L).int(), (uniq % L).int(), S_out, a_out)
    return merged, torch.tensor(uniq.shape[0], dtype=torch.int32, device=uniq.device)


class CallObserver:
    """What one attention call of a capture step hands `biased_attention(capture=)`: its fill
    (called by that call's backward) goes to the layer's LayerCapture. With `cut` (the layer's
    cut from its last capture step, a float) the call's SalienceCapture exists before the
    backward, so the Triton backward fills its fused bound and rescores only the segments that
    pass (memtrace.capture), and the step needs no host sync for the cut."""

    def __init__(self, owner, layer: int, key_padding_mask=None, *, cut=None, capacity=None, q=None, k=None):
        self._owner = owner
        self._layer = layer
        self._kpm = key_padding_mask
        self._inner = None
        if cut is not None and q is not None:
            self._inner = SalienceCapture(threshold=min(cut, _FLOAT32_MAX), capacity=call_capacity(capacity, q, k))

    def fused_bound_applies(self, q, k) -> bool:
        return self._inner is not None and self._inner.fused_bound_applies(q, k)

    def fused_bound(self, q, k):
        return None if self._inner is None else self._inner.fused_bound(q, k)

    def score_segments(self, q, k, v, lse, dout, bias, words, *, causal, scale, bound, key_padding_mask=None):
        self._inner.score_segments(q, k, v, lse, dout, bias, words, causal=causal, scale=scale, bound=bound,
                                   key_padding_mask=key_padding_mask)

    def fill(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, bound=None, **extra):
        kpm = extra.get("key_padding_mask", self._kpm)
        self._owner._fill(self._layer, q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale,
                          alpha=alpha, key_padding_mask=kpm, extra=extra, inner=self._inner,
                          bound=bound if self._inner is not None else None)


def call_capacity(capacity: int, q, k) -> int:
    """The capture buffer of one call: the layer's capacity, at most one slot per (head, query, key)."""
    return max(1, min(capacity, q.shape[1] * q.shape[2] * k.shape[2]))


def default_capacity(quota: int, num_heads: int) -> int:
    """Capture buffer size: four times what the layer's memory can hold, within [4096, 2^17]."""
    return int(min(max(4 * quota * num_heads, 4096), DEFAULT_CAPACITY))
