"""The standalone backward correction: the entry terms added to a dense backward's (dq, dk, dv).

correct_bwd runs a query-side launch (dQ, delta, dvalues) and a key-side launch (dK, dV; GQA
heads summed in the program), each by blocks or by windows of entries (config.bwd_q_config /
bwd_kv_config); with row_flags the cancelling rows are skipped here and recomputed exactly
(kernels/attention/cancel.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LOG2E, dot_precision
from .cancel import exact_rows, mask_lse
from .checks import check_common, flags_2d, last_dim_contiguous
from .config import bwd_kv_config, bwd_q_config, reg_cap
from .entries import (
    add_to_rows,
    block_range,
    dkdv_entries,
    dq_entries,
    dq_entries_delta,
    gather,
    launch_order,
    row_term,
    rows_with_entries,
    window_rows,
    window_slots,
)


@triton.jit
def _row_delta(o_base, delta_base, do, rows, live, stride_om, offs_d, DELTA_GIVEN: tl.constexpr):
    """delta = rowsum(dO * O') of rows `rows` where live: read from delta_base when DELTA_GIVEN
    (a dense backward's preprocess computed it), else computed from O' and stored there."""
    if DELTA_GIVEN:
        return tl.load(delta_base + rows, mask=live, other=0.0)
    o = tl.load(o_base + rows[:, None] * stride_om + offs_d[None, :], mask=live[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_base + rows, delta, mask=live)
    return delta


@triton.jit
def _dq_rows(q_base, do_base, o_base, l_base, dq_base, delta_base, pdp_base, k_base, v_base, dval_base, rows, live,
             e_lo, e_hi, EntryPos, EntryVal, stride_qm, stride_dom, stride_om, stride_lm, stride_dqm,
             stride_kn, stride_vn, Tq, Tk, causal_off, scale, qk_scale2, alpha2, alpha,
             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
             DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr, DELTA_GIVEN: tl.constexpr, EXACT_D: tl.constexpr):
    """correct_bwd's query side for rows `rows` [BLOCK_M] of one (batch, head) slice (only `live`
    rows read or written): delta = rowsum(dO * O') (_row_delta), dq += scale * entry terms in
    place, the entries' dvalues to dval_base. EXACT_D: the entry terms and dvalues use the exact
    row term instead, from pdp_base's dense sums of P dP and P (rows [2, Tq]) and the entries'
    (dq_entries_delta, row_term)."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=live[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=live[:, None], other=0.0)
    delta = _row_delta(o_base, delta_base, do, rows, live, stride_om, offs_d, DELTA_GIVEN)
    lse = tl.load(l_base + rows * stride_lm, mask=live, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if EXACT_D:
        pdp, psum = dq_entries_delta(tl.load(pdp_base + rows, mask=live, other=0.0),
                                     tl.load(pdp_base + Tq + rows, mask=live, other=0.0), q, do, lse2, rows, e_lo,
                                     e_hi, EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk,
                                     causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC)
        delta = row_term(pdp, psum)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = dq_entries(dq, q, do, lse2, delta, rows, e_lo, e_hi, EntryPos, EntryVal, dval_base, k_base, v_base,
                     stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                     CAUSAL, CHUNK, DOT_PREC, NEED_DVAL)
    add_to_rows(dq_base, rows, stride_dqm, offs_d, live, scale * dq)


@triton.jit
def _correct_bwd_q_kernel(Q, K, V, Out, Lse, DO, DQ, Delta, Pdp, DvalPart,
                          EntryPos, EntryVal, QOffsets,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                          stride_dqb, stride_dqh, stride_dqm,
                          Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr,
                          DELTA_GIVEN: tl.constexpr, EXACT_D: tl.constexpr):
    """dQ += scale * entry terms (in place), Delta = rowsum(dO*O') on rows with entries, and
    DvalPart[b, e] = alpha * P'(dP - D) for this batch element.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). Out/Lse are the biased O', natural LSE'. Delta is [B*Hq, Tq]
    float32 and is read by _correct_bwd_k_kernel for the same rows; DELTA_GIVEN: the caller's
    dense backward already computed it (Out is not read). EXACT_D: Pdp [B*Hq, 2, Tq] float32 holds
    the dense pass's sums of P dP and P, and dQ and the dvalues use the exact D (_dq_rows).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    if e_hi > e_lo:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        live = rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        _dq_rows(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                 Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h * stride_lh,
                 DQ + b * stride_dqb + h * stride_dqh, Delta + (b * Hq + h) * Tq, Pdp + (b * Hq + h) * 2 * Tq,
                 K + b * stride_kb + hk * stride_kh,
                 V + b * stride_vb + hk * stride_vh, DvalPart + b * E, offs_m, live, e_lo, e_hi, EntryPos, EntryVal,
                 stride_qm, stride_dom, stride_om, stride_lm, stride_dqm, stride_kn, stride_vn, Tq, Tk, causal_off,
                 scale, qk_scale2, alpha2, alpha, HEAD_DIM, CAUSAL, BLOCK_M, CHUNK, DOT_PREC, NEED_DVAL, DELTA_GIVEN,
                 EXACT_D)


@triton.jit
def _correct_bwd_q_window_kernel(Q, K, V, Out, Lse, DO, DQ, Delta, Pdp, DvalPart,
                                 EntryPos, EntryVal, QOffsets,
                                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                                 stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                                 stride_dqb, stride_dqh, stride_dqm,
                                 Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                                 HP: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                                 NEED_DVAL: tl.constexpr, REVERSE: tl.constexpr, DELTA_GIVEN: tl.constexpr,
                                 EXACT_D: tl.constexpr):
    """_correct_bwd_q_kernel by windows of entries (_correct_fwd_window_kernel's rows), for
    sparse biases. Grid (>= windows, B)."""
    pid_w, b = launch_order(REVERSE)
    b = b.to(tl.int64)
    h, rows, e_lo, e_hi = window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP)
    if e_lo < e_hi:
        hk = (h // GROUP).to(tl.int64)
        live = rows >= 0
        _dq_rows(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                 Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h * stride_lh,
                 DQ + b * stride_dqb + h * stride_dqh, Delta + (b * Hq + h) * Tq, Pdp + (b * Hq + h) * 2 * Tq,
                 K + b * stride_kb + hk * stride_kh,
                 V + b * stride_vb + hk * stride_vh, DvalPart + b * E, rows, live, e_lo, e_hi, EntryPos, EntryVal,
                 stride_qm, stride_dom, stride_om, stride_lm, stride_dqm, stride_kn, stride_vn, Tq, Tk, causal_off,
                 scale, qk_scale2, alpha2, alpha, HEAD_DIM, CAUSAL, WINDOW, CHUNK, DOT_PREC, NEED_DVAL, DELTA_GIVEN,
                 EXACT_D)


@triton.jit
def _correct_bwd_k_kernel(Q, K, V, Lse, DO, DK, DV, Delta,
                          EntryPos, EntryVal, KOrder, KOffsets,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_lb, stride_lh, stride_lm,
                          stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                          stride_dvb, stride_dvh, stride_dvn,
                          Hq, Hkv, GROUP, Tq, Tk, TkMax, causal_off, scale, qk_scale2, alpha2,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                          CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """dK += scale * entry terms, dV += entry terms (in place) for keys [n0, n0+BLOCK_N) of (b, kv head).

    Grid (cdiv(Tk, BLOCK_N), B*Hkv); the program sums the entries of all GROUP query heads that
    share the kv head, so no atomics. Delta comes from _correct_bwd_q_kernel.
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = bhk % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    total = 0
    live = offs_n < 0
    for g in range(GROUP):
        h = hk * GROUP + g
        t_lo, t_hi = block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
        total += t_hi - t_lo
        live = live | rows_with_entries(KOffsets, h, offs_n, Tk, TkMax)
    if total > 0:
        hk64 = hk.to(tl.int64)
        k = gather(K + b * stride_kb + hk64 * stride_kh, offs_n, stride_kn, offs_d, live)
        v = gather(V + b * stride_vb + hk64 * stride_vh, offs_n, stride_vn, offs_d, live)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            t_lo, t_hi = block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
            h64 = h.to(tl.int64)
            dk, dv = dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                   Q + b * stride_qb + h64 * stride_qh, DO + b * stride_dob + h64 * stride_doh,
                                   Lse + b * stride_lb + h64 * stride_lh, Delta + (b * Hq + h64) * Tq,
                                   stride_qm, stride_dom, stride_lm, offs_d,
                                   Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, True)
        add_to_rows(DK + b * stride_dkb + hk64 * stride_dkh, offs_n, stride_dkn, offs_d, live, scale * dk)
        add_to_rows(DV + b * stride_dvb + hk64 * stride_dvh, offs_n, stride_dvn, offs_d, live, dv)


@triton.jit
def _correct_bwd_k_window_kernel(Q, K, V, Lse, DO, DK, DV, Delta,
                                 EntryPos, EntryVal, KOrder, KOffsets,
                                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_lb, stride_lh, stride_lm,
                                 stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                                 stride_dvb, stride_dvh, stride_dvn,
                                 Hq, Tq, Tk, TkMax, causal_off, scale, qk_scale2, alpha2,
                                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                                 HP: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                                 REVERSE: tl.constexpr):
    """_correct_bwd_k_kernel by windows of k-ordered entries (the keys that start in a window of
    WINDOW entries of one head, with all their entries), for sparse biases, WITHOUT GQA: a kv head
    is one query head here, so no two programs touch the same dK/dV rows. Grid (>= windows, B)."""
    pid_w, b = launch_order(REVERSE)
    b = b.to(tl.int64)
    h, keys, t_lo, t_hi = window_slots(EntryPos, KOrder, KOffsets, pid_w, Hq, Tk, TkMax, WINDOW, HP, True)
    if t_lo < t_hi:
        h64 = h.to(tl.int64)
        live = keys >= 0
        offs_d = tl.arange(0, HEAD_DIM)
        k = gather(K + b * stride_kb + h64 * stride_kh, keys, stride_kn, offs_d, live)
        v = gather(V + b * stride_vb + h64 * stride_vh, keys, stride_vn, offs_d, live)
        dk = tl.zeros([WINDOW, HEAD_DIM], tl.float32)
        dv = tl.zeros([WINDOW, HEAD_DIM], tl.float32)
        dk, dv = dkdv_entries(dk, dv, k, v, keys, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                               Q + b * stride_qb + h64 * stride_qh, DO + b * stride_dob + h64 * stride_doh,
                               Lse + b * stride_lb + h64 * stride_lh, Delta + (b * Hq + h64) * Tq,
                               stride_qm, stride_dom, stride_lm, offs_d,
                               Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, True)
        add_to_rows(DK + b * stride_dkb + h64 * stride_dkh, keys, stride_dkn, offs_d, live, scale * dk)
        add_to_rows(DV + b * stride_dvb + h64 * stride_dvh, keys, stride_dvn, offs_d, live, dv)


def correct_bwd(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, *, causal, scale, alpha,
                need_dvalues, allow_tf32: bool = False, block_m: int = 16, block_n: int = 16,
                chunk: int = 16, num_warps: int = 2, row_flags=None, maxnreg: int | None = None,
                q_form: str | None = None, q_window: int | None = None, q_warps: int | None = None,
                delta: torch.Tensor | None = None, parts: str = "all", kv_form: str | None = None,
                kv_window: int | None = None, row_pdp: torch.Tensor | None = None):
    """Add the entry terms to a dense backward's (dq, dk, dv) (computed from O', LSE'), in place.

    out, lse are the BIASED O', natural LSE' (unmasked). Returns (dq, dk, dv, dvalues) with
    dvalues float32 [E] (per sorted entry; duplicate followers 0) or None. Two launches: by query
    block (dQ, delta, dvalues per batch element) and by key block (dK, dV; GQA heads summed in
    the program).

    row_flags (int8/bool [B, Hq, Tq], from correct_fwd(return_flags=True) or cancelling_rows):
    the cancelling rows, which the caller's dense backward must have EXCLUDED (fed
    mask_lse(lse, row_flags), or mask_dout(dout, row_flags)). Their entry terms are skipped here
    and exact_rows_bwd then computes their whole gradient exactly (two more launches). With
    row_flags=None nothing is special-cased: on a cancelling row the dense backward's entry edges
    carry P = exp(s - LSE') >> 1 and the terms added here cancel them, losing about log2 of that
    factor in bits (dvalues stay exact: P' is computed directly).

    delta: float32 [B*Hq, Tq] (contiguous) = rowsum(dO * O'), when the caller's dense backward has
    it (its preprocess): the query-side launch then reads it instead of O'. parts: "all", "q" (the
    query-side launch: dq, dvalues) or "kv" (the key-side launch: dk, dv; needs delta), so that a
    caller can run the key side beside its dense dQ kernel (bwd.py, attn_bwd_overlap);
    the exact-row launches of row_flags need parts="all". q_form / kv_form: "rows" or "window" for
    each side's launch (None: by density, bwd_q_config / bwd_kv_config); q_window / kv_window
    their window sizes, q_warps the warps of both window launches.

    row_pdp: float32 [B*Hq, 2, Tq] (contiguous), [:, 0] = sum_j P dP and [:, 1] = sum_j P over every
    key (P = exp(s - LSE'), dP = dO . v_j), when the caller's dense dQ pass summed them (flash_bwd's
    split form). With need_dvalues the query side then adds the entries' g dP and g and uses that
    exact row term sum_j P' dP / sum_j P' for dq's entry terms and the dvalues instead of delta:
    rowsum(dO * O') from a half-precision O' cancels on an entry that dominates its row
    (entries.py). Without it (the cudnn and flash backends: their dense backward does not expose
    the sums) the dvalues keep rowsum(dO * O').
    """
    B, Hq, Hkv, Tq, Tk, D = check_common(q, k, v, bias)
    if parts not in ("all", "q", "kv"):
        raise ValueError(f"parts must be 'all', 'q' or 'kv', got {parts!r}")
    if delta is not None and (not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32
                              or tuple(delta.shape) != (B * Hq, Tq) or not delta.is_contiguous()):
        raise ValueError(f"delta must be a contiguous float32 tensor of shape {(B * Hq, Tq)}")
    if row_pdp is not None and (not isinstance(row_pdp, torch.Tensor) or row_pdp.dtype != torch.float32
                                or tuple(row_pdp.shape) != (B * Hq, 2, Tq) or not row_pdp.is_contiguous()):
        raise ValueError(f"row_pdp must be a contiguous float32 tensor of shape {(B * Hq, 2, Tq)}")
    if parts == "kv" and delta is None:
        raise ValueError("parts='kv' needs delta (the query-side launch computes it otherwise)")
    if parts != "all" and row_flags is not None:
        raise ValueError("row_flags needs parts='all' (the exact-row launches cover both sides)")
    for name, form in (("q_form", q_form), ("kv_form", kv_form)):
        if form not in (None, "rows", "window"):
            raise ValueError(f"{name} must be 'rows' or 'window', got {form!r}")
    if kv_form == "window" and Hq != Hkv:
        raise ValueError("kv_form='window' needs Hq == Hkv (no GQA)")
    E = 0 if bias is None else bias.nnz
    if bias is None or E == 0:
        dvals = torch.zeros(E, dtype=torch.float32, device=q.device) if need_dvalues and parts != "kv" else None
        return dq, dk, dv, dvals
    q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
    for name, t, used in (("dq", dq, parts != "kv"), ("dk", dk, parts != "q"), ("dv", dv, parts != "q")):
        if used and (not isinstance(t, torch.Tensor) or t.stride(-1) != 1):
            raise ValueError(f"{name} must be a tensor with unit stride along D for the in-place correction")
    sign = 1.0
    if scale < 0:
        q, scale, sign = -q, -scale, -1.0
    prec = dot_precision(q.dtype, allow_tf32)
    lse_real = lse
    if row_flags is not None:
        flags = flags_2d(row_flags, B, Hq, Tq)
        lse = mask_lse(lse, flags.view(B, Hq, Tq))   # the entry terms skip the flagged rows
    launch = reg_cap(maxnreg if maxnreg is not None else (128 if D <= 128 else None))
    delta_given = delta is not None
    if not delta_given:
        delta = torch.empty((B * Hq, Tq), dtype=torch.float32, device=q.device)
    need_dvalues = bool(need_dvalues) and parts != "kv"
    dval_part = torch.zeros((B, E) if need_dvalues else (1, 1), dtype=torch.float32, device=q.device)
    exact_d = need_dvalues and row_pdp is not None
    # small blocks (16 rows/keys, 2 warps) measured fastest on the H100: many light programs hide
    # the gathers' latency (16384 traces/head: 0.58 ms vs 0.85 ms at 64/32/4); a 128-register cap
    # fits more of them per SM (the dK/dV kernel needs 184 uncapped): 239 vs 297 us at 2048/head,
    # 508 vs 588 at 16384 (B4 H16 T4096 D128 bf16, benchmarks/tune/tune_correction.py)
    if parts != "kv":
        # with q negated, dq must come out negated: run on -dq and flip back (rare path)
        dq_work = dq if sign > 0 else dq.neg_()
        q_args = (q, k, v, out, lse, dout, dq_work, delta, row_pdp if exact_d else delta, dval_part,
                  bias.entry_pos, entry_values,
                  bias.q_offsets, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                  lse.stride(0), lse.stride(1), lse.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                  dq_work.stride(0), dq_work.stride(1), dq_work.stride(2),
                  Hq, Hq // Hkv, Tq, Tk, bias.index_rows, E, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E, alpha)
        q_form, auto_window, auto_warps = bwd_q_config(D, E / (bias.num_heads * bias.index_rows), q_form)
        q_const = {"HEAD_DIM": D, "CAUSAL": bool(causal), "CHUNK": chunk, "DOT_PREC": prec, "NEED_DVAL": need_dvalues,
                       "DELTA_GIVEN": delta_given, "EXACT_D": exact_d}
        if q_form == "rows":
            _correct_bwd_q_kernel[(triton.cdiv(Tq, block_m), B * Hq)](*q_args, BLOCK_M=block_m, **q_const,
                                                                      num_warps=num_warps, **launch)
        else:
            window = q_window or auto_window
            _correct_bwd_q_window_kernel[(triton.cdiv(E, window) + Hq, B)](
                *q_args, WINDOW=window, HP=max(2, triton.next_power_of_2(Hq)), REVERSE=True, **q_const,
                num_warps=q_warps or auto_warps, **launch)
        if sign < 0:
            dq.neg_()
    if parts != "q":
        kv_form, auto_window, auto_warps = bwd_kv_config(D, E / (bias.num_heads * bias.seq_len_k), Hq // Hkv,
                                                          kv_form)
        kv_args = (q, k, v, lse, dout, dk, dv, delta, bias.entry_pos, entry_values, bias.k_order, bias.k_offsets,
                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                   dout.stride(0), dout.stride(1), dout.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
                   dv.stride(0), dv.stride(1), dv.stride(2))
        kv_const = dict(HEAD_DIM=D, CAUSAL=bool(causal), CHUNK=chunk, DOT_PREC=prec, **launch)
        if kv_form == "rows":
            _correct_bwd_k_kernel[(triton.cdiv(Tk, block_n), B * Hkv)](
                *kv_args, Hq, Hkv, Hq // Hkv, Tq, Tk, bias.seq_len_k, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
                BLOCK_N=block_n, num_warps=num_warps, **kv_const)
        else:
            window = kv_window or auto_window
            _correct_bwd_k_window_kernel[(triton.cdiv(E, window) + Hq, B)](
                *kv_args, Hq, Tq, Tk, bias.seq_len_k, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
                WINDOW=window, HP=max(2, triton.next_power_of_2(Hq)), REVERSE=True,
                num_warps=q_warps or auto_warps, **kv_const)
    if row_flags is not None:
        exact_rows(q, k, v, out, lse_real, dout, bias, entry_values, dq, dk, dv, flags,
                    dval_part if need_dvalues else None, causal=causal, scale=scale, dq_scale=scale * sign,
                    alpha=alpha, prec=prec)
    dvals = dval_part.sum(0) if need_dvalues else None
    return dq, dk, dv, dvals
