"""Salience of the bias entries, exactly.

``_salience_entry_kernel``  the bias entries, exactly: grid (cdiv(E, BLOCK_E),); each program
    gathers q_i, k_j, v_j, dO_i of its entries for every batch element,
    P' = exp(scale q.k + alpha b - LSE'), S = mean_b P'|dO.v|, a = mean_b P'. Entries outside
    (Tq, Tk) or masked by causal score 0.

Layouts: q, dout [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; lse float32 [B, Hq, Tq] natural log,
-inf for fully masked rows (P = 0 there); any strides. Outputs are int32 / float32 1-D buffers.
"""
import triton
import triton.language as tl

from .._common import padded_strides
from ..launch import FastLaunch


@triton.jit
def _salience_entry_kernel(
        Q, K, V, DO, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, som, sod, slb, slh, slm,
        ENT_H, ENT_I, ENT_J, ENT_VAL, E,
        B, Tq, Tk, group, qk_scale, alpha_log2, inv_batch, causal_offset,
        OUT_S, OUT_A, KMask,
        BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr = False):
    """HAS_MASK: an entry on a key that the key padding mask KMask (int8 [B, Tk]) drops in batch b
    has P' = 0 there."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_e = offs_e < E
    h = tl.load(ENT_H + offs_e, mask=in_e, other=0)
    i = tl.load(ENT_I + offs_e, mask=in_e, other=0)
    j = tl.load(ENT_J + offs_e, mask=in_e, other=0)
    val = tl.load(ENT_VAL + offs_e, mask=in_e, other=0.0)
    ok = in_e & (i < Tq) & (j < Tk) & (j <= i + causal_offset)
    i = tl.where(ok, i, 0)
    j = tl.where(ok, j, 0)
    h = tl.where(ok, h, 0)
    hk = h // group
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + (h * sqh + i * sqm)[:, None] + offs_d[None, :] * sqd
    do_ptrs = DO + (h * soh + i * som)[:, None] + offs_d[None, :] * sod
    k_ptrs = K + (hk * skh + j * skn)[:, None] + offs_d[None, :] * skd
    v_ptrs = V + (hk * svh + j * svn)[:, None] + offs_d[None, :] * svd
    lse_ptrs = LSE + h * slh + i * slm
    acc_s = tl.zeros([BLOCK_E], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_E], dtype=tl.float32)
    for b in range(B):
        q = tl.load(q_ptrs + b * sqb, mask=ok[:, None], other=0.0).to(tl.float32)
        k = tl.load(k_ptrs + b * skb, mask=ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(do_ptrs + b * sob, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptrs + b * svb, mask=ok[:, None], other=0.0).to(tl.float32)
        lse = tl.load(lse_ptrs + b * slb, mask=ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        logit2 = tl.sum(q * k, axis=1) * qk_scale + val * alpha_log2
        p = tl.exp2(logit2 - lse2)
        if HAS_MASK:
            p = tl.where(tl.load(KMask + b * Tk + j, mask=ok, other=0) != 0, p, 0.0)
        dp = tl.sum(do * v, axis=1)
        acc_a += p
        acc_s += p * tl.abs(dp)
    tl.store(OUT_S + offs_e, tl.where(ok, acc_s * inv_batch, 0.0), mask=in_e)
    tl.store(OUT_A + offs_e, tl.where(ok, acc_a * inv_batch, 0.0), mask=in_e)


def launch_entries(q, k, v, dout, lse, ent_h, ent_i, ent_j, ent_val, out_s, out_a, *, qk_scale,
                   alpha_log2, causal_offset, block_e=32, num_warps=4, key_padding_mask=None):
    """Score every sorted bias entry exactly (see `_salience_entry_kernel`); key_padding_mask None
    or int8 [B, Tk] contiguous."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    E = ent_h.shape[0]
    if E == 0:
        return
    grid = (triton.cdiv(E, block_e),)
    _ENTRY_FAST[grid](
        q, k, v, dout, lse,
        *padded_strides(q, 4), *padded_strides(k, 4), *padded_strides(v, 4), *padded_strides(dout, 4),
        *padded_strides(lse, 3),
        ent_h, ent_i, ent_j, ent_val, E,
        B, Tq, Tk, Hq // Hkv, qk_scale, alpha_log2, 1.0 / B, causal_offset,
        out_s, out_a, out_s if key_padding_mask is None else key_padding_mask, BLOCK_E=block_e, HEAD_DIM=D,
        num_warps=num_warps, **({} if key_padding_mask is None else {"HAS_MASK": True}))


_ENTRY_FAST = FastLaunch(_salience_entry_kernel)
