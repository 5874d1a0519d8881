"""The flash backward with the entry terms in its epilogues (flash_bwd).

Preprocess (delta, lse2; +inf on the cancelling rows), then dQ by query block and dK/dV by key
block, each with the entry terms of its block in the epilogue (rows or one-hot form,
config.entry_form), then the exact backward of the cancelling rows (cancel.py). With a dense
bias and no cancelling rows (config.split_backward) the entry terms come from correct_bwd after
an unbiased pass instead. The dQ kernel can also fill the salience capture's bound
(kernels/salience/bound.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings
from .._common import INTERPRET, LOG2E, dot_precision
from ..salience.bound import CAPTURE_SEG, CaptureBound, capture_all_pass_word, capture_bound_format
from .cancel import cancel_flags, exact_rows
from .checks import check_common, flags_2d, key_mask_2d, last_dim_contiguous
from .config import (
    bwd_configs,
    desc4,
    entry_form,
    interpret_desc,
    len_key,
    prune_dkdv,
    prune_dq,
    split_backward,
    use_tma,
)
from .correct_bwd import correct_bwd
from .entries import (
    block_range,
    dkdv_entries,
    dkdv_entries_rows,
    dq_entries,
    dq_entries_delta,
    dq_entries_rows,
    dq_entries_rows_delta,
    key_live,
    key_mask_row,
    row_term,
)

# The split backward's key-side correction (dK, dV) touches nothing the dense dQ kernel writes.
# So the split backward runs the dense dK/dV kernel first, then the dense dQ kernel on a
# high-priority stream (its blocks take every freed slot first) beside the key-side correction on
# the caller's stream, whose light programs fill what the dQ kernel leaves on each SM; the query
# side follows once dQ exists. Both read the preprocess's delta. On the H100 (B4 H16 T4096 D128
# bf16) this hid 40-50 us of the key side's 150-280 (the autotuned dQ kernel holds most of each
# SM): the backward's overhead at 16384 traces/head went from +15.2% to +14.0%, at 2048 from
# +8.1% to +6.6% (benchmarks/results/bwd_overlap_probe_h100_session13.json).
# Settings attn_bwd_overlap: auto (on for CUDA tensors), 0 (one stream, same order), 1.
_PRIORITY_STREAMS: dict = {}


def _priority_stream(device):
    """A cached highest-priority CUDA stream of `device` (None when attn_bwd_overlap is off, under the
    interpreter or off CUDA)."""
    if settings.current().attn_bwd_overlap == "0" or INTERPRET or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PRIORITY_STREAMS:
        _PRIORITY_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-100)   # clamped to the highest
    return _PRIORITY_STREAMS[idx]



@triton.jit
def _bwd_pre_kernel(Out, DO, Lse, Delta, Lse2, Flags,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    stride_lb, stride_lh, stride_lm, Hq, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_FLAGS: tl.constexpr):
    """Delta = rowsum(dO * O'), Lse2 = LSE' * log2(e) with +inf on fully masked rows (so every
    probability of such a row is exp2(s - inf) = 0 without a mask). Both [B*Hq, Tq] float32.
    HAS_FLAGS: Lse2 = +inf also on the cancelling rows (Flags int8 [B*Hq, Tq] != 0), which drops
    them from the dense loops and the entry epilogues exactly as a fully masked row (P = 0, so
    dS = 0 and no dV term); the exact-row kernels then do their gradient. Masking here, once per
    row, keeps the flag out of the dK/dV inner loop (which reloads dO per query block) and needs
    no masked copy of dO. Grid (cdiv(Tq, BLOCK_M), B*Hq)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (offs_m < Tq)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=offs_m < Tq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if HAS_FLAGS:
        flag = tl.load(Flags + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0)
        lse2 = tl.where(flag != 0, float("inf"), lse2)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)
    tl.store(Lse2 + bh.to(tl.int64) * Tq + offs_m, lse2, mask=offs_m < Tq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                lo, hi, offs_n, offs_mb, offs_d, Tq, causal_off, qk_scale2, q_desc, do_desc, b, h,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr):
    """dK (unscaled), dV of one key block over query blocks [lo, hi) of one head. MASKED applies
    the causal mask (query rows past Tq need none: their lse2 is +inf and dO 0). USE_DESC: q and
    dO tiles by TMA through [B, Hq, Tq, D] descriptors at (b, h) (rows past Tq read as zeros)."""
    for m0 in range(lo, hi, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_mb
        rmask = rows < Tq
        if USE_DESC:
            q = q_desc.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BLOCK_M, k.shape[1])
        else:
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=rmask, other=float("inf"))
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                 # [BN, BM]
        pT = tl.math.exp2(qkT * qk_scale2 - lse2[None, :])
        if MASKED:
            pT = tl.where(rows[None, :] + causal_off >= offs_n[:, None], pT, 0.0)
        if USE_DESC:
            do = do_desc.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BLOCK_M, k.shape[1])
        else:
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv



@triton.autotune(configs=bwd_configs("dkdv"),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK", "ENTRY_FORM",
                      "CHUNK", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": prune_dkdv})
@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, QDesc, DODesc, DK, DV, Lse2, Delta,
                           EntryPos, EntryVal, KOrder, KOffsets, QOffsets, Flags, KMask,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                           stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                           Hq, Hkv, GROUP, Tq, Tk, TqMax, TkMax, causal_off, scale, qk_scale2, alpha2,
                           TQ_KEY, TK_KEY, TMA_OK,
                           HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, ENTRY_FORM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr,
                           HAS_MASK: tl.constexpr = False):
    """DK, DV [B,Hkv,Tk,D] for keys [n0, n0+BLOCK_N) of (b, kv head).

    Grid (cdiv(Tk, BLOCK_N), B*Hkv). Loops over the GROUP query heads of the kv head and over
    their query blocks (causal: from the first block that sees the keys; masked blocks first),
    then adds the entry terms of each head's entries in this key block (k_order).
    HAS_MASK: KMask int8 [B, Tk] is the key padding mask. A masked key's P is 0 in every row and
    its dK, dV rows are its own, so the loops run unmasked and the masked keys' rows are stored as
    0 (a block with no key left skips the loops); the entry terms skip entries on masked keys
    (the rows form's one-hot dots would spread their values over the block).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
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
    if CAUSAL:
        # rows i see key j when i >= j - causal_off
        first = tl.maximum(n0 - causal_off, 0)
        lo = (first // BLOCK_M) * BLOCK_M
        unmasked = tl.maximum(tl.minimum(n0 + BLOCK_N - 1 - causal_off, Tq), 0)
        mid = tl.minimum(tl.cdiv(unmasked, BLOCK_M) * BLOCK_M, tl.maximum(lo, tl.cdiv(Tq, BLOCK_M) * BLOCK_M))
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    hi = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    km = key_mask_row(KMask, b, Tk, HAS_MASK)
    if HAS_MASK:
        keep = key_live(km, offs_n, Tk)
        hi = tl.where(tl.max(keep.to(tl.int32), 0) > 0, hi, 0)     # no key of the block left: no loop
        mid = tl.minimum(mid, hi)
        lo = tl.minimum(lo, hi)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + bh * Tq, Delta + bh * Tq,
                             stride_qm, stride_dom, lo, mid, offs_n, offs_mb, offs_d, Tq, causal_off,
                             qk_scale2, QDesc, DODesc, b, h, CAUSAL, True, BLOCK_M, DOT_PREC, USE_DESC)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + bh * Tq, Delta + bh * Tq,
                             stride_qm, stride_dom, mid, hi, offs_n, offs_mb, offs_d, Tq, causal_off,
                             qk_scale2, QDesc, DODesc, b, h, CAUSAL, False, BLOCK_M, DOT_PREC, USE_DESC)
    if HAS_BIAS:
        for g in range(GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            t_lo, t_hi = block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
            if ENTRY_FORM == 1:
                dk, dv = dkdv_entries_rows(dk, dv, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                            Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                            Lse2 + bh * Tq, Delta + bh * Tq, K + b * stride_kb + hk * stride_kh,
                                            V + b * stride_vb + hk * stride_vh, stride_qm, stride_dom,
                                            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2,
                                            CAUSAL, CHUNK, DOT_PREC, km, HAS_MASK)
            else:
                dk, dv = dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                       Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                       Lse2 + bh * Tq, Delta + bh * Tq, stride_qm, stride_dom, 1, offs_d,
                                       Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, False,
                                       km, HAS_MASK)
    dk = dk * scale
    if HAS_MASK:
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_tiles(dq, pdp, psum, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, hi,
              offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, k_desc, v_desc, b, hk,
              cap_bound, cap_scale, cap_limit, Tq,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              USE_DESC: tl.constexpr, CAPTURE: tl.constexpr, ROW_PDP: tl.constexpr, KM=None,
              HAS_MASK: tl.constexpr = False):
    """(dq, pdp, psum): dQ (unscaled) of one row block over key blocks [lo, hi); ROW_PDP: the rows'
    sums of P dP and P added to pdp, psum [BM] (the exact row term's, entries.row_term; else they
    come back as given). Keys past Tk are loaded as zero rows, which add nothing to dq (nor, being
    masked, to psum); MASKED applies the causal mask. USE_DESC: K/V tiles by TMA
    (as in _fwd_tiles). CAPTURE (the field width in bits, 0 = off): also add, per row, the levels
    ceil(min(cap_scale * max P*|dP|, cap_limit)) of each field's keys into that field of
    cap_bound[key block, row] (the salience capture's segment bound, see flash_bwd). HAS_MASK
    (masked blocks only): P = 0 on the keys that the key padding mask KM drops, so they add
    nothing to dq and never reach the bound."""
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        if USE_DESC:
            k = k_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
            v = v_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale2 - lse2[:, None])
        if MASKED and CAUSAL:
            p = tl.where(cols[None, :] <= offs_m[:, None] + causal_off, p, 0.0)
        if MASKED and HAS_MASK:
            p = tl.where(key_live(KM, cols, Tk)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        if ROW_PDP:
            if MASKED:
                p = tl.where((cols < Tk)[None, :], p, 0.0)     # keys past Tk: zero K rows, P = exp2(-lse2)
            pdp += tl.sum(p * dp, 1)
            psum += tl.sum(p, 1)
        if CAPTURE != 0:
            # Fire-and-forget integer adds (the result is unused): the B programs of (h, rows) sum
            # their batch element's rounded-up field maxima, so a field reaches cap_limit whenever
            # mean_b max_j P*|dP| (>= max_j S) reaches the threshold. NaN and inf clamp to the limit.
            FIELDS: tl.constexpr = 32 // CAPTURE
            sal = p * tl.abs(dp)
            if FIELDS == 1:
                top = tl.max(sal, 1) * cap_scale
                word = tl.ceil(tl.where(top < cap_limit, top, cap_limit)).to(tl.int32)
            else:
                # Field f holds the keys j of the block with (j // 2) % FIELDS == f: in the wgmma
                # accumulator a thread's columns are 8g + 2 * (lane % 4) + {0, 1}, so a field's
                # maximum needs no shuffles (contiguous 16-key fields needed four per row and value,
                # +25% dq time on the H100). The fill rescores a whole block when any field passes,
                # so which keys share a field changes only how tight the bound is.
                top = tl.reshape(sal, [sal.shape[0], BLOCK_N // (2 * FIELDS), FIELDS, 2])
                top = tl.max(tl.max(top, 3), 1) * cap_scale
                level = tl.ceil(tl.where(top < cap_limit, top, cap_limit)).to(tl.int32)
                word = tl.sum(level << (tl.arange(0, FIELDS) * CAPTURE)[None, :], 1)
            tl.atomic_add(cap_bound + (n0 // BLOCK_N) * Tq + offs_m, word, mask=offs_m < Tq, sem="relaxed")
    return dq, pdp, psum


@triton.autotune(configs=bwd_configs("dq"),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK", "ENTRY_FORM",
                      "CHUNK", "CAPTURE", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": prune_dq}, reset_to_zero=["CapBound"])
@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, KDesc, VDesc, DQ, Lse2, Delta, DeltaX, DvalPart,
                         EntryPos, EntryVal, QOffsets, CapBound, cap_scale, cap_limit, cap_blocks, KMask,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                         stride_dqb, stride_dqh, stride_dqm,
                         Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                         TQ_KEY, TK_KEY, TMA_OK,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr,
                         ENTRY_FORM: tl.constexpr, CAPTURE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr,
                         HAS_MASK: tl.constexpr = False):
    """DQ [B,Hq,Tq,D] for rows [m0, m0+BLOCK_M) of (b, h), and DvalPart[b, e] for their entries.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). Dense loop over the visible key blocks (unmasked, then the
    diagonal/tail blocks masked), then the entry terms of the block's entries (entry_pos order).
    CAPTURE (field bits, 0 = off): CapBound int32 [Hq, cap_blocks, Tq] (BLOCK_N == the capture's
    segment width) receives the salience bound of every (row, key block) the loops visit.
    HAS_MASK: KMask int8 [B, Tk] is the key padding mask; every key block runs the masked loop.
    NEED_DVAL: the entry terms and dvalues use the exact row term D = sum_j P' dP / sum_j P' (the
    dense loops' sums, then the entries': entries.row_term) instead of Delta. DeltaX float32
    [B*Hq, 2, Tq]: with a bias [:, 0] receives D (the rows form gathers it); without (the split
    backward) [:, 0] and [:, 1] receive the dense sums of P dP and P, for correct_bwd(row_pdp=).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    lse2 = tl.load(Lse2 + bh.to(tl.int64) * Tq + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        full = tl.maximum(tl.minimum(Tk, m0 + 1 + causal_off), 0)
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    km = key_mask_row(KMask, b, Tk, HAS_MASK)
    if HAS_MASK:
        full = 0
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    pdp = tl.zeros([BLOCK_M], tl.float32)
    psum = tl.zeros([BLOCK_M], tl.float32)
    cap_bound = CapBound + h.to(tl.int64) * cap_blocks * Tq
    dq, pdp, psum = _dq_tiles(dq, pdp, psum, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, 0, full,
                              offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                              cap_bound, cap_scale, cap_limit, Tq, CAUSAL, False, BLOCK_N, DOT_PREC, USE_DESC,
                              CAPTURE, NEED_DVAL)
    dq, pdp, psum = _dq_tiles(dq, pdp, psum, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full, hi,
                              offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                              cap_bound, cap_scale, cap_limit, Tq, CAUSAL, True, BLOCK_N, DOT_PREC, USE_DESC,
                              CAPTURE, NEED_DVAL, km, HAS_MASK)
    if HAS_BIAS:
        e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    if NEED_DVAL:
        x_rows = DeltaX + bh.to(tl.int64) * 2 * Tq          # [2, Tq] of this (b, h)
        if HAS_BIAS:
            if ENTRY_FORM == 1:
                pdp, psum = dq_entries_rows_delta(pdp, psum, offs_m, e_lo, e_hi, EntryPos, EntryVal,
                                                  Q + b * stride_qb + h * stride_qh,
                                                  DO + b * stride_dob + h * stride_doh, Lse2 + bh.to(tl.int64) * Tq,
                                                  k_base, v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d,
                                                  Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, km, HAS_MASK)
            else:
                pdp, psum = dq_entries_delta(pdp, psum, q, do, lse2, offs_m, e_lo, e_hi, EntryPos, EntryVal,
                                             k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                             qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, km, HAS_MASK)
            delta = row_term(pdp, psum)     # from here on the exact row term
            tl.store(x_rows + offs_m, delta, mask=rmask)
        else:
            tl.store(x_rows + offs_m, pdp, mask=rmask)
            tl.store(x_rows + Tq + offs_m, psum, mask=rmask)
    if HAS_BIAS:
        if ENTRY_FORM == 1:
            if NEED_DVAL:
                tl.debug_barrier()      # the rows form gathers each entry's D from DeltaX
            dq = dq_entries_rows(dq, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalPart + b * E,
                                  Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                  Lse2 + bh.to(tl.int64) * Tq, x_rows if NEED_DVAL else Delta + bh.to(tl.int64) * Tq,
                                  k_base, v_base,
                                  stride_qm, stride_dom, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                  qk_scale2, alpha2, alpha, CAUSAL, CHUNK, DOT_PREC, NEED_DVAL, km, HAS_MASK)
        else:
            dq = dq_entries(dq, q, do, lse2, delta, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalPart + b * E,
                             k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                             qk_scale2, alpha2, alpha, CAUSAL, CHUNK, DOT_PREC, NEED_DVAL, km, HAS_MASK)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


def flash_bwd(q, k, v, out, lse, dout, bias=None, entry_values=None, *, causal: bool, scale: float,
              alpha: float, need_dvalues: bool, allow_tf32: bool = False, chunk: int | None = None, row_flags=None,
              may_cancel: bool = True, capture_bound: CaptureBound | None = None, beside_dq=None,
              key_padding_mask=None, row_pdp=None):
    """Backward of flash_fwd: (dq, dk, dv, dvalues).

    out, lse are flash_fwd's results (biased O', natural LSE'); dout [B,Hq,Tq,D]. dq has q's
    shape, dk/dv k's shape (GQA heads summed), all in the inputs' dtype; dvalues float32 [E]
    (per sorted entry, alpha * sum_b of the logit gradient; duplicate followers 0) when
    need_dvalues, else None. row_flags: the cancelling rows from flash_fwd(return_flags=True)
    (int8/bool [B,Hq,Tq]); when None and there is a bias they are recomputed from lse (one pass
    over the entries). Launches: preprocess (delta, lse2; +inf on flagged rows), dQ by query
    block, dK/dV by key block (the entry terms in each epilogue), then with a bias the exact
    backward of the flagged rows (by query block, by key block; idle programs exit at once).
    may_cancel=False makes flash_fwd's promise (alpha * every entry value >= ln(CANCEL_THRESHOLD),
    so no row can cancel): the flags pass, their masking and the exact-row launches are skipped
    (at B4 H16 T4096 D128 they took ~110 us of a ~4.6 ms forward+backward at 2048 traces/head,
    ~180 us at 16384; benchmarks/results/profile_attention_h100_session4.json). With
    may_cancel=False, no capture_bound and a dense bias (split_backward) the entry terms come
    from correct_bwd after an unbiased pass instead of the fused epilogues.

    capture_bound: None, or a CaptureBound whose words the dQ kernel fills, for the salience
    capture (memtrace.capture), against its threshold t > 0; then its after_dq runs, then the
    dK/dV kernel (dQ runs first so that the bound is gone before dK/dV exist). With
    (bits, K) = capture_bound_format(B), word [h, n, i] packs 32 / bits fields, field f for the
    keys j of segment n with (j // 2) % (32 / bits) == f, each holding
        sum_b ceil(min(K / t * max_j P[b,h,i,j] * |dP[b,h,i,j]|, K * B))    (j: the field's keys)
    which reaches K * B whenever mean_b max_j P*|dP| >= t, so whenever some edge there that is not
    a bias entry has salience S >= t. Rows the cancelling-row path recomputes (their P is 0 in the
    dense loops) get every field at K * B. Cost: a row max per field and one fire-and-forget
    integer atomic add per row and tile; the capture then rescores only the words with a passing
    field (a float bound of the whole segment let 2-4x more rows through at B4 on random data).

    beside_dq (internal, the split form; bias=None and no capture only): a callable
    f(delta, dk, dv) launched on the caller's stream right after the dK/dV kernel, which then runs
    BEFORE the dQ kernel; the dQ kernel runs meanwhile on a high-priority stream
    (_priority_stream), joined before return. delta: the preprocess's float32 [B*Hq, Tq], which
    then also takes the place of dvalues in the result: (dq, dk, dv, delta).

    key_padding_mask: None, or bool/int8 [B, Tk] (nonzero = attend), as given to flash_fwd:
    masked keys get zero dK, dV, their entries zero dvalues, and neither reaches the capture
    bound. Masked calls take the fused form only (never split_backward / correct_bwd).

    With need_dvalues the dQ kernel computes the exact row term D = sum_j P' dP / sum_j P' for the
    entry terms and dvalues (entries.py, issue 28 point 3); row_pdp (internal, the split form's dense pass:
    bias=None) is a float32 [B*Hq, 2, Tq] tensor that then receives the dense sums of P dP and P
    for correct_bwd(row_pdp=) to complete. dK/dV keep the preprocess's delta.
    """
    B, Hq, Hkv, Tq, Tk, D = check_common(q, k, v, bias)
    kmask = key_mask_2d(key_padding_mask, B, Tk, q.device)
    if beside_dq is not None and (bias is not None or capture_bound is not None or kmask is not None):
        raise ValueError("beside_dq needs bias=None, no capture_bound and no key_padding_mask")
    if kmask is None and split_backward(bias, may_cancel, capture_bound):
        ev = bias.entry_values() if entry_values is None else entry_values
        kw = {"causal": causal, "scale": scale, "alpha": alpha, "allow_tf32": allow_tf32}

        def key_side(delta, dk, dv):     # beside the dense dQ kernel (attn_bwd_overlap)
            correct_bwd(q, k, v, out, lse, dout, bias, ev, None, dk, dv, need_dvalues=False, delta=delta,
                        parts="kv", **kw)
        pdp = torch.empty((B * Hq, 2, Tq), dtype=torch.float32, device=q.device) if need_dvalues else None
        dq, dk, dv, delta = flash_bwd(q, k, v, out, lse, dout, None, need_dvalues=False, chunk=chunk,
                                      beside_dq=key_side, row_pdp=pdp, **kw)
        return correct_bwd(q, k, v, out, lse, dout, bias, ev, dq, dk, dv, need_dvalues=need_dvalues,
                           delta=delta, parts="q", row_pdp=pdp, **kw)
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    sign = 1.0
    if scale < 0:
        q, scale, sign = -q, -scale, -1.0
    prec = dot_precision(q.dtype, allow_tf32)
    dev = q.device
    chunk = settings.current().attn_bwd_chunk if chunk is None else chunk
    has_bias = bias is not None and bias.nnz > 0
    E = bias.nnz if bias is not None else 0
    if has_bias:
        if entry_values is None:
            entry_values = bias.entry_values()
        ep, ko, kof, qo = bias.entry_pos, bias.k_order, bias.k_offsets, bias.q_offsets
        tq_max, tk_max = bias.index_rows, bias.seq_len_k
        if not may_cancel:
            row_flags = torch.empty(1, dtype=torch.int8, device=dev)
        elif row_flags is None:
            row_flags = cancel_flags(q, k, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                                      prec=prec, key_padding_mask=kmask)
        else:
            row_flags = flags_2d(row_flags, B, Hq, Tq)
        flags = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        ep = ko = kof = qo = flags = torch.empty(1, dtype=torch.int32, device=dev)
        entry_values = torch.empty(1, dtype=torch.float32, device=dev)
        tq_max = tk_max = 1
        row_flags = torch.empty(1, dtype=torch.int8, device=dev)
    capture = capture_bound is not None
    cap_bits, cap_scale, cap_limit = 0, 1.0, 1.0
    if capture:
        if not isinstance(capture_bound, CaptureBound):
            raise TypeError(f"capture_bound must be a CaptureBound or None, got {type(capture_bound).__name__}")
        want = (Hq, triton.cdiv(Tk, CAPTURE_SEG), Tq)
        w = capture_bound.words
        if (not isinstance(w, torch.Tensor) or tuple(w.shape) != want or w.dtype != torch.int32
                or not w.is_contiguous() or w.device != dev):
            got = f"{w.dtype} {tuple(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else repr(w)
            raise ValueError(f"capture_bound.words must be a contiguous int32 tensor of shape {want} on {dev}, "
                             f"got {got}")
        t = capture_bound.threshold
        if not isinstance(t, (int, float)) or not (1e-30 < t < float("inf")):
            raise ValueError(f"capture_bound.threshold must be a finite float > 1e-30, got {t!r}")
        if capture_bound.after_dq is not None and not callable(capture_bound.after_dq):
            raise TypeError("capture_bound.after_dq must be callable or None")
        cap_bits, levels = capture_bound_format(B)
        cap_scale, cap_limit = levels / float(t), float(levels * B)
        del w
    delta = torch.empty((B * Hq, Tq), dtype=torch.float32, device=dev)
    lse2 = torch.empty((B * Hq, Tq), dtype=torch.float32, device=dev)
    pre_bm = 64 if D <= 128 else 32
    _bwd_pre_kernel[(triton.cdiv(Tq, pre_bm), B * Hq)](
        out, dout, lse, delta, lse2, row_flags,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), Hq, Tq, HEAD_DIM=D, BLOCK_M=pre_bm,
        HAS_FLAGS=has_bias and may_cancel,
        num_warps=4)
    need_dval = bool(need_dvalues) and has_bias
    dval_part = torch.zeros((B, E) if need_dval else (1, 1), dtype=torch.float32, device=dev)
    if row_pdp is not None and (has_bias or tuple(row_pdp.shape) != (B * Hq, 2, Tq)
                                or row_pdp.dtype != torch.float32 or not row_pdp.is_contiguous()):
        raise ValueError(f"row_pdp needs bias=None and a contiguous float32 tensor of shape {(B * Hq, 2, Tq)}")
    if need_dval:
        row_pdp = torch.empty((B * Hq, 2, Tq), dtype=torch.float32, device=dev)
    exact_d = row_pdp is not None
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    use_desc = use_tma(q, k, v, dout)
    q_desc, k_desc, v_desc, do_desc = ((desc4(t) for t in (q, k, v, dout)) if use_desc else (q, k, v, dout))
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_BIAS=has_bias, CHUNK=chunk, DOT_PREC=prec,
                  ENTRY_FORM=entry_form(bias) if has_bias else 0,
                  **interpret_desc(use_desc), **({} if kmask is None else {"HAS_MASK": True}))
    km_arg = row_flags if kmask is None else kmask
    def launch_dq():
        cap_words = capture_bound.words if capture else torch.empty(1, dtype=torch.int32, device=dev)
        _flash_bwd_dq_kernel[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, dout, k_desc, v_desc, dq, lse2, delta, row_pdp if exact_d else delta, dval_part, ep,
            entry_values, qo,
            cap_words, cap_scale, cap_limit, triton.cdiv(Tk, CAPTURE_SEG), km_arg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Hq // Hkv, Tq, Tk, tq_max, E, Tk - Tq, scale * sign, scale * LOG2E, alpha * LOG2E, alpha,
            len_key(Tq), len_key(Tk), int(use_desc), NEED_DVAL=exact_d, CAPTURE=cap_bits, **common)

    def launch_dkdv(dk, dv):
        _flash_bwd_dkdv_kernel[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, q_desc, do_desc, dk, dv, lse2, delta, ep, entry_values, ko, kof, qo, flags, km_arg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            Hq, Hkv, Hq // Hkv, Tq, Tk, tq_max, tk_max, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
            len_key(Tq), len_key(Tk), int(use_desc), **common)

    if beside_dq is not None:
        dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        launch_dkdv(dk, dv)
        side = _priority_stream(dev)
        if side is None:
            beside_dq(delta, dk, dv)
            launch_dq()
        else:
            # every tensor the side stream touches was made on the caller's stream, which waits for
            # the side stream below, before any of them can be freed and reused
            main = torch.cuda.current_stream(dev)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                launch_dq()
            beside_dq(delta, dk, dv)
            main.wait_stream(side)
        return dq, dk, dv, delta
    launch_dq()
    if capture:
        if has_bias and may_cancel:
            # the cancelling rows' P was 0 in the loops: no bound, so every segment of theirs is rescored
            flagged = row_flags.view(B, Hq, Tq).ne(0).any(0)
            capture_bound.words.masked_fill_(flagged[:, None, :], capture_all_pass_word(B))
        if capture_bound.after_dq is not None:
            words, capture_bound.words = capture_bound.words, None
            capture_bound.after_dq(words)
            del words        # the bound's memory is free (stream-ordered) for dK and dV
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    launch_dkdv(dk, dv)
    if has_bias and may_cancel:  # the cancelling rows, excluded above (lse2 = +inf), done exactly
        exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, row_flags,
                    dval_part if need_dval else None, causal=causal, scale=scale, dq_scale=scale * sign,
                    alpha=alpha, prec=prec, key_padding_mask=kmask)
    # with q negated (negative scale), dk = scale' dS (-q) is already right; dq's scale carries the sign
    if not need_dvalues:
        return dq, dk, dv, None
    dvals = dval_part.sum(0) if need_dval else torch.zeros(E, dtype=torch.float32, device=dev)
    return dq, dk, dv, dvals
