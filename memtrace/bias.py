"""TraceBias: a sparse attention bias, indexed for the kernels.

Layout (built on the bias's device, no host round trip after validation):

    entries are the COO triples sorted by (head, q_idx, k_idx); duplicates stay adjacent and are
    merged into the first of their run (the "leader"), the others carry value 0 and so add nothing
    (exp(0) - 1 = 0 in the correction).

    entry_pos   int32 [E]          (q_idx << 16) | k_idx of each sorted entry (positions < 65536)
    src_entry   int32 [E]          for each COO entry (user order), the sorted leader it adds into
    k_order     int32 [E]          the sorted entries again, ordered by (head, k_idx, q_idx)
    q_offsets   int32 [H*Tq_max+1] entries of (h, i) are entry_pos[q_offsets[h*Tq_max+i] : ... +1]
    k_offsets   int32 [H*Tk_max+1] entries of (h, j) are k_order[k_offsets[h*Tk_max+j] : ... +1]

With the merged float32 values (`entry_values()`, differentiable w.r.t. `value`) that is 16 bytes an
entry plus the two offset tables. A program that owns query rows [m0, m1) of head h reads its
entries as the contiguous range q_offsets[h*Tq_max+m0] .. q_offsets[h*Tq_max+m1]; key blocks alike.
"""
from __future__ import annotations

import torch

from . import _validate as V


class TraceBias:
    """A sparse bias M over (query head, query, key): logits get `alpha * M[h, i, j]`."""

    def __init__(self, head, q_idx, k_idx, value, *, num_heads, seq_len_q, seq_len_k, _index=None, _index_rows=None):
        self.head = head
        self.q_idx = q_idx
        self.k_idx = k_idx
        self.value = value
        self.num_heads = num_heads
        self.seq_len_q = seq_len_q
        self.seq_len_k = seq_len_k
        # Query rows of the index (the kernels' Tq_max): seq_len_q, or more when value-0 padding
        # entries sit on rows past the stated shape (TraceMemory.bias's empty slots).
        self.index_rows = seq_len_q if _index_rows is None else _index_rows
        idx = _index if _index is not None else _build_index(head, q_idx, k_idx, num_heads, self.index_rows,
                                                             seq_len_k)
        self.entry_pos, self.src_entry, self.k_order, self.q_offsets, self.k_offsets = idx

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_coo(cls, head, q_idx, k_idx, value, *, num_heads, seq_len_q, seq_len_k) -> TraceBias:
        """Build from COO entries (1-D, equal length). Duplicate (h, i, j) entries add."""
        num_heads = V.check_int("num_heads", num_heads, low=1)
        seq_len_q = V.check_seq_len("seq_len_q", seq_len_q)
        seq_len_k = V.check_seq_len("seq_len_k", seq_len_k)
        V.check_tensor("head", head, ndim=1, integer=True)
        V.check_tensor("q_idx", q_idx, ndim=1, integer=True)
        V.check_tensor("k_idx", k_idx, ndim=1, integer=True)
        V.check_tensor("value", value, ndim=1, floating=True)
        n = head.shape[0]
        for name, t in (("q_idx", q_idx), ("k_idx", k_idx), ("value", value)):
            if t.shape[0] != n:
                raise ValueError(f"{name} must have {n} entries like head, got {t.shape[0]}")
        V.check_same_device(head=head, q_idx=q_idx, k_idx=k_idx, value=value)
        V.check_index_range("head", head, 0, num_heads)
        V.check_index_range("q_idx", q_idx, 0, seq_len_q)
        V.check_index_range("k_idx", k_idx, 0, seq_len_k)
        if value.dtype != torch.float32:
            value = value.float()
        V.check_finite("value", value.detach())   # after the cast: float64 past float32's range is Inf
        return cls(head.long(), q_idx.long(), k_idx.long(), value,
                   num_heads=num_heads, seq_len_q=seq_len_q, seq_len_k=seq_len_k)

    @classmethod
    def empty(cls, *, num_heads, seq_len_q, seq_len_k, device=None) -> TraceBias:
        z = torch.zeros(0, dtype=torch.long, device=device)
        return cls.from_coo(z, z, z, torch.zeros(0, device=device), num_heads=num_heads,
                            seq_len_q=seq_len_q, seq_len_k=seq_len_k)

    # -- views -------------------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.head.shape[0]

    @property
    def device(self) -> torch.device:
        return self.head.device

    def entry_values(self) -> torch.Tensor:
        """float32 [E]: the value of each sorted entry, duplicates summed into their leader."""
        # in place on fresh zeros with the int32 index: one kernel after the fill (the out-of-place
        # form with an int64 copy of the index was three, on every attention call)
        out = torch.zeros(self.nnz, dtype=torch.float32, device=self.device)
        return out.index_add_(0, self.src_entry, self.value.float())

    def entry_coords(self):
        """(head, q_idx, k_idx) int64 [E] of the sorted entries (followers repeat their leader's)."""
        h = _head_of_sorted(self.q_offsets, self.num_heads, self.index_rows, self.nnz)
        pos = self.entry_pos.long() & 0xFFFFFFFF
        return h, pos >> 16, pos & 0xFFFF

    @property
    def nbytes(self) -> int:
        """Bytes of the index and the merged values (the user's COO tensors are not counted)."""
        idx = (self.entry_pos, self.src_entry, self.k_order, self.q_offsets, self.k_offsets)
        return sum(t.numel() * t.element_size() for t in idx) + 4 * self.nnz

    def to_dense(self) -> torch.Tensor:
        """[H, seq_len_q, seq_len_k] float32; duplicates add. Reference and debugging only."""
        dense = torch.zeros(self.num_heads * self.seq_len_q * self.seq_len_k, dtype=torch.float32,
                            device=self.device)
        inside = self.q_idx < self.seq_len_q          # padding entries (rows past the shape) hold 0
        flat = (self.head * self.seq_len_q + self.q_idx) * self.seq_len_k + self.k_idx
        flat = torch.where(inside, flat, torch.zeros_like(flat))
        dense = dense.index_add(0, flat, torch.where(inside, self.value.float(), torch.zeros((), device=self.device)))
        return dense.view(self.num_heads, self.seq_len_q, self.seq_len_k)

    def detach(self) -> TraceBias:
        idx = (self.entry_pos, self.src_entry, self.k_order, self.q_offsets, self.k_offsets)
        return TraceBias(self.head, self.q_idx, self.k_idx, self.value.detach(), num_heads=self.num_heads,
                         seq_len_q=self.seq_len_q, seq_len_k=self.seq_len_k, _index=idx,
                         _index_rows=self.index_rows)

    def __repr__(self) -> str:
        return (f"TraceBias(nnz={self.nnz}, num_heads={self.num_heads}, seq_len_q={self.seq_len_q}, "
                f"seq_len_k={self.seq_len_k}, device={self.device})")


def _head_of_sorted(q_offsets, num_heads, seq_len_q, nnz):
    """Head of each sorted entry, from the offset table (no host sync)."""
    head_starts = q_offsets[: num_heads * seq_len_q : seq_len_q].long()
    pos = torch.arange(nnz, device=q_offsets.device)
    return torch.searchsorted(head_starts, pos, right=True) - 1


_TRITON_BUILDER = []  # [build_index or None], resolved on first CUDA use


def _tracing(t) -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


def _build_index(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k):
    """The index on the tensors' device, no host sync: on CUDA the Triton builder
    (memtrace.kernels.bias_index: 4 Triton launches and no sort for up to 2^18 entries averaging
    <= 4096 a head, else 3 launches + 2 int32 sorts), elsewhere (or where Triton cannot be
    imported) the pure-torch one. Both return the same tensors bit for bit. Under
    torch.compile or on fake tensors the torch builder runs too (traceable ops only)."""
    if head.is_cuda and not _tracing(head):
        if not _TRITON_BUILDER:
            try:
                from .kernels.bias_index import build_index
            except Exception:  # noqa: BLE001 - no usable Triton: the torch builder is correct, only slower
                build_index = None
            _TRITON_BUILDER.append(build_index)
        if _TRITON_BUILDER[0] is not None:
            return _TRITON_BUILDER[0](head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k)
    return _build_index_torch(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k)


def _build_index_torch(head, q_idx, k_idx, num_heads, seq_len_q, seq_len_k):
    """Sort COO entries both ways and build CSR offsets with eager torch ops (~35 launches, two
    int64 sorts), on the tensors' device. The reference for the Triton builder."""
    device = head.device
    n = head.shape[0]
    key_q = (head * seq_len_q + q_idx) * seq_len_k + k_idx
    key_q_sorted, perm_q = torch.sort(key_q, stable=True)
    # Leader of each run of equal keys: the first sorted position with that key.
    arange = torch.arange(n, device=device)
    is_leader = torch.ones(n, dtype=torch.bool, device=device)
    if n > 1:
        is_leader[1:] = key_q_sorted[1:] != key_q_sorted[:-1]
    leader = torch.where(is_leader, arange, torch.zeros_like(arange))
    if n:
        leader = torch.cummax(leader, dim=0).values
    src_entry = torch.empty(n, dtype=torch.int32, device=device)
    src_entry[perm_q] = leader.to(torch.int32)

    row_q = key_q_sorted // seq_len_k                     # h * Tq + i
    col_k = key_q_sorted - row_q * seq_len_k              # j
    i_sorted = row_q % seq_len_q
    entry_pos = ((i_sorted << 16) | col_k).to(torch.int32)  # wraps for i >= 32768; readers mask
    q_offsets = torch.searchsorted(row_q, torch.arange(num_heads * seq_len_q + 1, device=device))

    h_sorted = row_q // seq_len_q
    key_k = (h_sorted * seq_len_k + col_k) * seq_len_q + i_sorted
    key_k_sorted, k_order = torch.sort(key_k, stable=True)
    row_k = key_k_sorted // seq_len_q                     # h * Tk + j
    k_offsets = torch.searchsorted(row_k, torch.arange(num_heads * seq_len_k + 1, device=device))
    return (entry_pos, src_entry, k_order.to(torch.int32), q_offsets.to(torch.int32),
            k_offsets.to(torch.int32))
