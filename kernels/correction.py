"""The exact sparse correction that turns unbiased attention into trace-biased attention.

For an entry e = (h, i, j) with bias b_e, logits s = scale * q_i . k_j, and the UNBIASED output O
and log-sum-exp LSE of row i,

    w_e   = exp(s - LSE) * expm1(alpha * b_e)
    O'_i  = (O_i + sum_e w_e v_j) / (1 + sum_e w_e)          LSE'_i = LSE_i + log1p(sum_e w_e)

is exactly the biased attention (issue 7). The backward of a dense attention fed O', LSE' is exact
for every edge that is not an entry; for the entries, with P = exp(s - LSE'),
P' = exp(s + alpha b - LSE'), g = P' - P = P * expm1(alpha b), dP = dO_i . v_j, D_i = dO_i . O'_i:

    dV_j += g dO_i     dS = g (dP - D_i)     dQ_i += scale dS k_j     dK_j += scale dS q_i
    dvalues_e = alpha * sum_b P' (dP - D_i)               (the full logit gradient, summed over b)

This module holds those per-entry terms as @triton.jit helpers, shared by the fused flash kernels
in kernels/attention.py (which call them from their epilogues) and by the standalone kernels
here, which apply them after any dense attention (cuDNN, flash) through `correct_fwd` and
`correct_bwd`.

Numerics. The forward accumulates in a shifted frame, like flash attention's running max: with
c = max(0, max_e (s + alpha b - LSE)) it keeps e^-c (O + sum w v) and e^-c (1 + sum w), and forms
w as exp(t - c) - exp(u - c) (t = s + alpha b - LSE, u = s - LSE), so huge positive biases do not
overflow. Where 1 + sum w is tiny (entries that held almost all the mass pushed down by large
negative biases) the identity cancels; CANCEL_THRESHOLD below marks such rows ("cancelling").
The forwards then recompute those row blocks with the bias inside the tile loop (exact).

The backward cannot use the identity on a cancelling row either: the dense pass there computes
P = exp(s - LSE') ~ 1 / (1 + sum w) on the entry edges and the entry term subtracts a g of the
same size. So cancelling rows are taken out of the fast backward entirely and recomputed exactly:

    flags = the rows' cancelling flags (from the forward, or `cancelling_rows` from LSE')
    dense backward with LSE' = +inf on flagged rows (`mask_lse`): P = 0 there, so the row adds
    nothing to dK/dV and gets dQ = 0 (the dense kernels need no change: +inf is how they already
    drop fully masked rows); the entry terms read the same masked LSE' and skip those rows;
    `exact_rows_bwd`: by query block, dQ of the flagged rows and the dvalues of their entries; by
    key block, their dK/dV contributions (all GQA heads in one program: no atomics). Both use
    the bias inside the tile loop (_bias_tile) and P' = exp(s + alpha b - LSE'), which is <= 1.

A row is cancelling iff 1 + sum w < CANCEL_THRESHOLD. From LSE' alone (the backward's view):
Z / Z' = 1 + sum_e (P_e - P'_e), so the test is sum_e (P_e - P'_e) > 1 / CANCEL_THRESHOLD - 1.
Rows that pass it have sum_e P_e <= 1/CANCEL_THRESHOLD - 1 + sum_e P'_e <= 1/CANCEL_THRESHOLD,
so the fast backward loses at most ~2 bits on them.

Index layout (memtrace/bias.py): entry_pos int32 [E] = (i << 16) | j sorted by (head, i, j);
k_order int32 [E] the same entries ordered by (head, j, i); q_offsets [H*Tq_max+1],
k_offsets [H*Tk_max+1] CSR offsets. Entries with i >= Tq or j >= Tk of the call, or masked by
causal (j > i + Tk - Tq), are ignored.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import FastLaunch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# A row whose corrected normaliser 1 + sum w falls under this is "cancelling": the identity would
# amplify the dense attention's rounding by 1/(1 + sum w), so the fused forward recomputes it.
CANCEL_THRESHOLD = 0.25
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """input_precision for tl.dot: fp32 inputs use IEEE unless the caller allowed TF32."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


# ----------------------------------------------------------------------------------------------
# per-entry helpers (called from epilogues)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _unpack(pos):
    """(i, j) from entry_pos = (i << 16) | j (i >= 32768 wrapped the int32 sign: mask it)."""
    return (pos >> 16) & 0xFFFF, pos & 0xFFFF


@triton.jit
def _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL: tl.constexpr):
    ok = in_range & (i_e < Tq) & (j_e < Tk)
    if CAUSAL:
        ok = ok & (j_e <= i_e + causal_off)
    return ok


@triton.jit
def _load_entries(EntryPos, EntryVal, offs_e, e_hi, Tq, Tk, causal_off, CAUSAL: tl.constexpr):
    """(val, i, j, ok) of entries offs_e (q order); ok is False past e_hi, outside (Tq, Tk) or masked."""
    in_range = offs_e < e_hi
    pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
    val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
    i_e, j_e = _unpack(pos)
    ok = _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL)
    return val, i_e, j_e, ok


@triton.jit
def _gather(base, rows, stride, offs_d, ok):
    """[C, D] rows `rows` of a unit-stride-along-D slice; rows where not ok read as 0 (no traffic)."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _add_to_rows(base, rows, stride, offs_d, live, add):
    """base[rows] += add ([R, D] float32) in base's dtype, on `live` rows only (the correction
    kernels' read-modify-write of a dense pass's dQ / dK / dV rows)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    old = tl.load(ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    tl.store(ptrs, (old + add).to(base.dtype.element_ty), mask=live[:, None])


@triton.jit
def _fwd_prologue(EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi,
                  Tq, Tk, causal_off, CAUSAL: tl.constexpr, CHUNK: tl.constexpr):
    """The first chunk of entries with its gathered K/V rows: the state _fwd_entries starts
    from. Issued before the dense loop it hides the gathers' latency behind the dense work."""
    val0, i0, j0, ok0 = _load_entries(EntryPos, EntryVal, e_lo + tl.arange(0, CHUNK), e_hi, Tq, Tk, causal_off, CAUSAL)
    kg0 = _gather(k_base, j0, stride_kn, offs_d, ok0)
    vg0 = _gather(v_base, j0, stride_vn, offs_d, ok0)
    return val0, i0, ok0, kg0, vg0


@triton.jit
def _fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val, i_e, ok, kg, vg, qk_scale2, alpha2, DOT_PREC: tl.constexpr):
    """One chunk of entries (values val, rows i_e, valid ok, gathered K/V rows kg/vg) folded into
    the shifted-frame state (acc_o, den, c2) of _fwd_entries."""
    # [BM, C] logits of every row against the chunk's keys; only (row == i_e) is kept
    s2 = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2
    hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :]
    u = s2 - lse2[:, None]
    t = tl.where(hit, u + (val * alpha2)[None, :], float("-inf"))
    c_new = tl.maximum(c2, tl.max(t, 1))
    rescale = tl.exp2(c2 - c_new)
    acc_o = acc_o * rescale[:, None]
    den = den * rescale
    w = tl.where(hit, tl.exp2(t - c_new[:, None]) - tl.exp2(u - c_new[:, None]), 0.0)
    acc_o = tl.dot(w.to(vg.dtype), vg, acc_o, input_precision=DOT_PREC)
    return acc_o, den + tl.sum(w, 1), c_new


@triton.jit
def _fwd_entries(acc_o, den, c2, q, lse2, offs_m, e_lo, e_hi, val0, i0, ok0, kg0, vg0,
                 EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d,
                 Tq, Tk, causal_off, qk_scale2, alpha2,
                 CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold the entries e_lo..e_hi (rows offs_m, sorted by (i, j)) into a forward row block.

    acc_o [BM, D] f32 holds e^-c2 * (O + sum w v), den [BM] holds e^-c2 * (1 + sum w), c2 [BM] the
    shift in log2 units (start: acc_o = O, den = 1, c2 = 0). q [BM, D] is the query tile, lse2 [BM]
    the unbiased LSE in log2 units (-inf for fully masked rows). (val0, i0, ok0, kg0, vg0) is the
    first chunk from _fwd_prologue; K/V rows of later chunks are gathered from k_base/v_base (one
    (batch, kv head) slice, unit stride along D). (A deeper software pipeline, chunk c+1's gathers
    in flight during chunk c, measured slower on the H100: see benchmarks/notes_attention.md. So
    did a per-entry variant, q_{i_e} . k_{j_e} from gathered Q rows with two exponentials per
    entry instead of per [BM, C] element: the standalone kernel took 127 vs 100 us at 2048
    entries/head and 457 vs 298 us at 16384 (B4 H16 T4096 D128); its per-entry values need
    reductions across the rows axis, which cross warps, where the one-hot form reduces along the
    keys within a thread's fragment and puts the waste on the tensor cores.)
    """
    offs_c = tl.arange(0, CHUNK)
    for e0 in range(e_lo, e_hi, CHUNK):
        acc_o, den, c2 = _fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val0, i0, ok0, kg0, vg0, qk_scale2, alpha2,
                                    DOT_PREC)
        val0, i0, j0, ok0 = _load_entries(EntryPos, EntryVal, e0 + CHUNK + offs_c, e_hi, Tq, Tk, causal_off, CAUSAL)
        kg0 = _gather(k_base, j0, stride_kn, offs_d, ok0)
        vg0 = _gather(v_base, j0, stride_vn, offs_d, ok0)
    return acc_o, den, c2


@triton.jit
def _fwd_entries_piped(acc_o, den, c2, q, lse2, offs_m, e_lo, e_hi,
                       EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d,
                       Tq, Tk, causal_off, qk_scale2, alpha2,
                       CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr):
    """_fwd_entries as a plain loop (each chunk's index loads, gathers and dots in one iteration)
    that Triton's software pipeliner can take: with STAGES >= 2 it turns the gathers into
    asynchronous copies straight into shared memory, several chunks in flight, instead of
    loads into registers and a store to shared memory before every dot."""
    offs_c = tl.arange(0, CHUNK)
    for e0 in tl.range(e_lo, e_hi, CHUNK, num_stages=STAGES):
        val, i_e, j_e, ok = _load_entries(EntryPos, EntryVal, e0 + offs_c, e_hi, Tq, Tk, causal_off, CAUSAL)
        kg = _gather(k_base, j_e, stride_kn, offs_d, ok)
        vg = _gather(v_base, j_e, stride_vn, offs_d, ok)
        acc_o, den, c2 = _fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val, i_e, ok, kg, vg, qk_scale2, alpha2,
                                    DOT_PREC)
    return acc_o, den, c2


@triton.jit
def _dq_entries(dq, q, do, lse2, delta, offs_m, e_lo, e_hi,
                EntryPos, EntryVal, DvalOut, k_base, v_base, stride_kn, stride_vn, offs_d,
                Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                NEED_DVAL: tl.constexpr):
    """Entry terms of dQ (unscaled: the caller multiplies dq by `scale`) and dvalues for a row block.

    lse2 [BM] is the BIASED LSE' in log2 units with +inf on rows to skip (fully masked), delta [BM]
    = rowsum(dO * O'). dvalues of entry e (alpha * P'(dP - D), this batch element) go to
    DvalOut[e]; a duplicate follower (same position as the entry before it) gets 0, its leader
    carries the gradient.
    """
    for e0 in range(e_lo, e_hi, CHUNK):
        offs_e = e0 + tl.arange(0, CHUNK)
        in_range = offs_e < e_hi
        pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
        val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
        i_e, j_e = _unpack(pos)
        ok = _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL)
        kg = tl.load(k_base + j_e[:, None] * stride_kn + offs_d[None, :], mask=ok[:, None], other=0.0)
        vg = tl.load(v_base + j_e[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None], other=0.0)
        s2 = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2
        hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :]
        u = s2 - lse2[:, None]
        p_biased = tl.where(hit, tl.exp2(u + (val * alpha2)[None, :]), 0.0)
        g = tl.where(hit, p_biased - tl.exp2(u), 0.0)
        dp = tl.dot(do, tl.trans(vg), input_precision=DOT_PREC) - delta[:, None]
        ds = g * dp
        dq = tl.dot(ds.to(kg.dtype), kg, dq, input_precision=DOT_PREC)
        if NEED_DVAL:
            dval = tl.sum(p_biased * dp, 0) * alpha
            prev = tl.load(EntryPos + offs_e - 1, mask=in_range & (offs_e > e_lo), other=-1)
            dval = tl.where(prev == pos, 0.0, dval)
            tl.store(DvalOut + offs_e, dval, mask=in_range)
    return dq


@triton.jit
def _dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi,
                  KOrder, EntryPos, EntryVal, q_base, do_base, lse_base, delta_base,
                  stride_qm, stride_dom, stride_lm, offs_d,
                  Tq, Tk, causal_off, qk_scale2, alpha2,
                  CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                  LSE_NATURAL: tl.constexpr):
    """Entry terms of dK (unscaled) and dV for a key block of one query head.

    Entries t_lo..t_hi of k_order (keys offs_n, sorted by (j, i)). q/do/lse/delta bases point at
    the (batch, query head) slice; lse is LSE' in log2 units with +inf on rows to skip, or the
    natural LSE' (-inf on fully masked rows) when LSE_NATURAL.
    """
    for t0 in range(t_lo, t_hi, CHUNK):
        offs_t = t0 + tl.arange(0, CHUNK)
        in_range = offs_t < t_hi
        idx = tl.load(KOrder + offs_t, mask=in_range, other=0)
        pos = tl.load(EntryPos + idx, mask=in_range, other=0)
        val = tl.load(EntryVal + idx, mask=in_range, other=0.0)
        i_e, j_e = _unpack(pos)
        ok = _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL)
        qg = tl.load(q_base + i_e[:, None] * stride_qm + offs_d[None, :], mask=ok[:, None], other=0.0)
        dog = tl.load(do_base + i_e[:, None] * stride_dom + offs_d[None, :], mask=ok[:, None], other=0.0)
        lse_e = tl.load(lse_base + i_e * stride_lm, mask=ok, other=float("inf"))
        if LSE_NATURAL:
            lse_e = tl.where(lse_e == float("-inf"), float("inf"), lse_e * 1.4426950408889634)
        delta_e = tl.load(delta_base + i_e, mask=ok, other=0.0)
        s2 = tl.dot(k, tl.trans(qg), input_precision=DOT_PREC) * qk_scale2      # [BN, C]
        hit = (offs_n[:, None] == j_e[None, :]) & ok[None, :]
        u = s2 - lse_e[None, :]
        g = tl.where(hit, tl.exp2(u + (val * alpha2)[None, :]) - tl.exp2(u), 0.0)
        dv = tl.dot(g.to(dog.dtype), dog, dv, input_precision=DOT_PREC)
        dp = tl.dot(v, tl.trans(dog), input_precision=DOT_PREC) - delta_e[None, :]
        ds = g * dp
        dk = tl.dot(ds.to(qg.dtype), qg, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _entry_rows(pos, val, in_range, q_base, do_base, k_base, v_base, lse2_base, delta_base, stride_qm, stride_dom,
                stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL: tl.constexpr):
    """The per-entry terms of a chunk of entries (pos, val) for the rows-form epilogues: the
    gathered q_i / dO_i / k_j rows, P' = exp2(s + alpha b - lse2), g = P' - P and dP - D, with
    s = q_i . k_j and dP = dO_i . v_j as row dots in float32 (entries not ok: P' = g = 0).
    lse2_base / delta_base: the (batch, head) rows of Lse2 (log2 units, +inf on rows to skip) and
    Delta."""
    i_e, j_e = _unpack(pos)
    ok = _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL)
    qg = _gather(q_base, i_e, stride_qm, offs_d, ok)
    dog = _gather(do_base, i_e, stride_dom, offs_d, ok)
    kg = _gather(k_base, j_e, stride_kn, offs_d, ok)
    vg = _gather(v_base, j_e, stride_vn, offs_d, ok)
    lse_e = tl.load(lse2_base + i_e, mask=ok, other=float("inf"))
    delta_e = tl.load(delta_base + i_e, mask=ok, other=0.0)
    u = tl.sum(qg.to(tl.float32) * kg.to(tl.float32), 1) * qk_scale2 - lse_e
    p_biased = tl.where(ok, tl.exp2(u + val * alpha2), 0.0)
    g = tl.where(ok, p_biased - tl.exp2(u), 0.0)
    dp = tl.sum(dog.to(tl.float32) * vg.to(tl.float32), 1) - delta_e
    return i_e, j_e, qg, dog, kg, p_biased, g, dp


@triton.jit
def _dq_entries_rows(dq, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalOut, q_base, do_base, lse2_base, delta_base,
                     k_base, v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d,
                     Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                     CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr):
    """_dq_entries in the per-entry form: s = q_i . k_j and dP = dO_i . v_j per entry from gathered
    rows (the row block's own q/dO rows come back from L1/L2), so the one-hot product is only the
    scatter dq += R (ds k_j), R[r, e] = [r == i_e]: one [BM, C] x [C, D] dot per chunk instead of
    three, and two exponentials per entry instead of per [BM, C] element (_entry_rows). The
    chunk loop is not software-pipelined by the compiler (num_stages=1): its own next-chunk index
    loads hide part of the index -> rows latency, and 2-3 compiler stages measured no better on the
    H100 (benchmarks/notes_attention.md, session 7)."""
    offs_c = tl.arange(0, CHUNK)
    pos_next = tl.load(EntryPos + e_lo + offs_c, mask=e_lo + offs_c < e_hi, other=0)
    val_next = tl.load(EntryVal + e_lo + offs_c, mask=e_lo + offs_c < e_hi, other=0.0)
    for e0 in tl.range(e_lo, e_hi, CHUNK, num_stages=1):
        offs_e = e0 + offs_c
        in_range = offs_e < e_hi
        pos, val = pos_next, val_next       # the next chunk's entries load while this one computes
        nxt = offs_e + CHUNK
        pos_next = tl.load(EntryPos + nxt, mask=nxt < e_hi, other=0)
        val_next = tl.load(EntryVal + nxt, mask=nxt < e_hi, other=0.0)
        i_e, j_e, qg, dog, kg, p_biased, g, dp = _entry_rows(
            pos, val, in_range, q_base, do_base, k_base, v_base, lse2_base, delta_base, stride_qm, stride_dom,
            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL)
        ds = g * dp
        hit = tl.where(offs_m[:, None] == i_e[None, :], 1.0, 0.0)
        dq = tl.dot(hit.to(kg.dtype), (ds[:, None] * kg.to(tl.float32)).to(kg.dtype), dq, input_precision=DOT_PREC)
        if NEED_DVAL:
            prev = tl.load(EntryPos + offs_e - 1, mask=in_range & (offs_e > e_lo), other=-1)
            tl.store(DvalOut + offs_e, tl.where(prev == pos, 0.0, p_biased * dp * alpha), mask=in_range)
    return dq


@triton.jit
def _dkdv_entries_rows(dk, dv, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal, q_base, do_base, lse_base,
                       delta_base, k_base, v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d,
                       Tq, Tk, causal_off, qk_scale2, alpha2,
                       CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """_dkdv_entries in the per-entry form (lse in log2 units, +inf on rows to skip): the key
    block's own K/V rows are gathered back per entry, s and dP are per-entry row dots, and the
    scatter into the block is two [BN, C] x [C, D] dots (dv += R (g dO_i), dk += R (ds q_i)) instead
    of four. Not compiler-pipelined, as _dq_entries_rows."""
    offs_c = tl.arange(0, CHUNK)
    # the index chain KOrder -> (pos, val) -> rows runs ahead: chunk c+2's KOrder and chunk c+1's
    # entries load while chunk c computes (a few registers; the rows themselves are not carried)
    ok_next = t_lo + offs_c < t_hi
    idx_next = tl.load(KOrder + t_lo + offs_c, mask=ok_next, other=0)
    pos_next = tl.load(EntryPos + idx_next, mask=ok_next, other=0)
    val_next = tl.load(EntryVal + idx_next, mask=ok_next, other=0.0)
    idx_after = tl.load(KOrder + t_lo + CHUNK + offs_c, mask=t_lo + CHUNK + offs_c < t_hi, other=0)
    for t0 in tl.range(t_lo, t_hi, CHUNK, num_stages=1):
        offs_t = t0 + offs_c
        in_range = offs_t < t_hi
        pos, val = pos_next, val_next
        ok_next = offs_t + CHUNK < t_hi
        pos_next = tl.load(EntryPos + idx_after, mask=ok_next, other=0)
        val_next = tl.load(EntryVal + idx_after, mask=ok_next, other=0.0)
        idx_after = tl.load(KOrder + offs_t + 2 * CHUNK, mask=offs_t + 2 * CHUNK < t_hi, other=0)
        i_e, j_e, qg, dog, kg, p_biased, g, dp = _entry_rows(
            pos, val, in_range, q_base, do_base, k_base, v_base, lse_base, delta_base, stride_qm, stride_dom,
            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL)
        hit = tl.where(offs_n[:, None] == j_e[None, :], 1.0, 0.0).to(qg.dtype)
        dv = tl.dot(hit, (g[:, None] * dog.to(tl.float32)).to(dog.dtype), dv, input_precision=DOT_PREC)
        dk = tl.dot(hit, ((g * dp)[:, None] * qg.to(tl.float32)).to(qg.dtype), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """[BM, BN] alpha*M (log2 units) for rows offs_m and keys cols, from the row block's entries
    e_lo..e_hi (sorted by (i, j)): a one-hot product R @ C per chunk, in IEEE fp32 (exact).
    Slow; used only by the cancellation path."""
    tile = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for e0 in range(e_lo, e_hi, CHUNK):
        offs_e = e0 + tl.arange(0, CHUNK)
        in_range = offs_e < e_hi
        pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
        val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
        i_e = (pos >> 16) & 0xFFFF
        j_e = pos & 0xFFFF
        rows = tl.where((offs_m[:, None] == i_e[None, :]) & in_range[None, :], (val * alpha2)[None, :], 0.0)
        hits = tl.where(j_e[:, None] == cols[None, :], 1.0, 0.0)
        tile = tl.dot(rows, hits, tile, input_precision="ieee")
    return tile


@triton.jit
def _fwd_biased_rows(q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                     e_lo, e_hi, EntryPos, EntryVal, Tk, causal_off, hi, qk_scale2, alpha2,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Biased attention of a row block with the bias inside the tile loop: (acc/l, lse2)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2
        qk += _bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
        valid = (cols < Tk)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        corr = tl.math.exp2(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * corr[:, None], input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    return acc / l_safe[:, None], lse2


@triton.jit
def _fwd_rows(q_base, o_base, l_base, k_base, v_base, rows, live, e_lo, e_hi, EntryPos, EntryVal,
              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off, qk_scale2, alpha2,
              cancel_tol, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
              CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr):
    """The forward correction, in place, of rows `rows` [BLOCK_M] of one (batch, head) slice
    (bases; only `live` rows are read or written) from its entries e_lo..e_hi. Returns the rows'
    cancelling flags (1 + sum w < cancel_tol). The loop sums only the entry terms (from 0); O is
    read after it, so neither O nor its [BM, D] pointers hold registers during the gathers.
    STAGES: 0 runs the hand-carried entry loop (_fwd_entries), n >= 1 the plain loop that Triton
    pipelines over n stages (_fwd_entries_piped)."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=live[:, None], other=0.0)
    lse2 = tl.load(l_base + rows * stride_lm, mask=live, other=float("-inf")) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    den = tl.full([BLOCK_M], 1.0, tl.float32)
    c2 = tl.zeros([BLOCK_M], tl.float32)
    if STAGES == 0:
        val0, i0, ok0, kg0, vg0 = _fwd_prologue(
            EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk, causal_off,
            CAUSAL, CHUNK)
        acc, den, c2 = _fwd_entries(acc, den, c2, q, lse2, rows, e_lo, e_hi,
                                    val0, i0, ok0, kg0, vg0, EntryPos, EntryVal,
                                    k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                    qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC)
    else:
        acc, den, c2 = _fwd_entries_piped(acc, den, c2, q, lse2, rows, e_lo, e_hi, EntryPos, EntryVal,
                                          k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                          qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, STAGES)
    # acc = e^-c2 sum w v, den = e^-c2 (1 + sum w): add the dense e^-c2 O now
    o_ptrs = o_base + rows[:, None] * stride_om + offs_d[None, :]
    o = tl.load(o_ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    scale_o = tl.exp2(-c2)
    acc = o * scale_o[:, None] + acc
    tl.store(o_ptrs, (acc / den[:, None]).to(o_base.dtype.element_ty), mask=live[:, None])
    tl.store(l_base + rows * stride_lm, (lse2 + c2 + tl.log2(den)) * 0.6931471805599453, mask=live)
    return live & (den < cancel_tol * scale_o)


@triton.jit
def _block_range(Offsets, head, lo, hi, TMax):
    """Entry range of rows [lo, hi) of `head` in a CSR table built for TMax rows per head."""
    lo_c = tl.minimum(lo, TMax)
    hi_c = tl.maximum(tl.minimum(hi, TMax), lo_c)
    base = head * TMax
    return tl.load(Offsets + base + lo_c), tl.load(Offsets + base + hi_c)


@triton.jit
def _rows_with_entries(Offsets, head, offs, T, TMax):
    """[BLOCK] bool: row offs (< T and < TMax) of `head` holds at least one entry."""
    live = (offs < T) & (offs < TMax)
    base = head * TMax
    a = tl.load(Offsets + base + offs, mask=live, other=0)
    b = tl.load(Offsets + base + offs + 1, mask=live, other=0)
    return live & (b > a)


# ----------------------------------------------------------------------------------------------
# standalone kernels
# ----------------------------------------------------------------------------------------------
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
    no entries return at once, and only rows holding entries are read or written (_fwd_rows; with
    the cancelling-row recompute moved to its own kernel, BM=64, D=128 went from 255 registers to
    196, and _fwd_config caps them: more programs per SM to hide the gathers' latency).
    STORE_FLAGS: Flags[bh, i] (int8) = 1 where 1 + sum w < cancel_tol (the identity cancelled:
    _correct_fwd_slow_kernel recomputes those rows), 0 on every other row < Tq, so the caller need
    not zero it. STAGES: see _fwd_rows.
    """
    pid_m, bh = _launch_order(REVERSE)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    cancelled = offs_m < 0
    if e_hi > e_lo:
        live = _rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        cancelled = _fwd_rows(Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
                              Lse + b * stride_lb + h * stride_lh, K + b * stride_kb + hk * stride_kh,
                              V + b * stride_vb + hk * stride_vh, offs_m, live, e_lo, e_hi, EntryPos, EntryVal,
                              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off,
                              qk_scale2, alpha2, cancel_tol, HEAD_DIM, CAUSAL, BLOCK_M, CHUNK, DOT_PREC, STAGES)
    if STORE_FLAGS:
        tl.store(Flags + bh.to(tl.int64) * Tq + offs_m, cancelled.to(tl.int8), mask=offs_m < Tq)


@triton.jit
def _launch_order(REVERSE: tl.constexpr):
    """(program_id(0), program_id(1)), both counted from the end when REVERSE. Blocks start in
    launch order, so a reversed grid reads first what a dense pass over (b, h) in order wrote last,
    while it may still be in L2."""
    if REVERSE:
        return tl.num_programs(0) - 1 - tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _window_of(QOffsets, pid, Hq, TqMax, WINDOW: tl.constexpr, HP: tl.constexpr):
    """(head, head's first entry, window's first entry, head's end) of window `pid` in the list of
    every head's windows of WINDOW consecutive entries, heads in order (head = Hq: past the list)."""
    hs = tl.arange(0, HP)
    ok = hs < Hq
    start = tl.load(QOffsets + hs * TqMax, mask=ok, other=0)
    end = tl.load(QOffsets + (hs + 1) * TqMax, mask=ok, other=0)
    n_win = (end - start + WINDOW - 1) // WINDOW
    last = tl.cumsum(n_win, 0)                        # windows of heads 0..h
    h = tl.sum((last <= pid).to(tl.int32), 0)
    sel = hs == h
    h_start = tl.sum(tl.where(sel, start, 0), 0)
    w = pid - tl.sum(tl.where(sel, last - n_win, 0), 0)
    return h, h_start, h_start + w * WINDOW, tl.sum(tl.where(sel, end, 0), 0)


@triton.jit
def _window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW: tl.constexpr, HP: tl.constexpr):
    """The rows a window program owns (_correct_fwd_window_kernel): (head, rows [WINDOW] with -1 on
    slots that start no row, e_lo, e_hi); e_lo = e_hi when the program owns no row."""
    return _window_slots(EntryPos, EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP, False)


@triton.jit
def _window_slots(EntryPos, KOrder, Offsets, pid_w, H, T, TMax, WINDOW: tl.constexpr, HP: tl.constexpr,
                  BY_KEY: tl.constexpr):
    """_window_rows over either order: BY_KEY=False, the q order (entry t is EntryPos[t], its slot
    its row i); BY_KEY=True, the k order (entry t is EntryPos[KOrder[t]], its slot its key j;
    Offsets = k_offsets). (head, slots [WINDOW] with -1 where no slot starts, t_lo, t_hi)."""
    h, h_start, w0, h_end = _window_of(Offsets, pid_w, H, TMax, WINDOW, HP)
    offs_w = w0 + tl.arange(0, WINDOW)
    in_w = offs_w < h_end
    has_prev = in_w & (offs_w > h_start)
    if BY_KEY:
        s_w = tl.load(EntryPos + tl.load(KOrder + offs_w, mask=in_w, other=0), mask=in_w, other=0) & 0xFFFF
        s_prev = tl.load(EntryPos + tl.load(KOrder + offs_w - 1, mask=has_prev, other=0), mask=has_prev,
                         other=0) & 0xFFFF
    else:
        s_w = (tl.load(EntryPos + offs_w, mask=in_w, other=0) >> 16) & 0xFFFF
        s_prev = (tl.load(EntryPos + offs_w - 1, mask=has_prev, other=0) >> 16) & 0xFFFF
    starts = in_w & ((offs_w == h_start) | (s_w != s_prev))
    slots = tl.where(starts & (s_w < T), s_w, -1)
    t_lo = tl.min(tl.where(starts, offs_w, h_end), 0)
    t_hi = h_end
    if t_lo < h_end:
        # the window's last slot (sorted: the largest) owns the entries up to its end
        t_hi = tl.load(Offsets + h * TMax + tl.max(tl.where(in_w, s_w, 0), 0) + 1)
    return h, slots, t_lo, t_hi


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
    rows and 64 entries: the q/O tile is ~80% live instead of ~39% (_fwd_config's default window
    is 16, on one warp). Rows holding no entry are not touched (their cancelling flags stay as the
    caller zeroed them)."""
    pid_w, b = _launch_order(REVERSE)
    b = b.to(tl.int64)
    # past the list (h = Hq) the window is empty: no row starts, nothing to do
    h, rows, e_lo, e_hi = _window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP)
    if e_lo < e_hi:
        hk = (h // GROUP).to(tl.int64)
        live = rows >= 0
        cancelled = _fwd_rows(Q + b * stride_qb + h * stride_qh, Out + b * stride_ob + h * stride_oh,
                              Lse + b * stride_lb + h * stride_lh, K + b * stride_kb + hk * stride_kh,
                              V + b * stride_vb + hk * stride_vh, rows, live, e_lo, e_hi, EntryPos, EntryVal,
                              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off,
                              qk_scale2, alpha2, cancel_tol, HEAD_DIM, CAUSAL, WINDOW, CHUNK, DOT_PREC, STAGES)
        if STORE_FLAGS:
            tl.store(Flags + (b * Hq + h) * Tq + rows, cancelled.to(tl.int8), mask=live)


@triton.jit
def _flagged_rows(Flags, Tq, BLOCK_M: tl.constexpr):
    """(bh, m0, rows, flagged [BLOCK_M] bool) of a program on the grid (cdiv(Tq, BLOCK_M), B*Hq),
    from the int8 cancelling-row flags [B*Hq, Tq]."""
    bh = tl.program_id(1)
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return bh, m0, offs_m, tl.load(Flags + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0) != 0


@triton.jit
def _correct_fwd_slow_kernel(Q, K, V, Out, Lse, EntryPos, EntryVal, QOffsets, Flags,
                             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                             stride_lb, stride_lh, stride_lm,
                             Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2,
                             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """The rows _correct_fwd_kernel flagged (the identity cancelled there), recomputed with the
    bias inside the tile loop (exact, slow). Grid (cdiv(Tq, BLOCK_M), B*Hq); a block with no
    flagged row returns after reading its flags (the whole launch: 13 us at B4 H16 T4096 on the
    H100, which is why the callers skip it when no row can cancel)."""
    bh, m0, offs_m, flagged = _flagged_rows(Flags, Tq, BLOCK_M)
    if tl.sum(flagged.to(tl.int32), 0) > 0:
        b = (bh // Hq).to(tl.int64)
        h = bh % Hq
        hk = (h // GROUP).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=flagged[:, None], other=0.0)
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        else:
            hi = Tk
        acc, lse2 = _fwd_biased_rows(q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
                                     stride_kn, stride_vn, offs_m, tl.arange(0, BLOCK_N), offs_d,
                                     e_lo, e_hi, EntryPos, EntryVal, Tk, causal_off, hi, qk_scale2, alpha2,
                                     CAUSAL, BLOCK_M, BLOCK_N, HEAD_DIM, CHUNK, DOT_PREC)
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=flagged[:, None])
        tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse2 * 0.6931471805599453, mask=flagged)


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
def _dq_rows(q_base, do_base, o_base, l_base, dq_base, delta_base, k_base, v_base, dval_base, rows, live,
             e_lo, e_hi, EntryPos, EntryVal, stride_qm, stride_dom, stride_om, stride_lm, stride_dqm,
             stride_kn, stride_vn, Tq, Tk, causal_off, scale, qk_scale2, alpha2, alpha,
             HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
             DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr, DELTA_GIVEN: tl.constexpr):
    """correct_bwd's query side for rows `rows` [BLOCK_M] of one (batch, head) slice (only `live`
    rows read or written): delta = rowsum(dO * O') (_row_delta), dq += scale * entry terms in
    place, the entries' dvalues to dval_base."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=live[:, None], other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=live[:, None], other=0.0)
    delta = _row_delta(o_base, delta_base, do, rows, live, stride_om, offs_d, DELTA_GIVEN)
    lse = tl.load(l_base + rows * stride_lm, mask=live, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_entries(dq, q, do, lse2, delta, rows, e_lo, e_hi, EntryPos, EntryVal, dval_base, k_base, v_base,
                     stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                     CAUSAL, CHUNK, DOT_PREC, NEED_DVAL)
    _add_to_rows(dq_base, rows, stride_dqm, offs_d, live, scale * dq)


@triton.jit
def _correct_bwd_q_kernel(Q, K, V, Out, Lse, DO, DQ, Delta, DvalPart,
                          EntryPos, EntryVal, QOffsets,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                          stride_dqb, stride_dqh, stride_dqm,
                          Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr,
                          DELTA_GIVEN: tl.constexpr):
    """dQ += scale * entry terms (in place), Delta = rowsum(dO*O') on rows with entries, and
    DvalPart[b, e] = alpha * P'(dP - D) for this batch element.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). Out/Lse are the biased O', natural LSE'. Delta is [B*Hq, Tq]
    float32 and is read by _correct_bwd_k_kernel for the same rows; DELTA_GIVEN: the caller's
    dense backward already computed it (Out is not read).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    if e_hi > e_lo:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        live = _rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        _dq_rows(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                 Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h * stride_lh,
                 DQ + b * stride_dqb + h * stride_dqh, Delta + (b * Hq + h) * Tq, K + b * stride_kb + hk * stride_kh,
                 V + b * stride_vb + hk * stride_vh, DvalPart + b * E, offs_m, live, e_lo, e_hi, EntryPos, EntryVal,
                 stride_qm, stride_dom, stride_om, stride_lm, stride_dqm, stride_kn, stride_vn, Tq, Tk, causal_off,
                 scale, qk_scale2, alpha2, alpha, HEAD_DIM, CAUSAL, BLOCK_M, CHUNK, DOT_PREC, NEED_DVAL, DELTA_GIVEN)


@triton.jit
def _correct_bwd_q_window_kernel(Q, K, V, Out, Lse, DO, DQ, Delta, DvalPart,
                                 EntryPos, EntryVal, QOffsets,
                                 stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                                 stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                                 stride_dqb, stride_dqh, stride_dqm,
                                 Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                                 HP: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                                 NEED_DVAL: tl.constexpr, REVERSE: tl.constexpr, DELTA_GIVEN: tl.constexpr):
    """_correct_bwd_q_kernel by windows of entries (_correct_fwd_window_kernel's rows), for
    sparse biases. Grid (>= windows, B)."""
    pid_w, b = _launch_order(REVERSE)
    b = b.to(tl.int64)
    h, rows, e_lo, e_hi = _window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP)
    if e_lo < e_hi:
        hk = (h // GROUP).to(tl.int64)
        live = rows >= 0
        _dq_rows(Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                 Out + b * stride_ob + h * stride_oh, Lse + b * stride_lb + h * stride_lh,
                 DQ + b * stride_dqb + h * stride_dqh, Delta + (b * Hq + h) * Tq, K + b * stride_kb + hk * stride_kh,
                 V + b * stride_vb + hk * stride_vh, DvalPart + b * E, rows, live, e_lo, e_hi, EntryPos, EntryVal,
                 stride_qm, stride_dom, stride_om, stride_lm, stride_dqm, stride_kn, stride_vn, Tq, Tk, causal_off,
                 scale, qk_scale2, alpha2, alpha, HEAD_DIM, CAUSAL, WINDOW, CHUNK, DOT_PREC, NEED_DVAL, DELTA_GIVEN)


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
        t_lo, t_hi = _block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
        total += t_hi - t_lo
        live = live | _rows_with_entries(KOffsets, h, offs_n, Tk, TkMax)
    if total > 0:
        hk64 = hk.to(tl.int64)
        k = _gather(K + b * stride_kb + hk64 * stride_kh, offs_n, stride_kn, offs_d, live)
        v = _gather(V + b * stride_vb + hk64 * stride_vh, offs_n, stride_vn, offs_d, live)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            t_lo, t_hi = _block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
            h64 = h.to(tl.int64)
            dk, dv = _dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                   Q + b * stride_qb + h64 * stride_qh, DO + b * stride_dob + h64 * stride_doh,
                                   Lse + b * stride_lb + h64 * stride_lh, Delta + (b * Hq + h64) * Tq,
                                   stride_qm, stride_dom, stride_lm, offs_d,
                                   Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, True)
        _add_to_rows(DK + b * stride_dkb + hk64 * stride_dkh, offs_n, stride_dkn, offs_d, live, scale * dk)
        _add_to_rows(DV + b * stride_dvb + hk64 * stride_dvh, offs_n, stride_dvn, offs_d, live, dv)


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
    pid_w, b = _launch_order(REVERSE)
    b = b.to(tl.int64)
    h, keys, t_lo, t_hi = _window_slots(EntryPos, KOrder, KOffsets, pid_w, Hq, Tk, TkMax, WINDOW, HP, True)
    if t_lo < t_hi:
        h64 = h.to(tl.int64)
        live = keys >= 0
        offs_d = tl.arange(0, HEAD_DIM)
        k = _gather(K + b * stride_kb + h64 * stride_kh, keys, stride_kn, offs_d, live)
        v = _gather(V + b * stride_vb + h64 * stride_vh, keys, stride_vn, offs_d, live)
        dk = tl.zeros([WINDOW, HEAD_DIM], tl.float32)
        dv = tl.zeros([WINDOW, HEAD_DIM], tl.float32)
        dk, dv = _dkdv_entries(dk, dv, k, v, keys, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                               Q + b * stride_qb + h64 * stride_qh, DO + b * stride_dob + h64 * stride_doh,
                               Lse + b * stride_lb + h64 * stride_lh, Delta + (b * Hq + h64) * Tq,
                               stride_qm, stride_dom, stride_lm, offs_d,
                               Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, True)
        _add_to_rows(DK + b * stride_dkb + h64 * stride_dkh, keys, stride_dkn, offs_d, live, scale * dk)
        _add_to_rows(DV + b * stride_dvb + h64 * stride_dvh, keys, stride_dvn, offs_d, live, dv)


# ----------------------------------------------------------------------------------------------
# cancelling rows: detection from LSE', and the exact backward of those rows
# ----------------------------------------------------------------------------------------------
@triton.jit
def _cancel_flags_kernel(Q, K, Lse, Flags, EntryPos, EntryVal, QOffsets,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_lb, stride_lh, stride_lm,
                         Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, excess,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         CHUNK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Flags[bh, i] (int8) = 1 where row i is cancelling: sum_e (P_e - P'_e) > excess, with
    P = exp(s - LSE'), P' = exp(s + alpha b - LSE') over the row's entries (Lse is the BIASED
    natural LSE'). Grid (cdiv(Tq, BLOCK_M), B*Hq); every row < Tq is written (0 without entries).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    flag = offs_m < 0
    e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
    if e_hi > e_lo:
        offs_d = tl.arange(0, HEAD_DIM)
        live = _rows_with_entries(QOffsets, h, offs_m, Tq, TqMax)
        q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=live[:, None], other=0.0)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=live, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        k_base = K + b * stride_kb + hk * stride_kh
        excess_sum = tl.zeros([BLOCK_M], tl.float32)
        for e0 in range(e_lo, e_hi, CHUNK):
            val, i_e, j_e, ok = _load_entries(EntryPos, EntryVal, e0 + tl.arange(0, CHUNK), e_hi, Tq, Tk,
                                              causal_off, CAUSAL)
            kg = _gather(k_base, j_e, stride_kn, offs_d, ok)
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
def _exact_rows_q_kernel(Q, K, V, Out, Lse, DO, DQ, DvalPart, Flags, EntryPos, EntryVal, QOffsets,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                         stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                         stride_dqb, stride_dqh, stride_dqm,
                         Hq, GROUP, Tq, Tk, TqMax, E, causal_off, dq_scale, qk_scale2, alpha2, alpha,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                         NEED_DVAL: tl.constexpr):
    """Exact dQ of the flagged rows (STORED over what the fast pass left there, which is 0) and,
    NEED_DVAL, DvalPart[b, e] for the entries on those rows.

    Grid (cdiv(Tq, BLOCK_M), B*Hq); a block without a flagged row returns after one [BLOCK_M]
    load. Otherwise a flash-backward dQ loop over every visible key block with the bias added to
    the logits in the tile (P' = exp2(s + alpha b - lse2) <= 1, no cancellation), masked to the
    flagged rows. Out/Lse are the biased O' and natural LSE'.
    """
    bh, m0, offs_m, sel = _flagged_rows(Flags, Tq, BLOCK_M)
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
        e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        k_base = K + b * stride_kb + hk * stride_kh
        v_base = V + b * stride_vb + hk * stride_vh
        if CAUSAL:
            hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        else:
            hi = Tk
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for n0 in range(0, hi, BLOCK_N):
            cols = n0 + offs_n
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2
            s2 += _bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
            valid = sel[:, None] & (cols < Tk)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
            p = tl.where(valid, tl.math.exp2(s2 - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
                 (dq * dq_scale).to(DQ.dtype.element_ty), mask=sel[:, None])
        if NEED_DVAL:
            # per entry on a flagged row: alpha * P'(dP - D), P' computed directly (<= 1)
            for e0 in range(e_lo, e_hi, CHUNK):
                offs_e = e0 + tl.arange(0, CHUNK)
                in_range = offs_e < e_hi
                pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
                val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
                i_e, j_e = _unpack(pos)
                ok = _entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL)
                hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :] & sel[:, None]
                mine = tl.max(hit.to(tl.int32), 0) > 0
                kg = _gather(k_base, j_e, stride_kn, offs_d, mine)
                vg = _gather(v_base, j_e, stride_vn, offs_d, mine)
                u = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2 - lse2[:, None]
                p_biased = tl.where(hit, tl.exp2(u + (val * alpha2)[None, :]), 0.0)
                dp = tl.dot(do, tl.trans(vg), input_precision=DOT_PREC) - delta[:, None]
                dval = tl.sum(p_biased * dp, 0) * alpha
                prev = tl.load(EntryPos + offs_e - 1, mask=in_range & (offs_e > e_lo), other=-1)
                dval = tl.where(prev == pos, 0.0, dval)   # duplicate follower: its leader carries it
                tl.store(DvalPart + b * E + offs_e, dval, mask=mine)


@triton.jit
def _exact_rows_kv_kernel(Q, K, V, Out, Lse, DO, DK, DV, Flags, EntryPos, EntryVal, QOffsets,
                          stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                          stride_lb, stride_lh, stride_lm, stride_dob, stride_doh, stride_dom,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          Hq, Hkv, GROUP, Tq, Tk, TqMax, causal_off, scale, qk_scale2, alpha2,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, SCAN: tl.constexpr, CHUNK: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """dK += scale * (exact terms of the flagged rows), dV += (same), for keys [n0, n0+BLOCK_N) of
    (b, kv head), summed over the GROUP query heads in the program (no atomics).

    Grid (cdiv(Tk, BLOCK_N), B*Hkv). First a scan of the flags of the rows that can see these
    keys (SCAN bytes per step); a program that finds none returns without touching K, V, dK, dV.
    Otherwise, per query block holding a flagged row: the dense dK/dV tile with the bias in the
    logits, masked to the flagged rows.
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
                    e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
                    s2 = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2            # [BM, BN]
                    s2 += _bias_tile(rows, offs_n, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
                    valid = sel[:, None] & (offs_n < Tk)[None, :]
                    if CAUSAL:
                        valid = valid & (offs_n[None, :] <= rows[:, None] + causal_off)
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


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_common(q, k, v, bias):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, T, D]")
    B, Hq, Tq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported by the Triton kernels (one of {SUPPORTED_HEAD_DIMS})")
    Hkv = k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if bias is not None and bias.num_heads != Hq:
        raise ValueError(f"bias has {bias.num_heads} heads, q has {Hq}")
    return B, Hq, Hkv, Tq, k.shape[2], D


def _fwd_block(D):
    return 64 if D <= 128 else 32


def _fwd_config(D, entries_per_row, form=None):
    """(form, BLOCK_M or WINDOW, CHUNK, num_warps, register cap, STAGES) of the forward correction
    (form None: picked by density).

    The kernel is bound by the latency of its gathers, so what pays is programs in flight: small
    tiles, few warps, a 128-register cap. Timed on the H100 right after cuDNN's forward
    (benchmarks/tune_correction.py, after_dense_us; B4 H16 T4096 D128 bf16, random traces):
    - 4 entries per row (16384/head): rows of 16, chunks of 32, 2 warps, the entry loop pipelined
      over 2 stages (gathers as asynchronous copies into shared memory): 183-189 us, against 236
      at 64 rows / 4 warps / 3 stages (session 11) and 306 uncapped;
    - 0.5 per row (2048/head): most rows of a block hold no entry, so the window form (programs own
      the rows that start in a window of sorted entries) with windows of 16, one warp, 2 stages,
      in reverse launch order (the first programs find what the dense pass wrote last still in
      L2): 59.5-60.4 us, against 63 in order, 69 with windows of 64 and 81.5 for the rows form
      at 64/16/4 (session 11's choice). At 4 per row the window form is slower (~300 us);
    - 0.75 per row: window 79 us, rows 98-106; 1.5 per row: rows 16/32/2 122.5 us, window 127,
      rows 64/16/4 145 (tune_correction_mid_h100_session12.json): the switch sits at 1."""
    if form is None:
        form = "window" if entries_per_row < 1 and D <= 128 else "rows"
    if D > 128:
        return form, 32, 32, 4, None, 0
    if form == "window":
        return form, 16, 16, 1, 128, 2
    return form, 16, 32, 2, 128, 2


def _bwd_q_config(D, entries_per_row, form=None):
    """(form, WINDOW, num_warps) of correct_bwd's query-side launch: the window form below one
    entry per row (for the forward's reason, _fwd_config), else blocks of block_m rows. H100, B4
    H16 T4096 D128 bf16 (tune_correction_bwd_window_h100_session12.json), the whole correct_bwd:
    2048/head 240 -> 212 us with windows of 16 on 2 warps (1 warp 219, 4 warps 244, windows of
    32-64 232-242); 3072/head 267 -> 257 us."""
    if form is None:
        form = "window" if entries_per_row < 1 and D <= 128 else "rows"
    return form, 16, 2


def _bwd_kv_config(D, entries_per_key, group, form=None):
    """(form, WINDOW, num_warps) of correct_bwd's key-side launch: the window form (keys that start
    in a window of k-ordered entries) below one entry per key, as the query side, but only without
    GQA (its programs would share dK/dV rows across the query heads of a kv head); else blocks of
    block_n keys summing every query head of their kv head."""
    if form is None:
        form = "window" if entries_per_key < 1 and D <= 128 and group == 1 else "rows"
    return form, 16, 2


def _reg_cap(maxnreg):
    """Launch options capping registers per thread (not understood by the interpreter)."""
    return {"maxnreg": int(maxnreg)} if maxnreg and not INTERPRET else {}


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
    reverse: run the grid from its last program (default: for the window form, see _fwd_config).
    """
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, v, bias)
    if not inplace:
        out, lse = out.clone(), lse.clone()
    if bias is None or bias.nnz == 0:
        if return_flags:
            return out, lse, torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)
        return out, lse
    if lse.dtype != torch.float32:
        raise ValueError("lse must be float32")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if out.stride(-1) != 1:
        raise ValueError("out must have unit stride along D for the in-place correction")
    if scale < 0:  # the kernels assume a positive logit scale; fold the sign into q
        q, scale = -q, -scale
    if form not in (None, "rows", "window"):
        raise ValueError(f"form must be 'rows' or 'window', got {form!r}")
    form, auto_m, auto_chunk, auto_warps, auto_reg, auto_stages = _fwd_config(
        D, bias.nnz / (bias.num_heads * bias.seq_len_q), form)
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
            Hq, Hq // Hkv, Tq, Tk, bias.seq_len_q, Tk - Tq, scale * LOG2E, alpha * LOG2E)
    prec = dot_precision(q.dtype, allow_tf32)
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), CHUNK=chunk, DOT_PREC=prec, STORE_FLAGS=store_flags,
                  STAGES=stages, REVERSE=(form == "window") if reverse is None else bool(reverse),
                  num_warps=num_warps, **_reg_cap(maxnreg))
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


def recompute_flagged_rows(q, k, v, out, lse, bias, entry_values, flags, *, causal, scale, alpha, prec):
    """Overwrite the rows of (out [B,Hq,Tq,D], lse [B,Hq,Tq] natural) that `flags` (int8, B*Hq*Tq
    elements, row-major) marks with their biased attention computed with the bias inside the tile
    loop: the forwards' path for rows where the correction identity cancelled. scale > 0 (the
    callers fold a negative scale into q). One launch; a block with no flagged row exits after
    reading its flags (13 us for B4 H16 T4096 on the H100), so callers skip it when no row can
    cancel."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    block_m = _fwd_block(D)
    _correct_fwd_slow_kernel[(triton.cdiv(Tq, block_m), B * Hq)](
        q, k, v, out, lse, bias.entry_pos, entry_values, bias.q_offsets, flags,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.seq_len_q, Tk - Tq, scale * LOG2E, alpha * LOG2E,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=32, CHUNK=32, DOT_PREC=prec, num_warps=4)


def correct_bwd(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, *, causal, scale, alpha,
                need_dvalues, allow_tf32: bool = False, block_m: int = 16, block_n: int = 16,
                chunk: int = 16, num_warps: int = 2, row_flags=None, maxnreg: int | None = None,
                q_form: str | None = None, q_window: int | None = None, q_warps: int | None = None,
                delta: torch.Tensor | None = None, parts: str = "all", kv_form: str | None = None,
                kv_window: int | None = None):
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
    caller can run the key side beside its dense dQ kernel (kernels/attention.py, BWD_OVERLAP);
    the exact-row launches of row_flags need parts="all". q_form / kv_form: "rows" or "window" for
    each side's launch (None: by density, _bwd_q_config / _bwd_kv_config); q_window / kv_window
    their window sizes, q_warps the warps of both window launches.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, v, bias)
    if parts not in ("all", "q", "kv"):
        raise ValueError(f"parts must be 'all', 'q' or 'kv', got {parts!r}")
    if delta is not None and (not isinstance(delta, torch.Tensor) or delta.dtype != torch.float32
                              or tuple(delta.shape) != (B * Hq, Tq) or not delta.is_contiguous()):
        raise ValueError(f"delta must be a contiguous float32 tensor of shape {(B * Hq, Tq)}")
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
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    for name, t, used in (("dq", dq, parts != "kv"), ("dk", dk, parts != "q"), ("dv", dv, parts != "q")):
        if used and (not isinstance(t, torch.Tensor) or t.stride(-1) != 1):
            raise ValueError(f"{name} must be a tensor with unit stride along D for the in-place correction")
    sign = 1.0
    if scale < 0:
        q, scale, sign = -q, -scale, -1.0
    prec = dot_precision(q.dtype, allow_tf32)
    lse_real = lse
    if row_flags is not None:
        flags = _flags_2d(row_flags, B, Hq, Tq)
        lse = mask_lse(lse, flags.view(B, Hq, Tq))   # the entry terms skip the flagged rows
    launch = _reg_cap(maxnreg if maxnreg is not None else (128 if D <= 128 else None))
    delta_given = delta is not None
    if not delta_given:
        delta = torch.empty((B * Hq, Tq), dtype=torch.float32, device=q.device)
    need_dvalues = bool(need_dvalues) and parts != "kv"
    dval_part = torch.zeros((B, E) if need_dvalues else (1, 1), dtype=torch.float32, device=q.device)
    # small blocks (16 rows/keys, 2 warps) measured fastest on the H100: many light programs hide
    # the gathers' latency (16384 traces/head: 0.58 ms vs 0.85 ms at 64/32/4); a 128-register cap
    # fits more of them per SM (the dK/dV kernel needs 184 uncapped): 239 vs 297 us at 2048/head,
    # 508 vs 588 at 16384 (B4 H16 T4096 D128 bf16, benchmarks/tune_correction.py)
    if parts != "kv":
        # with q negated, dq must come out negated: run on -dq and flip back (rare path)
        dq_work = dq if sign > 0 else dq.neg_()
        q_args = (q, k, v, out, lse, dout, dq_work, delta, dval_part, bias.entry_pos, entry_values,
                  bias.q_offsets, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                  lse.stride(0), lse.stride(1), lse.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                  dq_work.stride(0), dq_work.stride(1), dq_work.stride(2),
                  Hq, Hq // Hkv, Tq, Tk, bias.seq_len_q, E, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E, alpha)
        q_form, auto_window, auto_warps = _bwd_q_config(D, E / (bias.num_heads * bias.seq_len_q), q_form)
        q_const = dict(HEAD_DIM=D, CAUSAL=bool(causal), CHUNK=chunk, DOT_PREC=prec, NEED_DVAL=need_dvalues,
                       DELTA_GIVEN=delta_given)
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
        kv_form, auto_window, auto_warps = _bwd_kv_config(D, E / (bias.num_heads * bias.seq_len_k), Hq // Hkv,
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
        _exact_rows(q, k, v, out, lse_real, dout, bias, entry_values, dq, dk, dv, flags,
                    dval_part if need_dvalues else None, causal=causal, scale=scale, dq_scale=scale * sign,
                    alpha=alpha, prec=prec)
    dvals = dval_part.sum(0) if need_dvalues else None
    return dq, dk, dv, dvals


# ----------------------------------------------------------------------------------------------
# cancelling rows: flags, masking, the exact backward of those rows
# ----------------------------------------------------------------------------------------------
def _flags_2d(row_flags, B, Hq, Tq):
    """row_flags [B, Hq, Tq] (bool or integer) -> int8 [B*Hq, Tq] contiguous (no copy if it is one)."""
    if tuple(row_flags.shape) != (B, Hq, Tq):
        raise ValueError(f"row_flags must be [B, Hq, Tq] = {(B, Hq, Tq)}, got {tuple(row_flags.shape)}")
    return row_flags.to(torch.int8).contiguous().view(B * Hq, Tq)


def _slow_blocks(D):
    """(q-kernel BLOCK_M, BLOCK_N, kv-kernel BLOCK_M, BLOCK_N, SCAN) of the exact-row kernels.
    Sized for registers, not speed: they run only on blocks holding a cancelling row."""
    if INTERPRET:
        return 16, 16, 16, 16, 64
    if D <= 64:
        return 32, 64, 32, 64, 1024
    if D <= 128:
        return 32, 32, 32, 64, 1024
    return 16, 32, 16, 32, 1024


def _cancel_flags(q, k, lse, bias, entry_values, *, causal, scale, alpha, prec, chunk=32):
    """int8 [B*Hq, Tq] cancelling flags from LSE' (q already sign-normalised: scale > 0)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    flags = torch.empty((B * Hq, Tq), dtype=torch.int8, device=q.device)
    block_m = 16 if INTERPRET else 32
    _cancel_flags_kernel[(triton.cdiv(Tq, block_m), B * Hq)](
        q, k, lse, flags, bias.entry_pos, entry_values, bias.q_offsets,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.seq_len_q, Tk - Tq, scale * LOG2E, alpha * LOG2E,
        1.0 / CANCEL_THRESHOLD - 1.0,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=block_m, CHUNK=chunk, DOT_PREC=prec, num_warps=4)
    return flags


def cancelling_rows(q, k, lse, bias, entry_values=None, *, causal, scale, alpha, allow_tf32: bool = False):
    """int8 [B, Hq, Tq]: 1 on the rows where the sparse-correction identity cancels.

    lse is the BIASED natural LSE' [B, Hq, Tq] (what the forward returned). A row is cancelling
    iff 1 + sum w < CANCEL_THRESHOLD, evaluated here as sum_e (exp(s - LSE') - exp(s + alpha b -
    LSE')) > 1/CANCEL_THRESHOLD - 1 over the row's entries: one pass over the entries (a K row
    gathered per entry and batch element), no dense work. The forwards compute the same flags for
    free (flash_fwd / correct_fwd with return_flags=True): prefer those.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, k, bias)
    if bias is None or bias.nnz == 0:
        return torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)
    if lse.dtype != torch.float32:
        raise ValueError("lse must be float32")
    if entry_values is None:
        entry_values = bias.entry_values()
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    if scale < 0:
        q, scale = -q, -scale
    flags = _cancel_flags(q, k, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
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


def _exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, flags, dval_part, *,
                causal, scale, dq_scale, alpha, prec, chunk=16):
    """Launch the two exact-row kernels. q sign-normalised (scale > 0), dq_scale = scale with
    the sign the caller's dq needs; flags int8 [B*Hq, Tq]; dval_part float32 [B, E] or None.
    dq: flagged rows stored; dk, dv: flagged rows' terms added; dval_part[b, e] stored for the
    entries on flagged rows."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    E = bias.nnz
    bm_q, bn_q, bm_kv, bn_kv, scan = _slow_blocks(D)
    need_dval = dval_part is not None
    if not need_dval:
        dval_part = torch.empty((1, 1), dtype=torch.float32, device=q.device)
    ep, qo = bias.entry_pos, bias.q_offsets
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
              lse.stride(0), lse.stride(1), lse.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _exact_rows_q_kernel[(triton.cdiv(Tq, bm_q), B * Hq)](
        q, k, v, out, lse, dout, dq, dval_part, flags, ep, entry_values, qo, *common,
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, Hq // Hkv, Tq, Tk, bias.seq_len_q, E, Tk - Tq, dq_scale, scale * LOG2E, alpha * LOG2E, alpha,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=bm_q, BLOCK_N=bn_q, CHUNK=chunk, DOT_PREC=prec,
        NEED_DVAL=need_dval, num_warps=4, num_stages=1)
    _exact_rows_kv_kernel[(triton.cdiv(Tk, bn_kv), B * Hkv)](
        q, k, v, out, lse, dout, dk, dv, flags, ep, entry_values, qo, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, Hkv, Hq // Hkv, Tq, Tk, bias.seq_len_q, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
        HEAD_DIM=D, CAUSAL=bool(causal), BLOCK_M=bm_kv, BLOCK_N=bn_kv, SCAN=scan, CHUNK=chunk,
        DOT_PREC=prec, num_warps=4 if INTERPRET or D > 128 else 8, num_stages=1)


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
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, v, bias)
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
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    flags = _flags_2d(row_flags, B, Hq, Tq)
    dq_scale = scale
    if scale < 0:
        q, scale = -q, -scale
    _exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, flags, dval_part, causal=causal,
                scale=scale, dq_scale=dq_scale, alpha=alpha, prec=dot_precision(q.dtype, allow_tf32))
    return dq, dk, dv
