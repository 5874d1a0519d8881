"""Salience capture kernels (SPEC 3): S = mean_b P*|dP| and a = mean_b P, tile by tile.

Two kernels, both reading the backward's inputs directly (nothing of size Tq x Tk is allocated):

``_salience_tile_kernel``  every edge that is NOT a bias entry.
    Tile (h, t) covers the query rows [m0, m0 + BLOCK_M) and keys [n0, n0 + BLOCK_N) of query
    head h (kv head h // group); PASS 0 runs a program per tile, PASS 1 / 2 grid-stride; a tile
    loops over the batch inside, so the batch sums of P*|dP| and P stay in registers:

        P  = exp(scale * q_i . k_j - LSE'_i)       (LSE' = biased log-sum-exp of the forward;
                                                    exact for every edge without a bias entry)
        dP = dO_i . v_j

    Edges that are bias entries are masked out here (their P carries exp(alpha * b), which this
    kernel does not know); ``_salience_entry_kernel`` scores them exactly. The tile's candidates
    (valid, not an entry, S > threshold) are compacted into the edge buffer: one atomic per tile
    reserves a contiguous run of slots, the rank inside the tile is a row-major exclusive scan.

    PASS = 0  emit into slots [0, capacity) (slots past the end are dropped), count every
              candidate (cnt[0]), store the tile's largest candidate S (tile_max, -1 if none) and,
              when HIST, add the tile's candidates to a 4096-bin histogram of their float bits
              (bits 30..19: exponent and the top 4 mantissa bits, a bin is <= 1/16 relative wide).
    PASS = 1  histogram only (the overflow path when PASS 0 ran without HIST).
    PASS = 2  refine (overflow only): with the boundary bin b* (the bin holding the
              capacity-th strongest candidate, from the histogram), write the candidates of bins
              above b* (the sure winners, fewer than capacity) into the edge buffer from slot 0
              (cnt[1]) and those of bin b* into a staging buffer (cnt[2]); tiles whose tile_max
              falls below bin b* are skipped. The host side then picks the strongest of the
              staging buffer exactly (sort) to fill the remaining slots.
    PASS 1 and 2 return at once when cnt[0] <= capacity (no overflow), so the host never syncs.

``_salience_stream_kernel``  PASS 0 with the same tiles, but a program walks many key tiles in one
    flat (key tile, batch element) loop, so loads overlap the dots (the default on the GPU).

``_salience_entry_kernel``  the bias entries, exactly: grid (cdiv(E, BLOCK_E),); each program
    gathers q_i, k_j, v_j, dO_i of its entries for every batch element,
    P' = exp(scale q.k + alpha b - LSE'), S = mean_b P'|dO.v|, a = mean_b P'. Entries outside
    (Tq, Tk) or masked by causal score 0.

Layouts: q, dout [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D]; lse float32 [B, Hq, Tq] natural log,
-inf for fully masked rows (P = 0 there); any strides. Outputs are int32 / float32 1-D buffers.
"""
import os

import triton
import triton.language as tl

from .launch import INTERPRET, FastLaunch

HIST_BINS = 4096
HIST_SHIFT = 19          # float32 bits >> 19 -> 12 bits: 8 exponent + 4 mantissa bits
INDEX_TILE = 128         # bias entries are bucketed by 128 x 128 index tiles
LAST_COMPILED = {}
# The segment kernel's (ROWS_BLOCK, num_warps, num_stages[, maxnreg]) on the GPU;
# MEMTRACE_CAPTURE_SEGMENT_CONFIG ("128,8,2") overrides it for probes (benchmarks/tune_segment.py).
SEGMENT_CONFIG = tuple(int(x) for x in (os.environ.get("MEMTRACE_CAPTURE_SEGMENT_CONFIG", "").strip()
                                         or "128,8,2").split(","))


@triton.jit
def _tile_ptrs(Q, K, V, DO, sqh, sqm, sqd, skh, skn, skd, svh, svn, svd, soh, som, sod,
               h, hk, offs_m, offs_n, offs_d):
    """Pointers to batch element 0 of the q / dO rows offs_m (head h) and k / v rows offs_n (kv head hk)."""
    q_ptrs = Q + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    do_ptrs = DO + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    k_ptrs = K + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    return q_ptrs, do_ptrs, k_ptrs, v_ptrs


@triton.jit
def _tile_scores(Q, K, V, DO, LSE,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sob, soh, som, sod, slb, slh, slm,
                 h, hk, m0, n0, B, Tq, Tk, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PRECISION: tl.constexpr, USE_DESC: tl.constexpr):
    """(sum_b P*|dP|, sum_b P) of one [BLOCK_M, BLOCK_N] tile of head h. USE_DESC: Q, K, V, DO
    are TMA descriptors over the [B*H*T, D] row views and the q/k/v/o strides count rows."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    col_ok = offs_n < Tk
    if not USE_DESC:
        q_ptrs, do_ptrs, k_ptrs, v_ptrs = _tile_ptrs(Q, K, V, DO, sqh, sqm, sqd, skh, skn, skd, svh, svn, svd,
                                                     soh, som, sod, h, hk, offs_m, offs_n, offs_d)
    lse_ptrs = LSE + h * slh + offs_m * slm
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(B):
        if USE_DESC:
            q = Q.load([b * sqb + h * sqh + m0, 0])
            k = K.load([b * skb + hk * skh + n0, 0])
            do = DO.load([b * sob + h * soh + m0, 0])
            v = V.load([b * svb + hk * svh + n0, 0])
        else:
            q = tl.load(q_ptrs + b * sqb, mask=row_ok[:, None], other=0.0)
            k = tl.load(k_ptrs + b * skb, mask=col_ok[:, None], other=0.0)
            do = tl.load(do_ptrs + b * sob, mask=row_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + b * svb, mask=col_ok[:, None], other=0.0)
        lse = tl.load(lse_ptrs + b * slb, mask=row_ok, other=float("-inf"))
        # A fully masked row has lse = -inf: subtract +inf so that P = exp2(-inf) = 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc_a += p
        acc_s += p * tl.abs(dp)
    return acc_s, acc_a


@triton.jit
def _store_edges(pos, keep, S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A):
    zero = tl.zeros(S.shape, dtype=tl.int32)
    tl.store(OUT_H + pos, zero + h, mask=keep)
    tl.store(OUT_I + pos, zero + offs_m[:, None], mask=keep)
    tl.store(OUT_J + pos, zero + offs_n[None, :], mask=keep)
    tl.store(OUT_S + pos, S, mask=keep)
    tl.store(OUT_A + pos, A, mask=keep)


@triton.jit
def _emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A):
    base = tl.atomic_add(CNT_PTR, n.to(tl.int64))
    # int32 from here (registers): the room left is < 2^31, and a slot is base + rank < limit.
    room = (limit - tl.minimum(base, limit)).to(tl.int32)
    row_cnt = tl.sum(c, axis=1)
    row_excl = tl.cumsum(row_cnt, axis=0) - row_cnt
    rank = row_excl[:, None] + (tl.cumsum(c, axis=1) - c)
    keep = cand & (rank < room)
    pos = (limit - room) + rank            # wraps only where keep is False
    _store_edges(pos, keep, S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)


@triton.jit
def _emit(cand, S, A, offs_m, offs_n, h, CNT_PTR, limit,
          OUT_H, OUT_I, OUT_J, OUT_S, OUT_A, SPARSE_EMIT: tl.constexpr = 0):
    """Append the tile's candidates to a buffer: one atomic reserves a run of slots, the rank
    inside the tile is the row-major exclusive scan of `cand`; slots >= limit are dropped.
    SPARSE_EMIT > 0: a tile with at most that many candidates takes one slot per candidate with
    its own atomic instead (a few predicated atomics cost far fewer instructions than the two
    scans and the cross-warp traffic of the ranked path; the order of slots is arbitrary in both
    paths, the fill sorts them afterwards)."""
    c = cand.to(tl.int32)
    n = tl.sum(tl.sum(c, axis=1), axis=0)
    if SPARSE_EMIT > 0:
        if (n > 0) & (n <= SPARSE_EMIT):
            ptrs = CNT_PTR + tl.zeros(c.shape, dtype=tl.int32)
            pos = tl.atomic_add(ptrs, tl.full(c.shape, 1, tl.int64), mask=cand, sem="relaxed")
            _store_edges(pos, cand & (pos < limit), S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
        elif n > 0:
            _emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
    elif n > 0:
        _emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)


@triton.jit
def _add_histogram(S, cand, HIST, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_BINS: tl.constexpr, SHIFT: tl.constexpr):
    bins = (S.to(tl.int32, bitcast=True) >> SHIFT)
    bins = tl.minimum(tl.maximum(bins, 0), NUM_BINS - 1)
    hist = tl.histogram(tl.reshape(bins, [BLOCK_M * BLOCK_N]), NUM_BINS,
                        mask=tl.reshape(cand, [BLOCK_M * BLOCK_N]))
    offs = tl.arange(0, NUM_BINS)
    tl.atomic_add(HIST + offs, hist, mask=hist > 0)


@triton.jit
def _epilogue(acc_s, acc_a, h, m0, n0, Tq, Tk, inv_batch, causal_offset, threshold,
              ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
              CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
              STG_H, STG_I, STG_J, STG_S, STG_A, stg_capacity, HIST, bstar,
              PASS: tl.constexpr, HIST_IN_MAIN: tl.constexpr, HAS_ENTRIES: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IDX_TILE: tl.constexpr,
              NUM_BINS: tl.constexpr, SHIFT: tl.constexpr, SPARSE_EMIT: tl.constexpr = 0):
    """Mask, drop bias entries, threshold, then the pass's output; returns the tile's largest
    candidate S (-1 if none)."""
    S = acc_s * inv_batch
    A = acc_a * inv_batch
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if HAS_ENTRIES:
        # Entries of the 128 x 128 index tile that holds this tile; usually 0..2 of them.
        itile = (h * idx_tiles_m + m0 // IDX_TILE) * idx_tiles_n + n0 // IDX_TILE
        e_lo = tl.load(ENT_OFF + itile)
        e_hi = tl.load(ENT_OFF + itile + 1)
        for e in range(e_lo, e_hi):
            ei = tl.load(ENT_I + e)
            ej = tl.load(ENT_J + e)
            valid = valid & ~((offs_m[:, None] == ei) & (offs_n[None, :] == ej))
    cand = valid & (S > threshold)
    if PASS == 0:
        _emit(cand, S, A, offs_m, offs_n, h, CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A, SPARSE_EMIT)
        if HIST_IN_MAIN:
            _add_histogram(S, cand, HIST, BLOCK_M, BLOCK_N, NUM_BINS, SHIFT)
    elif PASS == 1:
        _add_histogram(S, cand, HIST, BLOCK_M, BLOCK_N, NUM_BINS, SHIFT)
    else:
        bins = S.to(tl.int32, bitcast=True) >> SHIFT
        _emit(cand & (bins > bstar), S, A, offs_m, offs_n, h, CNT + 1, capacity,
              OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
        _emit(cand & (bins == bstar), S, A, offs_m, offs_n, h, CNT + 2, stg_capacity,
              STG_H, STG_I, STG_J, STG_S, STG_A)
    return tl.max(tl.max(tl.where(cand, S, -1.0), axis=1), axis=0)


@triton.jit
def _salience_tile_kernel(
        Q, K, V, DO, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, som, sod, slb, slh, slm,
        B, Tq, Tk, group, num_q_tiles, num_k_tiles, num_heads, qk_scale, inv_batch, causal_offset, threshold,
        ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
        CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
        STG_H, STG_I, STG_J, STG_S, STG_A, stg_capacity,
        TILE_MAX, HIST,
        PASS: tl.constexpr, HIST_IN_MAIN: tl.constexpr, HAS_ENTRIES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr, IDX_TILE: tl.constexpr,
        NUM_BINS: tl.constexpr, SHIFT: tl.constexpr, USE_DESC: tl.constexpr):
    """PASS 0: program t owns tile t (BLOCK_M queries x BLOCK_N keys; tiles numbered
    (head, query tile, key tile) row-major). PASS 1 / 2: a few programs stride over the tiles, and
    only when the fill overflowed: without overflow the launch is a handful of programs that read
    one counter and exit (one program per tile cost ~0.14 ms per pass on an H100 just to launch
    and retire 32768 one-block-per-SM programs)."""
    # PASS 0: tile program_id only; PASS 1 / 2: every num_programs-th tile, or none at all.
    first = tl.program_id(0)
    stop = first + 1
    step = 1
    bstar = 0
    if PASS > 0:
        step = tl.num_programs(0)
        stop = tl.where(tl.load(CNT) > capacity, num_heads * num_q_tiles * num_k_tiles, 0)
        if PASS == 2:
            if stop > 0:
                # The cut bin b*: the highest bin whose count from the top reaches capacity (every
                # program reads the finished histogram of PASS 1; 16 KB, only on overflow).
                bins = tl.arange(0, NUM_BINS)
                counts = tl.load(HIST + bins)
                from_top = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
                bstar = tl.max(tl.where(from_top >= capacity, bins, 0), axis=0)
    for t in range(first, stop, step):
        _tile_program(Q, K, V, DO, LSE,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                      sob, soh, som, sod, slb, slh, slm,
                      t, B, Tq, Tk, group, num_q_tiles, num_k_tiles, qk_scale, inv_batch, causal_offset,
                      threshold, ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
                      CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                      STG_H, STG_I, STG_J, STG_S, STG_A, stg_capacity, TILE_MAX, HIST, bstar,
                      PASS, HIST_IN_MAIN, HAS_ENTRIES, BLOCK_M, BLOCK_N, HEAD_DIM, PRECISION,
                      IDX_TILE, NUM_BINS, SHIFT, USE_DESC)


@triton.jit
def _tile_program(Q, K, V, DO, LSE,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  sob, soh, som, sod, slb, slh, slm,
                  tile_id, B, Tq, Tk, group, num_q_tiles, num_k_tiles, qk_scale, inv_batch, causal_offset,
                  threshold, ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
                  CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                  STG_H, STG_I, STG_J, STG_S, STG_A, stg_capacity, TILE_MAX, HIST, bstar,
                  PASS: tl.constexpr, HIST_IN_MAIN: tl.constexpr, HAS_ENTRIES: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PRECISION: tl.constexpr, IDX_TILE: tl.constexpr,
                  NUM_BINS: tl.constexpr, SHIFT: tl.constexpr, USE_DESC: tl.constexpr):
    """One tile of one pass (see `_salience_tile_kernel`)."""
    per_head = num_q_tiles * num_k_tiles
    h = tile_id // per_head
    tile_m = (tile_id % per_head) // num_k_tiles
    tile_n = tile_id % num_k_tiles
    m0 = tile_m * BLOCK_M
    n0 = tile_n * BLOCK_N
    # causal_offset = Tk - Tq when causal, else Tk (nothing masked).
    live = n0 <= m0 + BLOCK_M - 1 + causal_offset
    if PASS > 0:
        tmax = tl.load(TILE_MAX + tile_id)
        live = live & (tmax > threshold)
        if PASS == 2:
            tbin = tmax.to(tl.int32, bitcast=True) >> SHIFT
            live = live & (tbin >= bstar)
    if live:
        acc_s, acc_a = _tile_scores(Q, K, V, DO, LSE,
                                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                                    sob, soh, som, sod, slb, slh, slm,
                                    h, h // group, m0, n0, B, Tq, Tk, qk_scale,
                                    BLOCK_M, BLOCK_N, HEAD_DIM, PRECISION, USE_DESC)
        tile_best = _epilogue(acc_s, acc_a, h, m0, n0, Tq, Tk, inv_batch, causal_offset, threshold,
                              ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
                              CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                              STG_H, STG_I, STG_J, STG_S, STG_A, stg_capacity, HIST, bstar,
                              PASS, HIST_IN_MAIN, HAS_ENTRIES, BLOCK_M, BLOCK_N, IDX_TILE,
                              NUM_BINS, SHIFT)
        if PASS == 0:
            tl.store(TILE_MAX + tile_id, tile_best)


@triton.jit
def _salience_stream_kernel(
        Q, K, V, DO, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, som, sod, slb, slh, slm,
        B, Tq, Tk, group, num_k_tiles, k_tiles_per_split, qk_scale, inv_batch, causal_offset, threshold,
        ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
        CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A, TILE_MAX,
        HAS_ENTRIES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, IDX_TILE: tl.constexpr,
        NUM_BINS: tl.constexpr, SHIFT: tl.constexpr, USE_DESC: tl.constexpr, SPARSE_EMIT: tl.constexpr):
    """PASS 0 as a stream: program (tile_m, h, split) walks the key tiles
    [split * k_tiles_per_split, ...) of its BLOCK_M query rows in ONE flat loop over
    (key tile, batch element), so the compiler pipelines the loads of the next step under the
    dots of this one (the per-tile kernel's batch loop is 1..4 steps long: nothing to overlap).
    The batch sums live in registers and are flushed through the epilogue after the last batch
    element of each key tile. Same tiles and outputs as `_salience_tile_kernel`, whose PASS 1 / 2
    therefore stay valid after this kernel."""
    LOG2E: tl.constexpr = 1.4426950408889634
    tile_m = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    hk = h // group
    m0 = tile_m * BLOCK_M
    num_q_tiles = tl.num_programs(0)
    n_lo = split * k_tiles_per_split
    n_hi = tl.minimum(n_lo + k_tiles_per_split, num_k_tiles)
    # causal_offset = Tk - Tq when causal, else Tk: key tiles past the last row's limit are skipped.
    n_hi = tl.minimum(n_hi, (m0 + BLOCK_M - 1 + causal_offset) // BLOCK_N + 1)
    steps = tl.maximum(n_hi - n_lo, 0) * B
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    if not USE_DESC:
        q_ptrs, do_ptrs, k_ptrs, v_ptrs = _tile_ptrs(Q, K, V, DO, sqh, sqm, sqd, skh, skn, skd, svh, svn, svd,
                                                     soh, som, sod, h, hk, offs_m, offs_n, offs_d)
    lse_ptrs = LSE + h * slh + offs_m * slm
    acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(steps):
        b = step % B
        n0 = (n_lo + step // B) * BLOCK_N
        if USE_DESC:
            q = Q.load([b * sqb + h * sqh + m0, 0])
            do = DO.load([b * sob + h * soh + m0, 0])
            k = K.load([b * skb + hk * skh + n0, 0])
            v = V.load([b * svb + hk * svh + n0, 0])
        else:
            col_ok = (n0 + offs_n) < Tk
            q = tl.load(q_ptrs + b * sqb, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs + b * sob, mask=row_ok[:, None], other=0.0)
            k = tl.load(k_ptrs + b * skb + n0 * skn, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + b * svb + n0 * svn, mask=col_ok[:, None], other=0.0)
        lse = tl.load(lse_ptrs + b * slb, mask=row_ok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc_a += p
        acc_s += p * tl.abs(dp)
        last = b == B - 1
        if last:
            tile_id = (h * num_q_tiles + tile_m) * num_k_tiles + n0 // BLOCK_N
            best = _epilogue(acc_s, acc_a, h, m0, n0, Tq, Tk, inv_batch, causal_offset, threshold,
                             ENT_OFF, ENT_I, ENT_J, idx_tiles_m, idx_tiles_n,
                             CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                             OUT_H, OUT_I, OUT_J, OUT_S, OUT_A, capacity, CNT, 0,
                             0, False, HAS_ENTRIES, BLOCK_M, BLOCK_N, IDX_TILE, NUM_BINS, SHIFT,
                             SPARSE_EMIT)
            tl.store(TILE_MAX + tile_id, best)
            # Reset here, not after the if: the old sums die inside the epilogue (registers).
            acc_s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


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
        HAS_ENTRIES: tl.constexpr, SEG: tl.constexpr, BITS: tl.constexpr, ROWS_BLOCK: tl.constexpr,
        SCAN: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, SPARSE_EMIT: tl.constexpr):
    """PASS 0 after the Triton backward filled the segment bound (kernels/attention.py,
    flash_bwd's capture_bound): program (n, h) owns keys [n*SEG, (n+1)*SEG) of query head h.

    1. It compacts the rows i whose bound word [h, n, i] has a field (BITS wide) at or above
       bound_limit (the only rows whose edges in this segment can have S > threshold) into the
       front of the same column, in row order (each block of words is read before any write
       reaches it).
    2. It scores those rows' edges exactly, ROWS_BLOCK gathered rows at a time with the batch loop
       inside (as the tile kernels do), and emits the candidates like PASS 0."""
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
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        acc_a += p
        acc_s += p * tl.abs(dp)
        if b == B - 1:
            S = acc_s * inv_batch
            A = acc_a * inv_batch
            valid = live[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None] + causal_offset)
            if HAS_ENTRIES:
                valid = _drop_entry_edges(valid, rows, live, cols, h, ENT_POS, Q_OFF, TqMax)
            _emit(valid & (S > threshold), S, A, rows, cols, h, CNT, capacity, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A,
                  SPARSE_EMIT)
            acc_s = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)
            acc_a = tl.zeros([ROWS_BLOCK, SEG], dtype=tl.float32)


@triton.jit
def _salience_entry_kernel(
        Q, K, V, DO, LSE,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        sob, soh, som, sod, slb, slh, slm,
        ENT_H, ENT_I, ENT_J, ENT_VAL, E,
        B, Tq, Tk, group, qk_scale, alpha_log2, inv_batch, causal_offset,
        OUT_S, OUT_A,
        BLOCK_E: tl.constexpr, HEAD_DIM: tl.constexpr):
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
        dp = tl.sum(do * v, axis=1)
        acc_a += p
        acc_s += p * tl.abs(dp)
    tl.store(OUT_S + offs_e, tl.where(ok, acc_s * inv_batch, 0.0), mask=in_e)
    tl.store(OUT_A + offs_e, tl.where(ok, acc_a * inv_batch, 0.0), mask=in_e)


def _num_sms(device):
    if device.type != "cuda":
        return 8                   # the interpreter: tiny shapes still get split key ranges
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count


def _desc_ok(t):
    """A [B, H, T, D] tensor whose (B, H, T) rows form a [B*H*T, D] view that TMA can read."""
    B, H, T, D = t.shape
    return (t.stride(3) == 1 and t.stride(2) == D and t.stride(1) == T * D and t.stride(0) == H * T * D
            and t.data_ptr() % 16 == 0 and (D * t.element_size()) % 16 == 0)


def _row_desc(t, block_rows):
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, H, T, D = t.shape
    return TensorDescriptor(t, [B * H * T, D], [D, 1], [block_rows, D])


def _strides(t, ndim):
    s = list(t.stride())
    return s + [0] * (ndim - len(s))


def launch_tiles(pass_, q, k, v, dout, lse, *, threshold, qk_scale, causal_offset, entries, cnt,
                 capacity, out, staging, stg_capacity, tile_max, hist, config, precision,
                 hist_in_main, use_desc=False, sparse_emit=0):
    """Launch one pass. `entries` = (off, i, j, tiles_m, tiles_n) or None; `out`/`staging` =
    (h, i, j, S, a) buffers; config = (BLOCK_M, BLOCK_N, warps, stages, per_tile): per_tile 1,
    every pass runs `_salience_tile_kernel` (a program per tile in PASS 0); per_tile 0, PASS 0 runs
    `_salience_stream_kernel` (a program streams over key tiles) and PASS 1 / 2 the tile kernel
    (the same tiles)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bm, bn, warps, stages, per_tile = config
    if per_tile not in (0, 1):
        raise ValueError(f"capture config's last field must be 0 (streaming) or 1 (per tile), got {per_tile}")
    stream = per_tile == 0
    num_k_tiles = triton.cdiv(Tk, bn)
    num_q_tiles = triton.cdiv(Tq, bm)
    total_tiles = num_q_tiles * num_k_tiles * Hq
    # PASS 0: a program per tile; the overflow passes: grid-stride programs (see the kernel).
    grid = (total_tiles if pass_ == 0 else min(total_tiles, 2 * _num_sms(q.device)),)
    strides = [*_strides(q, 4), *_strides(k, 4), *_strides(v, 4), *_strides(dout, 4)]
    use_desc = bool(use_desc) and all(_desc_ok(t) for t in (q, k, v, dout))
    if use_desc:
        # TMA descriptors over the [B*H*T, D] row views (rows past a head's T read the next
        # head's rows or zeros: they only reach masked rows / columns); strides then count rows.
        tensors = (_row_desc(q, bm), _row_desc(k, bn), _row_desc(v, bn), _row_desc(dout, bm))
        strides = [s // D if s % D == 0 else s for s in strides]
    else:
        tensors = (q, k, v, dout)
    if entries is None:
        ent_off = ent_i = ent_j = cnt
        tiles_m = tiles_n = 1
    else:
        ent_off, ent_i, ent_j, tiles_m, tiles_n = entries
    if stream and pass_ == 0:
        # Enough programs to fill the machine: split the key range when rows x heads are few.
        want = max(1, -(-(4 * _num_sms(q.device)) // (num_q_tiles * Hq)))
        per_split = triton.cdiv(num_k_tiles, min(want, num_k_tiles))
        grid = (num_q_tiles, Hq, triton.cdiv(num_k_tiles, per_split))
        compiled = _salience_stream_kernel[grid](
            tensors[0], tensors[1], tensors[2], tensors[3], lse, *strides, *_strides(lse, 3),
            B, Tq, Tk, Hq // Hkv, num_k_tiles, per_split, qk_scale, 1.0 / B, causal_offset, threshold,
            ent_off, ent_i, ent_j, tiles_m, tiles_n, cnt, capacity, *out, tile_max,
            HAS_ENTRIES=entries is not None, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, PRECISION=precision,
            IDX_TILE=INDEX_TILE, NUM_BINS=HIST_BINS, SHIFT=HIST_SHIFT, USE_DESC=use_desc,
            SPARSE_EMIT=sparse_emit, num_warps=warps, num_stages=stages)
        LAST_COMPILED[pass_] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))
        return
    # Triton's per-call dispatch costs ~0.1-0.2 ms of host time a launch on the H100 machine's host,
    # and the overflow passes launch on every fill (no-ops without overflow): FastLaunch skips it
    # whenever no tensor descriptor is passed.
    launcher = _salience_tile_kernel if use_desc else _TILE_FAST
    compiled = launcher[grid](
        tensors[0], tensors[1], tensors[2], tensors[3], lse, *strides, *_strides(lse, 3),
        B, Tq, Tk, Hq // Hkv, num_q_tiles, num_k_tiles, Hq, qk_scale, 1.0 / B, causal_offset, threshold,
        ent_off, ent_i, ent_j, tiles_m, tiles_n,
        cnt, capacity, *out, *staging, stg_capacity, tile_max, hist,
        PASS=pass_, HIST_IN_MAIN=hist_in_main, HAS_ENTRIES=entries is not None,
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, PRECISION=precision, IDX_TILE=INDEX_TILE,
        NUM_BINS=HIST_BINS, SHIFT=HIST_SHIFT, USE_DESC=use_desc, num_warps=warps, num_stages=stages)
    # Registers / spills of the last compiled launch, for the benchmark's report (GPU only).
    LAST_COMPILED[pass_] = (getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None))


def launch_segments(q, k, v, dout, lse, bound, *, seg, bits, bound_limit, threshold, qk_scale, causal_offset,
                    bias, cnt, capacity, out, precision, sparse_emit=0, config=None):
    """PASS 0 from a filled segment bound (see `_salience_segment_kernel`); `bound` int32
    [Hq, cdiv(Tk, seg), Tq] words of `bits`-wide fields that pass at `bound_limit` (flash_bwd's
    format) is overwritten (its columns end up holding row lists); `bias` a TraceBias or None
    (its entries are not edges)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    num_blocks = triton.cdiv(Tk, seg)
    if config is None:
        config = (16, 4, 1) if INTERPRET else SEGMENT_CONFIG
    rows_block, num_warps, num_stages = config[:3]
    extra = {"maxnreg": config[3]} if len(config) > 3 and config[3] and not INTERPRET else {}
    has_entries = bias is not None and bias.nnz > 0
    if has_entries:
        ent_pos, q_off, tq_max = bias.entry_pos, bias.q_offsets, bias.seq_len_q
    else:
        ent_pos = q_off = cnt
        tq_max = 1
    _SEGMENT_FAST[(num_blocks, Hq)](
        q, k, v, dout, lse, *_strides(q, 4), *_strides(k, 4), *_strides(v, 4), *_strides(dout, 4),
        *_strides(lse, 3), bound, B, Tq, Tk, Hq // Hkv, num_blocks, qk_scale, 1.0 / B,
        causal_offset, threshold, int(bound_limit), ent_pos, q_off, tq_max,
        cnt, capacity, *out, HAS_ENTRIES=has_entries, SEG=seg, BITS=bits, ROWS_BLOCK=rows_block,
        SCAN=min(4096, triton.next_power_of_2(max(Tq, 16))), HEAD_DIM=D, PRECISION=precision,
        SPARSE_EMIT=sparse_emit, num_warps=num_warps, num_stages=num_stages, **extra)


def launch_entries(q, k, v, dout, lse, ent_h, ent_i, ent_j, ent_val, out_s, out_a, *, qk_scale,
                   alpha_log2, causal_offset, block_e=32, num_warps=4):
    """Score every sorted bias entry exactly (see `_salience_entry_kernel`)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    E = ent_h.shape[0]
    if E == 0:
        return
    grid = (triton.cdiv(E, block_e),)
    _ENTRY_FAST[grid](
        q, k, v, dout, lse,
        *_strides(q, 4), *_strides(k, 4), *_strides(v, 4), *_strides(dout, 4), *_strides(lse, 3),
        ent_h, ent_i, ent_j, ent_val, E,
        B, Tq, Tk, Hq // Hkv, qk_scale, alpha_log2, 1.0 / B, causal_offset,
        out_s, out_a, BLOCK_E=block_e, HEAD_DIM=D, num_warps=num_warps)


_TILE_FAST = FastLaunch(_salience_tile_kernel)
_SEGMENT_FAST = FastLaunch(_salience_segment_kernel)
_ENTRY_FAST = FastLaunch(_salience_entry_kernel)
