"""Cancelling rows: their detection from LSE', and the exact backward of those rows.

Where 1 + sum w of a row is tiny the correction identity (kernels/attention/entries.py) cancels.
The backward cannot use the identity on a cancelling row either: the dense pass there computes
P = exp(s - LSE') ~ 1 / (1 + sum w) on the entry edges and the entry term subtracts a g of the
same size. So cancelling rows are taken out of the fast backward entirely and recomputed exactly:

    flags = the rows' cancelling flags (from the forward, or `cancelling_rows` from LSE')
    dense backward with LSE' = +inf on flagged rows (`mask_lse`): P = 0 there, so the row adds
    nothing to dK/dV and gets dQ = 0 (the dense kernels need no change: +inf is how they already
    drop fully masked rows); the entry terms read the same masked LSE' and skip those rows;
    `exact_rows_bwd`: by query block, dQ of the flagged rows and the dvalues of their entries; by
    key block, their dK/dV contributions (all GQA heads in one program: no atomics). Both use
    the bias inside the tile loop (bias_tile) and P' = exp(s + alpha b - LSE'), which is <= 1.

A row is cancelling iff 1 + sum w < CANCEL_THRESHOLD. From LSE' alone (the backward's view):
Z / Z' = 1 + sum_e (P_e - P'_e), so the test is sum_e (P_e - P'_e) > 1 / CANCEL_THRESHOLD - 1.
Rows that pass it have sum_e P_e <= 1/CANCEL_THRESHOLD - 1 + sum_e P'_e <= 1/CANCEL_THRESHOLD,
so the fast backward loses at most ~2 bits on them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import INTERPRET, LOG2E, dot_precision
from .checks import check_common, flags_2d, last_dim_contiguous
from .config import slow_blocks
from .entries import (
    CANCEL_THRESHOLD,
    bias_tile,
    block_range,
    entry_chunk,
    flagged_rows,
    gather,
    key_live,
    key_mask_row,
    load_entries,
    row_term,
    rows_with_entries,
)


@triton.jit
def _cancel_flags_kernel(Q, K, Lse, Flags, EntryPos, EntryVal, QOffsets, KMask,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_lb, stride_lh, stride_lm,
                         Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, excess,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, HAS_MASK: tl.constexpr = False):
    """Flags[bh, i] (int8) = 1 where row i is cancelling: sum_e (P_e - P'_e) > excess, with
    P = exp(s - LSE'), P' = exp(s + alpha b - LSE') over the row's entries (Lse is the BIASED
    natural LSE'). Grid (cdiv(Tq, BLOCK_M), B*Hq); every row < Tq is written (0 without entries).
    HAS_MASK: entries on keys that the key padding mask KMask (int8 [B, Tk]) drops are skipped.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    flag = offs_m < 0
    e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    if e_hi > e_lo:
        offs_d = tl.arange(0, HEAD_DIM)
        live = rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=live, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b * stride_kb + hk * stride_kh
        excess_sum = tl.zeros([BLOCK_M], tl.float32)
        for e0 in range(e_lo, e_hi, CHUNK):
            val, i_e, j_e, ok = load_entries(EntryPos, EntryVal, e0 + tl.arange(0, CHUNK), e_hi, Tq, Tk,
                                              causal_off, CAUSAL, key_mask_row(KMask, b, Tk, HAS_MASK), HAS_MASK)
            kg = gather(k_base, j_e, stride_kn, offs_d, ok)
            u = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2 - lse2[:, None]
            hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :]
            excess_sum += tl.sum(tl.where(hit, tl.exp2(u) - tl.exp2(u + (val * alpha2)[None, :]), 0.0), 1)
        flag = live & (excess_sum > excess)
    tl.store(Flags + bh.to(tl.int64) * Tq + offs_m, flag.to(tl.int8), mask=offs_m < Tq)


@triton.jit
def _load_row_state(q_base, o_base, do_base, lse_base, rows, sel, stride_qm, stride_om,
                    stride_lm, stride_dom, offs_d):
    """q, dO (input dtype), delta = rowsum(dO * O') and LSE' in log2 units (+inf where the row is
    fully masked) of rows `rows`, loaded only where `sel` (0 / +inf elsewhere)."""
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=sel[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=sel[:, None], other=0.0)
    o = tl.load(o_base + rows[:, None] * stride_om + offs_d[None, :], mask=sel[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(lse_base + rows * stride_lm, mask=sel, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return q, do, delta, lse2


@triton.jit
def _exact_rows_q_kernel(Q, K, V, Out, Lse, DO, DQ, DvalPart, Flags, EntryPos, EntryVal, QOffsets, KMask,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                         stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                         stride_dqb, stride_dqh, stride_dqm,
                         Hq, GROUP, Tq, Tk, TqMax, E, causal_off, dq_scale, qk_scale2, alpha2, alpha,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                         NEED_DVAL: tl.constexpr, HAS_MASK: tl.constexpr = False):
    """Exact dQ of the flagged rows (STORED over what the fast pass left there, which is 0) and,
    NEED_DVAL, DvalPart[b, e] for the entries on those rows.

    Grid (cdiv(Tq, BLOCK_M), B*Hq); a block without a flagged row returns after one [BLOCK_M]
    load. Otherwise a flash-backward dQ loop over every visible key block with the bias added to
    the logits in the tile (P' = exp2(s + alpha b - lse2) <= 1, no cancellation), masked to the
    flagged rows. Out/Lse are the biased O' and natural LSE'. HAS_MASK: keys that the key
    padding mask KMask (int8 [B, Tk]) drops, and their entries, take no part.
    """
    bh, m0, offs_m, sel = flagged_rows(Flags, Tq, BLOCK_M)
    if tl.sum(sel.to(tl.int32), 0) > 0:
        b = (bh // Hq).to(tl.int64)
        h = (bh % Hq).to(tl.int64)
        hk = h // GROUP
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q, do, delta, lse2 = _load_row_state(
            Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
            DO + b * stride_dob + h * stride_doh, Lse + b * stride_lb + h * stride_lh, offs_m, sel,
            stride_qm, stride_om, stride_lm, stride_dom, offs_d)
        e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        else:
            hi = Tk
        km = key_mask_row(KMask, b, Tk, HAS_MASK)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        pdp = tl.zeros([BLOCK_M], tl.float32)
        psum = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + offs_n
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2
            s2 += bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
            valid = sel[:, None] & (cols < Tk)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
            if HAS_MASK:
                valid = valid & key_live(km, cols, Tk)[None, :]
            p = tl.where(valid, tl.math.exp2(s2 - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
            if NEED_DVAL:
                pdp += tl.sum(p * dp, 1)
                psum += tl.sum(p, 1)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                 (dq * dq_scale).to(DQ.dtype.element_ty), mask=sel[:, None])
        if NEED_DVAL:
            # per entry on a flagged row: alpha * P'(dP - D), P' computed directly (<= 1), with the
            # exact D = sum_j P' dP / sum_j P' of the loop above (rowsum(dO * O') from a
            # half-precision O' cancels on an entry that dominates its row; dQ above keeps it)
            delta = row_term(pdp, psum)
            for e0 in range(e_lo, e_hi, CHUNK):
                offs_e, in_range, pos, val, i_e, j_e, ok = entry_chunk(EntryPos, EntryVal, e0, e_hi, Tq, Tk,
                                                                       causal_off, CAUSAL, CHUNK, km, HAS_MASK)
                hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :] & sel[:, None]
                mine = tl.max(hit.to(tl.int32), 0) > 0
                kg = gather(k_base, j_e, stride_kn, offs_d, mine)
                vg = gather(v_base, j_e, stride_vn, offs_d, mine)
                u = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2 - lse2[:, None]
                p_biased = tl.where(hit, tl.exp2(u + (val * alpha2)[None, :]), 0.0)
                dp = tl.dot(do, tl.trans(vg), input_precision=DOT_PREC) - delta[:, None]
                dval = tl.sum(p_biased * dp, 0) * alpha
                prev = tl.load(EntryPos + offs_e - 1, mask=in_range & (offs_e > e_lo), other=-1)
                dval = tl.where(prev == pos, 0.0, dval)   # duplicate follower: its leader carries it
                tl.store(DvalPart + b * E + offs_e, dval, mask=mine)


@triton.jit
def _exact_rows_kv_kernel(Q, K, V, Out, Lse, DO, DK, DV, Flags, EntryPos, EntryVal, QOffsets, KMask,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          Hq, Hkv, GROUP, Tq, Tk, TqMax, causal_off, scale, qk_scale2, alpha2,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, SCAN: tl.constexpr, CHUNK: tl.constexpr,
                          DOT_PREC: tl.constexpr, HAS_MASK: tl.constexpr = False):
    """dK += scale * (exact terms of the flagged rows), dV += (same), for keys [n0, n0+BLOCK_N) of
    (b, kv head), summed over the GROUP query heads in the program (no atomics).

    Grid (cdiv(Tk, BLOCK_N), B*Hkv). First a scan of the flags of the rows that can see these
    keys (SCAN bytes per step); a program that finds none returns without touching K, V, dK, dV.
    Otherwise, per query block holding a flagged row: the dense dK/dV tile with the bias in the
    logits, masked to the flagged rows (HAS_MASK: and to the keys the key padding mask KMask,
    int8 [B, Tk], keeps).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    if CAUSAL:
        lo = (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M   # rows i >= j - causal_off see key j
    else:
        lo = 0
    total = 0
    offs_s = tl.arange(0, SCAN)
    for g in range(GROUP):
        f_base = Flags + (b * Hq + hk * GROUP + g) * Tq
        for s0 in range(lo, Tq, SCAN):
            rows = s0 + offs_s
            total += tl.sum(tl.load(f_base + rows, mask=rows < Tq, other=0).to(tl.int32), 0)
    if total > 0:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_mb = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        kmask = (offs_n < Tk)[:, None]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=kmask, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                    mask=kmask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            f_base = Flags + (b * Hq + h) * Tq
            for m0 in range(lo, Tq, BLOCK_M):
                rows = m0 + offs_mb
                sel = tl.load(f_base + rows, mask=rows < Tq, other=0) != 0
                if tl.sum(sel.to(tl.int32), 0) > 0:
                    q, do, delta, lse2 = _load_row_state(
                        Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
                        DO + b * stride_dob + h * stride_doh, Lse + b * stride_lb + h * stride_lh, rows, sel,
                        stride_qm, stride_om, stride_lm, stride_dom, offs_d)
                    e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
                    s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2            # [BM, BN]
                    s2 += bias_tile(rows, offs_n, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
                    valid = sel[:, None] & (offs_n < Tk)[None, :]
                    if CAUSAL:
                        valid = valid & (offs_n[None, :] <= rows[:, None] + causal_off)
                    if HAS_MASK:
                        valid = valid & key_live(key_mask_row(KMask, b, Tk, HAS_MASK), offs_n, Tk)[None, :]
                    p = tl.where(valid, tl.math.exp2(s2 - lse2[:, None]), 0.0)
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                    ds = p * (dp - delta[:, None])
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PREC)
        dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
        dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
        dk_old = tl.load(dk_ptrs, mask=kmask, other=0.0).to(tl.float32)
        dv_old = tl.load(dv_ptrs, mask=kmask, other=0.0).to(tl.float32)
        tl.store(dk_ptrs, (dk_old + scale * dk).to(DK.dtype.element_ty), mask=kmask)
        tl.store(dv_ptrs, (dv_old + dv).to(DV.dtype.element_ty), mask=kmask)



def cancel_flags(q, k, lse, bias, entry_values, *, causal, scale, alpha, prec, chunk=32, key_padding_mask=None):
    """int8 [B*Hq, Tq] cancelling flags from LSE' (q already sign-normalised: scale > 0);
    key_padding_mask: None or the int8 [B, Tk] mask of checks.key_mask_2d."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    flags = torch.empty((B * Hq, Tq), dtype=torch.int8, device=q.device)
    block_m = 16 if INTERPRET else 32
    _cancel_flags_kernel[(triton.cdiv(Tq, block_m), B * Hq)](
        q, k, lse, flags, bias.entry_pos, entry_values, bias.q_offsets,
        flags if key_padding_mask is None else key_padding_mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.index_rows, Tk - Tq, scale * LOG2E, alpha * LOG2E,
        1.0 / CANCEL_THRESHOLD - 1.0,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=block_m, CHUNK=chunk, DOT_PREC=prec, num_warps=4,
        **_mask_kw(key_padding_mask))
    return flags


def _mask_kw(key_padding_mask):
    """The launch kwargs of a masked call (none for an unmasked one: its kernels are unchanged)."""
    return {} if key_padding_mask is None else {"HAS_MASK": True}


def cancelling_rows(q, k, lse, bias, entry_values=None, *, causal, scale, alpha, allow_tf32: bool = False):
    """int8 [B, Hq, Tq]: 1 on the rows where the sparse-correction identity cancels.

    lse is the BIASED natural LSE' [B, Hq, Tq] (what the forward returned). A row is cancelling
    iff 1 + sum w < CANCEL_THRESHOLD, evaluated here as sum_e (exp(s - LSE') - exp(s + alpha b -
    LSE')) > 1/CANCEL_THRESHOLD - 1 over the row's entries: one pass over the entries (a K row
    gathered per entry and batch element), no dense work. The forwards compute the same flags for
    free (flash_fwd / correct_fwd with return_flags=True): prefer those.
    """
    B, Hq, _Hkv, Tq, _Tk, _D = check_common(q, k, k, bias)
    if bias is None or bias.nnz == 0:
        return torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)
    if lse.dtype != torch.float32:
        raise ValueError("lse must be float32")
    if entry_values is None:
        entry_values = bias.entry_values()
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    if scale < 0:
        q, scale = -q, -scale
    flags = cancel_flags(q, k, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                          prec=dot_precision(q.dtype, allow_tf32))
    return flags.view(B, Hq, Tq)


def mask_lse(lse, row_flags, value: float = float("inf")):
    """A copy of lse [B, Hq, Tq] with `value` (+inf) on the flagged rows. A flash-style backward
    fed it computes P = exp(s - inf) = 0 on those rows: they add nothing to dK/dV, get dQ = 0, and
    no P can overflow (unlike masking dO alone, where an fp16 P = exp(s - LSE') > 65504 times a
    zero dO is NaN). +inf is FlashAttention's own LSE for a fully masked row; for a backend that
    mishandles it, any finite value far above the logits (e.g. 1e4) has the same effect.
    Cheap: B*Hq*Tq floats."""
    return lse.masked_fill(row_flags.bool(), value)


def mask_dout(dout, row_flags):
    """A copy of dout [B, Hq, Tq, D] with the flagged rows zeroed (D = dP = dS = 0 there). Costs a
    full pass over dO; use mask_lse where the dense backward accepts an LSE of +inf (all of ours
    and FlashAttention-style kernels do), or both for a backend that does not."""
    return dout.masked_fill(row_flags.bool()[..., None], 0)


def exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, flags, dval_part, *,
                causal, scale, dq_scale, alpha, prec, chunk=16, key_padding_mask=None):
    """Launch the two exact-row kernels. q sign-normalised (scale > 0), dq_scale = scale with
    the sign the caller's dq needs; flags int8 [B*Hq, Tq]; dval_part float32 [B, E] or None.
    dq: flagged rows stored; dk, dv: flagged rows' terms added; dval_part[b, e] stored for the
    entries on flagged rows. key_padding_mask: None or the int8 [B, Tk] mask of checks.key_mask_2d."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    E = bias.nnz
    bm_q, bn_q, bm_kv, bn_kv, scan = slow_blocks(D)
    need_dval = dval_part is not None
    if not need_dval:
        dval_part = torch.empty((1, 1), dtype=torch.float32, device=q.device)
    ep, qo = bias.entry_pos, bias.q_offsets
    km = flags if key_padding_mask is None else key_padding_mask
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
              lse.stride(0), lse.stride(1), lse.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _exact_rows_q_kernel[(triton.cdiv(Tq, bm_q), B * Hq)](
        q, k, v, out, lse, dout, dq, dval_part, flags, ep, entry_values, qo, km, *common,
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.index_rows, E, Tk - Tq, dq_scale, scale * LOG2E, alpha * LOG2E, alpha,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=bm_q, BLOCK_N=bn_q, CHUNK=chunk, DOT_PREC=prec,
        NEED_DVAL=need_dval, num_warps=4, num_stages=1, **_mask_kw(key_padding_mask))
    _exact_rows_kv_kernel[(triton.cdiv(Tk, bn_kv), B * Hkv)](
        q, k, v, out, lse, dout, dk, dv, flags, ep, entry_values, qo, km, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, Hkv, Hq // Hkv, Tq, Tk, bias.index_rows, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=bm_kv, BLOCK_N=bn_kv, SCAN=scan, CHUNK=chunk,
        DOT_PREC=prec, num_warps=4 if INTERPRET or D > 128 else 8, num_stages=1, **_mask_kw(key_padding_mask))


def exact_rows_bwd(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, row_flags, *, causal, scale,
                   alpha, dval_part=None, allow_tf32: bool = False):
    """The exact backward of the flagged (cancelling) rows, after a backward that excluded them.

    Precondition: (dq, dk, dv) come from a dense backward fed mask_lse(lse, row_flags) (or
    mask_dout(dout, row_flags)), so flagged rows contributed nothing and hold dq = 0, and any
    entry terms were computed with the same masked LSE (correct_bwd(row_flags=...) does that).
    out, lse are the biased O', natural LSE' (unmasked); dout the real dO. In place: dq rows of
    flagged rows are overwritten with their exact gradient; dk, dv get the flagged rows' exact
    terms added; dval_part (float32 [B, E], optional) gets, at each entry on a flagged row,
    alpha * P'(dP - D) of that batch element (duplicate followers 0). Returns (dq, dk, dv).
    Two launches, no host sync: programs whose rows/keys see no flagged row exit at once.
    """
    B, Hq, _Hkv, Tq, _Tk, _D = check_common(q, k, v, bias)
    if bias is None or bias.nnz == 0:
        return dq, dk, dv
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along D")
    if dval_part is not None and (dval_part.shape != (B, bias.nnz) or dval_part.dtype != torch.float32
                                  or not dval_part.is_contiguous()):
        raise ValueError(f"dval_part must be contiguous float32 [B, E] = {(B, bias.nnz)}")
    if entry_values is None:
        entry_values = bias.entry_values()
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    flags = flags_2d(row_flags, B, Hq, Tq)
    dq_scale = scale
    if scale < 0:
        q, scale = -q, -scale
    exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, flags, dval_part, causal=causal,
                scale=scale, dq_scale=dq_scale, alpha=alpha, prec=dot_precision(q.dtype, allow_tf32))
    return dq, dk, dv
