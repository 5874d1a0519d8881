"""TraceBias: the sorted index against a brute-force reading of the COO entries, and bad input;
the Triton index builder (kernels/bias_index.py, under TRITON_INTERPRET=1 on the CPU) against the
pure-torch one, bit for bit."""
import pytest
import torch
from _helpers import DEV, assert_index_equal, bias_index_module

import memtrace as mt
from memtrace.bias import _build_index, _build_index_torch


def _random_coo(n, H, Tq, Tk, seed, dup=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, H, (n,), generator=g)
    i = torch.randint(0, Tq, (n,), generator=g)
    j = torch.randint(0, Tk, (n,), generator=g)
    if dup and n > 4:  # force a few duplicates
        h[-3:], i[-3:], j[-3:] = h[0], i[0], j[0]
    return h, i, j, torch.randn(n, generator=g)


@pytest.mark.parametrize("n,H,Tq,Tk", [(0, 2, 3, 4), (1, 1, 1, 1), (50, 3, 7, 5), (300, 4, 33, 65)])
def test_index_matches_brute_force(n, H, Tq, Tk):
    h, i, j, val = _random_coo(n, H, Tq, Tk, seed=n)
    b = mt.TraceBias.from_coo(h, i, j, val, num_heads=H, seq_len_q=Tq, seq_len_k=Tk)
    assert b.entry_pos.dtype == b.src_entry.dtype == b.k_order.dtype == torch.int32
    ev = b.entry_values()
    eh, ei, ej = b.entry_coords()
    # every row (h, i) of the q-ordered table holds exactly its entries, sorted by key
    for hh in range(H):
        for ii in range(Tq):
            lo, hi = b.q_offsets[hh * Tq + ii].item(), b.q_offsets[hh * Tq + ii + 1].item()
            assert (eh[lo:hi] == hh).all() and (ei[lo:hi] == ii).all()
            assert torch.equal(ej[lo:hi], torch.sort(ej[lo:hi]).values)
            assert hi - lo == int(((h == hh) & (i == ii)).sum())
        for jj in range(Tk):
            lo, hi = b.k_offsets[hh * Tk + jj].item(), b.k_offsets[hh * Tk + jj + 1].item()
            sel = b.k_order[lo:hi].long()
            assert (eh[sel] == hh).all() and (ej[sel] == jj).all()
    # merged values reproduce the dense bias: leaders hold sums, followers 0
    dense = torch.zeros(H, Tq, Tk).index_put_((eh, ei, ej), ev, accumulate=True)
    torch.testing.assert_close(dense, b.to_dense())
    follower = torch.zeros(n, dtype=torch.bool)
    if n > 1:
        follower[1:] = (eh[1:] == eh[:-1]) & (ei[1:] == ei[:-1]) & (ej[1:] == ej[:-1])
    assert torch.all(ev[follower] == 0)
    want_dense = torch.zeros(H, Tq, Tk, dtype=torch.float64).index_put_((h, i, j), val.double(), accumulate=True)
    torch.testing.assert_close(ev[~follower].double(), want_dense[eh[~follower], ei[~follower], ej[~follower]],
                               rtol=1e-6, atol=1e-6)
    # 16 bytes an entry plus the two offset tables
    assert b.nbytes == 16 * n + 4 * (H * Tq + 1) + 4 * (H * Tk + 1)


def test_entry_values_gradient_reaches_coo_values():
    h, i, j, val = _random_coo(40, 2, 5, 6, seed=3)
    val.requires_grad_()
    b = mt.TraceBias.from_coo(h, i, j, val, num_heads=2, seq_len_q=5, seq_len_k=6)
    weights = torch.randn(40)
    (b.entry_values() * weights).sum().backward()
    torch.testing.assert_close(val.grad, weights[b.src_entry.long()])


def test_large_positions_pack_and_unpack():
    T = 65535
    h = torch.tensor([0, 0])
    i = torch.tensor([T - 1, 40000])
    j = torch.tensor([T - 2, 3])
    b = mt.TraceBias.from_coo(h, i, j, torch.ones(2), num_heads=1, seq_len_q=T, seq_len_k=T)
    _, ei, ej = b.entry_coords()
    assert ei.tolist() == [40000, T - 1] and ej.tolist() == [3, T - 2]


GOOD = dict(num_heads=2, seq_len_q=4, seq_len_k=5)


@pytest.mark.parametrize("change,err,word", [
    (dict(head=torch.tensor([2])), ValueError, "head"),
    (dict(head=torch.tensor([-1])), ValueError, "head"),
    (dict(q_idx=torch.tensor([4])), ValueError, "q_idx"),
    (dict(k_idx=torch.tensor([5])), ValueError, "k_idx"),
    (dict(value=torch.tensor([float("nan")])), ValueError, "value"),
    (dict(value=torch.tensor([float("inf")])), ValueError, "value"),
    (dict(value=torch.tensor([1e300], dtype=torch.float64)), ValueError, "value"),   # Inf in float32
    (dict(head=torch.tensor([2], dtype=torch.uint64)), ValueError, "head"),
    (dict(k_idx=torch.tensor([5], dtype=torch.uint32)), ValueError, "k_idx"),
    (dict(value=torch.tensor([1.0, 2.0])), ValueError, "value"),
    (dict(q_idx=torch.tensor([[1]])), ValueError, "q_idx"),
    (dict(head=torch.tensor([0.0])), TypeError, "head"),
    (dict(value=torch.tensor([1])), TypeError, "value"),
    (dict(k_idx=[1]), TypeError, "k_idx"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(seq_len_q=70000), ValueError, "seq_len_q"),
    (dict(seq_len_k=0), ValueError, "seq_len_k"),
    (dict(seq_len_k=2.5), TypeError, "seq_len_k"),
])
def test_from_coo_bad_input(change, err, word):
    args = dict(head=torch.tensor([1]), q_idx=torch.tensor([3]), k_idx=torch.tensor([4]), value=torch.tensor([0.5]))
    kw = dict(GOOD)
    for key, value in change.items():
        (kw if key in kw else args)[key] = value
    with pytest.raises(err, match=word):
        mt.TraceBias.from_coo(args["head"], args["q_idx"], args["k_idx"], args["value"], **kw)


def test_from_coo_unsigned_indices():
    """uint16/32/64 indices (no min/max in torch) are range-checked like the others."""
    h, i, j = (torch.tensor([v], dtype=dt) for v, dt in ((1, torch.uint64), (3, torch.uint32), (4, torch.uint16)))
    b = mt.TraceBias.from_coo(h, i, j, torch.tensor([0.5]), **GOOD)
    assert b.to_dense()[1, 3, 4] == 0.5


# -- the Triton builder against the torch builder ---------------------------------------------------

def _assert_same_index(coo, H, Tq, Tk):
    pytest.importorskip("triton")
    h, i, j = (t.to(DEV) for t in coo)
    got = bias_index_module().build_index(h, i, j, H, Tq, Tk)
    assert_index_equal(got, _build_index_torch(h.long(), i.long(), j.long(), H, Tq, Tk))


@pytest.mark.parametrize("n,H,Tq,Tk,seed", [
    (0, 2, 3, 4, 0), (1, 1, 1, 1, 0), (1, 3, 5, 7, 1), (2, 1, 1, 1, 0),   # empty, one entry, one cell
    (50, 3, 7, 5, 2), (300, 4, 33, 65, 3), (1500, 2, 6, 3, 4),            # dense: long duplicate runs
    (2500, 5, 40, 17, 5),                                                  # several blocks of 1024
])
def test_triton_builder_matches_torch(n, H, Tq, Tk, seed):
    h, i, j, _ = _random_coo(n, H, Tq, Tk, seed)
    _assert_same_index((h, i, j), H, Tq, Tk)


def test_triton_builder_all_duplicates_and_int32_inputs():
    n = 1100
    z = torch.zeros(n, dtype=torch.int32)
    _assert_same_index((z + 1, z + 2, z + 3), 2, 4, 5)
    h, i, j, _ = _random_coo(700, 3, 9, 11, seed=7)
    _assert_same_index((h.int(), i.int(), j.int()), 3, 9, 11)


@pytest.mark.parametrize("H,Tq,Tk", [
    (1, 65535, 65535),   # H*Tq*Tk >= 2^31: int64 keys
    (1, 32768, 65535),   # just under 2^31: int32 keys up to 2^31 - 32768 - 1, i >= 32768 wraps
    (2, 65535, 7),       # int32 keys, large positions only in i
])
def test_triton_builder_large_positions(H, Tq, Tk):
    g = torch.Generator().manual_seed(H * Tq + Tk)
    n = 40
    h = torch.randint(0, H, (n,), generator=g)
    i = torch.randint(0, Tq, (n,), generator=g)
    j = torch.randint(0, Tk, (n,), generator=g)
    i[:4] = torch.tensor([Tq - 1, Tq - 1, 32767, 32768]).clamp(max=Tq - 1)
    j[:4] = torch.tensor([Tk - 1, Tk - 1, 0, Tk - 1])
    h[:4] = H - 1
    _assert_same_index((h, i, j), H, Tq, Tk)


def _brute_force_index(h, i, j, H, Tq, Tk):
    """The five index tensors from plain Python sorting (independent of both builders)."""
    h, i, j = h.tolist(), i.tolist(), j.tolist()
    n = len(h)
    q_sorted = sorted(range(n), key=lambda e: (h[e], i[e], j[e], e))          # stable by (h, i, j)
    leader = {}
    for r, e in enumerate(q_sorted):
        leader.setdefault((h[e], i[e], j[e]), r)
    entry_pos = [((i[e] << 16) | j[e]) for e in q_sorted]
    entry_pos = [p - (1 << 32) if p >= 1 << 31 else p for p in entry_pos]    # int32 wrap
    src_entry = [leader[(h[e], i[e], j[e])] for e in range(n)]
    k_order = sorted(range(n), key=lambda r: (h[q_sorted[r]], j[q_sorted[r]], i[q_sorted[r]], r))
    q_rows = [h[e] * Tq + i[e] for e in q_sorted]
    k_rows = [h[q_sorted[r]] * Tk + j[q_sorted[r]] for r in k_order]
    q_offsets = [sum(x < row for x in q_rows) for row in range(H * Tq + 1)]
    k_offsets = [sum(x < row for x in k_rows) for row in range(H * Tk + 1)]
    return tuple(torch.tensor(t, dtype=torch.int32) for t in (entry_pos, src_entry, k_order, q_offsets, k_offsets))


def test_build_index_dispatch_matches_torch():
    """_build_index (Triton on CUDA, torch elsewhere) agrees with the torch builder on DEV and with
    a brute-force index (on the CPU both sides would otherwise be the torch builder)."""
    h, i, j, _ = _random_coo(600, 4, 21, 19, seed=11)
    want = _brute_force_index(h, i, j, 4, 21, 19)
    h, i, j = h.to(DEV), i.to(DEV), j.to(DEV)
    got = _build_index(h, i, j, 4, 21, 19)
    names = ("entry_pos", "src_entry", "k_order", "q_offsets", "k_offsets")
    for name, g, t, w in zip(names, got, _build_index_torch(h, i, j, 4, 21, 19), want):
        assert torch.equal(g, t), name
        assert torch.equal(g.cpu(), w), name


def test_memory_bias_states_the_memory_shape():
    """A TraceMemory of length T gives a bias of shape [H, T, T] (its empty slots' padding row is
    internal to the index), and that bias runs in attention exactly like the same traces as COO."""
    T, H = 12, 2
    mem = mt.TraceMemory(1, H, quota=5, threshold=0.0, max_seq_len=T)
    S = torch.zeros(H, T, T)
    S[0, 3, 1], S[1, 11, 11], S[1, 0, 0] = 1.0, 2.0, 0.5
    mem.update_dense(0, S, torch.ones(H, T, T))
    bias = mem.bias(0)
    assert (bias.num_heads, bias.seq_len_q, bias.seq_len_k) == (H, T, T)
    dense = bias.to_dense()
    assert dense.shape == (H, T, T)
    h, q, k, strength = mem.traces(0)[:4]
    want = torch.zeros(H, T, T)
    want[h, q, k] = strength
    torch.testing.assert_close(dense, want)
    g = torch.Generator().manual_seed(5)
    qq, kk, vv = (torch.randn(1, H, T, 16, generator=g) for _ in range(3))
    coo = mt.TraceBias.from_coo(h, q, k, strength, num_heads=H, seq_len_q=T, seq_len_k=T)
    got = mt.biased_attention(qq, kk, vv, bias, backend="reference")
    ref = mt.biased_attention(qq, kk, vv, coo, backend="reference")
    torch.testing.assert_close(got, ref)
