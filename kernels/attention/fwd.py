"""The flash forward with the entries folded into its epilogue (flash_fwd).

The dense loop never looks at the bias; the entries of the program's rows are folded in after it
(entries.fwd_entries). Dense bias (config.split_forward) and the warp-specialized forward
(fwd_ws) take the unbiased pass followed by correct_fwd instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LOG2E, dot_precision
from . import fwd_ws
from .checks import check_common, key_mask_2d, last_dim_contiguous
from .config import desc4, fwd_configs, interpret_desc, len_key, prune_fwd, split_forward, use_tma
from .correct_fwd import correct_fwd, recompute_flagged_rows
from .entries import CANCEL_THRESHOLD, block_range, fwd_entries, fwd_prologue, key_live, key_mask_row


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi,
               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, k_desc, v_desc, b, hk,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False, KM=None, HAS_MASK: tl.constexpr = False):
    """Online-softmax over key blocks [lo, hi). MASKED: the blocks may hold keys >= Tk or keys
    hidden by causal or by the key padding mask KM (HAS_MASK, masked blocks only); otherwise
    every key is visible to every row and no mask is applied.
    USE_DESC: K/V tiles come by TMA through the [B, Hkv, Tk, D] descriptors k_desc / v_desc at
    (b, hk) instead of pointer loads (TMA fills rows past Tk with zeros)."""
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        if USE_DESC:   # rows past Tk come back zero, as the masked load's `other`
            k = k_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            valid = (cols < Tk)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
            if HAS_MASK:
                valid = valid & key_live(KM, cols, Tk)[None, :]
            qk = tl.where(valid, qk * qk_scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale2 - m_use[:, None])
        corr = tl.math.exp2(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None]
        if USE_DESC:
            v = v_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i



@triton.autotune(configs=fwd_configs(),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": prune_fwd})
@triton.jit
def _flash_fwd_kernel(Q, K, V, KDesc, VDesc, Out, Lse, EntryPos, EntryVal, QOffsets, Flags, KMask,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                      Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, cancel_tol,
                      TQ_KEY, TK_KEY, TMA_OK,
                      HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CHUNK: tl.constexpr, PREFETCH: tl.constexpr, USE_DESC: tl.constexpr,
                      HAS_MASK: tl.constexpr = False):
    """Out [B,Hq,Tq,D], Lse [B*Hq, Tq] (natural) of biased attention.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). A program owns rows [m0, m0+BLOCK_M) of (b, h): the key
    blocks every row sees fully run unmasked, the diagonal/tail blocks masked; then the entries of
    those rows are folded in (HAS_BIAS). Flags[bh, i] (int8) = 1 on the rows that cancelled;
    flash_fwd then recomputes them in a launch of their own (correct_fwd.recompute_flagged_rows):
    inline, that tile loop had put every biased config at 255 registers with spills (128 rows, 8
    warps: 136 bytes of stack; without it, 199 and none).
    HAS_MASK: KMask int8 [B, Tk] is the key padding mask (0 = the key takes no part): every key
    block runs the masked loop, and entries on masked keys are skipped (the unmasked kernel,
    HAS_MASK=False, is unchanged).
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
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < Tq)[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)      # keys any row sees
        full = tl.maximum(tl.minimum(Tk, m0 + 1 + causal_off), 0)         # keys every row sees
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    km = key_mask_row(KMask, b, Tk, HAS_MASK)
    if HAS_MASK:
        full = 0        # every key block may hold masked keys
    if HAS_BIAS:
        e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        if PREFETCH:  # the entries' gathers fly while the dense loop runs
            val0, i0, ok0, kg0, vg0 = fwd_prologue(
                EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk,
                causal_off, CAUSAL, CHUNK, km, HAS_MASK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, full,
                               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                               CAUSAL, False, BLOCK_N, DOT_PREC, USE_DESC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full, hi,
                               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                               CAUSAL, True, BLOCK_N, DOT_PREC, USE_DESC, km, HAS_MASK)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    if HAS_BIAS:
        if not PREFETCH:
            val0, i0, ok0, kg0, vg0 = fwd_prologue(
                EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk,
                causal_off, CAUSAL, CHUNK, km, HAS_MASK)
        den = tl.full([BLOCK_M], 1.0, tl.float32)
        c2 = tl.zeros([BLOCK_M], tl.float32)
        acc, den, c2 = fwd_entries(acc, den, c2, q, lse2, offs_m, e_lo, e_hi,
                                    val0, i0, ok0, kg0, vg0, EntryPos, EntryVal,
                                    k_base, v_base, stride_kn, stride_vn, offs_d,
                                    Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, km, HAS_MASK)
        # 1 + sum w = den * 2^c2; under the threshold the identity has cancelled
        cancelled = (den < cancel_tol * tl.math.exp2(-c2)) & (offs_m < Tq)
        acc = acc / den[:, None]
        lse2 = lse2 + c2 + tl.math.log2(den)
        tl.store(Flags + bh.to(tl.int64) * Tq + offs_m, cancelled.to(tl.int8), mask=offs_m < Tq)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    l_ptrs = Lse + bh.to(tl.int64) * Tq + offs_m
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < Tq)[:, None])
    tl.store(l_ptrs, lse2 * 0.6931471805599453, mask=offs_m < Tq)


def flash_fwd(q, k, v, bias=None, entry_values=None, *, causal: bool, scale: float, alpha: float,
              allow_tf32: bool = False, return_flags: bool = False, may_cancel: bool = True,
              key_padding_mask=None):
    """Biased flash attention forward.

    q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (fp16/bf16/fp32, same dtype); bias a TraceBias for Hq heads
    (or None), entry_values = bias.entry_values() (float32 [E]). Returns (out [B,Hq,Tq,D] in
    q.dtype, lse [B,Hq,Tq] float32 natural log, -inf on fully masked rows). fp32 inputs use IEEE
    dots unless allow_tf32. return_flags=True returns (out, lse, flags): int8 [B,Hq,Tq], 1 on the
    cancelling rows (for flash_bwd(row_flags=...), which otherwise recomputes them).
    may_cancel=False promises alpha * (every entry value) >= ln(CANCEL_THRESHOLD): no row can
    cancel, so the launch that recomputes cancelled rows is skipped.
    key_padding_mask: None, or bool/int8 [B, Tk] (nonzero = attend): masked keys get no mass and
    their entries add nothing; a row with no key left gives out 0 and lse -inf. Masked calls run
    the fused kernel only (neither the warp-specialized forward nor the split form + correct_fwd).
    """
    B, Hq, Hkv, Tq, Tk, D = check_common(q, k, v, bias)
    kmask = key_mask_2d(key_padding_mask, B, Tk, q.device)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if scale < 0:  # the kernels assume a positive logit scale; fold the sign into q
        q, scale = -q, -scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    has_bias = bias is not None and bias.nnz > 0
    if kmask is None and fwd_ws.ws_usable(q, k, v, causal, D, Tk):
        # the dense pass warp-specialized, then the entries by the standalone correction (in place)
        fwd_ws.flash_fwd_ws(q, k, v, out, lse, scale=scale)
        if not has_bias:
            if return_flags:
                return out, lse, torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)
            return out, lse
        if entry_values is None:
            entry_values = bias.entry_values()
        # flags only when asked for (or needed for the recompute): the window form zeroes them first
        return correct_fwd(q, k, v, out, lse, bias, entry_values, causal=False, scale=scale, alpha=alpha,
                           return_flags=return_flags, may_cancel=may_cancel)
    if has_bias and kmask is None and split_forward(bias):
        out, lse = flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha, allow_tf32=allow_tf32)
        if entry_values is None:
            entry_values = bias.entry_values()
        return correct_fwd(q, k, v, out, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                           allow_tf32=allow_tf32, return_flags=return_flags, may_cancel=may_cancel)
    if has_bias:
        if entry_values is None:
            entry_values = bias.entry_values()
        ep, qo, tq_max = bias.entry_pos, bias.q_offsets, bias.index_rows
        flags = torch.empty((B * Hq, Tq), dtype=torch.int8, device=q.device)   # every row written
    else:
        ep = qo = torch.empty(1, dtype=torch.int32, device=q.device)
        flags = torch.zeros((B * Hq, Tq) if return_flags else (1,), dtype=torch.int8, device=q.device)
        entry_values = torch.empty(1, dtype=torch.float32, device=q.device)
        tq_max = 1

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)

    use_desc = use_tma(k, v)
    k_desc, v_desc = (desc4(t) for t in (k, v)) if use_desc else (k, v)
    _flash_fwd_kernel[grid](
        q, k, v, k_desc, v_desc, out, lse, ep, entry_values, qo, flags, flags if kmask is None else kmask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Tq, Tk, tq_max, Tk - Tq, scale * LOG2E, alpha * LOG2E, CANCEL_THRESHOLD,
        len_key(Tq), len_key(Tk), int(use_desc),
        HEAD_DIM=D, CAUSAL=bool(causal), HAS_BIAS=has_bias, DOT_PREC=dot_precision(q.dtype, allow_tf32),
        **interpret_desc(use_desc), **({} if kmask is None else {"HAS_MASK": True}))
    if has_bias and may_cancel:
        recompute_flagged_rows(q, k, v, out, lse, bias, entry_values, flags, causal=causal, scale=scale,
                               alpha=alpha, prec=dot_precision(q.dtype, allow_tf32), key_padding_mask=kmask)
    if return_flags:
        return out, lse, flags.view(B, Hq, Tq)
    return out, lse
