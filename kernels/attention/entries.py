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

Where an entry dominates its row (P' ~ 1), dP - D_i is a small difference of large terms and the
rounding of a half-precision O' in D_i = dO_i . O'_i passes into dvalues_e (fp16: 1e-2 - 1e-1
relative on issue 28 point 3's cases). So when the dvalues are needed, the query side uses the exact row term
D_i = sum_j P'_ij dP_ij / sum_j P'_ij instead (row_term): the dense loop's sums of P dP and P plus
the entries' of g dP and g (dq_entries_delta / dq_entries_rows_delta), all in float32. The
division (by 1 in exact arithmetic) makes D_i a weighted mean of the dP, as O' is one: the float32
rounding of a dominant P' (~1e-5 at alpha b = 40) then moves D_i by that much of dP - D_i, not of
dP (without it fp32 dvalues at alpha b up to 40 went from 2e-6 to 3e-5; with it 1e-6).

This module holds those per-entry terms as @triton.jit helpers, shared by the fused flash kernels
(fwd.py, bwd.py: they call them from their epilogues) and by the standalone kernels (correct_fwd.py,
correct_bwd.py), which apply them after any dense attention (cuDNN, flash) through `correct_fwd`
and `correct_bwd`; cancel.py uses them for the cancelling rows.

Numerics. The forward accumulates in a shifted frame, like flash attention's running max: with
c = max(0, max_e (s + alpha b - LSE)) it keeps e^-c (O + sum w v) and e^-c (1 + sum w), and forms
w as exp(t - c) - exp(u - c) (t = s + alpha b - LSE, u = s - LSE), so huge positive biases do not
overflow. Where 1 + sum w is tiny (entries that held almost all the mass pushed down by large
negative biases) the identity cancels; CANCEL_THRESHOLD below marks such rows ("cancelling").
The forwards then recompute those row blocks with the bias inside the tile loop (exact).

Index layout (memtrace/bias.py): entry_pos int32 [E] = (i << 16) | j sorted by (head, i, j);
k_order int32 [E] the same entries ordered by (head, j, i); q_offsets [H*Tq_max+1],
k_offsets [H*Tk_max+1] CSR offsets. Entries with i >= Tq or j >= Tk of the call, or masked by
causal (j > i + Tk - Tq), are ignored.
"""
from __future__ import annotations

import triton
import triton.language as tl

# A row whose corrected normaliser 1 + sum w falls under this is "cancelling": the identity would
# amplify the dense attention's rounding by 1/(1 + sum w), so the fused forward recomputes it.
CANCEL_THRESHOLD = 0.25


# ----------------------------------------------------------------------------------------------
# per-entry helpers (called from epilogues)
# ----------------------------------------------------------------------------------------------
@triton.jit
def unpack(pos):
    """(i, j) from entry_pos = (i << 16) | j (i >= 32768 wrapped the int32 sign: mask it)."""
    return (pos >> 16) & 0xFFFF, pos & 0xFFFF


@triton.jit
def entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL: tl.constexpr, KM=None, HAS_MASK: tl.constexpr = False):
    """Whether entries (i_e, j_e) take part: in range, inside (Tq, Tk), not hidden by causal and,
    HAS_MASK, on a key that the batch row's key padding mask KM (int8 [Tk], nonzero = attend)
    keeps: an entry on a masked key adds nothing anywhere (P' = P = 0 there)."""
    ok = in_range & (i_e < Tq) & (j_e < Tk)
    if CAUSAL:
        ok = ok & (j_e <= i_e + causal_off)
    if HAS_MASK:
        ok = ok & (tl.load(KM + j_e, mask=ok, other=0) != 0)
    return ok


@triton.jit
def entry_chunk(EntryPos, EntryVal, e0, e_hi, Tq, Tk, causal_off, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
                KM=None, HAS_MASK: tl.constexpr = False):
    """The CHUNK entries from e0 (of those before e_hi): (offs_e, in_range, pos, val, i_e, j_e, ok)."""
    offs_e = e0 + tl.arange(0, CHUNK)
    in_range = offs_e < e_hi
    pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
    val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
    i_e, j_e = unpack(pos)
    ok = entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL, KM, HAS_MASK)
    return offs_e, in_range, pos, val, i_e, j_e, ok


@triton.jit
def key_mask_row(KMask, b, Tk, HAS_MASK: tl.constexpr):
    """The batch row b of the key padding mask (int8 [B, Tk], contiguous), or KMask when unused."""
    if HAS_MASK:
        return KMask + b * Tk
    return KMask


@triton.jit
def key_live(KM, cols, Tk):
    """[N] bool: keys `cols` are < Tk and kept by the batch row's key padding mask KM."""
    return tl.load(KM + cols, mask=cols < Tk, other=0) != 0


@triton.jit
def load_entries(EntryPos, EntryVal, offs_e, e_hi, Tq, Tk, causal_off, CAUSAL: tl.constexpr, KM=None,
                 HAS_MASK: tl.constexpr = False):
    """(val, i, j, ok) of entries offs_e (q order); ok is False past e_hi, outside (Tq, Tk) or masked."""
    in_range = offs_e < e_hi
    pos = tl.load(EntryPos + offs_e, mask=in_range, other=0)
    val = tl.load(EntryVal + offs_e, mask=in_range, other=0.0)
    i_e, j_e = unpack(pos)
    ok = entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL, KM, HAS_MASK)
    return val, i_e, j_e, ok


@triton.jit
def gather(base, rows, stride, offs_d, ok):
    """[C, D] rows `rows` of a unit-stride-along-D slice; rows where not ok read as 0 (no traffic)."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def add_to_rows(base, rows, stride, offs_d, live, add):
    """base[rows] += add ([R, D] float32) in base's dtype, on `live` rows only (the correction
    kernels' read-modify-write of a dense pass's dQ / dK / dV rows)."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    old = tl.load(ptrs, mask=live[:, None], other=0.0).to(tl.float32)
    tl.store(ptrs, (old + add).to(base.dtype.element_ty), mask=live[:, None])


@triton.jit
def fwd_prologue(EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi,
                  Tq, Tk, causal_off, CAUSAL: tl.constexpr, CHUNK: tl.constexpr, KM=None,
                  HAS_MASK: tl.constexpr = False):
    """The first chunk of entries with its gathered K/V rows: the state fwd_entries starts
    from. Issued before the dense loop it hides the gathers' latency behind the dense work."""
    val0, i0, j0, ok0 = load_entries(EntryPos, EntryVal, e_lo + tl.arange(0, CHUNK), e_hi, Tq, Tk, causal_off, CAUSAL,
                                     KM, HAS_MASK)
    kg0 = gather(k_base, j0, stride_kn, offs_d, ok0)
    vg0 = gather(v_base, j0, stride_vn, offs_d, ok0)
    return val0, i0, ok0, kg0, vg0


@triton.jit
def fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val, i_e, ok, kg, vg, qk_scale2, alpha2, DOT_PREC: tl.constexpr):
    """One chunk of entries (values val, rows i_e, valid ok, gathered K/V rows kg/vg) folded into
    the shifted-frame state (acc_o, den, c2) of fwd_entries."""
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
def fwd_entries(acc_o, den, c2, q, lse2, offs_m, e_lo, e_hi, val0, i0, ok0, kg0, vg0,
                 EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d,
                 Tq, Tk, causal_off, qk_scale2, alpha2,
                 CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, KM=None,
                 HAS_MASK: tl.constexpr = False):
    """Fold the entries e_lo..e_hi (rows offs_m, sorted by (i, j)) into a forward row block.

    acc_o [BM, D] f32 holds e^-c2 * (O + sum w v), den [BM] holds e^-c2 * (1 + sum w), c2 [BM] the
    shift in log2 units (start: acc_o = O, den = 1, c2 = 0). q [BM, D] is the query tile, lse2 [BM]
    the unbiased LSE in log2 units (-inf for fully masked rows). (val0, i0, ok0, kg0, vg0) is the
    first chunk from fwd_prologue; K/V rows of later chunks are gathered from k_base/v_base (one
    (batch, kv head) slice, unit stride along D). (A deeper software pipeline, chunk c+1's gathers
    in flight during chunk c, measured slower on the H100: see docs/perf-log.md. So
    did a per-entry variant, q_{i_e} . k_{j_e} from gathered Q rows with two exponentials per
    entry instead of per [BM, C] element: the standalone kernel took 127 vs 100 us at 2048
    entries/head and 457 vs 298 us at 16384 (B4 H16 T4096 D128); its per-entry values need
    reductions across the rows axis, which cross warps, where the one-hot form reduces along the
    keys within a thread's fragment and puts the waste on the tensor cores.)
    """
    offs_c = tl.arange(0, CHUNK)
    for e0 in range(e_lo, e_hi, CHUNK):
        acc_o, den, c2 = fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val0, i0, ok0, kg0, vg0, qk_scale2, alpha2,
                                    DOT_PREC)
        val0, i0, j0, ok0 = load_entries(EntryPos, EntryVal, e0 + CHUNK + offs_c, e_hi, Tq, Tk, causal_off, CAUSAL,
                                         KM, HAS_MASK)
        kg0 = gather(k_base, j0, stride_kn, offs_d, ok0)
        vg0 = gather(v_base, j0, stride_vn, offs_d, ok0)
    return acc_o, den, c2


@triton.jit
def fwd_entries_piped(acc_o, den, c2, q, lse2, offs_m, e_lo, e_hi,
                       EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d,
                       Tq, Tk, causal_off, qk_scale2, alpha2,
                       CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr):
    """fwd_entries as a plain loop (each chunk's index loads, gathers and dots in one iteration)
    that Triton's software pipeliner can take: with STAGES >= 2 it turns the gathers into
    asynchronous copies straight into shared memory, several chunks in flight, instead of
    loads into registers and a store to shared memory before every dot."""
    offs_c = tl.arange(0, CHUNK)
    for e0 in tl.range(e_lo, e_hi, CHUNK, num_stages=STAGES):
        val, i_e, j_e, ok = load_entries(EntryPos, EntryVal, e0 + offs_c, e_hi, Tq, Tk, causal_off, CAUSAL)
        kg = gather(k_base, j_e, stride_kn, offs_d, ok)
        vg = gather(v_base, j_e, stride_vn, offs_d, ok)
        acc_o, den, c2 = fwd_chunk(acc_o, den, c2, q, lse2, offs_m, val, i_e, ok, kg, vg, qk_scale2, alpha2,
                                    DOT_PREC)
    return acc_o, den, c2


@triton.jit
def row_term(pdp, psum):
    """The exact row term D = sum_j P' dP / sum_j P' (module docstring); 0 on rows without mass
    (lse2 = +inf: fully masked, or cancelling rows left to the exact-row kernels)."""
    return tl.where(psum > 0, pdp / tl.where(psum > 0, psum, 1.0), 0.0)


@triton.jit
def dq_entries_delta(d, l, q, do, lse2, offs_m, e_lo, e_hi, EntryPos, EntryVal, k_base, v_base, stride_kn,
                      stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2,
                      CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, KM=None,
                      HAS_MASK: tl.constexpr = False):
    """(d + sum_e g dP, l + sum_e g) [BM] over a row block's entries (dP = dO_i . v_j, no row term
    subtracted), g as dq_entries forms it: from the dense loop's sums of P dP and P these are the
    exact row term's two sums (row_term). Rows with lse2 = +inf add 0."""
    for e0 in range(e_lo, e_hi, CHUNK):
        val, i_e, j_e, ok = load_entries(EntryPos, EntryVal, e0 + tl.arange(0, CHUNK), e_hi, Tq, Tk, causal_off,
                                         CAUSAL, KM, HAS_MASK)
        kg = gather(k_base, j_e, stride_kn, offs_d, ok)
        vg = gather(v_base, j_e, stride_vn, offs_d, ok)
        u = tl.dot(q, tl.trans(kg), input_precision=DOT_PREC) * qk_scale2 - lse2[:, None]
        hit = (offs_m[:, None] == i_e[None, :]) & ok[None, :]
        g = tl.where(hit, tl.exp2(u + (val * alpha2)[None, :]) - tl.exp2(u), 0.0)
        d += tl.sum(g * tl.dot(do, tl.trans(vg), input_precision=DOT_PREC), 1)
        l += tl.sum(g, 1)
    return d, l


@triton.jit
def dq_entries(dq, q, do, lse2, delta, offs_m, e_lo, e_hi,
                EntryPos, EntryVal, DvalOut, k_base, v_base, stride_kn, stride_vn, offs_d,
                Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                NEED_DVAL: tl.constexpr, KM=None, HAS_MASK: tl.constexpr = False):
    """Entry terms of dQ (unscaled: the caller multiplies dq by `scale`) and dvalues for a row block.

    lse2 [BM] is the BIASED LSE' in log2 units with +inf on rows to skip (fully masked), delta [BM]
    = rowsum(dO * O'). dvalues of entry e (alpha * P'(dP - D), this batch element) go to
    DvalOut[e]; a duplicate follower (same position as the entry before it) gets 0, its leader
    carries the gradient.
    """
    for e0 in range(e_lo, e_hi, CHUNK):
        offs_e, in_range, pos, val, i_e, j_e, ok = entry_chunk(EntryPos, EntryVal, e0, e_hi, Tq, Tk, causal_off,
                                                               CAUSAL, CHUNK, KM, HAS_MASK)
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
def dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi,
                  KOrder, EntryPos, EntryVal, q_base, do_base, lse_base, delta_base,
                  stride_qm, stride_dom, stride_lm, offs_d,
                  Tq, Tk, causal_off, qk_scale2, alpha2,
                  CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr,
                  LSE_NATURAL: tl.constexpr, KM=None, HAS_MASK: tl.constexpr = False):
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
        i_e, j_e = unpack(pos)
        ok = entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL, KM, HAS_MASK)
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
def entry_rows(pos, val, in_range, q_base, do_base, k_base, v_base, lse2_base, delta_base, stride_qm, stride_dom,
                stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL: tl.constexpr,
                KM=None, HAS_MASK: tl.constexpr = False):
    """The per-entry terms of a chunk of entries (pos, val) for the rows-form epilogues: the
    gathered q_i / dO_i / k_j rows, P' = exp2(s + alpha b - lse2), g = P' - P and dP - D, with
    s = q_i . k_j and dP = dO_i . v_j as row dots in float32 (entries not ok: P' = g = 0).
    lse2_base / delta_base: the (batch, head) rows of Lse2 (log2 units, +inf on rows to skip) and
    Delta."""
    i_e, j_e = unpack(pos)
    ok = entry_ok(in_range, i_e, j_e, Tq, Tk, causal_off, CAUSAL, KM, HAS_MASK)
    qg = gather(q_base, i_e, stride_qm, offs_d, ok)
    dog = gather(do_base, i_e, stride_dom, offs_d, ok)
    kg = gather(k_base, j_e, stride_kn, offs_d, ok)
    vg = gather(v_base, j_e, stride_vn, offs_d, ok)
    lse_e = tl.load(lse2_base + i_e, mask=ok, other=float("inf"))
    delta_e = tl.load(delta_base + i_e, mask=ok, other=0.0)
    u = tl.sum(qg.to(tl.float32) * kg.to(tl.float32), 1) * qk_scale2 - lse_e
    p_biased = tl.where(ok, tl.exp2(u + val * alpha2), 0.0)
    g = tl.where(ok, p_biased - tl.exp2(u), 0.0)
    dp = tl.sum(dog.to(tl.float32) * vg.to(tl.float32), 1) - delta_e
    return i_e, j_e, qg, dog, kg, p_biased, g, dp


@triton.jit
def dq_entries_rows_delta(d, l, offs_m, e_lo, e_hi, EntryPos, EntryVal, q_base, do_base, lse2_base, k_base,
                           v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2,
                           alpha2, CAUSAL: tl.constexpr, CHUNK: tl.constexpr, KM=None, HAS_MASK: tl.constexpr = False):
    """dq_entries_delta in the per-entry form: g and dP as entry_rows forms them (row dots of
    gathered rows), each entry's g dP and g summed into its row of d and l [BM]."""
    for e0 in range(e_lo, e_hi, CHUNK):
        offs_e, in_range, pos, val, i_e, j_e, ok = entry_chunk(EntryPos, EntryVal, e0, e_hi, Tq, Tk, causal_off,
                                                               CAUSAL, CHUNK, KM, HAS_MASK)
        qg = gather(q_base, i_e, stride_qm, offs_d, ok)
        dog = gather(do_base, i_e, stride_dom, offs_d, ok)
        kg = gather(k_base, j_e, stride_kn, offs_d, ok)
        vg = gather(v_base, j_e, stride_vn, offs_d, ok)
        lse_e = tl.load(lse2_base + i_e, mask=ok, other=float("inf"))
        u = tl.sum(qg.to(tl.float32) * kg.to(tl.float32), 1) * qk_scale2 - lse_e
        g = tl.where(ok, tl.exp2(u + val * alpha2) - tl.exp2(u), 0.0)
        gdp = g * tl.sum(dog.to(tl.float32) * vg.to(tl.float32), 1)
        mine = offs_m[:, None] == i_e[None, :]
        d += tl.sum(tl.where(mine, gdp[None, :], 0.0), 1)
        l += tl.sum(tl.where(mine, g[None, :], 0.0), 1)
    return d, l


@triton.jit
def dq_entries_rows(dq, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalOut, q_base, do_base, lse2_base, delta_base,
                     k_base, v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d,
                     Tq, Tk, causal_off, qk_scale2, alpha2, alpha,
                     CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr,
                     KM=None, HAS_MASK: tl.constexpr = False):
    """dq_entries in the per-entry form: s = q_i . k_j and dP = dO_i . v_j per entry from gathered
    rows (the row block's own q/dO rows come back from L1/L2), so the one-hot product is only the
    scatter dq += R (ds k_j), R[r, e] = [r == i_e]: one [BM, C] x [C, D] dot per chunk instead of
    three, and two exponentials per entry instead of per [BM, C] element (entry_rows). The
    chunk loop is not software-pipelined by the compiler (num_stages=1): its own next-chunk index
    loads hide part of the index -> rows latency, and 2-3 compiler stages measured no better on the
    H100 (docs/perf-log.md, session 7)."""
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
        i_e, _j_e, _qg, _dog, kg, p_biased, g, dp = entry_rows(
            pos, val, in_range, q_base, do_base, k_base, v_base, lse2_base, delta_base, stride_qm, stride_dom,
            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, KM, HAS_MASK)
        ds = g * dp
        hit = tl.where(offs_m[:, None] == i_e[None, :], 1.0, 0.0)
        dq = tl.dot(hit.to(kg.dtype), (ds[:, None] * kg.to(tl.float32)).to(kg.dtype), dq, input_precision=DOT_PREC)
        if NEED_DVAL:
            prev = tl.load(EntryPos + offs_e - 1, mask=in_range & (offs_e > e_lo), other=-1)
            tl.store(DvalOut + offs_e, tl.where(prev == pos, 0.0, p_biased * dp * alpha), mask=in_range)
    return dq


@triton.jit
def dkdv_entries_rows(dk, dv, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal, q_base, do_base, lse_base,
                       delta_base, k_base, v_base, stride_qm, stride_dom, stride_kn, stride_vn, offs_d,
                       Tq, Tk, causal_off, qk_scale2, alpha2,
                       CAUSAL: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, KM=None,
                       HAS_MASK: tl.constexpr = False):
    """dkdv_entries in the per-entry form (lse in log2 units, +inf on rows to skip): the key
    block's own K/V rows are gathered back per entry, s and dP are per-entry row dots, and the
    scatter into the block is two [BN, C] x [C, D] dots (dv += R (g dO_i), dk += R (ds q_i)) instead
    of four. Not compiler-pipelined, as dq_entries_rows."""
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
        _i_e, j_e, qg, dog, _kg, _p_biased, g, dp = entry_rows(
            pos, val, in_range, q_base, do_base, k_base, v_base, lse_base, delta_base, stride_qm, stride_dom,
            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, KM, HAS_MASK)
        hit = tl.where(offs_n[:, None] == j_e[None, :], 1.0, 0.0).to(qg.dtype)
        dv = tl.dot(hit, (g[:, None] * dog.to(tl.float32)).to(dog.dtype), dv, input_precision=DOT_PREC)
        dk = tl.dot(hit, ((g * dp)[:, None] * qg.to(tl.float32)).to(qg.dtype), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2,
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
def fwd_biased_rows(q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                     e_lo, e_hi, EntryPos, EntryVal, Tk, causal_off, hi, qk_scale2, alpha2,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, KM=None,
                     HAS_MASK: tl.constexpr = False):
    """Biased attention of a row block with the bias inside the tile loop: (acc/l, lse2).
    HAS_MASK: keys that the batch row's key padding mask KM drops get no mass."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale2
        qk += bias_tile(offs_m, cols, e_lo, e_hi, EntryPos, EntryVal, alpha2, BLOCK_M, BLOCK_N, CHUNK)
        valid = (cols < Tk)[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
        if HAS_MASK:
            valid = valid & key_live(KM, cols, Tk)[None, :]
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
def fwd_rows(q_base, o_base, l_base, k_base, v_base, rows, live, e_lo, e_hi, EntryPos, EntryVal,
              stride_qm, stride_om, stride_lm, stride_kn, stride_vn, Tq, Tk, causal_off, qk_scale2, alpha2,
              cancel_tol, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
              CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr):
    """The forward correction, in place, of rows `rows` [BLOCK_M] of one (batch, head) slice
    (bases; only `live` rows are read or written) from its entries e_lo..e_hi. Returns the rows'
    cancelling flags (1 + sum w < cancel_tol). The loop sums only the entry terms (from 0); O is
    read after it, so neither O nor its [BM, D] pointers hold registers during the gathers.
    STAGES: 0 runs the hand-carried entry loop (fwd_entries), n >= 1 the plain loop that Triton
    pipelines over n stages (fwd_entries_piped)."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=live[:, None], other=0.0)
    lse2 = tl.load(l_base + rows * stride_lm, mask=live, other=float("-inf")) * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    den = tl.full([BLOCK_M], 1.0, tl.float32)
    c2 = tl.zeros([BLOCK_M], tl.float32)
    if STAGES == 0:
        val0, i0, ok0, kg0, vg0 = fwd_prologue(
            EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk, causal_off,
            CAUSAL, CHUNK)
        acc, den, c2 = fwd_entries(acc, den, c2, q, lse2, rows, e_lo, e_hi,
                                    val0, i0, ok0, kg0, vg0, EntryPos, EntryVal,
                                    k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                    qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC)
    else:
        acc, den, c2 = fwd_entries_piped(acc, den, c2, q, lse2, rows, e_lo, e_hi, EntryPos, EntryVal,
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
def block_range(Offsets, head, lo, hi, TMax):
    """Entry range of rows [lo, hi) of `head` in a CSR table built for TMax rows per head."""
    lo_c = tl.minimum(lo, TMax)
    hi_c = tl.maximum(tl.minimum(hi, TMax), lo_c)
    base = head * TMax
    return tl.load(Offsets + base + lo_c), tl.load(Offsets + base + hi_c)


@triton.jit
def rows_with_entries(Offsets, head, offs, T, TMax):
    """[BLOCK] bool: row offs (< T and < TMax) of `head` holds at least one entry."""
    live = (offs < T) & (offs < TMax)
    base = head * TMax
    a = tl.load(Offsets + base + offs, mask=live, other=0)
    b = tl.load(Offsets + base + offs + 1, mask=live, other=0)
    return live & (b > a)


# ----------------------------------------------------------------------------------------------
# program prologues: launch order, windows of entries, flagged rows
# ----------------------------------------------------------------------------------------------
@triton.jit
def launch_order(REVERSE: tl.constexpr):
    """(program_id(0), program_id(1)), both counted from the end when REVERSE. Blocks start in
    launch order, so a reversed grid reads first what a dense pass over (b, h) in order wrote last,
    while it may still be in L2."""
    if REVERSE:
        return tl.num_programs(0) - 1 - tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def window_of(QOffsets, pid, Hq, TqMax, WINDOW: tl.constexpr, HP: tl.constexpr):
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
def window_rows(EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW: tl.constexpr, HP: tl.constexpr):
    """The rows a window program owns (_correct_fwd_window_kernel): (head, rows [WINDOW] with -1 on
    slots that start no row, e_lo, e_hi); e_lo = e_hi when the program owns no row."""
    return window_slots(EntryPos, EntryPos, QOffsets, pid_w, Hq, Tq, TqMax, WINDOW, HP, False)


@triton.jit
def window_slots(EntryPos, KOrder, Offsets, pid_w, H, T, TMax, WINDOW: tl.constexpr, HP: tl.constexpr,
                  BY_KEY: tl.constexpr):
    """window_rows over either order: BY_KEY=False, the q order (entry t is EntryPos[t], its slot
    its row i); BY_KEY=True, the k order (entry t is EntryPos[KOrder[t]], its slot its key j;
    Offsets = k_offsets). (head, slots [WINDOW] with -1 where no slot starts, t_lo, t_hi)."""
    h, h_start, w0, h_end = window_of(Offsets, pid_w, H, TMax, WINDOW, HP)
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
def flagged_rows(Flags, Tq, BLOCK_M: tl.constexpr):
    """(bh, m0, rows, flagged [BLOCK_M] bool) of a program on the grid (cdiv(Tq, BLOCK_M), B*Hq),
    from the int8 cancelling-row flags [B*Hq, Tq]."""
    bh = tl.program_id(1)
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return bh, m0, offs_m, tl.load(Flags + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0) != 0
