"""The TraceBias index on the GPU: the same tensors as memtrace.bias._build_index_torch, bit for bit,
with no host sync. Two paths, chosen on the host from the sizes alone (build_index):

  * small indexes (<= 2^18 entries, <= 4096 a head on average; 32 heads x 2048 is one): 4 Triton
    launches and no torch.sort (see "small-index path" below);
  * otherwise 3 small Triton launches and 2 int32 radix sorts (the pipeline described next).

Inputs: COO (head, q_idx, k_idx) integer [nnz] on one device, already validated (0 <= h < H,
0 <= i < Tq, 0 <= j < Tk). Outputs (see memtrace/bias.py):

    entry_pos  int32 [E]       (i << 16) | j of the entries sorted by (h, i, j) (wraps for i >= 32768)
    src_entry  int32 [nnz]     for each COO entry, the sorted index of the first entry of its run
                               of equal (h, i, j) (its "leader")
    k_order    int32 [E]       the sorted-entry indices ordered by (h, j, i)
    q_offsets  int32 [H*Tq+1]  entries of (h, i) are [q_offsets[h*Tq+i], q_offsets[h*Tq+i+1])
    k_offsets  int32 [H*Tk+1]  k_order[k_offsets[h*Tk+j] : k_offsets[h*Tk+j+1]] are those of (h, j)

Pipeline (keys are int32 when H*Tq*Tk < 2^31, e.g. 32 x 4096 x 4096 = 2^29; int64 otherwise):

    1. _keys_kernel      key = (h*Tq + i)*Tk + j                                      1 launch
    2. torch.sort(key, stable=True) -> sorted keys, perm (sorted -> COO index)        cub radix sort
    3. _sorted_kernel    per sorted entry p: entry_pos[p]; leader = lower_bound(sorted, key[p])
                         scattered to src_entry[perm[p]]; the k-key h*Tk + j.
                         per row r in [0, H*Tq]: q_offsets[r] = lower_bound(sorted, r*Tk)  1 launch
    4. torch.sort(kkey, stable=True) -> k_order: the sorted entries are in (h, i, j) order,
       so a stable sort on h*Tk + j alone keeps i ascending (and duplicates in sorted order)
       within each (h, j): exactly the (h, j, i) order of the torch builder.     cub radix sort
    5. _korder_kernel    k_order -> int32; k_offsets[c] = lower_bound(sorted kkeys, c)  1 launch

The leader is lower_bound(sorted, sorted[p]) (the first position holding the same key) instead
of the torch builder's is-leader mask + cummax; the CSR offsets are lower bounds too, one binary
search per row (ceil(log2(E+1)) L2-resident gathers), so every step is a fixed-shape launch.

Predicted H100 cost at 32 heads x 2048 entries (E = 65536), T = 4096: ~45-55 us of GPU time.
Measured (benchmarks/results/bias_index_h100.json): 0.253 ms at 65536 and at 524288 entries alike,
31 GPU kernels a build, ~28 of them the two torch.sort calls (index fill, cub onesweep passes):
launch / host bound, not bandwidth bound. Hence the small-index path below, which has no sort.
The torch builder: ~35 launches including two int64 sorts: 0.80 ms measured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _lower_bound(arr_ptr, n, x, STEPS):
    """First index in the sorted arr[0:n] whose value is >= x (elementwise over the block x).
    STEPS = n.bit_length() halvings always suffice: an interval of size s leaves at most s // 2."""
    lo = tl.full(x.shape, 0, tl.int32)  # tl.full is a builtin (tl.zeros, tl.cdiv are @jit helpers)
    hi = lo + n
    for _ in range(STEPS):
        active = lo < hi
        mid = lo + ((hi - lo) >> 1)
        v = tl.load(arr_ptr + mid, mask=active, other=0)
        right = v < x
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (v >= x), mid, hi)
    return lo


@triton.jit
def _keys_kernel(head_ptr, q_ptr, k_ptr, key_ptr, n, Tq, Tk, BLOCK: tl.constexpr, KEY64: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(head_ptr + offs, mask=mask, other=0)
    i = tl.load(q_ptr + offs, mask=mask, other=0)
    j = tl.load(k_ptr + offs, mask=mask, other=0)
    if KEY64:
        h = h.to(tl.int64)
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    else:
        h = h.to(tl.int32)
        i = i.to(tl.int32)
        j = j.to(tl.int32)
    tl.store(key_ptr + offs, (h * Tq + i) * Tk + j, mask=mask)


@triton.jit
def _sorted_kernel(skey_ptr, perm_ptr, entry_pos_ptr, src_ptr, kkey_ptr, q_off_ptr,
                   n, n_rows1, Tq, Tk, STEPS, BLOCK: tl.constexpr, KEY64: tl.constexpr):
    pid = tl.program_id(0)
    n_entry_blocks = (n + BLOCK - 1) // BLOCK
    if pid < n_entry_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        key = tl.load(skey_ptr + offs, mask=mask, other=0)
        row = key // Tk                                   # h * Tq + i
        j = key - row * Tk
        i = row % Tq
        h = row // Tq
        pos = (i.to(tl.int32) << 16) | j.to(tl.int32)     # int32 shift wraps like the torch cast
        tl.store(entry_pos_ptr + offs, pos, mask=mask)
        leader = _lower_bound(skey_ptr, n, key, STEPS)
        src = tl.load(perm_ptr + offs, mask=mask, other=0)
        tl.store(src_ptr + src, leader, mask=mask)
        tl.store(kkey_ptr + offs, h * Tk + j, mask=mask)
    else:
        offs = (pid - n_entry_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_rows1
        if KEY64:
            target = offs.to(tl.int64) * Tk
        else:
            target = offs * Tk                            # <= H*Tq*Tk < 2^31
        tl.store(q_off_ptr + offs, _lower_bound(skey_ptr, n, target, STEPS), mask=mask)


@triton.jit
def _korder_kernel(kperm_ptr, skkey_ptr, k_order_ptr, k_off_ptr, n, n_cols1, STEPS,
                   BLOCK: tl.constexpr, KEY64: tl.constexpr):
    pid = tl.program_id(0)
    n_entry_blocks = (n + BLOCK - 1) // BLOCK
    if pid < n_entry_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(k_order_ptr + offs, tl.load(kperm_ptr + offs, mask=mask, other=0).to(tl.int32), mask=mask)
    else:
        offs = (pid - n_entry_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols1
        if KEY64:
            target = offs.to(tl.int64)
        else:
            target = offs
        tl.store(k_off_ptr + offs, _lower_bound(skkey_ptr, n, target, STEPS), mask=mask)


# ---- small-index path: no torch.sort, 4 Triton launches --------------------------------------------
# Why: at 32 heads x 2048 entries the sort path is launch bound (two cub radix sorts are ~28 of its
# 31 GPU kernels and most of its host time). Here every entry is first bucketed by head, each head is
# cut into chunks of CHUNK entries that one program sorts in registers (tl.sort of unique packed
# int64 keys), and an entry's global rank is its base (entries of lower heads) plus its lower bound in
# every chunk of its head: exact merge ranks, so no stable sort is needed. Cost per entry grows with
# the chunks of its head, so the host takes this path only for small indexes (see _fast_ok).
#
#   L1 _head_hist_kernel   per block of BLOCK_E entries: its head histogram -> tbl[block, head]
#   L2 _bucket_kernel      head bases from tbl; each entry's slot in the head-bucketed order
#                          (atomic slot counters seeded with the block's start per head)
#   L3 _chunk_sort_kernel  per (chunk, order): sort packed keys; Q: (i, j, e), K: (j, i, e)
#   L4 _rank_kernel        entry_pos, src_entry (leader = rank of (i, j, 0)), k_order, both offsets
#
# Keys are within a head: i, j < 2^16 (SPEC: seq_len <= 65535), e < 2^31 in the low bits, so they
# are unique and ordering by (i, j, e) is the stable (h, i, j) order of the torch builder; ordering
# the K keys by (j, i, e) equals (j, i, sorted position) since duplicates keep e order.

CHUNK_MAX = 2048        # entries one program sorts in registers (tl.sort); at least CHUNK_MIN
CHUNK_MIN = 64
BLOCK_E = 1024          # entries per bucketing program
BLOCK_R = 1024          # offset-table rows per program
FAST_MAX_N = 1 << 18    # entries; beyond that the sort path (it scales better)
FAST_MAX_PER_HEAD = 2 * CHUNK_MAX   # mean entries per head: merge ranks cost ~chunks-per-head searches


@triton.jit
def _head_hist_kernel(head_ptr, tbl_ptr, n, BLOCK_E: tl.constexpr, HP: tl.constexpr):
    # tbl_ptr: the workspace, whose first NB*HP int32 are the block histograms
    pid = tl.program_id(0)
    offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = offs < n
    h = tl.load(head_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(tbl_ptr + pid * HP + tl.arange(0, HP), tl.histogram(h, HP, mask=mask))


@triton.jit
def _bucket_kernel(head_ptr, ws_ptr, n, NB, BLOCK_E: tl.constexpr, HP: tl.constexpr, NBP: tl.constexpr):
    # workspace (int32): tbl [NB, HP] | slot counters [NB, HP] | head base [HP], count [HP] | bucket [n]
    tbl_ptr = ws_ptr
    slot_ptr = ws_ptr + NB * HP
    hinfo_ptr = slot_ptr + NB * HP
    bucket_ptr = hinfo_ptr + 2 * HP
    pid = tl.program_id(0)
    rows = tl.arange(0, NBP)[:, None]
    cols = tl.arange(0, HP)[None, :]
    t2 = tl.load(tbl_ptr + rows * HP + cols, mask=rows < NB, other=0)
    cnt = tl.sum(t2, axis=0)                                  # entries per head
    base = tl.cumsum(cnt, 0) - cnt                            # first bucketed position of each head
    start = base + tl.sum(tl.where(rows < pid, t2, 0), axis=0)  # + this head's entries of earlier blocks
    hcols = tl.arange(0, HP)
    if pid == 0:
        tl.store(hinfo_ptr + hcols, base)
        tl.store(hinfo_ptr + HP + hcols, cnt)
    # Seed this block's counters with its start positions; the atomics then hand out final slots
    # (in any order within the block: chunks are re-sorted by unique keys, so the result is fixed).
    tl.store(slot_ptr + pid * HP + hcols, start)
    tl.debug_barrier()
    offs = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = offs < n
    h = tl.load(head_ptr + offs, mask=mask, other=0).to(tl.int32)
    pos = tl.atomic_add(slot_ptr + pid * HP + h, 1, mask=mask)
    tl.store(bucket_ptr + pos, offs, mask=mask)


@triton.jit
def _chunk_of(hinfo_ptr, g, CHUNK: tl.constexpr, HP: tl.constexpr):
    """(valid, chunk start, chunk length, head base, head count) of global chunk g; the chunks
    of head h are its bucketed entries cut every CHUNK, numbered head after head."""
    hcols = tl.arange(0, HP)
    cnt = tl.load(hinfo_ptr + HP + hcols)
    base = tl.load(hinfo_ptr + hcols)
    nch = (cnt + CHUNK - 1) // CHUNK
    cend = tl.cumsum(nch, 0)
    h = tl.sum((cend <= g).to(tl.int32))
    valid = g < tl.max(cend)
    h = tl.minimum(h, HP - 1)
    cst = tl.sum(tl.where(hcols == h, cend - nch, 0))
    hbase = tl.sum(tl.where(hcols == h, base, 0))
    hcnt = tl.sum(tl.where(hcols == h, cnt, 0))
    k = g - cst
    return valid, hbase + k * CHUNK, tl.minimum(CHUNK, hcnt - k * CHUNK), hbase, hcnt


@triton.jit
def _chunk_sort_kernel(ws_ptr, q_ptr, k_ptr, keys_ptr, n, NB, CHUNK: tl.constexpr, HP: tl.constexpr):
    hinfo_ptr = ws_ptr + 2 * NB * HP
    bucket_ptr = hinfo_ptr + 2 * HP
    sq_ptr = keys_ptr                                  # sorted chunks of Q keys, then of K keys
    sk_ptr = keys_ptr + n
    g = tl.program_id(0)
    valid, cstart, clen, _hbase, _hcnt = _chunk_of(hinfo_ptr, g, CHUNK, HP)
    if valid:
        offs = tl.arange(0, CHUNK)
        mask = offs < clen
        e = tl.load(bucket_ptr + cstart + offs, mask=mask, other=0)
        i = tl.load(q_ptr + e, mask=mask, other=0).to(tl.int64)
        j = tl.load(k_ptr + e, mask=mask, other=0).to(tl.int64)
        e = e.to(tl.int64)
        if tl.program_id(1) == 0:
            key = (i << 47) | (j << 31) | e
            out_ptr = sq_ptr
        else:
            key = (j << 47) | (i << 31) | e
            out_ptr = sk_ptr
        key = tl.where(mask, key, 9223372036854775807)       # padding sorts last, never stored
        tl.store(out_ptr + cstart + offs, tl.sort(key), mask=mask)


@triton.jit
def _head_rank(arr_ptr, hbase, hcnt, x, CHUNK: tl.constexpr, STEPS: tl.constexpr):
    """Rank of x among the entries of one head (sum of its lower bounds in every sorted chunk)."""
    r = tl.full(x.shape, 0, tl.int32)
    nch = (hcnt + CHUNK - 1) // CHUNK
    for c in range(nch):
        r += _lower_bound(arr_ptr + hbase + c * CHUNK, tl.minimum(CHUNK, hcnt - c * CHUNK), x, STEPS)
    return r + hbase


@triton.jit
def _rank_kernel(keys_ptr, ws_ptr, entry_pos_ptr, src_ptr, k_order_ptr, q_off_ptr, k_off_ptr,
                 n, NB, G, H, Tq, Tk, RQ,
                 CHUNK: tl.constexpr, HP: tl.constexpr, BLOCK_R: tl.constexpr, STEPS: tl.constexpr):
    hinfo_ptr = ws_ptr + 2 * NB * HP
    sq_ptr = keys_ptr
    sk_ptr = keys_ptr + n
    pid = tl.program_id(0)
    emask = (1 << 31) - 1
    if pid < 2 * G:                                   # one program per sorted chunk, Q then K
        g = pid % G
        valid, cstart, clen, hbase, hcnt = _chunk_of(hinfo_ptr, g, CHUNK, HP)
        if valid:
            offs = tl.arange(0, CHUNK)
            mask = offs < clen
            if pid < G:
                x = tl.load(sq_ptr + cstart + offs, mask=mask, other=0)
                p = _head_rank(sq_ptr, hbase, hcnt, x, CHUNK, STEPS)
                leader = _head_rank(sq_ptr, hbase, hcnt, x & ~emask, CHUNK, STEPS)   # rank of (i, j, 0)
                i = x >> 47
                j = (x >> 31) & 0xFFFF
                tl.store(entry_pos_ptr + p, ((i << 16) | j).to(tl.int32), mask=mask)  # wraps like torch
                tl.store(src_ptr + (x & emask), leader, mask=mask)
            else:
                y = tl.load(sk_ptr + cstart + offs, mask=mask, other=0)
                t = _head_rank(sk_ptr, hbase, hcnt, y, CHUNK, STEPS)
                qkey = (((y >> 31) & 0xFFFF) << 47) | ((y >> 47) << 31) | (y & emask)
                tl.store(k_order_ptr + t, _head_rank(sq_ptr, hbase, hcnt, qkey, CHUNK, STEPS), mask=mask)
    else:                                             # offset tables: programs of (head, row block)
        r = pid - 2 * G
        if r < RQ:
            arr_ptr = sq_ptr
            off_ptr = q_off_ptr
            T = Tq
        else:
            r -= RQ
            arr_ptr = sk_ptr
            off_ptr = k_off_ptr
            T = Tk
        nrb = (T + BLOCK_R - 1) // BLOCK_R
        h = r // nrb
        rows = (r % nrb) * BLOCK_R + tl.arange(0, BLOCK_R)
        hbase = tl.load(hinfo_ptr + h)
        hcnt = tl.load(hinfo_ptr + HP + h)
        off = _head_rank(arr_ptr, hbase, hcnt, rows.to(tl.int64) << 47, CHUNK, STEPS)
        tl.store(off_ptr + h * T + rows, off, mask=rows < T)
        if r == 0:                                    # the closing entry of the table
            tl.store(off_ptr + H * T + rows, off * 0 + n, mask=rows == 0)


def _fast_ok(n, H, Tq=1, Tk=1):
    """Whether the chunk-sort path takes (n entries, H heads): keys hold i, j in 16 bits each; the
    per-program head table [blocks, HP] stays small; heads average at most two CHUNK_MAX chunks."""
    hp = max(16, triton.next_power_of_2(H))
    nb = triton.cdiv(n, BLOCK_E)
    return (0 < n <= FAST_MAX_N and n <= FAST_MAX_PER_HEAD * H and hp <= 1024 and max(Tq, Tk) <= 1 << 16
            and triton.next_power_of_2(nb) * hp <= 1 << 16)


def _build_index_fast(head, q_idx, k_idx, H, Tq, Tk):
    device = head.device
    n = head.shape[0]
    HP = max(16, triton.next_power_of_2(H))         # histogram bins (>= H; the extra ones stay 0)
    NB = triton.cdiv(n, BLOCK_E)
    # one int32 workspace (block histograms, slot counters, head base/count, bucketed entries) and
    # one int64 one (sorted chunks of Q keys, then K keys); kernels find the parts by offset
    ws = torch.empty(2 * NB * HP + 2 * HP + n, dtype=torch.int32, device=device)
    keys = torch.empty(2 * n, dtype=torch.int64, device=device)
    # separate output tensors (not views of one buffer): callers hand them to custom ops / compile
    entry_pos, src_entry, k_order = (torch.empty(n, dtype=torch.int32, device=device) for _ in range(3))
    q_offsets = torch.empty(H * Tq + 1, dtype=torch.int32, device=device)
    k_offsets = torch.empty(H * Tk + 1, dtype=torch.int32, device=device)

    _head_hist_kernel[(NB,)](head, ws, n, BLOCK_E=BLOCK_E, HP=HP, num_warps=4)
    _bucket_kernel[(NB,)](head, ws, n, NB, BLOCK_E=BLOCK_E, HP=HP, NBP=triton.next_power_of_2(NB),
                          num_warps=4)
    # chunk size: the mean entries per head, so a typical head is one or two chunks and small indexes
    # do not sort padding (a power of two: a few compiled variants at most)
    CHUNK = min(CHUNK_MAX, max(CHUNK_MIN, triton.next_power_of_2(triton.cdiv(n, H))))
    G = triton.cdiv(n, CHUNK) + H                     # >= the chunks of any head split
    _chunk_sort_kernel[(G, 2)](ws, q_idx, k_idx, keys, n, NB, CHUNK=CHUNK, HP=HP,
                               num_warps=8 if CHUNK >= 2048 else 4)
    RQ = H * triton.cdiv(Tq, BLOCK_R)
    RK = H * triton.cdiv(Tk, BLOCK_R)
    _rank_kernel[(2 * G + RQ + RK,)](keys, ws, entry_pos, src_entry, k_order, q_offsets, k_offsets,
                                    n, NB, G, H, Tq, Tk, RQ, CHUNK=CHUNK, HP=HP, BLOCK_R=BLOCK_R,
                                    STEPS=CHUNK.bit_length(), num_warps=8 if CHUNK >= 1024 else 4)
    return entry_pos, src_entry, k_order, q_offsets, k_offsets


def build_index(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k, *, method=None):
    """(entry_pos, src_entry, k_order, q_offsets, k_offsets), as memtrace.bias._build_index_torch
    returns them, bit for bit. No host sync: every size used here is a tensor shape.
    method: None (chunk-sort path for small indexes, else the sort path), "fast" or "sort"."""
    n = head.shape[0]
    H, Tq, Tk = int(num_heads), int(seq_len_q), int(seq_len_k)
    if method is None:
        # settings bias_index_method "sort" forces the path measured on the H100 (the fast one is not yet)
        method = settings.current().bias_index_method
        if method == "fast" and not _fast_ok(n, H, Tq, Tk):
            method = "sort"
    if method == "fast" and max(Tq, Tk) > 1 << 16:
        raise ValueError("TraceBias index: the chunk-sort path needs seq_len <= 65536")
    if method == "fast" and n:
        return _build_index_fast(head, q_idx, k_idx, H, Tq, Tk)
    return _build_index_sorted(head, q_idx, k_idx, H, Tq, Tk)


def _build_index_sorted(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k):
    """build_index's sort path: 3 Triton launches and 2 int32 torch.sort calls (module docstring)."""
    device = head.device
    n = head.shape[0]
    H, Tq, Tk = int(num_heads), int(seq_len_q), int(seq_len_k)
    if n >= 2**31 - BLOCK or H * max(Tq, Tk) + 1 >= 2**31 - BLOCK:
        raise ValueError("TraceBias index: too many entries or rows for int32 offsets")
    key64 = H * Tq * Tk >= 2**31
    kdt = torch.int64 if key64 else torch.int32
    steps = n.bit_length()
    n_entry_blocks = triton.cdiv(n, BLOCK)

    key = torch.empty(n, dtype=kdt, device=device)
    if n:
        _keys_kernel[(n_entry_blocks,)](head, q_idx, k_idx, key, n, Tq, Tk,
                                        BLOCK=BLOCK, KEY64=key64, num_warps=NUM_WARPS)
    skey, perm = torch.sort(key, stable=True)

    entry_pos = torch.empty(n, dtype=torch.int32, device=device)
    src_entry = torch.empty(n, dtype=torch.int32, device=device)
    kkey = torch.empty(n, dtype=kdt, device=device)
    q_offsets = torch.empty(H * Tq + 1, dtype=torch.int32, device=device)
    grid = (n_entry_blocks + triton.cdiv(H * Tq + 1, BLOCK),)
    _sorted_kernel[grid](skey, perm, entry_pos, src_entry, kkey, q_offsets, n, H * Tq + 1, Tq, Tk, steps,
                         BLOCK=BLOCK, KEY64=key64, num_warps=NUM_WARPS)

    skkey, kperm = torch.sort(kkey, stable=True)
    k_order = torch.empty(n, dtype=torch.int32, device=device)
    k_offsets = torch.empty(H * Tk + 1, dtype=torch.int32, device=device)
    grid = (n_entry_blocks + triton.cdiv(H * Tk + 1, BLOCK),)
    _korder_kernel[grid](kperm, skkey, k_order, k_offsets, n, H * Tk + 1, steps,
                         BLOCK=BLOCK, KEY64=key64, num_warps=NUM_WARPS)
    return entry_pos, src_entry, k_order, q_offsets, k_offsets
