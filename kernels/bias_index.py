"""The TraceBias index on the GPU: the same tensors as memtrace.bias._build_index_torch, bit for bit,
in 3 small Triton launches and 2 int32 radix sorts, with no host sync.

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

Predicted H100 cost at 32 heads x 2048 entries (E = 65536), T = 4096 (H*T + 1 = 131073 rows):
    * each torch.sort (1-D, > 4096 elements, stable): an index fill + cub DeviceRadixSort::SortPairs
      on 32-bit keys (onesweep: histogram, scan, 4 digit passes of 8 bits), ~6-8 kernels of
      ~2-3 us each on 65536 keys: ~15-20 us each (the int64 sorts of the torch builder run 8
      digit passes).
    * _keys_kernel: 64 programs, 1.5 MiB read: ~3 us.
    * _sorted_kernel: 64 + 129 programs, 17-step binary searches in a 256 KiB (L2) array: ~5 us.
    * _korder_kernel: 64 + 129 programs, same: ~5 us.
  ~45-55 us of GPU time, 3 Triton launches + 2 sorts on the host side (~60-80 us of Python /
  launch overhead when called back to back with nothing else queued). At 16384 entries/head
  (E = 524288) the sorts grow to ~30-40 us each (4 passes over 4 MiB of key/value pairs):
  ~80-100 us. The torch builder: ~35 launches including two int64 sorts, cummax and two
  searchsorted over 131073 queries: 0.77-0.97 ms measured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def build_index(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k):
    """(entry_pos, src_entry, k_order, q_offsets, k_offsets), as memtrace.bias._build_index_torch
    returns them, bit for bit. No host sync: every size used here is a tensor shape."""
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
