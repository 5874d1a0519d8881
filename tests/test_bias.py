"""TraceBias: the sorted index against a brute-force reading of the COO entries, and bad input."""
import pytest
import torch

import memtrace as mt


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
