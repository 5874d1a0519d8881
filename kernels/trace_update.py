"""Trace-memory update (SPEC 4) over fixed-capacity slabs, as Triton kernels with no host sync.

State (see memtrace/memory.py): strength float32 [L, H, Q] (-1 = empty slot) and meta int64
[L, H, Q] = pos << (W + A) | age << W | hist, pos = i * max_seq_len + j. In each (layer, head)
slab the traces fill slots [0, n) sorted by pos; the rest are empty.

One update of B layers (B x H slabs) is three Triton launches and a cumsum (launches are host
time: an eager update waits on the host, see BENCHMARKS.md; the per-slab counters live in a
workspace kept between calls and the select kernel leaves them at zero, so no memset comes first):

1. `_match_kernel`, grid (cdiv(C, BLOCK_C), B): each candidate edge (head, i, j, S, a) of layer b
   binary-searches its slab for pos over all Q slots, reading meta only: an empty slot has meta 0
   and a stored trace past slot 0 has pos > 0, so meta 0 past slot 0 sorts last (no slab-length
   pass first; the strength is read once, at the end). A stored trace takes the edge's (S, a)
   into the slot score buffers (unless the layer's slot scores came from the bias, `direct`).
   An edge that is not stored becomes a new trace when Sh = S ln(1 + [a > attn_eps]) > threshold and
   M = (1 - retention) Sh >= prune_eps; those are counted per slab (one atomic per block and head).
2. `torch.cumsum` of the per-slab counts gives each slab's range in a grouped buffer;
   `_group_kernel`, grid (B, cdiv(C, BLOCK_C)): new traces are scattered into their slab's range
   (order inside a range is arbitrary: step 3 does not depend on it).
3. `_select_kernel`, grid (B * H,): one program per slab. Stored traces get history
   ((hist << 1) | [a > attn_eps]) & (2^W - 1), Sh = S ln(1 + popcount(hist)), reinforce
   (M = retention M + (1 - retention) Sh, age 0) or decay (M = decay M, age + 1, saturating),
   prune (M < prune_eps). Every surviving item (stored or new) gets the 96-bit key
   (float64_bits(M), 2^32 - 1 - pos): larger key = stronger, ties to the smaller (i, j), the
   float64 values ranked as the reference ranks them. Keys are unique in a slab, so "keep the
   quota largest" is "keep key >= T" with T the quota-th largest key, found by a radix select
   (8-bit digits, `tl.histogram`) that starts below the key bits all items share (max/min) and
   stops once the chosen digit's bucket holds exactly the items still missing: 2-3 passes on
   typical strengths instead of 12, one cumsum and one min/max reduction per pass. Only the key
   and meta of the stored traces stay live across the passes (quota 2048: 8 warps capped at 128
   registers, two programs per SM). The
   kept items are written back in pos order: the stored ones are already in order; up to
   SELECT_MERGE_MAX new ones (the steady state) are merged in (each stored trace moves up by
   the new ones with a smaller pos, each new one lands at its rank among the new plus a binary
   search over the stored); past that, a scratch area is sorted (`tl.sort` of pos << 14 | index,
   which measured 58% of the kernel at quota 2048 with 16 new traces per slab).

Arithmetic is float64 (the ln(1 + r) table comes from the host, like the reference's
math.log1p); strengths are stored float32. Results are independent of the order of candidates
and of atomics, so updates are deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import FastLaunch

MAX_TRITON_QUOTA = 8192
_IDX_BITS = 14          # compact index bits in the sort key (quota <= 8192 < 2^14)
_FLOAT32_MAX = 3.4028234663852886e38

__all__ = ["MAX_TRITON_QUOTA", "trace_update_slabs"]


@triton.jit
def _popcount64(x):
    """Bits set in int64 values in [0, 2^32)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


@triton.jit
def _match_kernel(strength_ptr, meta_ptr, layers_ptr, head_ptr, q_ptr, k_ptr, s_ptr, a_ptr, num_edges_ptr,
                  direct_ptr, slot_s_ptr, slot_a_ptr, params_ptr, ln1p_ptr,
                  cand_slab_ptr, cand_m_ptr, cand_meta_ptr, new_count_ptr,
                  C, H, Q, L,
                  POS_SHIFT: tl.constexpr, POS_MASK: tl.constexpr, LOG_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                  H_P2: tl.constexpr):
    # grid (cdiv(C, BLOCK_C), B): programs launched together search the same layer's slabs, so
    # the top levels of those searches can stay in the SMs' L1 (this grid and the per-block
    # counts below took the kernel from 199 to 150 us on the H100; not measured apart)
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_buf = offs < C
    n = tl.load(num_edges_ptr + b)
    row = b.to(tl.int64) * C + offs
    h = tl.load(head_ptr + row, mask=in_buf, other=-1)
    qi = tl.load(q_ptr + row, mask=in_buf, other=-1)
    kj = tl.load(k_ptr + row, mask=in_buf, other=-1)
    s = tl.load(s_ptr + row, mask=in_buf, other=0.0)
    at = tl.load(a_ptr + row, mask=in_buf, other=0.0)
    valid = in_buf & (offs < n) & (h >= 0) & (h < H) & (qi >= 0) & (qi < L) & (kj >= 0) & (kj < L)
    valid = valid & (s == s) & (tl.abs(s) < float("inf")) & (at == at) & (tl.abs(at) < float("inf"))  # noqa: PLR0124
    h = tl.where(valid, h, 0)
    pos = tl.where(valid, qi.to(tl.int64) * L + kj, 0)
    layer = tl.load(layers_ptr + b).to(tl.int64)
    base = (layer * H + h) * Q
    local_slab = b * H + h

    # lower bound of pos over the slab's Q slots, meta only. The traces fill [0, n) sorted by
    # unique pos and empty slots hold meta 0, so past slot 0 meta 0 means empty and sorts last
    # (slot 0 reads as pos 0 either way): the keys are monotone without knowing n. (A search that
    # also loaded the strength per step ran 295 instead of 149 us on the H100: the gathers are
    # the kernel's cost; a slab-length launch before it cost host time.)
    lo = tl.zeros([BLOCK_C], dtype=tl.int64)
    hi = tl.zeros([BLOCK_C], dtype=tl.int64) + Q
    for _ in range(LOG_Q):
        active = valid & (lo < hi)
        mid = (lo + hi) // 2
        mm = tl.load(meta_ptr + base + mid, mask=active, other=0)
        right = ((mm != 0) | (mid == 0)) & (((mm >> POS_SHIFT) & POS_MASK) < pos)
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    inside = valid & (lo < Q)
    mm = tl.load(meta_ptr + base + lo, mask=inside, other=0)
    st = tl.load(strength_ptr + base + lo, mask=inside, other=-1.0)
    found = inside & (st >= 0) & (((mm >> POS_SHIFT) & POS_MASK) == pos)

    direct = tl.load(direct_ptr + b)
    write = found & (direct == 0)
    tl.store(slot_s_ptr + local_slab.to(tl.int64) * Q + lo, s, mask=write)
    tl.store(slot_a_ptr + local_slab.to(tl.int64) * Q + lo, at, mask=write)

    retention_c = tl.load(params_ptr + 1)
    threshold = tl.load(params_ptr + 3)
    prune_eps = tl.load(params_ptr + 4)
    attn_eps = tl.load(params_ptr + 5)
    bit = at.to(tl.float64) > attn_eps
    s_new = s.to(tl.float64) * tl.load(ln1p_ptr + bit.to(tl.int32))
    m_new = retention_c * s_new
    is_new = valid & (~found) & (s_new > threshold) & (~(m_new < prune_eps))
    tl.store(cand_slab_ptr + row, tl.where(is_new, local_slab, -1), mask=in_buf)
    tl.store(cand_m_ptr + row, m_new, mask=in_buf)
    tl.store(cand_meta_ptr + row, (pos << POS_SHIFT) | bit.to(tl.int64), mask=in_buf)
    # one atomic per (block, head) instead of one per new edge: all of a block's edges hit the
    # same H counters
    heads = tl.arange(0, H_P2)
    per_head = tl.histogram(h, H_P2, mask=is_new)
    tl.atomic_add(new_count_ptr + b * H + heads, per_head, mask=(heads < H) & (per_head > 0))


@triton.jit
def _group_kernel(cand_slab_ptr, cand_m_ptr, cand_meta_ptr, new_count_ptr, new_end_ptr, cursor_ptr,
                  grouped_m_ptr, grouped_meta_ptr, C, BLOCK_C: tl.constexpr):
    """Scatter the new traces of a block of edges into their slabs' ranges, one returning atomic
    per edge for its place. Grid (B, cdiv(C, BLOCK_C)): blocks launched together belong to
    different layers, so their atomics spread over all the layers' counters. (Block-local ranks
    from a cumsum of the one-hot [BLOCK, H] matrix, one atomic per block and head, on the
    match's layer-major grid, measured slower on the H100: 141 vs 76 us at 2M edges.)"""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_buf = offs < C
    row = b.to(tl.int64) * C + offs
    slab = tl.load(cand_slab_ptr + row, mask=in_buf, other=-1)
    is_new = slab >= 0
    slab = tl.where(is_new, slab, 0)
    rank = tl.atomic_add(cursor_ptr + slab, tl.where(is_new, 1, 0), mask=is_new)
    start = tl.load(new_end_ptr + slab, mask=is_new, other=0) - tl.load(new_count_ptr + slab, mask=is_new, other=0)
    dst = (start + rank).to(tl.int64)
    tl.store(grouped_m_ptr + dst, tl.load(cand_m_ptr + row, mask=is_new, other=0.0), mask=is_new)
    tl.store(grouped_meta_ptr + dst, tl.load(cand_meta_ptr + row, mask=is_new, other=0), mask=is_new)


@triton.jit
def _min_max(a_min, a_max, b_min, b_max):
    return tl.minimum(a_min, b_min), tl.maximum(a_max, b_max)


@triton.jit
def _select_kernel(strength_ptr, meta_ptr, layers_ptr, slot_s_ptr, slot_a_ptr, params_ptr, ln1p_ptr,
                   new_count_ptr, new_end_ptr, cursor_ptr, grouped_m_ptr, grouped_meta_ptr,
                   scratch_m_ptr, scratch_meta_ptr, scratch_key_ptr,
                   H, Q,
                   W: tl.constexpr, AGE_MAX: tl.constexpr, POS_SHIFT: tl.constexpr, POS_MASK: tl.constexpr,
                   IDX_BITS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                   MERGE_MAX: tl.constexpr, LOG_Q: tl.constexpr):
    ls = tl.program_id(0)
    b = ls // H
    h = ls % H
    layer = tl.load(layers_ptr + b).to(tl.int64)
    base = (layer * H + h) * Q
    lbase = ls.to(tl.int64) * Q
    offs = tl.arange(0, BLOCK_Q)
    inq = offs < Q

    retention = tl.load(params_ptr + 0)
    retention_c = tl.load(params_ptr + 1)
    decay = tl.load(params_ptr + 2)
    threshold = tl.load(params_ptr + 3)
    prune_eps = tl.load(params_ptr + 4)
    attn_eps = tl.load(params_ptr + 5)
    hist_mask = (1 << W) - 1

    # 1-3, 5 on the stored traces
    m_old = tl.load(strength_ptr + base + offs, mask=inq, other=-1.0)
    meta = tl.load(meta_ptr + base + offs, mask=inq, other=0)
    s = tl.load(slot_s_ptr + lbase + offs, mask=inq, other=0.0)
    at = tl.load(slot_a_ptr + lbase + offs, mask=inq, other=0.0)
    s = tl.where((s == s) & (tl.abs(s) < float("inf")), s, 0.0).to(tl.float64)  # noqa: PLR0124 (NaN test)
    at = tl.where((at == at) & (tl.abs(at) < float("inf")), at, 0.0).to(tl.float64)  # noqa: PLR0124
    valid = m_old >= 0
    pos = (meta >> POS_SHIFT) & POS_MASK
    age = (meta >> W) & AGE_MAX
    hist = ((meta << 1) | (at > attn_eps).to(tl.int64)) & hist_mask
    s_eff = s * tl.load(ln1p_ptr + _popcount64(hist).to(tl.int32))
    reinforce = s_eff > threshold
    m64 = tl.where(reinforce, retention * m_old.to(tl.float64) + retention_c * s_eff, decay * m_old.to(tl.float64))
    age = tl.where(reinforce, 0, tl.minimum(age + 1, AGE_MAX))
    alive = valid & (~(m64 < prune_eps))
    meta = (pos << POS_SHIFT) | (age << W) | hist
    # eviction key (key_hi, key_lo): float64 bits of M (>= 0, so ordered as integers; -0.0 as
    # +0.0, which the reference ranks equal), then key_lo = 2^32 - 1 - pos (equal strengths: the
    # smaller (i, j) ranks higher). key_hi = -1 (sign bit set) marks a dead slot.
    key_hi = tl.where(alive, tl.where(m64 > 0, m64.to(tl.int64, bitcast=True), 0), -1)
    n_alive = tl.sum(alive.to(tl.int32), axis=0)

    n_new = tl.load(new_count_ptr + ls)
    start = tl.load(new_end_ptr + ls) - n_new
    # leave this slab's counters at zero for the next update (the workspace is kept between
    # calls, so no memset launch ahead of the match): every thread has read them first
    tl.debug_barrier()
    tl.store(new_count_ptr + ls, 0)
    tl.store(cursor_ptr + ls, 0)
    chunk = tl.arange(0, BLOCK_N)

    # 6. the quota-th largest key T (only when over quota); keys are unique in a slab, so exactly
    #    `quota` items are >= T. Radix select, 8-bit digits (`tl.histogram`), most significant
    #    first, starting below the key_hi bits every item shares and stopping as soon as the
    #    chosen digit's bucket holds exactly the items still missing (usually 2-3 passes, not 12).
    t_hi = tl.zeros([], dtype=tl.int64)
    t_lo = tl.zeros([], dtype=tl.int64)
    if n_alive + n_new > Q:
        big = 0x7FFFFFFFFFFFFFFF
        k_min, k_max = tl.reduce((tl.where(key_hi >= 0, key_hi, big), key_hi), 0, _min_max)
        for c0 in range(0, n_new, BLOCK_N):
            idx = c0 + chunk
            in_chunk = idx < n_new
            n_hi = tl.load(grouped_m_ptr + start + idx, mask=in_chunk, other=0.0).to(tl.int64, bitcast=True)
            c_min, c_max = tl.reduce((tl.where(in_chunk, n_hi, big), tl.where(in_chunk, n_hi, -1)), 0, _min_max)
            k_min = tl.minimum(k_min, c_min)
            k_max = tl.maximum(k_max, c_max)
        # bits >= top agree in every item (top >= bit_length(k_max ^ k_min), read off the
        # float64 exponent; rounding can only raise it); top <= 63 keeps the sign bit in the
        # prefix, so dead slots (-1) never match
        diff = (k_max ^ k_min).to(tl.float64).to(tl.int64, bitcast=True)
        top = tl.minimum(tl.maximum((diff >> 52) - 1022, 0), 63)
        mask_hi = ~((tl.full([], 1, tl.int64) << top) - 1)
        t_hi = k_max & mask_hi
        mask_lo = tl.zeros([], dtype=tl.int64)
        n_hi_passes = (top + 7) // 8
        remaining = Q + tl.zeros([], dtype=tl.int32)      # items still to keep among the matching ones
        total = n_alive + n_new                            # items matching (t, mask)
        bins = tl.arange(0, 256)
        p = tl.zeros([], dtype=tl.int64)
        done = tl.zeros([], dtype=tl.int32)
        # n_hi_passes digits of key_hi (the last may overlap bits already fixed: harmless, the
        # matching items agree on them), then 4 of key_lo
        while (p < n_hi_passes + 4) & (done == 0):
            is_hi = p < n_hi_passes
            shift = tl.where(is_hi, tl.maximum(top - 8 * (p + 1), 0), 24 - 8 * (p - n_hi_passes))
            key_lo = 0xFFFFFFFF - ((meta >> POS_SHIFT) & POS_MASK)
            match = ((key_hi & mask_hi) == t_hi) & ((key_lo & mask_lo) == t_lo)
            digit = ((tl.where(is_hi, key_hi, key_lo) >> shift) & 255).to(tl.int32)
            counts = tl.histogram(digit, 256, mask=match)
            for c0 in range(0, n_new, BLOCK_N):
                idx = c0 + chunk
                in_chunk = idx < n_new
                n_hi = tl.load(grouped_m_ptr + start + idx, mask=in_chunk, other=0.0).to(tl.int64, bitcast=True)
                gmeta = tl.load(grouped_meta_ptr + start + idx, mask=in_chunk, other=0)
                n_lo = 0xFFFFFFFF - ((gmeta >> POS_SHIFT) & POS_MASK)
                nmatch = in_chunk & ((n_hi & mask_hi) == t_hi) & ((n_lo & mask_lo) == t_lo)
                ndigit = ((tl.where(is_hi, n_hi, n_lo) >> shift) & 255).to(tl.int32)
                counts += tl.histogram(ndigit, 256, mask=nmatch)
            at_least = total - tl.cumsum(counts, axis=0) + counts      # matching items with digit >= d
            # chosen = the largest d with at_least >= remaining; at_least is non-increasing in d,
            # so one min gives it with its at_least, one max the count above it
            enough = at_least >= remaining
            packed = tl.where(enough, (at_least.to(tl.int64) << 8) | (255 - bins), big)
            packed, greater = tl.reduce((packed, tl.where(enough, 0, at_least)), 0, _min_max)
            chosen = 255 - (packed & 255)
            at_chosen = (packed >> 8).to(tl.int32)
            t_hi = tl.where(is_hi, t_hi | (chosen << shift), t_hi)
            mask_hi = tl.where(is_hi, mask_hi | (tl.full([], 255, tl.int64) << shift), mask_hi)
            t_lo = tl.where(is_hi, t_lo, t_lo | (chosen << shift))
            mask_lo = tl.where(is_hi, mask_lo, mask_lo | (tl.full([], 255, tl.int64) << shift))
            done = (at_chosen == remaining).to(tl.int32)
            remaining -= greater
            total = at_chosen - greater
            p += 1

    # compaction: kept stored traces first (in pos order), then kept new ones. Only key_hi and
    # meta of the stored traces stay live across the select (registers): the rest is re-derived
    pos = (meta >> POS_SHIFT) & POS_MASK
    m32 = tl.minimum(key_hi.to(tl.float64, bitcast=True), 3.4028234663852886e38).to(tl.float32)
    kept = (key_hi > t_hi) | ((key_hi == t_hi) & (0xFFFFFFFF - pos >= t_lo))
    kept_i = kept.to(tl.int32)
    n_kept_old = tl.sum(kept_i, axis=0)
    dst_old = tl.cumsum(kept_i, axis=0) - 1
    tl.debug_barrier()  # every thread has read the slab before anyone writes it
    n_kept = n_kept_old
    for c0 in range(0, n_new, BLOCK_N):
        idx = c0 + chunk
        in_chunk = idx < n_new
        gm = tl.load(grouped_m_ptr + start + idx, mask=in_chunk, other=0.0)
        gmeta = tl.load(grouped_meta_ptr + start + idx, mask=in_chunk, other=0)
        n_hi = gm.to(tl.int64, bitcast=True)
        n_lo = 0xFFFFFFFF - ((gmeta >> POS_SHIFT) & POS_MASK)
        nkept = in_chunk & ((n_hi > t_hi) | ((n_hi == t_hi) & (n_lo >= t_lo)))
        nkept_i = nkept.to(tl.int32)
        dst = n_kept + tl.cumsum(nkept_i, axis=0) - 1
        tl.store(scratch_m_ptr + lbase + dst, tl.minimum(gm, 3.4028234663852886e38).to(tl.float32), mask=nkept)
        tl.store(scratch_meta_ptr + lbase + dst, gmeta, mask=nkept)
        tl.store(scratch_key_ptr + lbase + dst, (((gmeta >> POS_SHIFT) & POS_MASK) << IDX_BITS) | dst, mask=nkept)
        n_kept += tl.sum(nkept_i, axis=0)

    n_new_kept = n_kept - n_kept_old
    if n_new_kept == 0:
        # no new trace kept: the stored ones are already in pos order
        tl.store(strength_ptr + base + dst_old, m32, mask=kept)
        tl.store(meta_ptr + base + dst_old, meta, mask=kept)
    elif n_new_kept <= MERGE_MAX:
        # Few new traces (the steady state): merge instead of sorting all n_kept keys (the sort
        # was 58% of the kernel at quota 2048 with 16 new traces per slab). A stored trace moves
        # up by the number of new ones with a smaller pos; a new one lands at its rank among the
        # new ones plus the number of stored ones with a smaller pos (binary search over the
        # stored keys, which are in pos order in scratch_key[0, n_kept_old)).
        tl.store(scratch_key_ptr + lbase + dst_old, (pos << IDX_BITS) | dst_old, mask=kept)
        tl.debug_barrier()
        mchunk = tl.arange(0, MERGE_MAX)
        new_in = mchunk < n_new_kept
        new_src = n_kept_old + mchunk
        p_x = tl.load(scratch_key_ptr + lbase + new_src, mask=new_in, other=0) >> IDX_BITS
        # one pass over the new positions gives both counts: the stored traces' shift and the
        # new ones' rank among themselves
        shift = tl.zeros([BLOCK_Q], dtype=tl.int32)
        rank = tl.zeros([MERGE_MAX], dtype=tl.int32)
        for t in range(n_new_kept):
            p_t = tl.load(scratch_key_ptr + lbase + n_kept_old + t) >> IDX_BITS
            shift += (p_t < pos).to(tl.int32)
            rank += (p_t < p_x).to(tl.int32)
        tl.store(strength_ptr + base + dst_old + shift, m32, mask=kept)
        tl.store(meta_ptr + base + dst_old + shift, meta, mask=kept)
        lo = tl.zeros([MERGE_MAX], dtype=tl.int32)      # first stored key with pos >= p_x
        hi = tl.zeros([MERGE_MAX], dtype=tl.int32) + n_kept_old
        for _ in tl.static_range(LOG_Q):
            open_ = lo < hi
            mid = (lo + hi) // 2
            p_mid = tl.load(scratch_key_ptr + lbase + mid, mask=new_in & open_, other=0) >> IDX_BITS
            right = open_ & (p_mid < p_x)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(open_ & ~right, mid, hi)
        dst_new = rank + lo
        tl.store(strength_ptr + base + dst_new, tl.load(scratch_m_ptr + lbase + new_src, mask=new_in, other=0.0),
                 mask=new_in)
        tl.store(meta_ptr + base + dst_new, tl.load(scratch_meta_ptr + lbase + new_src, mask=new_in, other=0),
                 mask=new_in)
    else:
        tl.store(scratch_m_ptr + lbase + dst_old, m32, mask=kept)
        tl.store(scratch_meta_ptr + lbase + dst_old, meta, mask=kept)
        tl.store(scratch_key_ptr + lbase + dst_old, (pos << IDX_BITS) | dst_old, mask=kept)
        tl.debug_barrier()
        skey = tl.load(scratch_key_ptr + lbase + offs, mask=offs < n_kept, other=0x7FFFFFFFFFFFFFFF)
        skey = tl.sort(skey, 0)
        src = skey & ((1 << IDX_BITS) - 1)
        out = offs < n_kept
        tl.store(strength_ptr + base + offs, tl.load(scratch_m_ptr + lbase + src, mask=out, other=0.0), mask=out)
        tl.store(meta_ptr + base + offs, tl.load(scratch_meta_ptr + lbase + src, mask=out, other=0), mask=out)
    empty = inq & (offs >= n_kept)
    tl.store(strength_ptr + base + offs, tl.full([BLOCK_Q], -1.0, tl.float32), mask=empty)
    tl.store(meta_ptr + base + offs, tl.zeros([BLOCK_Q], dtype=tl.int64), mask=empty)


SELECT_WARPS = None  # override the select kernel's num_warps (benchmarks)
SELECT_OPTIONS: dict = {}  # extra launch options of the select kernel (benchmarks: maxnreg)
# up to this many new traces kept in a slab are merged in (a power of two: its tl.arange); more: one full sort
SELECT_MERGE_MAX = 64
_LAYER_CACHE: dict = {}
_TABLE_CACHE: dict = {}


def _layers_tensor(layers, device):
    key = (tuple(layers), device)
    t = _LAYER_CACHE.get(key)
    if t is None:
        if len(_LAYER_CACHE) > 256:
            _LAYER_CACHE.clear()
        t = _LAYER_CACHE[key] = torch.tensor(layers, dtype=torch.int32, device=device)
    return t


def _tables(retention, decay, threshold, prune_eps, attn_eps, window, device):
    key = (retention, decay, threshold, prune_eps, attn_eps, window, device)
    t = _TABLE_CACHE.get(key)
    if t is None:
        if len(_TABLE_CACHE) > 64:
            _TABLE_CACHE.clear()
        params = torch.tensor([retention, 1.0 - retention, decay, threshold, prune_eps, attn_eps],
                              dtype=torch.float64, device=device)
        ln1p = torch.tensor([math.log1p(r) for r in range(window + 1)], dtype=torch.float64, device=device)
        t = _TABLE_CACHE[key] = (params, ln1p)
    return t


_BLOCK_C = 512
_CONSTANTS: dict = {}


def _launch_constants(H, Q, pos_bits, age_bits):
    """The launches' constexprs and options for a slab shape, worked out once (plain integer
    arithmetic: on the H100 machine's host each triton.cdiv / next_power_of_2 call cost ~5 us,
    and the eager update waits on host time before its first kernel)."""
    key = (H, Q, pos_bits, age_bits, SELECT_WARPS, tuple(sorted(SELECT_OPTIONS.items())), SELECT_MERGE_MAX)
    k = _CONSTANTS.get(key)
    if k is None:
        pos_shift, pos_mask, log_q = 64 - pos_bits, (1 << pos_bits) - 1, max(1, Q.bit_length())
        block_q = max(16, 1 << (Q - 1).bit_length())
        # quota 2048: 8 warps capped at 128 registers (no spills when compiled for sm_90) fit two
        # programs per SM, so one program's barriers and reductions overlap the other's work
        warps = SELECT_WARPS or max(4, min(16, block_q // 256))
        options = dict(SELECT_OPTIONS) if SELECT_OPTIONS or SELECT_WARPS else ({"maxnreg": 128} if warps == 8 else {})
        k = _CONSTANTS[key] = {
            "match": {"POS_SHIFT": pos_shift, "POS_MASK": pos_mask, "LOG_Q": log_q, "BLOCK_C": _BLOCK_C,
                          "H_P2": max(2, 1 << (H - 1).bit_length()), "num_warps": 4},
            "select": dict(AGE_MAX=(1 << age_bits) - 1, POS_SHIFT=pos_shift, POS_MASK=pos_mask, IDX_BITS=_IDX_BITS,
                           BLOCK_Q=block_q, BLOCK_N=min(block_q, 1024), MERGE_MAX=SELECT_MERGE_MAX, LOG_Q=log_q,
                           num_warps=warps, **options)}
    return k


_WORKSPACES = {}


def _workspace(device, n_edges, n_slabs, Q):
    """The update's scratch buffers. On CUDA they are kept between calls on the same stream
    (allocating them each call was ~25 us of host time ahead of the first kernel on the H100
    machine; stream order makes the reuse safe), except while a CUDA graph is being
    captured: the graph must own what it reads (this cache may drop its buffers). Holds
    ~36 B per candidate + ~20 B per slot (~120 MiB at 2M candidates and 2M slots)."""
    cached = device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    if cached:
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index), n_edges, n_slabs, Q)
        ws = _WORKSPACES.get(key)
        if ws is not None:
            return ws
    n_edges = max(n_edges, 1)

    def empty(n, dtype):
        return torch.empty(n, dtype=dtype, device=device)
    counts = torch.zeros(2, n_slabs, dtype=torch.int32, device=device)   # the select kernel re-zeroes them
    ws = {"counts": counts, "new_count": counts[0], "cursor": counts[1],
          "cand_slab": empty(n_edges, torch.int32), "cand_m": empty(n_edges, torch.float64),
          "cand_meta": empty(n_edges, torch.int64), "grouped_m": empty(n_edges, torch.float64),
          "grouped_meta": empty(n_edges, torch.int64), "scratch_m": empty(n_slabs * Q, torch.float32),
          "scratch_meta": empty(n_slabs * Q, torch.int64), "scratch_key": empty(n_slabs * Q, torch.int64)}
    if cached:
        if len(_WORKSPACES) >= 4:    # a few shapes / streams at a time
            _WORKSPACES.clear()
        _WORKSPACES[key] = ws
    return ws


# the update's launches skip Triton's per-call dispatch after the first (kernels/launch.py): an
# eager update's first kernel waits on the host's launch work
_match, _group, _select = FastLaunch(_match_kernel), FastLaunch(_group_kernel), FastLaunch(_select_kernel)


def trace_update_slabs(strength, meta, layers, head, q_idx, k_idx, S, a, num_edges, slot_S, slot_a, direct, *,
                       quota, retention, decay, threshold, prune_eps, attn_eps, window, max_seq_len, age_bits,
                       pos_bits):
    """Update the slabs of `layers` in place (strength, meta: [L, H, Q]).

    head, q_idx, k_idx int32 [B, C]; S, a float32 [B, C]; num_edges int32 [B];
    slot_S, slot_a float32 [B, H, Q] (overwritten: scratch); direct bool [B].
    """
    device = strength.device
    _, H, Q = strength.shape
    B, C = head.shape
    if Q > MAX_TRITON_QUOTA:
        raise ValueError(f"quota {Q} is over the Triton path's {MAX_TRITON_QUOTA}; use backend='torch'")
    k = _launch_constants(H, Q, pos_bits, age_bits)
    layers_t = _layers_tensor(layers, device)
    params, ln1p = _tables(retention, decay, threshold, prune_eps, attn_eps, window, device)
    head, q_idx, k_idx = head.contiguous(), q_idx.contiguous(), k_idx.contiguous()
    S, a = S.contiguous(), a.contiguous()
    slot_S, slot_a = slot_S.contiguous(), slot_a.contiguous()
    direct_u8 = direct.contiguous().view(torch.uint8)
    num_edges = num_edges.contiguous()
    n_slabs = B * H
    ws = _workspace(device, B * C, n_slabs, Q)
    try:
        _launch_all(strength, meta, layers_t, head, q_idx, k_idx, S, a, num_edges, direct_u8, slot_S, slot_a,
                    params, ln1p, ws, B, C, H, Q, n_slabs, window, max_seq_len, k)
    except BaseException:
        ws["counts"].zero_()    # the select kernel did not run: it did not clear the counters
        raise


def _launch_all(strength, meta, layers_t, head, q_idx, k_idx, S, a, num_edges, direct_u8, slot_S, slot_a,
                params, ln1p, ws, B, C, H, Q, n_slabs, window, max_seq_len, k):
    """match, cumsum, group, select on the workspace `ws`, whose counters are zero on entry and
    on return (the select kernel clears them)."""
    counts, new_count, cursor = ws["counts"], ws["new_count"], ws["cursor"]
    grouped_m, grouped_meta = ws["grouped_m"], ws["grouped_meta"]
    new_end = new_count                                  # (no candidates: every slab's range is empty)
    if C > 0:
        cand_slab, cand_m, cand_meta = ws["cand_slab"], ws["cand_m"], ws["cand_meta"]
        blocks = (C + _BLOCK_C - 1) // _BLOCK_C
        _match[(blocks, B)](
            strength, meta, layers_t, head, q_idx, k_idx, S, a, num_edges, direct_u8, slot_S, slot_a,
            params, ln1p, cand_slab, cand_m, cand_meta, counts, C, H, Q, max_seq_len, **k["match"])
        # (counts' row 0 is new_count)
        new_end = torch.cumsum(new_count, 0, dtype=torch.int32)    # slab s's range: [end - count, end)
        _group[(B, blocks)](cand_slab, cand_m, cand_meta, new_count, new_end, cursor,
                            grouped_m, grouped_meta, C, BLOCK_C=_BLOCK_C, num_warps=4)
    scratch_m, scratch_meta, scratch_key = ws["scratch_m"], ws["scratch_meta"], ws["scratch_key"]
    _select[(n_slabs,)](strength, meta, layers_t, slot_S, slot_a, params, ln1p, new_count, new_end, cursor,
                        grouped_m, grouped_meta, scratch_m, scratch_meta, scratch_key, H, Q,
                        W=window, **k["select"])
