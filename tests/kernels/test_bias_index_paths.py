"""kernels/bias_index.build_index: both GPU paths (the small-index chunk-sort path without torch.sort,
and the torch.sort path) against the torch builder, bit for bit, under TRITON_INTERPRET=1 on the CPU
(on CUDA directly). Shapes aim at the chunk-sort path's edges: heads split into several chunks,
duplicate runs across chunk boundaries, empty heads, more heads than histogram bins of a block."""
from __future__ import annotations

import pytest
import torch
from _helpers import DEV, assert_index_equal, bias_index_module
from memtrace.kernels import settings

from memtrace.bias import _build_index_torch


def _coo(n, H, Tq, Tk, seed, head_probs=None):
    g = torch.Generator().manual_seed(seed)
    if head_probs is None:
        h = torch.randint(0, H, (n,), generator=g)
    else:
        h = torch.multinomial(torch.tensor(head_probs, dtype=torch.float), n, replacement=True, generator=g)
    i = torch.randint(0, Tq, (n,), generator=g)
    j = torch.randint(0, Tk, (n,), generator=g)
    return h.to(DEV), i.to(DEV), j.to(DEV)


def _check(method, h, i, j, H, Tq, Tk):
    got = bias_index_module().build_index(h, i, j, H, Tq, Tk, method=method)
    assert_index_equal(got, _build_index_torch(h.long(), i.long(), j.long(), H, Tq, Tk))


@pytest.mark.parametrize("method", ["fast", "sort"])
@pytest.mark.parametrize("n,H,Tq,Tk,seed,probs", [
    (1, 1, 1, 1, 0, None),
    (2, 1, 1, 1, 1, None),                                   # one cell, a duplicate
    (100, 3, 7, 5, 2, None),
    (600, 8, 9, 7, 3, [0.8] + [0.2 / 6] * 6 + [0.0]),        # one head of ~4 chunks, an empty head
    (300, 40, 13, 11, 4, None),                              # 40 heads: 64 histogram bins
    (700, 2, 3, 2, 5, [0.0, 1.0]),                           # 6 cells: runs of ~115 cross chunks
])
def test_paths_match_torch(method, n, H, Tq, Tk, seed, probs):
    _check(method, *_coo(n, H, Tq, Tk, seed, probs), H, Tq, Tk)


def test_fast_path_large_positions():
    h, i, j = _coo(64, 2, 65535, 65535, 6)
    i[:4] = torch.tensor([65534, 65534, 32767, 32768])
    j[:4] = torch.tensor([65534, 0, 65534, 65534])
    _check("fast", h, i, j, 2, 65535, 65535)


def test_dispatch_sizes():
    """The benchmark's small shape takes the sort-free path; large or head-heavy ones the sort path."""
    mod = bias_index_module()
    assert mod._fast_ok(32 * 2048, 32)
    assert not mod._fast_ok(32 * 16384, 32)          # > 2^18 entries
    assert not mod._fast_ok(65536, 1)                # 65536 entries in one head: many chunks
    assert not mod._fast_ok(0, 4)


def test_env_forces_the_sort_path(monkeypatch):
    """settings bias_index_method picks the path; a bad value is a ValueError naming the setting."""
    bi = bias_index_module()
    n, H, T = 40, 2, 32
    args = (*_coo(n, H, T, T, seed=5), H, T, T)
    ran = []
    for name in ("_build_index_fast", "_build_index_sorted"):
        real = getattr(bi, name)
        monkeypatch.setattr(bi, name, lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    a = bi.build_index(*args)                       # unset: the small index takes the fast path
    assert ran == ["_build_index_fast"]
    with settings.override(bias_index_method="sort"):
        b = bi.build_index(*args)
    assert ran[1:] == ["_build_index_sorted"]
    with settings.override(bias_index_method="fast"):
        c = bi.build_index(*args, method="sort")    # an explicit method wins over the setting
    assert ran[2:] == ["_build_index_sorted"]
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(ValueError, match="bias_index_method"):
        with settings.override(bias_index_method="quick"):
            bi.build_index(*args)
    assert settings.current().bias_index_method == "fast"
