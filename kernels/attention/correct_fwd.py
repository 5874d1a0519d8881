"""The standalone forward correction: unbiased (O, LSE) of any dense attention -> biased (O', LSE').

correct_fwd folds each row's entries in with the identity of kernels/attention/entries.py, in
place (rows form or window form, by density: config.fwd_config); recompute_flagged_rows redoes
the rows where the identity cancelled with the bias inside the tile loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import LOG2E, dot_precision
from ..launch import FastLaunch
from .checks import check_common, last_dim_contiguous
from .config import fwd_block, fwd_config, reg_cap
from .entries import (
    CANCEL_THRESHOLD,
    block_range,
    flagged_rows,
    fwd_biased_rows,
    fwd_rows,
    key_mask_row,
    launch_order,
    rows_with_entries,
    window_rows,
)


@triton.jit
def _correct_fwd_kernel(Q, K, V, Out, Lse, EntryPos, EntryVal, QOffsets, Flags,
                        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                        stride_lb, stride_lh, stride_lm,
                        Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, cancel_tol,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, STORE_FLAGS: tl.constexpr,
                        STAGES: tl.constexpr, REVERSE: tl.constexpr):
    """In place: Out, Lse (unbiased O [B,Hq,Tq,D], natural LSE [B,Hq,Tq]) -> biased O', LSE'.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). A program owns rows [m0, m0+BLOCK_M) of (b, h); blocks with
    no entries return at once, and only rows holding entries are read or written (fwd_rows; with
    the cancelling-row recompute moved to its own kernel, BM=64, D=128 went from 255 registers to
    196, and fwd_config caps them: more programs per SM to hide the gathers' latency).
    STORE_FLAGS: Flags[bh, i] (int8) = 1 where 1 + sum w < cancel_tol (the identity cancelled:
    _correct_fwd_slow_kernel recomputes those rows), 0 on every other row < Tq, so the caller need
    not zero it. STAGES: see fwd_rows.
    """
    pid_m, bh = launch_order(REVERSE)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    cancelled = offs_m < 0
    if e_hi > e_lo:
        live = rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        cancelled = fwd_rows(Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
                              Lse + b * stride_lb + h * stride_lh, K + b * stride_kb + hk * stride_kh,
                              V + b * stride_vb + hk * stride_vh, offs_m, live, e_lo, e_hi, EntryPos, EntryVal,
                              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off,
                              qk_scale2, alpha2, cancel_tol, HEAD_DIM, CAUSAL, BLOCK_M, CHUNK, DOT_PREC, STAGES)
    if STORE_FLAGS:
        tl.store(Flags + bh.to(tl.int64) * Tq + offs_m, cancelled.to(tl.int8), mask=offs_m < Tq)



@triton.jit
def _correct_fwd_window_kernel(Q, K, V, Out, Lse, EntryPos, EntryVal, QOffsets, Flags,
                               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                               stride_lb, stride_lh, stride_lm,
                               Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, cancel_tol,
                               HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                               HP: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                               STORE_FLAGS: tl.constexpr, STAGES: tl.constexpr, REVERSE: tl.constexpr):
    """_correct_fwd_kernel by windows of entries instead of blocks of rows, for sparse biases.

    Grid (>= windows, B). Each head's sorted entries are cut into windows of WINDOW; a program
    owns the rows whose first entry falls in its window (slot s: the row starting at entry w0+s,
    -1 if none) and folds in all their entries, which may run past the window's end. With 0.5
    entries per row a row block of 64 holds ~25 live rows and 32 entries; a window of 64 holds ~50
    rows and 64 entries: the q/O tile is ~80% live instead of ~39% (fwd_config's default window
    is 16, on one warp). Rows holding no entry are not touched (their cancelling flags stay as the
    caller zeroed them)."""
    pid_w, b = launch_order(REVERSE)
    b = b.to(tl.int64)
    # past the list (h = Hq) the window is empty: no row starts, nothing to do
    h, rows, e_lo, e_hi = window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP)
    if e_lo < e_hi:
        hk = (h // GROUP).to(tl.int64)
        live = rows >= 0
        cancelled = fwd_rows(Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
                              Lse + b * stride_lb + h * stride_lh, K + b * stride_kb + hk * stride_kh,
                              V + b * stride_vb + hk * stride_vh, rows, live, e_lo, e_hi, EntryPos, EntryVal,
                              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off,
                              qk_scale2, alpha2, cancel_tol, HEAD_DIM, CAUSAL, WINDOW, CHUNK, DOT_PREC, STAGES)
        if STORE_FLAGS:
            tl.store(Flags + (b * Hq + h) * Tq + rows, cancelled.to(tl.int8), mask=live)



@triton.jit
def _correct_fwd_slow_kernel(Q, K, V, Out, Lse, EntryPos, EntryVal, QOffsets, Flags, KMask,
                             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                             stride_lb, stride_lh, stride_lm,
                             Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2,
                             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                             HAS_MASK: tl.constexpr = False):
    """The rows _correct_fwd_kernel flagged (the identity cancelled there), recomputed with the
    bias inside the tile loop (exact, slow). Grid (cdiv(Tq, BLOCK_M), B*Hq); a block with no
    flagged row returns after reading its flags (the whole launch: 13 us at B4 H16 T4096 on the
    H100, which is why the callers skip it when no row can cancel). HAS_MASK: KMask int8 [B, Tk]
    is the key padding mask of flash_fwd's masked calls (0 = no mass on that key)."""
    bh, m0, offs_m, flagged = flagged_rows(Flags, Tq, BLOCK_M)
    if tl.sum(flagged.to(tl.int32), 0) > 0:
        b = (bh // Hq).to(tl.int64)
        h = bh % Hq
        hk = (h // GROUP).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        e_lo, e_hi = block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=flagged[:, None], other=0.0)
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        else:
            hi = Tk
        acc, lse2 = fwd_biased_rows(q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
                                     stride_kn, stride_vn, offs_m, tl.arange(0, BLOCK_N), offs_d,
                                     e_lo, e_hi, EntryPos, EntryVal, Tk, causal_off, hi, qk_scale2, alpha2,
                                     CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, CHUNK, DOT_PREC,
                                     key_mask_row(KMask, b, Tk, HAS_MASK), HAS_MASK)
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=flagged[:, None])
        tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse2 * 0.6931471805599453, mask=flagged)


def correct_fwd(q, k, v, out, lse, bias, entry_values, *, causal, scale, alpha,
                inplace: bool = True, allow_tf32: bool = False, block_m: int | None = None,
                chunk: int | None = None, num_warps: int | None = None, return_flags: bool = False,
                may_cancel: bool = True,
                maxnreg: int | None = None, stages: int | None = None, form: str | None = None,
                reverse: bool | None = None):
    """Apply the sparse correction to the UNBIASED attention (out, lse) -> (out', lse').

    q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D]; out [B,Hq,Tq,D] (any float dtype), lse [B,Hq,Tq] float32
    natural log. With inplace=True (default) out and lse are updated in place and returned (only
    rows holding entries are touched), so the cost is O(entries x D), independent of Tq*Tk.
    Rows where the identity cancels (1 + sum w < CANCEL_THRESHOLD) are recomputed with the bias
    in the tile loop, so out', lse' stay accurate there too. return_flags=True returns
    (out', lse', flags) with flags int8 [B, Hq, Tq] = 1 on those rows, for correct_bwd(row_flags=).
    may_cancel=False promises alpha * (every entry value) >= ln(CANCEL_THRESHOLD), so no row can
    cancel (1 + sum w >= exp(min alpha b)): the recompute launch is skipped.
    form: "rows" (programs own blocks of block_m rows) or "window" (programs own the rows that
    start in a window of block_m sorted entries: for sparse biases); None picks by density.
    reverse: run the grid from its last program (default: for the window form, see fwd_config).
    """
    B, Hq, Hkv, Tq, Tk, D = check_common(q, k, v, bias)
    if not inplace:
        out, lse = out.clone(), lse.clone()
    if bias is None or bias.nnz == 0:
        if return_flags:
            return out, lse, torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)
        return out, lse
    if lse.dtype != torch.float32:
        raise ValueError("lse must be float32")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if out.stride(-1) != 1:
        raise ValueError("out must have unit stride along D for the in-place correction")
    if scale < 0:  # the kernels assume a positive logit scale; fold the sign into q
        q, scale = -q, -scale
    if form not in (None, "rows", "window"):
        raise ValueError(f"form must be 'rows' or 'window', got {form!r}")
    form, auto_m, auto_chunk, auto_warps, auto_reg, auto_stages = fwd_config(
        D, bias.nnz / (bias.num_heads * bias.index_rows), form)
    num_warps = num_warps or auto_warps
    block_m, chunk = block_m or auto_m, chunk or auto_chunk
    maxnreg = maxnreg or auto_reg
    stages = auto_stages if stages is None else int(stages)
    store_flags = bool(return_flags or may_cancel)
    # the rows form writes every row's flag (no zeroing launch); the window form only live rows'
    alloc = torch.empty if form == "rows" else torch.zeros
    flags = alloc((B, Hq, Tq) if store_flags else (1,), dtype=torch.int8, device=q.device)
    args = (q, k, v, out, lse, bias.entry_pos, entry_values, bias.q_offsets, flags,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            Hq, Hq // Hkv, Tq, Tk, bias.index_rows, Tk - Tq, scale * LOG2E, alpha * LOG2E)
    prec = dot_precision(q.dtype, allow_tf32)
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), CHUNK=chunk, DOT_PREC=prec, STORE_FLAGS=store_flags,
                  STAGES=stages, REVERSE=(form == "window") if reverse is None else bool(reverse),
                  num_warps=num_warps, **reg_cap(maxnreg))
    if form == "rows":
        _CORRECT_FWD_FAST[(triton.cdiv(Tq, block_m), B * Hq)](*args, CANCEL_THRESHOLD, BLOCK_M=block_m, **common)
    else:
        # every head's windows fit in cdiv(nnz, window) + Hq programs; the extra ones exit
        _CORRECT_FWD_WINDOW_FAST[(triton.cdiv(bias.nnz, block_m) + Hq, B)](
            *args, CANCEL_THRESHOLD, WINDOW=block_m, HP=max(2, triton.next_power_of_2(Hq)), **common)
    if may_cancel:
        recompute_flagged_rows(q, k, v, out, lse, bias, entry_values, flags, causal=causal, scale=scale,
                               alpha=alpha, prec=prec)
    if return_flags:
        return out, lse, flags
    return out, lse


_CORRECT_FWD_FAST = FastLaunch(_correct_fwd_kernel)   # its host dispatch showed beside a 0.9 ms dense pass
_CORRECT_FWD_WINDOW_FAST = FastLaunch(_correct_fwd_window_kernel)


def recompute_flagged_rows(q, k, v, out, lse, bias, entry_values, flags, *, causal, scale, alpha, prec,
                           key_padding_mask=None):
    """Overwrite the rows of (out [B,Hq,Tq,D], lse [B,Hq,Tq] natural) that `flags` (int8, B*Hq*Tq
    elements, row-major) marks with their biased attention computed with the bias inside the tile
    loop: the forwards' path for rows where the correction identity cancelled. scale > 0 (the
    callers fold a negative scale into q). One launch; a block with no flagged row exits after
    reading its flags (13 us for B4 H16 T4096 on the H100), so callers skip it when no row can
    cancel. key_padding_mask: None or the int8 [B, Tk] mask of checks.key_mask_2d."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    block_m = fwd_block(D)
    _correct_fwd_slow_kernel[(triton.cdiv(Tq, block_m), B * Hq)](
        q, k, v, out, lse, bias.entry_pos, entry_values, bias.q_offsets, flags,
        flags if key_padding_mask is None else key_padding_mask,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.index_rows, Tk - Tq, scale * LOG2E, alpha * LOG2E,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=32, CHUNK=32, DOT_PREC=prec, num_warps=4,
        **({} if key_padding_mask is None else {"HAS_MASK": True}))
