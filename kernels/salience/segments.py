"""PASS 0 of the salience capture from the segment bound that flash_bwd's dQ kernel filled.

``_salience_segment_kernel`` rescores exactly the rows whose bound word passes (the format:
salience/bound.py), then emits their candidates as the tile kernels' PASS 0 does.

Layouts: q, dout [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; lse float32 [B, Hq, Tq] natural log,
-inf for fully masked rows (P = 0 there); any strides. Outputs are int32 / float32 1-D buffers.
"""
import triton
import triton.language as tl

from .. import settings
from .._common import INTERPRET, padded_strides
from ..launch import FastLaunch
from .emit import emit

# The segment kernel's (ROWS_BLOCK, num_warps, num_stages[, maxnreg]) on the GPU; settings
# capture_segment_config overrides it for probes.
SEGMENT_CONFIG = (128, 8, 2)


@triton.jit
def _drop_entry_edges(valid, rows, live, cols, h, ENT_POS, Q_OFF, TqMax):
    """valid & not a bias entry, for gathered query rows `rows` (live ones) and key columns
    `cols`: each row scans its own entries (the bias's (head, query) CSR; usually 0..2)."""
    has = live & (rows < TqMax)
    r = tl.where(has, rows, 0)
    e_lo = tl.load(Q_OFF + h * TqMax + r, mask=has, other=0)
    e_n = tl.where(has, tl.load(Q_OFF + h * TqMax + r + 1, mask=has, other=0) - e_lo, 0)
    for t in range(tl.max(e_n, axis=0)):
        hit = t < e_n
        kj = tl.load(ENT_POS + e_lo + t, mask=hit, other=0) & 0xFFFF
        valid = valid & ~(hit[:, None] & (cols[None, :] == kj[:, None]))
    return valid


@triton.jit
def _word_passes(word, limit, BITS: tl.constexpr):
    """Whether any BITS-wide field of the int32 bound words reaches `limit`."""
    if BITS == 32:
        return word >= limit
    passes = ((word >> 0) & ((1 << BITS) - 1)) >= limit
    for f in tl.static_range(1, 32 // BITS):
        passes = passes | (((word >> (f * BITS)) & ((1 << BITS) - 1)) >= limit)
    return passes


@triton.jit
def _salience_segment_kernel(
        Q, K, V, DO, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, som, sod, slb, slh, slm,
        BOUND, B, Tq, Tk, group, num_blocks, qk_scale, inv_batch, causal_offset, threshold, bound_limit,
        ENT_POS, Q_OFF, TqMax,
        CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
        KMask,
        HAS_ENTRIES: tl.constexpr, SEG: tl.constexpr, BITS: tl.constexpr, ROWS_BLOCK: tl.constexpr,
        SCAN: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, SPARSE_EMIT: tl.constexpr,
        HAS_MASK: tl.constexpr = False):
    """PASS 0 after the Triton backward filled the segment bound (kernels/attention/bwd.py,
    flash_bwd's capture_bound): program (n, h) owns keys [n*SEG, (n+1)*SEG) of query head h.

    1. It compacts the rows i whose bound word [h, n, i] has a field (BITS wide) at or above
       bound_limit (the only rows whose edges in this segment can have S > threshold) into the
       front of the same column, in row order (each block of words is read before any write
       reaches it).
    2. It scores those rows' edges exactly, ROWS_BLOCK gathered rows at a time with the batch loop
       inside (as the tile kernels do), and emits the candidates like PASS 0.
    HAS_MASK: P = 0 on the keys that the key padding mask KMask (int8 [B, Tk]) drops in batch b."""
    LOG2E: tl.constexpr = 1.4426950408889634
    n = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // group
    column = (h * num_blocks + n).to(tl.int64) * Tq
    count = 0
    for r0 in range(0, Tq, SCAN):
        offs = r0 + tl.arange(0, SCAN)
        keep = _word_passes(tl.load(BOUND + column + offs, mask=offs < Tq, other=0), bound_limit, BITS)
        k = keep.to(tl.int32)
        rank = tl.cumsum(k, axis=0) - k
        tl.debug_barrier()           # the whole block has read these slots before any is rewritten
        tl.store(BOUND + column + count + rank, offs, mask=keep)
        count += tl.sum(k, axis=0)
    tl.debug_barrier()
    offs_d = tl.arange(0, HEAD_DIM)
    cols = n * SEG + tl.arange(0, SEG)
    col_ok = cols < Tk
    k_ptrs = K + hk * skh + cols[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + hk * svh + cols[:, None] * svn + offs_d[None, :] * svd
    # One flat loop over (row chunk, batch element), as in the streaming kernel: the compiler
    # pipelines the next step's gathers under this step's dots (a batch loop alone is 1..4 long).
    acc_s = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)
    acc_a = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)
    steps = tl.cdiv(count, ROWS_BLOCK) * B
    for step in range(steps):
        b = step % B
        idx = (step // B) * ROWS_BLOCK + tl.arange(0, ROWS_BLOCK)
        live = idx < count
        rows = tl.load(BOUND + column + idx, mask=live, other=0)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd, mask=live[:, None],
                    other=0.0)
        do = tl.load(DO + b * sob + h * soh + rows[:, None] * som + offs_d[None, :] * sod, mask=live[:, None],
                     other=0.0)
        k = tl.load(k_ptrs + b * skb, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + b * svb, mask=col_ok[:, None], other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + rows * slm, mask=live, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        if HAS_MASK:
            p = tl.where((tl.load(KMask + b * Tk + cols, mask=col_ok, other=0) != 0)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc_a += p
        acc_s += p * tl.abs(dp)
        if b == B - 1:
            S = acc_s * inv_batch
            A = acc_a * inv_batch
            valid = live[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None] + causal_offset)
            if HAS_ENTRIES:
                valid = _drop_entry_edges(valid, rows, live, cols, h, ENT_POS, Q_OFF, TqMax)
            emit(valid & (S > threshold), S, A, rows, cols, h, CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                  SPARSE_EMIT)
            acc_s = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)
            acc_a = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)



def launch_segments(q, k, v, dout, lse, bound, *, seg, bits, bound_limit, threshold, qk_scale, causal_offset,
                    bias, cnt, capacity, out, precision, sparse_emit=0, config=None, key_padding_mask=None):
    """PASS 0 from a filled segment bound (see `_salience_segment_kernel`); `bound` int32
    [Hq, cdiv(Tk, seg), Tq] words of `bits`-wide fields that pass at `bound_limit` (flash_bwd's
    format) is overwritten (its columns end up holding row lists); `bias` a TraceBias or None
    (its entries are not edges); key_padding_mask None or int8 [B, Tk] contiguous (0: P = 0)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    num_blocks = triton.cdiv(Tk, seg)
    if config is None:
        config = (16, 4, 1) if INTERPRET else (settings.current().capture_segment_config or SEGMENT_CONFIG)
    rows_block, num_warps, num_stages = config[:3]
    extra = {"maxnreg": config[3]} if len(config) > 3 and config[3] and not INTERPRET else {}
    has_entries = bias is not None and bias.nnz > 0
    if has_entries:
        ent_pos, q_off, tq_max = bias.entry_pos, bias.q_offsets, bias.index_rows
    else:
        ent_pos = q_off = cnt
        tq_max = 1
    _SEGMENT_FAST[(num_blocks, Hq)](
        q, k, v, dout, lse, *padded_strides(q, 4), *padded_strides(k, 4), *padded_strides(v, 4),
        *padded_strides(dout, 4),
        *padded_strides(lse, 3), bound, B, Tq, Tk, Hq // Hkv, num_blocks, qk_scale, 1.0 / B,
        causal_offset, threshold, int(bound_limit), ent_pos, q_off, tq_max,
        cnt, capacity, *out, cnt if key_padding_mask is None else key_padding_mask,
        HAS_ENTRIES=has_entries, SEG=seg, BITS=bits, ROWS_BLOCK=rows_block,
        SCAN=min(4096, triton.next_power_of_2(max(Tq, 16))), HEAD_DIM=D, PRECISION=precision,
        SPARSE_EMIT=sparse_emit, num_warps=num_warps, num_stages=num_stages, **extra,
        **({} if key_padding_mask is None else {"HAS_MASK": True}))


_SEGMENT_FAST = FastLaunch(_salience_segment_kernel)
