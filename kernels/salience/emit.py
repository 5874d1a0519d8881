"""Compaction of a block's candidate edges into the capture's edge buffer (all salience kernels)."""
import triton
import triton.language as tl


@triton.jit
def store_edges(pos, keep, S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A):
    zero = tl.zeros(S.shape, dtype=tl.int32)
    tl.store(OUT_H + pos, zero + h, mask=keep)
    tl.store(OUT_I + pos, zero + offs_m[:, None], mask=keep)
    tl.store(OUT_J + pos, zero + offs_n[None, :], mask=keep)
    tl.store(OUT_S + pos, S, mask=keep)
    tl.store(OUT_A + pos, A, mask=keep)


@triton.jit
def emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A):
    base = tl.atomic_add(CNT_PTR, n.to(tl.int64))
    # int32 from here (registers): the room left is < 2^31, and a slot is base + rank < limit.
    room = (limit - tl.minimum(base, limit)).to(tl.int32)
    row_cnt = tl.sum(c, axis=1)
    row_excl = tl.cumsum(row_cnt, axis=0) - row_cnt
    rank = row_excl[:, None] + (tl.cumsum(c, axis=1) - c)
    keep = cand & (rank < room)
    pos = (limit - room) + rank            # wraps only where keep is False
    store_edges(pos, keep, S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)


@triton.jit
def emit(cand, S, A, offs_m, offs_n, h, CNT_PTR, limit,
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
            store_edges(pos, cand & (pos < limit), S, A, offs_m, offs_n, h, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
        elif n > 0:
            emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
    elif n > 0:
        emit_ranked(cand, c, n, S, A, offs_m, offs_n, h, CNT_PTR, limit, OUT_H, OUT_I, OUT_J, OUT_S, OUT_A)
