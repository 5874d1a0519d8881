"""The Triton trace-update kernels (interpreted) against the PyTorch path, bit for bit, on
workloads that reach every branch of the select kernel: over quota with many new traces (several
chunks), strengths spread over many float64 exponents or all equal (the (i, j) tie-break digits),
an empty memory filling up, and steps with no new trace kept."""
import os

import pytest
import torch

import memtrace as mt

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")


def _pair(**kw):
    tri, tor = mt.TraceMemory(**kw), mt.TraceMemory(**kw)
    tri.backend, tor.backend = "triton", "torch"
    return tri, tor


def _step(tri, tor, g, layers, C, T, H, Q, kind, direct):
    B = len(layers)
    cells = H * T * T
    key = torch.stack([torch.randperm(cells, generator=g)[:C] for _ in range(B)])
    head, pos = key // (T * T), key % (T * T)
    if kind == "wide":        # many exponents: the select starts high in the key bits
        S = torch.exp(-12 * torch.rand(B, C, generator=g))
    elif kind == "equal":     # one strength for all: the tie-break (key_lo) digits decide
        S = torch.full((B, C), 0.5)
    else:                     # a few values: exact ties between new and stored traces
        S = torch.tensor([0.1, 0.3, 0.3, 1.0])[torch.randint(0, 4, (B, C), generator=g)]
    a = torch.where(torch.rand(B, C, generator=g) < 0.8, 0.5, 0.0)
    args = (layers, head.int(), (pos // T).int(), (pos % T).int(), S, a)
    kw = {}
    if direct:
        kw = {"trace_salience": torch.rand(B, H, Q, generator=g) * (torch.rand(B, H, Q, generator=g) < 0.5),
              "trace_attn": torch.rand(B, H, Q, generator=g)}
    tri.update_edges(*args, **kw)
    tor.update_edges(*args, **kw)
    assert torch.equal(tri.meta, tor.meta)
    assert torch.equal(tri.strength, tor.strength)


@pytest.mark.parametrize("kind", ["wide", "equal", "ties"])
@pytest.mark.parametrize("Q", [16, 48])
def test_select_matches_torch_path(kind, Q):
    H, T, L = 2, 12, 2
    tri, tor = _pair(num_layers=L, num_heads=H, quota=Q, retention=0.6, decay=0.9, threshold=0.01,
                     prune_eps=1e-5, window=4, max_seq_len=T)
    g = torch.Generator().manual_seed(Q + len(kind))
    # first step fills an empty memory with more new traces than BLOCK_N (several chunks)
    for step in range(5):
        C = 5 * Q if step == 0 else Q // 2 + step * Q // 3
        _step(tri, tor, g, [0, 1] if step % 2 == 0 else [1], C, T, H, Q, kind, direct=step % 2 == 1)
    assert tri.num_traces() > 0


def test_select_no_new_trace_kept():
    """New candidates weaker than every stored trace: the stored ones stay in place."""
    H, T, Q = 1, 8, 8
    tri, tor = _pair(num_layers=1, num_heads=H, quota=Q, retention=0.5, decay=0.99, threshold=0.01,
                     prune_eps=1e-6, window=4, max_seq_len=T)
    g = torch.Generator().manual_seed(0)
    _step(tri, tor, g, [0], Q, T, H, Q, "ties", direct=False)
    for _ in range(2):
        key = torch.randperm(H * T * T, generator=g)[:3 * Q].view(1, -1)
        S = torch.full(key.shape, 0.02)
        args = ([0], (key // (T * T)).int(), (key % (T * T) // T).int(), (key % T).int(), S, torch.ones_like(S))
        tri.update_edges(*args)
        tor.update_edges(*args)
        assert torch.equal(tri.meta, tor.meta)
        assert torch.equal(tri.strength, tor.strength)


def test_select_full_quota_2048():
    """The launch configuration of the benchmark's quota (8 warps, 2 chunks of new traces)."""
    H, T, Q = 1, 64, 2048
    tri, tor = _pair(num_layers=1, num_heads=H, quota=Q, retention=0.7, decay=0.9, threshold=0.01,
                     prune_eps=1e-6, window=8, max_seq_len=T)
    g = torch.Generator().manual_seed(5)
    for step, kind in enumerate(("ties", "wide")):
        _step(tri, tor, g, [0], 3000, T, H, Q, kind, direct=step == 1)
        assert tri.num_traces() == Q          # over quota: the radix select ran
