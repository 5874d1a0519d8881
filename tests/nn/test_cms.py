"""mt.nn.CMSMemory (SPEC 13): the module against the float64 reference (memtrace/reference/cms.py),
the Triton scan (kernels/cms.py, interpreted) forward and backward, chunked runs, the seed's
properties (bounded norm, decay, saturation), bad input, and the sm_90 compile of the kernels."""
import os
import sys
from pathlib import Path

import pytest
import torch
from _helpers import rel_err

import memtrace as mt
from memtrace.reference import cms as R

INTERP = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
LEVELS = [(4, 6, 0.3), (6, 5, 0.1), (8, 7, 0.02)]
MODES = ("content", "lru", "hybrid")


def _module(addressing="content", backend="torch", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = mt.nn.CMSMemory(5, LEVELS, 3, addressing, d_context=4, backend=backend, hybrid_weight=0.3, **kw)
    return m.to(dtype)


def _params(m):
    return {n: p.detach().double().clone().requires_grad_() for n, p in m.named_parameters()}


def _oracle(m, x, **kw):
    p = _params(m)
    out, st = R.cms(x.double(), p, m.levels, addressing=m.addressing, hybrid_weight=m.hybrid_weight, **kw)
    return out, st, p


@pytest.mark.parametrize("addressing", MODES)
def test_torch_backend_matches_reference(addressing):
    m = _module(addressing)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    out, st = m(x)
    ref, rst, _ = _oracle(m, x)
    assert rel_err(out, ref) < 1e-12
    for a, b in zip(st.memory + st.keys + st.usage, rst[0] + rst[1] + rst[2]):
        assert rel_err(a, b) < 1e-12


@INTERP
@pytest.mark.parametrize("addressing", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_backward_matches_reference(addressing, dtype):
    m = _module(addressing, "triton", dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 5, generator=g).to(dtype).requires_grad_()
    out, st = m(x)
    ref, rst, p = _oracle(m, x.detach().double().requires_grad_())
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(out, ref) < tol
    for a, b in zip(st.memory + st.keys, rst[0] + rst[1]):
        assert rel_err(a, b) < tol
    dout = torch.randn(out.shape, generator=g)
    loss = (out.float() * dout).sum() + sum((M.float() ** 2).sum() for M in st.memory) + st.keys[-1].float().sum()
    loss.backward()
    rloss = (ref * dout.double()).sum() + sum((M ** 2).sum() for M in rst[0]) + rst[1][-1].sum()
    names = list(p)
    grads = torch.autograd.grad(rloss, [p[n] for n in names])
    params = dict(m.named_parameters())
    for n, gr in zip(names, grads):
        assert rel_err(params[n].grad, gr, 1e-3) < 10 * tol, n


@INTERP
def test_triton_scan_gradcheck_float64():
    """Hybrid addressing: the backward's content and LRU paths at once (the others: the parity test)."""
    from memtrace.nn.cms import _ScanTriton
    g = torch.Generator().manual_seed(2)
    B, T, N, D, DK = 1, 4, 3, 2, 2
    q, k = (torch.randn(B, T, DK, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    M = torch.randn(B, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(B, N, DK, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.rand(B, N, generator=g, dtype=torch.float64)

    def f(q, k, v, gate, M, K):
        c, M1, K1, _ = _ScanTriton.apply(q, k, v, gate, M, K, u, 0.2, "hybrid", 0.4)
        return c, M1, K1

    assert torch.autograd.gradcheck(f, (q, k, v, gate, M, K), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERP)])
def test_chunks_chain_exactly(backend):
    m = _module("hybrid", backend, torch.float32 if backend == "triton" else torch.float64)
    x = torch.randn(2, 9, 5, dtype=next(m.parameters()).dtype)
    whole, st = m(x)
    a, st_a = m(x[:, :4])
    b, st_b = m(x[:, 4:], st_a)
    tol = 1e-6 if backend == "triton" else 1e-12
    assert rel_err(torch.cat([a, b], 1), whole) < tol
    for u, w in zip(st_b.memory + st_b.keys + st_b.usage + (st_b.fast,), st.memory + st.keys + st.usage + (st.fast,)):
        assert rel_err(u, w) < tol


def test_fast_state_input():
    m = _module()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    s = torch.randn(2, 5, 5, dtype=torch.float64)
    out, st = m(x, fast_state=s)
    ref, _, _ = _oracle(m, x, fast_state=s)
    assert rel_err(out, ref) < 1e-12 and torch.equal(st.fast, s[:, -1])
    assert rel_err(m(x)[0], out) > 1e-6     # the fast state matters


# ---- the seed's properties (section 5) ----------------------------------------------------------

@pytest.mark.parametrize("addressing", MODES)
def test_bounded_norm_theorem(addressing):
    g = torch.Generator().manual_seed(3)
    B, T, N, D, DK, decay = 3, 300, 5, 4, 3, 0.05
    M = torch.randn(B, N, D, generator=g, dtype=torch.float64) * 0.1
    K = torch.randn(B, N, DK, generator=g, dtype=torch.float64)
    u = torch.zeros(B, N, dtype=torch.float64)
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 3
    v_max = v.norm(dim=-1).max().item()
    bound = [R.cms_norm_bound(M[b].norm(), v_max, N, decay) for b in range(B)]
    tight = [max(M[b].norm().item(), v_max / decay) for b in range(B)]     # ||w||_2 <= 1: sqrt(N) is slack
    gate = torch.ones(B, T, dtype=torch.float64)       # g = 1: the hardest case the theorem allows
    q, k = (torch.randn(B, T, DK, generator=g, dtype=torch.float64) for _ in range(2))
    for t in range(T):
        _, M, K, u = R.cms_step(M, K, u, q[:, t], k[:, t], v[:, t], gate[:, t], decay, addressing)
        for b in range(B):
            assert M[b].norm().item() <= min(bound[b], tight[b]) * (1 + 1e-12)


def test_module_norm_stays_bounded():
    m = _module("content")
    x = torch.randn(2, 40, 5, dtype=torch.float64) * 5
    _, st = m(x)
    for i, M in enumerate(st.memory):
        v_max = m.values[i].weight.norm().item()      # ||V z|| <= ||V||_F ||z|| and |tanh| <= 1 per entry
        v_max *= m.d_event ** 0.5
        for b in range(2):
            assert M[b].norm().item() <= m.norm_bound(i, 0.0, v_max)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERP)])
def test_decay_to_zero_without_writes(backend):
    g = torch.Generator().manual_seed(4)
    B, T, N, D, DK, decay = 2, 50, 4, 3, 2, 0.1
    M0 = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    K0 = torch.randn(B, N, DK, generator=g, dtype=torch.float64)
    q, k = (torch.randn(B, T, DK, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    zero = torch.zeros(B, T, dtype=torch.float64)
    u = torch.zeros(B, N, dtype=torch.float64)
    if backend == "torch":
        _, M, K, _ = R.cms_scan(q, k, v, zero, M0, K0, u, decay)
    else:
        from memtrace.kernels import cms as KC
        _, M, K, _, _ = KC.cms_scan_fwd(q, k, v, zero, M0, K0, u, decay)
    assert torch.allclose(M, (1 - decay) ** T * M0, rtol=1e-10, atol=0)
    assert torch.allclose(K, (1 - decay) ** T * K0, rtol=1e-10, atol=0)
    assert M.norm() < 0.01 * M0.norm()


def test_write_saturation():
    """Constant g, v and address (K = 0, k = 0: uniform content weights): M -> (g / d) (w v^T)."""
    B, T, N, D, DK, decay, gval = 1, 2000, 4, 3, 2, 0.02, 0.7
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).expand(B, T, D)
    zeros = torch.zeros(B, T, DK, dtype=torch.float64)
    gate = torch.full((B, T), gval, dtype=torch.float64)
    M = torch.zeros(B, N, D, dtype=torch.float64)
    K = torch.zeros(B, N, DK, dtype=torch.float64)
    _, M, _, _ = R.cms_scan(zeros, zeros, v, gate, M, K, torch.zeros(B, N, dtype=torch.float64), decay)
    w = torch.full((N,), 1.0 / N, dtype=torch.float64)
    assert torch.allclose(M[0], gval / decay * torch.outer(w, v[0, 0]), rtol=1e-12)


def test_lru_writes_cycle_through_slots():
    B, N, D, DK = 1, 4, 2, 2
    M, K, u = torch.zeros(B, N, D), torch.zeros(B, N, DK), torch.zeros(B, N)
    written = []
    for _ in range(N):
        w = R.cms_write_weights(K, u, torch.zeros(B, DK), "lru")
        written.append(int(w.argmax()))
        _, M, K, u = R.cms_step(M, K, u, torch.zeros(B, DK), torch.zeros(B, DK), torch.ones(B, D),
                                torch.ones(B), 0.1, "lru")
    assert written == list(range(N))


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels, match", [
    ([(4, 4, 0.1), (8, 4, 0.1)], "decrease"),
    ([(4, 4, 0.05), (8, 4, 0.1)], "decrease"),
    ([(4, 4, 0.0)], r"decay must be in \(0, 1\)"),
    ([(4, 4, 1.0)], r"decay must be in \(0, 1\)"),
    ([(4, 4, -0.5)], r"decay must be in \(0, 1\)"),
    ([(0, 4, 0.1)], "slots must be >= 1"),
    ([(4, 0, 0.1)], "dim must be >= 1"),
    ([], "non-empty"),
    ([(4, 4)], r"\(slots, dim, decay\)"),
])
def test_bad_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        mt.nn.CMSMemory(4, levels, 2)


def test_bad_arguments_and_state():
    with pytest.raises(ValueError, match="addressing"):
        mt.nn.CMSMemory(4, [(4, 4, 0.1)], 2, addressing="random")
    m = _module()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    _, st = m(x)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state.memory\[0\] must have shape"):
        m(torch.randn(3, 3, 5, dtype=torch.float64), st)         # batch mismatch
    bad = st._replace(keys=st.keys[:2])
    with pytest.raises(ValueError, match="state.keys must hold 3"):
        m(x, bad)
    bad = st._replace(usage=(st.usage[0], st.usage[1], st.usage[2][:, :3]))
    with pytest.raises(ValueError, match=r"state.usage\[2\]"):
        m(x, bad)
    with pytest.raises(ValueError, match="state must be the CMSState"):
        m(x, (1, 2))
    with pytest.raises(ValueError, match="fast_state must have shape"):
        m(x, fast_state=torch.randn(2, 2, 5, dtype=torch.float64))


# ---- sm_90 compile (real Triton frontend + ptxas, no GPU), as tests/kernels/test_kernels_compile.py --

SIZES = [(64, 64), (256, 128), (1024, 256)]      # the seed's suggested levels; d_k 64


def test_cms_kernels_compile_for_h100(tmp_path):
    import _sm90
    kernels = _sm90.run_compile_worker(__file__, tmp_path)
    names = {(x["kernel"], x["constexprs"]["MODE"], x["constexprs"]["BN"]) for x in kernels}
    for kern in ("_cms_scan_fwd_kernel", "_cms_scan_bwd_kernel"):
        for mode in (0, 1, 2):
            assert (kern, mode, 64) in names
        for n, _ in SIZES:
            assert (kern, 0, n) in names or (kern == "_cms_scan_bwd_kernel" and n == 1024)
    for x in kernels:
        assert "cubin" in x["stages"], x


def _compile_worker(report_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: _sm90
    import _sm90

    def launch():
        from memtrace.kernels import cms as KC
        B, T, DK = 2, 16, 64
        for (N, D), modes in zip(SIZES, [("content", "lru", "hybrid"), ("content",), ("content",)]):
            for mode in modes:
                q, k = torch.randn(B, T, DK), torch.randn(B, T, DK)
                v, g = torch.randn(B, T, D), torch.rand(B, T)
                M, K, u = torch.zeros(B, N, D), torch.randn(B, N, DK), torch.zeros(B, N)
                KC.cms_scan_fwd(q, k, v, g, M, K, u, 0.1, mode, 0.5, chunk=4)
                if N == 1024:       # its backward compiles too (~50 s of ptxas, 14 KB spilled/thread): skipped
                    continue
                ck = (torch.zeros(B, 4, N, D), torch.zeros(B, 4, N, DK), torch.zeros(B, 4, N))
                KC.cms_scan_bwd(q, k, v, g, ck, torch.zeros(B, T, D), M, K, 0.1, mode, 0.5, chunk=4)

    _sm90.compile_report(report_path, launch)


if __name__ == "__main__":
    _compile_worker(sys.argv[1])
